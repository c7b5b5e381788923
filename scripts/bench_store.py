"""Add rate, search latency, recall, size and save/load time of the long-term ChunkStore.

For each number of keys (10K, 100K, 1M), key dimension (64, 128) and search path:

- ``matmul``: the brute-force torch matmul (``matmul_threshold`` above the key count);
- ``flat``: FAISS ``Flat`` (exact);
- ``hnsw``: FAISS ``HNSW32`` built at ``--ef-construction`` (40, FAISS's default), swept over
  ``efSearch``;
- ``ivfpq``: FAISS ``IVF<nlist>,PQ<m>np`` (nlist ~ sqrt(keys) unless ``--nlist``; one row per
  ``--nlist`` value), re-ranked exactly from the kept float32 keys (``refine``), swept over
  ``nprobe``. ``np`` skips FAISS's polysemous training, which the factory's plain ``PQ16`` turns
  on although the search never uses it (``polysemous_ht`` 0) and which took 30-60 s of the
  "training" at 10K keys on the 2-core box (the k-means take 3.5 s for IVF1024 on 40K keys). The
  store trains the index once ``min_train_keys`` keys exist (39 per IVF list: 40K keys for
  IVF1024, 160K for IVF4096), on the keys it holds then; the matmul serves until then. Training
  time is reported on its own; ``build_s`` is the whole fill, training included.

Keys: ``--keys-per-chunk`` keys (default 4) point at each chunk of ``--chunk-len`` (128) tokens.
Data: ``random`` (unit vectors, uniform on the sphere: the hardest case for approximate search) or
``clustered`` (keys around 1000 centres, queries near stored keys: closer to real attention keys).
Queries: one batch of 64; latency is the median of ``--repeats`` batches divided by 64, and
``ms_single_query`` the median of ``--single`` one-query searches. Recall@10 is against exact
distinct-record search. Bytes per stored token: measured for the benchmark's
keys per chunk, and derived for 1 key per chunk from the same store's per-key and per-token bytes.

Usage::

    OMP_NUM_THREADS=2 python scripts/bench_store.py            # full run, ~10-15 min on 2 cores
    OMP_NUM_THREADS=2 python scripts/bench_store.py --quick    # 10K and 100K only
    OMP_NUM_THREADS=2 python scripts/bench_store.py --sizes 1000000 --dims 64 \
        --kinds matmul hnsw ivfpq --hnsw-max-keys 1000000 1000000 --nlist 1024 4096 \
        --data clustered --out results/bench/store_1m_clustered.json        # approximate indexes at 1M
"""

from __future__ import annotations

import os

# FAISS and torch each bring their own OpenMP runtime; with the default active wait, the threads of
# one spin on the 2 cores while the other's wait for them, which on a loaded box made one-query
# IVF-PQ searches take 8 ms instead of 0.7 and HNSW adds 2-5x slower. Read at library load, so
# set before the imports; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from memstack.memory.store.chunk_store import ChunkStore  # noqa: E402

BATCH_CHUNKS = 1024  # chunks per add call
QUERIES = 64
TOP_K = 10


