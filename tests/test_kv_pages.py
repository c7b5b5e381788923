"""Tests of memory/kv_pages.py: a store's K/V in memory-mapped scratch pages."""

from __future__ import annotations

import os

import pytest
import torch

from memstack.memory.store.chunk_store import ChunkStore
from tests.test_store import DIM, fill


def _mapped_pages() -> list[str]:
    """Memory mappings of K/V scratch pages in this process (Linux ``/proc/self/maps``)."""
    return [line for line in open("/proc/self/maps").read().splitlines() if "memstack-kv-" in line]


def _storage_is_a_page(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage lies inside a mapped ``memstack-kv-`` file rather than the heap."""
    ptr = t.untyped_storage().data_ptr()
    for line in _mapped_pages():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_kv_on_disk_pages_equal_kv_in_ram_through_eviction_and_save(tmp_path):
    """K/V kept in memory-mapped pages read back exactly as in RAM, and are file-backed, not heap."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = dict(max_records=300, eviction="fifo", kv_dtype=torch.bfloat16)
    ram = ChunkStore([0, 2], DIM, **args)
    disk = ChunkStore([0, 2], DIM, kv_dir=scratch, kv_page_tokens=64, **args)
    fill(ram, 700, kv=True)  # 400 evicted: the 256-dead compaction ran at least once
    fill(disk, 700, kv=True)
    assert not list(scratch.iterdir()), "page files are unlinked once mapped: a crash leaves none"
    ids = disk.ids()
    assert torch.equal(ids, ram.ids()) and len(ids) == 300
    for layer in (0, 2):
        k_r, v_r, len_r = ram.kv(layer, ids)
        k_d, v_d, len_d = disk.kv(layer, ids)
        assert torch.equal(len_r, len_d) and torch.equal(k_r, k_d) and torch.equal(v_r, v_d)
        row = disk._rows_of(ids[:1])[0]
        assert _storage_is_a_page(disk._kv[layer][row][0])
        assert not _storage_is_a_page(ram._kv[layer][row][0])
    disk.save(tmp_path / "s")
    again = ChunkStore.load(tmp_path / "s", kv_dir=scratch)
    back = ChunkStore.load(tmp_path / "s")  # K/V location is per process: RAM unless asked
    for store in (again, back):
        for layer in (0, 2):
            assert torch.equal(store.kv(layer, ids)[0], ram.kv(layer, ids)[0])
    assert _storage_is_a_page(again._kv[0][again._rows_of(ids[:1])[0]][0])
    assert not _storage_is_a_page(back._kv[0][back._rows_of(ids[:1])[0]][0])


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_kv_pages_are_unmapped_once_their_chunks_are_evicted(tmp_path):
    """Pages whose chunks were all evicted leave the address space (the kernel frees the disk)."""
    import gc

    store = ChunkStore([0], DIM, kv_dir=tmp_path, kv_page_tokens=32, max_records=20, eviction="fifo")
    before = len(_mapped_pages())
    fill(store, 2000, kv=True)  # ~12K tokens through 32-token pages: hundreds of pages created
    gc.collect()
    created = store._kv_pages[0].pages_created
    live = len(_mapped_pages()) - before
    assert created > 300
    assert live <= 20 + 2, f"{live} of {created} pages still mapped for 20 live records"
    del store
    gc.collect()
    assert len(_mapped_pages()) == before


def test_values_may_be_wider_than_keys_in_ram_in_pages_and_saved(tmp_path):
    # DeepSeek's MLA: D_v != D_k. Every place K/V live must keep each at its own width.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    g = torch.Generator().manual_seed(3)
    lengths = [3, 5, 4]
    k = [torch.randn(2, n, 4, generator=g) for n in lengths]
    v = [torch.randn(2, n, 6, generator=g) for n in lengths]
    keys = {0: (torch.randn(3, DIM, generator=g), torch.arange(3))}
    toks = [torch.arange(n) for n in lengths]
    stores = [ChunkStore([0], DIM, kv_dtype=torch.float32, **kw) for kw in ({}, {"kv_dir": scratch})]
    for i, store in enumerate(stores):
        ids = store.add(toks, [0, 3, 8], 0, keys, kv={0: (k, v)}, time=0.0)
        store.save(tmp_path / f"saved{i}")
    loaded = [ChunkStore.load(tmp_path / f"saved{i}") for i in range(2)]
    for store in stores + loaded:
        k_out, v_out, got = store.kv(0, ids)
        assert k_out.shape == (3, 2, 5, 4) and v_out.shape == (3, 2, 5, 6)
        for i, n in enumerate(lengths):
            assert torch.equal(k_out[i, :, :n], k[i]) and torch.equal(v_out[i, :, :n], v[i])
    with pytest.raises(ValueError, match="same heads and length"):
        stores[0].add(toks[:1], [20], 1, {}, kv={0: ([k[0]], [v[0][:1]])}, time=1.0)
