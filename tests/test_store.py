"""Tests of memory/store.py: the long-term chunk store of one stream."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import numpy as np
import pytest
import torch

from memstack.memory.store.chunk_store import ChunkStore, StoreFullError

DIM = 16
FINGERPRINT = {"model_type": "llama", "model_fingerprint": "abc123", "strategy": "received_attention"}


def fill(
    store: ChunkStore, n_chunks: int, *, seed: int = 0, per_call: int = 10, kv: bool = False, layer=None
):
    """Add ``n_chunks`` chunks of 4..8 tokens, 0..3 keys each (random, seeded), in calls of per_call."""
    g = torch.Generator().manual_seed(seed)
    layers = store.layers if layer is None else [layer]
    ids = []
    for c0 in range(0, n_chunks, per_call):
        n = min(per_call, n_chunks - c0)
        lengths = torch.randint(4, 9, (n,), generator=g).tolist()
        toks = [torch.randint(0, 50_000, (length,), generator=g) for length in lengths]
        starts = [c0 * 8 + 8 * i for i in range(n)]
        keys = {}
        for layer_ in layers:
            chunk = torch.repeat_interleave(torch.arange(n), torch.randint(0, 4, (n,), generator=g))
            keys[layer_] = (torch.randn(len(chunk), store.dim, generator=g), chunk)
        kvs = None
        if kv:
            kvs = {layer_: ([torch.randn(2, n_, 4, generator=g) for n_ in lengths],) * 2 for layer_ in layers}
            kvs = {la: (k, [x * 2 for x in v]) for la, (k, v) in kvs.items()}
        ids.append(store.add(toks, starts, c0 // per_call, keys, kv=kvs, time=float(c0)))
    return torch.cat(ids)


def reference_search(store: ChunkStore, layer: int, queries: torch.Tensor, k: int):
    """Brute force in numpy: each record's best key score, argsort, top k, -1 padding."""
    a = store.arrays()
    keys, rec = a[f"keys.{layer}"].numpy(), a[f"key_records.{layer}"].numpy()
    alive_ids = set(a["ids"][a["alive"]].tolist())
    q = queries.numpy().astype(np.float32)
    if store.metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    scores = q @ keys.T
    out_s, out_i = np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1)
    for i in range(len(q)):
        best: dict[int, float] = {}
        for s, r in zip(scores[i], rec, strict=True):
            if r in alive_ids:
                best[r] = max(best.get(r, -np.inf), s)
        ids = np.array(list(best), dtype=np.int64)
        vals = np.array([best[r] for r in ids], dtype=np.float32)
        order = np.argsort(-vals, kind="stable")[:k]
        out_s[i, : len(order)], out_i[i, : len(order)] = vals[order], ids[order]
    return out_s, out_i


def same_store(a: ChunkStore, b: ChunkStore) -> bool:
    x, y = a.arrays(), b.arrays()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("backend", ["matmul", "faiss"])
def test_search_matches_numpy_brute_force(metric, backend):
    store = ChunkStore([3], DIM, metric=metric, matmul_threshold=10**9 if backend == "matmul" else 0)
    fill(store, 300)
    queries = torch.randn(7, DIM)
    scores, ids = store.search(3, queries, top_k=10)
    assert store.index_info(3)["backend"] == backend
    ref_s, ref_i = reference_search(store, 3, queries, 10)
    np.testing.assert_array_equal(ids.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-5)
    # more than the records that have keys: padded with -1 / -inf
    small = ChunkStore([3], DIM, metric=metric, matmul_threshold=10**9 if backend == "matmul" else 0)
    fill(small, 4)
    s, i = small.search(3, queries, top_k=8)
    ref_s, ref_i = reference_search(small, 3, queries, 8)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    assert (i == -1).any() and torch.isinf(s[i == -1]).all()


@pytest.mark.parametrize("backend", ["matmul", "faiss"])
def test_search_under_bf16_autocast_scores_in_float32(backend):
    # the training loop runs under bf16 autocast: a bf16 matmul here would round the scores (and
    # reorder near ties) and mix bf16 scores into the float32 per-record max
    store = ChunkStore([3], DIM, matmul_threshold=10**9 if backend == "matmul" else 0)
    fill(store, 300)
    queries = torch.randn(7, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, ids = store.search(3, queries, top_k=10)
    ref_s, ref_i = reference_search(store, 3, queries, 10)
    assert scores.dtype == torch.float32
    np.testing.assert_array_equal(ids.numpy(), ref_i)
    np.testing.assert_allclose(scores.numpy(), ref_s, rtol=1e-5, atol=1e-5)


def test_matmul_equals_faiss_flat():
    stores = [ChunkStore([0], DIM, matmul_threshold=t) for t in (10**9, 0)]
    for s in stores:
        fill(s, 500, seed=5)
    q = torch.randn(20, DIM)
    (s0, i0), (s1, i1) = (s.search(0, q, 12) for s in stores)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s0, s1)


