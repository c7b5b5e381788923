"""Where a store's K/V live: in RAM, or in memory-mapped pages on disk once a store is large.

A stored chunk's K/V are ``(H_kv, L, D_k)`` and ``(H_kv, L, D_v)`` tensors in ``kv_dtype``. In RAM
that is 534 bytes per token and layer for the tiny benchmark model, so a million-token stream holds
about half a GiB per store layer; a 7B model's is 100x that. :class:`KVPages` keeps them instead in
fixed-size pages of a memory-mapped scratch file, so the kernel can write cold chunks out and read
hot ones back on demand; the store keeps *views* into the pages and every reader (``ChunkStore.kv``,
``save``) works unchanged.

Why each page file is unlinked right after it is mapped: the mapping stays valid (POSIX), the
disk space is reclaimed by the kernel when the last view of the page dies (eviction and
compaction drop views, so nothing needs reference counting here), and a crash leaves no scratch
files behind. The scratch pages are a cache, not persistence: ``ChunkStore.save`` writes the K/V
into the store directory like any other array.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# numpy has no bfloat16: pages are mapped as same-width integers and viewed as the torch dtype.
_STORAGE = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}


class KVPages:
    """Append-only K/V pages of one store layer, in memory-mapped scratch files.

    Args:
        directory: where the scratch files are created (a fast local disk); it must exist.
        dtype: ``torch.bfloat16``, ``torch.float16`` or ``torch.float32``.
        page_tokens: tokens per page; a chunk longer than a page gets a page of its own.
    """

    def __init__(self, directory: str | Path, dtype: torch.dtype, page_tokens: int = 16384) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"kv_dir={str(directory)!r} is not an existing directory")
        if dtype not in _STORAGE:
            raise ValueError(f"dtype={dtype!r}: expected one of {list(_STORAGE)}")
        if int(page_tokens) < 1:
            raise ValueError(f"page_tokens={page_tokens!r}: expected an int >= 1")
        self.directory = directory
        self.dtype = dtype
        self.page_tokens = int(page_tokens)
        self._page: torch.Tensor | None = None  # (H, P, D_k + D_v) view of the page being filled
        self._key_dim = 0
        self._used = 0
        self.pages_created = 0

    def _new_page(self, h: int, tokens: int, d: int) -> torch.Tensor:
        fd, name = tempfile.mkstemp(prefix="memstack-kv-", suffix=".bin", dir=self.directory)
        os.close(fd)
        try:
            mm = np.memmap(name, dtype=_STORAGE[self.dtype], mode="w+", shape=(h, tokens, d))
        finally:
            os.unlink(name)  # the mapping outlives the name; the kernel frees it with the last view
        self.pages_created += 1
        return torch.from_numpy(mm).view(self.dtype)

    def put(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy one chunk's ``K (H, L, D_k)`` and ``V (H, L, D_v)`` into the pages (side by side
        in the last dimension); return views of the copies."""
        h, length, dk = k.shape
        d = dk + v.shape[2]
        if length > self.page_tokens:
            page, lo = self._new_page(h, length, d), 0
        else:
            page = self._page
            fits = page is not None and page.shape[0] == h and page.shape[2] == d and self._key_dim == dk
            if not fits or self._used + length > self.page_tokens:
                self._page, self._used, self._key_dim = self._new_page(h, self.page_tokens, d), 0, dk
            page, lo = self._page, self._used
            self._used += length
        rows = page[:, lo : lo + length]
        rows[..., :dk] = k.to(self.dtype)
        rows[..., dk:] = v.to(self.dtype)
        return rows[..., :dk], rows[..., dk:]


class StoreKV:
    """Writing and reading a :class:`~memstack.memory.store.chunk_store.ChunkStore`'s K/V (a mixin)."""

    def _check_kv(self, layer: int, value: Any, lengths: np.ndarray) -> tuple[list, list]:
        self._check_layer(layer)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"kv[{layer}] must be a pair (K, V)")
        out = []
        for name, part in zip("KV", value, strict=True):
            part = list(part.unbind(0)) if isinstance(part, torch.Tensor) else list(part)
            if len(part) != len(lengths):
                raise ValueError(f"kv[{layer}] {name} has {len(part)} chunks; expected {len(lengths)}")
            for i, (x, length) in enumerate(zip(part, lengths, strict=True)):
                if x.dim() != 3 or x.shape[1] != length or x.shape[::2] != part[0].shape[::2]:
                    raise ValueError(
                        f"kv[{layer}] {name}[{i}] has shape {tuple(x.shape)}; expected "
                        f"(H_kv, {length}, D_{name.lower()}) like the other chunks of the call"
                    )
            out.append([x.detach() for x in part])
        if any(k.shape[:2] != v.shape[:2] for k, v in zip(*out, strict=True)):
            raise ValueError(f"kv[{layer}]: K and V must have the same heads and length per chunk")
        return out[0], out[1]

    def _keep_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's K/V as the store keeps them: in RAM, or views into this layer's disk pages."""
        if self._kv_pages is None:
            return k.to("cpu", self.kv_dtype).contiguous(), v.to("cpu", self.kv_dtype).contiguous()
        return self._kv_pages[layer].put(k.cpu(), v.cpu())

    def kv_heads(self, layer: int) -> int | None:
        """KV heads of the K/V stored at ``layer`` (None before any is stored)."""
        shape = self._check_layer(layer).kv_shape
        return None if shape is None else int(shape[0])

    def kv(
        self, layer: int, record_ids: torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The records' stored K/V at ``layer``, zero-padded to the longest.

        Returns:
            ``K (n, H_kv, L, D_k)``, ``V (n, H_kv, L, D_v)`` in ``kv_dtype`` and ``lengths (n,)`` int64.

        Raises:
            ValueError: unknown layer or id, or a record written without K/V at this layer.
        """
        lk = self._check_layer(layer)
        with self._lock:
            rows = self._rows_of(record_ids)
            pairs = [self._kv[layer][r] for r in rows]
        missing = [int(self._ids[r]) for r, p in zip(rows, pairs, strict=True) if p is None]
        if missing:
            raise ValueError(f"records {missing[:5]} were written without K/V at layer {layer}")
        h, dk, dv = lk.kv_shape if lk.kv_shape else (0, 0, 0)
        lengths = torch.tensor([p[0].shape[1] for p in pairs], dtype=torch.int64)
        longest = int(lengths.max()) if len(pairs) else 0
        out = [torch.zeros(len(pairs), h, longest, d, dtype=self.kv_dtype) for d in (dk, dv)]
        for i, p in enumerate(pairs):
            for j in range(2):
                out[j][i, :, : p[j].shape[1]] = p[j]
        return out[0], out[1], lengths