def make_keys(n: int, dim: int, data: str, seed: int) -> np.ndarray:
    """``(n, dim)`` float32 unit keys."""
    g = torch.Generator().manual_seed(seed)
    if data == "random":
        x = torch.randn(n, dim, generator=g)
    else:
        centres = torch.randn(1000, dim, generator=g)
        x = centres[torch.randint(0, 1000, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    return F.normalize(x, dim=-1).numpy()


def make_queries(keys: np.ndarray, data: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    if data == "random":
        q = torch.randn(QUERIES, keys.shape[1], generator=g)
    else:
        q = torch.from_numpy(keys[torch.randint(0, len(keys), (QUERIES,), generator=g).numpy()])
        q = q + 0.3 * torch.randn(q.shape, generator=g) / keys.shape[1] ** 0.5
    return F.normalize(q, dim=-1)


def exact_top(keys: np.ndarray, queries: torch.Tensor, kpc: int) -> np.ndarray:
    """Exact distinct-record top-10 record ids (keys are grouped kpc per chunk, in id order)."""
    out = []
    for q in queries.split(16):
        best = (q @ torch.from_numpy(keys).T).view(len(q), -1, kpc).amax(-1)
        out.append(best.topk(TOP_K, dim=1).indices)
    return torch.cat(out).numpy()


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` keys: the power of two nearest sqrt(n), at least 64."""
    return 1 << round(np.log2(max(64, np.sqrt(n))))


def build(kind: str, n: int, dim: int, args, nlist: int | None = None) -> tuple[ChunkStore, dict]:
    if kind == "matmul":
        return ChunkStore([0], dim, matmul_threshold=n + 1), {}
    if kind == "flat":
        return ChunkStore([0], dim, index_factory="Flat", matmul_threshold=0), {}
    if kind == "hnsw":
        # efConstruction is a faiss.ParameterSpace name: the store applies it before the first add
        params = {"efConstruction": args.ef_construction, "efSearch": args.ef_search[0]}
        store = ChunkStore([0], dim, index_factory="HNSW32", matmul_threshold=0, search_params=params)
        return store, {"efSearch": args.ef_search}
    factory = f"IVF{nlist or default_nlist(n)},PQ{args.pq}np"
    store = ChunkStore([0], dim, index_factory=factory, matmul_threshold=0, refine=args.refine)
    return store, {"nprobe": args.nprobe}


def measure(
    kind: str, n: int, dim: int, args, keys: np.ndarray, queries, exact, tokens, nlist: int | None = None
) -> dict:
    kpc, chunk_len = args.keys_per_chunk, args.chunk_len
    store, sweep = build(kind, n, dim, args, nlist)
    n_chunks = n // kpc
    t0 = time.perf_counter()
    for c0 in range(0, n_chunks, BATCH_CHUNKS):
        c1 = min(n_chunks, c0 + BATCH_CHUNKS)
        toks = list(tokens[: c1 - c0])
        chunk = torch.arange(c1 - c0).repeat_interleave(kpc)
        store.add(
            toks,
            list(range(c0 * chunk_len, c1 * chunk_len, chunk_len)),
            c0,
            {0: (keys[c0 * kpc : c1 * kpc], chunk)},
        )
    add_s = time.perf_counter() - t0
    info = store.index_info(0)
    row = {
        "kind": kind,
        "keys": n,
        "dim": dim,
        "factory": "matmul" if kind == "matmul" else store.index_factory,
        "backend": info["backend"],
        "train_s": round(info["train_seconds"], 3),
        "add_keys_per_s": round(n / max(add_s - info["train_seconds"], 1e-9)),
        "build_s": round(add_s, 2),
    }
    if kind == "hnsw":
        row["efConstruction"] = args.ef_construction
    if kind == "ivfpq":
        row["min_train_keys"] = info["min_train_keys"]  # trained on the keys held at that add
    nb = store.nbytes()
    n_tokens = n_chunks * chunk_len
    per_key = (nb["keys"] + nb["index"]) / n
    per_token_fields = nb["tokens"] / n_tokens
    row["bytes"] = nb
    row[f"bytes_per_token_{kpc}kpc"] = round(sum(nb.values()) / n_tokens, 2)
    row["bytes_per_token_1kpc_derived"] = round(per_token_fields + per_key / chunk_len, 2)
    row["search"] = []
    for value in sweep.get("efSearch", sweep.get("nprobe", [None])):
        if value is not None:
            store.set_search_params(**{next(iter(sweep)): value})
        store.search(0, queries, TOP_K)  # warm-up
        times, ids = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            _, ids = store.search(0, queries, TOP_K)
            times.append(time.perf_counter() - t)
        recall = np.mean(
            [len(set(a) & set(b)) / TOP_K for a, b in zip(ids.tolist(), exact.tolist(), strict=True)]
        )
        single = []
        for i in range(min(args.single, QUERIES)):
            t = time.perf_counter()
            store.search(0, queries[i : i + 1], TOP_K)
            single.append(time.perf_counter() - t)
        param = {next(iter(sweep)): value} if value is not None else {}
        row["search"].append(
            {
                **param,
                "ms_per_query": round(1e3 * statistics.median(times) / QUERIES, 4),
                "ms_single_query": round(1e3 * statistics.median(single), 4) if single else None,
                "recall@10": round(float(recall), 4),
            }
        )
    tmp = Path(tempfile.mkdtemp(prefix="bench_store."))
    try:
        t = time.perf_counter()
        store.save(tmp / "s")
        row["save_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        ChunkStore.load(tmp / "s")
        row["load_s"] = round(time.perf_counter() - t, 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def format_row(row: dict, kpc: int) -> str:
    """One table line: add rate, training, each search setting, bytes per token, save/load."""
    head = f"{row['kind']:7s} {row['keys']:>8d} x {row['dim']:<4d} add {row['add_keys_per_s']:>9d}/s"
    head += f"  train {row['train_s']:6.2f}s build {row['build_s']:7.1f}s "
    cells = []
    for s in row["search"]:
        shown = ("ms_per_query", "ms_single_query", "recall@10")
        param = ",".join(f"{k}={v}" for k, v in s.items() if k not in shown)
        one = "" if s["ms_single_query"] is None else f" 1q {s['ms_single_query']:.3f}ms"
        cells.append(f"[{param} {s['ms_per_query']:.3f}ms{one} r={s['recall@10']:.3f}]")
    tail = f"B/tok {row[f'bytes_per_token_{kpc}kpc']}/{row['bytes_per_token_1kpc_derived']}"
    tail += f"  save {row['save_s']:.2f}s load {row['load_s']:.2f}s"
    return "  ".join([head, *cells, tail])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kinds", nargs="+", default=["matmul", "flat", "hnsw", "ivfpq"])
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--refine", type=int, default=10, help="IVF-PQ candidates x refine re-ranked exactly")
    p.add_argument(
        "--nlist",
        type=int,
        nargs="+",
        default=[None],
        help="IVF lists, one IVF-PQ row each (default: the power of two nearest sqrt(keys))",
    )
    p.add_argument("--pq", type=int, default=16, help="PQ sub-quantizers (bytes per key) of IVF-PQ")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW efConstruction")
    p.add_argument(
        "--hnsw-max-keys",
        type=int,
        nargs=2,
        default=[100_000, 100_000],
        metavar=("D64", "D128"),
        help="largest HNSW build per dim (HNSW adds only a few thousand keys/s on the shared 2-core "
        "box: minutes per 1M keys, so the default run stops at 100K)",
    )
    p.add_argument("--ivfpq-max-keys", type=int, default=1_000_000, help="largest IVF-PQ build")
    p.add_argument("--single", type=int, default=16, help="one-query searches timed per setting")
    p.add_argument("--keys-per-chunk", type=int, default=4)
    p.add_argument("--chunk-len", type=int, default=128)
    p.add_argument("--data", choices=["random", "clustered"], default="random")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="10K and 100K keys only")
    p.add_argument("--out", default="results/bench/store.json")
    args = p.parse_args()
    sizes = [s for s in args.sizes if s <= 100_000] if args.quick else args.sizes
    torch.manual_seed(0)
    tokens = torch.randint(0, 32_000, (BATCH_CHUNKS, args.chunk_len)).unbind(0)
    rows, skipped = [], []
    load_start = list(os.getloadavg())
    started = time.perf_counter()
    for dim in args.dims:
        for n in sizes:
            keys = make_keys(n, dim, args.data, seed=n + dim)
            queries = make_queries(keys, args.data, seed=n + dim)
            exact = exact_top(keys, queries, args.keys_per_chunk)
            runs = [(k, nl) for k in args.kinds for nl in (args.nlist if k == "ivfpq" else [None])]
            for kind, nlist in runs:
                cap = args.hnsw_max_keys[0 if dim <= 64 else 1]
                cap = args.ivfpq_max_keys if kind == "ivfpq" else cap
                if kind in ("hnsw", "ivfpq") and n > cap:
                    skipped.append(
                        {
                            "kind": kind,
                            "keys": n,
                            "dim": dim,
                            "why": f"{kind} build capped at {cap} keys (time)",
                        }
                    )
                    continue
                row = measure(kind, n, dim, args, keys, queries, exact, tokens, nlist)
                rows.append(row)
                print(format_row(row, args.keys_per_chunk), flush=True)
    meta = {
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "omp_threads": faiss.omp_get_max_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "args": vars(args),
        "total_s": round(time.perf_counter() - started, 1),
        "note": "shared, noisy 2-core machine: compare ratios between rows rather than absolute times",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {args.out} ({meta['total_s']} s)")


if __name__ == "__main__":
    main()