def test_top_k_counts_each_record_once_with_its_best_key():
    store = ChunkStore([0], 4, metric="ip", matmul_threshold=10**9)
    q = torch.tensor([[1.0, 0, 0, 0]])
    keys = torch.tensor([[0.9, 0, 0, 0], [0.8, 0, 0, 0], [0.95, 0, 0, 0], [0.5, 0, 0, 0], [0.1, 0, 0, 0]])
    toks = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4])]
    store.add(toks, [0, 2, 3], 0, {0: (keys, torch.tensor([0, 0, 0, 1, 2]))})
    for backend_store in (store, _copy_with_threshold(store, 0)):
        scores, ids = backend_store.search(0, q, 3)
        assert ids.tolist() == [[0, 1, 2]]
        torch.testing.assert_close(scores, torch.tensor([[0.95, 0.5, 0.1]]))


def _copy_with_threshold(store: ChunkStore, threshold: int) -> ChunkStore:
    other = ChunkStore(store.layers, store.dim, metric=store.metric, matmul_threshold=threshold)
    a = store.arrays()
    offsets = a["token_offsets"]
    toks = [a["tokens"][offsets[i] : offsets[i + 1]].long() for i in range(len(a["ids"]))]
    keys = {la: (a[f"keys.{la}"], a[f"key_records.{la}"]) for la in store.layers}
    other.add(toks, a["starts"].tolist(), 0, keys)
    return other


def test_hnsw_recall_against_flat():
    flat = ChunkStore([0], 32, matmul_threshold=0)
    hnsw = ChunkStore([0], 32, index_factory="HNSW32", matmul_threshold=0, search_params={"efSearch": 64})
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(3000, 32, generator=g)
    toks = [torch.tensor([i]) for i in range(3000)]
    for s in (flat, hnsw):
        s.add(toks, list(range(3000)), 0, {0: (keys, torch.arange(3000))})
    q = torch.randn(100, 32, generator=g)
    _, exact = flat.search(0, q, 10)
    _, approx = hnsw.search(0, q, 10)
    assert hnsw.index_info(0)["backend"] == "faiss"
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), approx.tolist(), strict=True)]
    )
    assert recall >= 0.9, recall


def test_ivf_is_trained_only_once_enough_keys_exist():
    store = ChunkStore([0], DIM, index_factory="IVF8,Flat", matmul_threshold=0, search_params={"nprobe": 8})
    assert store.min_train_keys == 39 * 8
    one_key = lambda n, off: (torch.randn(n, DIM), torch.arange(n))  # noqa: E731
    store.add([torch.tensor([i]) for i in range(200)], list(range(200)), 0, {0: one_key(200, 0)})
    info = store.index_info(0)
    assert info["backend"] == "matmul" and not info["built"] and not info["trained"]
    q = torch.randn(5, DIM)
    before = store.search(0, q, 5)
    store.add([torch.tensor([i]) for i in range(200)], list(range(200, 400)), 1, {0: one_key(200, 200)})
    info = store.index_info(0)
    assert info["backend"] == "faiss" and info["trained"] and info["ntotal"] == 400
    # nprobe = nlist scans every list: the trained index must agree with brute force exactly
    ref_s, ref_i = reference_search(store, 0, q, 5)
    s, i = store.search(0, q, 5)
    np.testing.assert_array_equal(i.numpy(), ref_i)
    assert before[1].max() < 200


@pytest.mark.parametrize("factory,threshold", [("Flat", 10**9), ("Flat", 0), ("HNSW32", 0)])
def test_fifo_keeps_the_newest_and_evicted_never_return(factory, threshold):
    store = ChunkStore(
        [0], DIM, index_factory=factory, matmul_threshold=threshold, max_records=50, eviction="fifo"
    )
    ids = fill(store, 420, per_call=7)  # 370 evictions: record and key compaction both run
    assert len(store) == 50
    assert torch.equal(store.ids(), ids[-50:])
    assert store.arrays()["ids"].numel() < 420  # tombstoned rows were compacted away
    q = torch.randn(40, DIM)
    _, found = store.search(0, q, 60)
    found = found[found >= 0]
    assert found.numel() and found.min() >= ids[-50]
    assert store.num_keys(0) == int((store.arrays()["key_records.0"] >= ids[-50]).sum())
    with pytest.raises(ValueError, match="not in the store"):
        store.tokens([int(ids[0])])


def test_least_retrieved_keeps_the_most_retrieved():
    store = ChunkStore([0], DIM, max_records=20, eviction="least_retrieved")
    keys = torch.randn(20, DIM)
    store.add([torch.tensor([i]) for i in range(20)], list(range(20)), 0, {0: (keys, torch.arange(20))})
    favourites = [2, 5, 11]
    for _ in range(3):
        _, got = store.search(0, keys[favourites], 1)  # cosine 1 with itself: always the top hit
        assert got[:, 0].tolist() == favourites
    assert store.records(favourites)["retrievals"].tolist() == [3, 3, 3]
    new = store.add(
        [torch.tensor([0])] * 10, list(range(20, 30)), 1, {0: (torch.randn(10, DIM), torch.arange(10))}
    )
    # the 10 evicted are the oldest never-retrieved: 0, 1, 3, 4, 6, 7, 8, 9, 10, 12
    assert store.ids().tolist() == [2, 5, 11, 13, 14, 15, 16, 17, 18, 19, *new.tolist()]
    _, found = store.search(0, torch.randn(30, DIM), 20)
    assert set(found[found >= 0].tolist()) <= set(store.ids().tolist())


def test_eviction_none_raises_when_full_and_writes_nothing():
    store = ChunkStore([0], DIM, max_records=10)
    fill(store, 10)
    before = store.arrays()
    with pytest.raises(StoreFullError, match="store is full: 10 records \\+ 1 new > max_records=10"):
        store.add([torch.tensor([1, 2])], [99], 5, {0: (torch.randn(1, DIM), torch.tensor([0]))})
    assert len(store) == 10 and all(torch.equal(before[k], v) for k, v in store.arrays().items())


@pytest.mark.parametrize(
    "with_kv,threshold,factory", [(True, 0, "HNSW32"), (False, 10**9, "Flat"), (True, 0, "Flat")]
)
def test_save_load_round_trip_is_bit_identical(tmp_path, with_kv, threshold, factory):
    store = ChunkStore(
        [1, 4],
        DIM,
        index_factory=factory,
        matmul_threshold=threshold,
        max_records=150,
        eviction="fifo",
        metadata=FINGERPRINT,
    )
    fill(store, 200, kv=with_kv)
    store.search(1, torch.randn(3, DIM), 4)  # retrieval counts are part of the state
    store.save(tmp_path / "store")
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert ("kv.safetensors" in files) == with_kv and ("index.1.faiss" in files) == (threshold == 0)
    loaded = ChunkStore.load(tmp_path / "store", expect=FINGERPRINT, expect_dim=DIM)
    assert same_store(store, loaded)
    q = torch.randn(9, DIM)
    for layer in (1, 4):
        a, b = store.search(layer, q, 6), loaded.search(layer, q, 6)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert same_store(store, loaded)  # retrieval counts moved the same way
    ids = store.ids()[::7]
    assert all(torch.equal(x, y) for x, y in zip(store.tokens(ids), loaded.tokens(ids), strict=True))
    assert loaded.tokens(ids)[0].dtype == torch.int64
    if with_kv:
        for x, y in zip(store.kv(4, ids), loaded.kv(4, ids), strict=True):
            assert torch.equal(x, y)
        k, v, lengths = loaded.kv(4, ids)
        assert k.dtype == torch.bfloat16 and k.shape[2] == lengths.max() and torch.equal(v, 2 * k)
    # the loaded store keeps working: adds, evictions, saves
    fill(loaded, 30, seed=9)
    assert len(loaded) == 150 and loaded.ids()[-1] == store.ids()[-1] + 30


_CHILD_SAVES = "child saves"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_save_killed_halfway_leaves_the_old_store(tmp_path):
    old = ChunkStore([0], 64, metadata=FINGERPRINT)
    fill(old, 50)
    big = ChunkStore([0, 1], 64, matmul_threshold=0, metadata=FINGERPRINT)
    fill(big, 6000, per_call=500, kv=True)
    t0 = time.perf_counter()
    big.save(tmp_path / "timing")
    duration = time.perf_counter() - t0
    target = tmp_path / "store"
    rng = random.Random(0)
    outcomes = []
    for _ in range(4):
        old.save(target)
        pid = os.fork()  # the child only writes files: no threads needed after the fork
        if pid == 0:
            try:
                big.save(target)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.7) * duration)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        loaded = ChunkStore.load(target, expect=FINGERPRINT)
        outcomes.append("old" if same_store(loaded, old) else "new" if same_store(loaded, big) else "mixed")
    assert "mixed" not in outcomes and "old" in outcomes, outcomes


def test_load_rejects_bad_stores_with_clear_errors(tmp_path):
    store = ChunkStore([0], DIM, matmul_threshold=0, metadata=FINGERPRINT)
    fill(store, 40)
    path = tmp_path / "s"
    store.save(path)
    with pytest.raises(ValueError, match="model_fingerprint='abc123' does not match the expected 'zzz'"):
        ChunkStore.load(path, expect={"model_fingerprint": "zzz"})
    with pytest.raises(ValueError, match=f"store has key dim {DIM}, expected dim 128"):
        ChunkStore.load(path, expect_dim=128)
    with pytest.raises(FileNotFoundError, match="no memstack.chunk_store manifest"):
        ChunkStore.load(tmp_path / "nothing")

    def broken(edit):
        p = tmp_path / f"b{random.random()}"
        store.save(p)
        edit(p)
        return p

    arrays = "arrays.safetensors"
    p = broken(lambda p: (p / "index.0.faiss").unlink())
    with pytest.raises(FileNotFoundError, match=r"index\.0\.faiss: missing"):
        ChunkStore.load(p)
    p = broken(lambda p: os.truncate(p / arrays, (p / arrays).stat().st_size // 2))
    with pytest.raises(ValueError, match=r"arrays\.safetensors: \d+ bytes, manifest says \d+ \(truncated"):
        ChunkStore.load(p)

    def edit_manifest(p, change):
        m = json.loads((p / "manifest.json").read_text())
        change(m)
        (p / "manifest.json").write_text(json.dumps(m))

    # a truncated file whose size the manifest agrees with: safetensors itself must refuse it
    def truncate_both(p):
        os.truncate(p / arrays, 100)
        edit_manifest(p, lambda m: m["files"].update({arrays: 100}))

    with pytest.raises(ValueError, match=r"arrays\.safetensors: cannot be read as safetensors"):
        ChunkStore.load(broken(truncate_both))
    p = broken(lambda p: edit_manifest(p, lambda m: m["counts"].update(rows=41)))
    with pytest.raises(ValueError, match=r"array 'ids' has shape \(40,\).*manifest implies 41 rows"):
        ChunkStore.load(p)
    p = broken(lambda p: edit_manifest(p, lambda m: m.update(version=99)))
    with pytest.raises(ValueError, match="version 99"):
        ChunkStore.load(p)
    p = broken(lambda p: edit_manifest(p, lambda m: m.update(format="other")))
    with pytest.raises(ValueError, match="not a memstack.chunk_store manifest"):
        ChunkStore.load(p)


def test_concurrent_add_and_search_lose_nothing():
    store = ChunkStore([0], DIM, matmul_threshold=300)  # the FAISS index appears mid-way
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            fill(store, 600, per_call=5, seed=3)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    def reader():
        try:
            while not done.is_set():
                _, ids = store.search(0, torch.randn(4, DIM), 8)
                ids = ids[ids >= 0]
                store.tokens(ids)  # every returned id is a whole, readable record
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(store) == 600 and torch.equal(store.ids(), torch.arange(600))
    assert store.index_info(0)["backend"] == "faiss"
    assert store.num_keys(0) == store.index_info(0)["ntotal"] == store.arrays()["keys.0"].shape[0]


def test_neighbours_stop_at_stream_ends_and_gaps():
    store = ChunkStore([0], DIM, max_records=8, eviction="fifo")
    fill(store, 10, per_call=1)  # records 2..9 exist
    assert store.neighbours([2], 1).tolist() == [2, 3]
    assert store.neighbours([9], 2).tolist() == [7, 8, 9]
    assert store.neighbours(torch.tensor([[5, -1]]), 0).tolist() == [5]
    assert store.neighbours([2, 9], 1).tolist() == [2, 3, 8, 9]
    assert store.neighbours([], 3).tolist() == []


def test_records_keep_their_fields():
    store = ChunkStore([0], DIM)
    toks = [torch.tensor([5, 6, 7]), torch.tensor([2**40])]
    ids = store.add(toks, [100, 103], 7, {0: (torch.randn(1, DIM), torch.tensor([1]))}, time=12.5)
    assert ids.tolist() == [0, 1] and store.num_keys(0) == 1
    got = store.tokens(ids)
    assert torch.equal(got[0], toks[0]) and torch.equal(got[1], toks[1])  # int64 ids survive
    rec = store.records(ids)
    assert rec["start"].tolist() == [100, 103] and rec["segment"].tolist() == [7, 7]
    assert rec["time"].tolist() == [12.5, 12.5] and rec["length"].tolist() == [3, 1]
    assert set(store.nbytes()) == {"keys", "tokens", "kv", "index"}
    with pytest.raises(ValueError, match="written without K/V at layer 0"):
        store.kv(0, ids)


def test_bad_arguments_name_the_argument_and_the_accepted_values():
    with pytest.raises(ValueError, match="metric='l2': expected one of \\('cosine', 'ip'\\)"):
        ChunkStore([0], DIM, metric="l2")
    with pytest.raises(ValueError, match="eviction='lru': expected one of"):
        ChunkStore([0], DIM, eviction="lru", max_records=3)
    with pytest.raises(ValueError, match="index_factory='HNSWxx' is not a FAISS factory.*'HNSW32'"):
        ChunkStore([0], DIM, index_factory="HNSWxx")
    with pytest.raises(ValueError, match="'efSearch' does not apply to index_factory='Flat'"):
        ChunkStore([0], DIM, search_params={"efSearch": 10})
    store = ChunkStore([0, 2], DIM)
    fill(store, 5)
    with pytest.raises(ValueError, match=f"queries has shape \\(3, 8\\); expected \\(q, {DIM}\\)"):
        store.search(0, torch.randn(3, 8), 2)
    with pytest.raises(ValueError, match="layer=1 is not a store layer; store layers are \\[0, 2\\]"):
        store.search(1, torch.randn(3, DIM), 2)
    with pytest.raises(ValueError, match="token_ids\\[1\\] has shape \\(0,\\).*L_i >= 1"):
        store.add([torch.tensor([1]), torch.tensor([], dtype=torch.long)], [0, 1], 0, {})
    with pytest.raises(ValueError, match="keys\\[0\\] vectors have shape \\(2, 3\\); expected \\(m, 16\\)"):
        store.add([torch.tensor([1])], [0], 0, {0: (torch.randn(2, 3), torch.tensor([0, 0]))})
    with pytest.raises(ValueError, match="chunk indices must lie in \\[0, 1\\)"):
        store.add([torch.tensor([1])], [0], 0, {0: (torch.randn(1, DIM), torch.tensor([4]))})
    assert len(store) == 5  # failed adds wrote nothing


def test_an_empty_store_returns_padding():
    store = ChunkStore([0], DIM)
    scores, ids = store.search(0, torch.randn(3, DIM), 4)
    assert ids.tolist() == [[-1] * 4] * 3 and bool(torch.isinf(scores).all())


def test_consolidation_marks_survive_save_and_remove_evicts(tmp_path):
    """Sleep's marks: set per record, filter ids(), persist; remove() evicts exactly those ids."""
    store = ChunkStore([0], DIM)
    ids = fill(store, 30)
    store.mark_consolidated(ids[:10])
    assert torch.equal(store.ids(consolidated=True), ids[:10])
    assert torch.equal(store.ids(consolidated=False), ids[10:])
    assert store.records(ids[8:12])["consolidated"].tolist() == [True, True, False, False]
    store.save(tmp_path / "s")
    back = ChunkStore.load(tmp_path / "s")
    assert torch.equal(back.ids(consolidated=True), ids[:10])
    back.remove(ids[:10])
    assert torch.equal(back.ids(), ids[10:]) and len(back) == 20
    q = torch.randn(5, DIM)
    _, hit = back.search(0, q, top_k=20)
    assert not set(hit.reshape(-1).tolist()) & set(ids[:10].tolist())
    with pytest.raises(ValueError, match="not in the store"):
        back.remove(ids[:1])
    with pytest.raises(ValueError, match="not in the store"):
        back.mark_consolidated([10_000])
