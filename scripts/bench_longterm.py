"""What the long-term store costs: tokens/s and peak memory of the full stack (compressive memory +
store) against compressive memory alone, on the same seeded tiny Llama, and memory per token.

Systems (inference, ``torch.no_grad()``, no logits kept, batch 1, segment 512):

- ``compressive``: ``StackConfig(segment_len=512)``;
- ``stack``: the same plus ``StoreConfig(layers="1,3", chunk_len=32, block_len=64, top_k=4)``,
  the ``kv`` readout, received-attention keys;
- ``stack_lean``: the store on one layer (3) with one search per 128 queries;
- ``stack_lean_meankey``: the same with ``mean_key`` keys (no attention-mass pass at write).

Each (system, length) runs in a fresh subprocess (this script with ``--one``), so one
measurement's peak memory cannot hide behind another's: peak RSS over a baseline taken after a
warm-up. Time: the median of ``--repeats`` runs after one warm-up (the store is rebuilt each run).
Memory per token compares compressive memory (constant, so per token it vanishes), the store
(keys + token ids + metadata, and with K/V) and a full KV cache of the same model (float32 and
bfloat16). The machine is shared: compare the two systems' ratio, measured in the same run.

    python scripts/bench_longterm.py                      # 32K and 1M tokens
    python scripts/bench_longterm.py --lengths 32768      # quicker
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import build_model, peak_rss_mib  # noqa: E402  (the same tiny Llama)

SYSTEMS = ("compressive", "stack", "stack_lean", "stack_lean_meankey")
SEGMENT_LEN = 512


def make_stack(system: str):
    from memstack import CompressiveConfig, MemoryStack, StackConfig
    from memstack.config import StoreConfig

    store = None
    if system == "stack":
        store = StoreConfig(layers="1,3", chunk_len=32, block_len=64, top_k=4, readout="kv")
    elif system == "stack_lean":  # one store layer, one search per 128 queries
        store = StoreConfig(layers="3", chunk_len=32, block_len=128, top_k=4, readout="kv")
    elif system == "stack_lean_meankey":  # the same without the attention-mass pass
        store = StoreConfig(
            layers="3", chunk_len=32, block_len=128, top_k=4, readout="kv", strategy="mean_key"
        )
    compressive = CompressiveConfig(update_rule="delta")
    return MemoryStack(
        build_model("cpu"), StackConfig(segment_len=SEGMENT_LEN, compressive=compressive, store=store)
    )


def measure_one(system: str, length: int, repeats: int) -> dict[str, Any]:
    """Build, warm up, time and measure one (system, length). Run in a fresh process."""
    stack = make_stack(system).eval()
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        stack(ids[:, : 2 * SEGMENT_LEN], return_logits=False)
    gc.collect()
    base = peak_rss_mib()
    times, state = [], None
    for _ in range(1 + repeats):
        state = None  # the previous run's stores must not count in this run's peak
        gc.collect()
        t0 = time.perf_counter()
        with torch.no_grad():
            state = stack(ids, return_logits=False).state
        times.append(time.perf_counter() - t0)
    peak = peak_rss_mib() - base
    median = statistics.median(times[1:])
    store_bytes = {"keys": 0, "tokens": 0, "kv": 0, "index": 0}
    for layer_state in state.memories.get("store", {}).values():
        for store in layer_state.stores:
            for k, v in store.nbytes().items():
                store_bytes[k] = store_bytes.get(k, 0) + v
    return {
        "system": system,
        "length": length,
        "repeats": repeats,
        "times_s": times,
        "median_s": median,
        "tokens_per_s": length / median,
        "peak_mib": peak,
        "compressive_bytes": state.num_bytes(),
        "store_bytes": store_bytes,
        "loadavg_1min_after": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
    }


def kv_cache_bytes_per_token() -> dict[str, float]:
    """A full KV cache of the model: 2 (K, V) x layers x kv heads x head dim per token."""
    cfg = build_model("cpu").config
    per = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return {"float32": per * 4.0, "bfloat16": per * 2.0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 1048576])
    p.add_argument("--repeats", type=int, default=None, help="default: 3 below 100K tokens, else 1")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--out", default="results/bench/longterm.json")
    p.add_argument("--one", nargs=2, metavar=("SYSTEM", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        length = int(args.one[1])
        repeats = args.repeats or (3 if length < 100_000 else 1)
        print(json.dumps(measure_one(args.one[0], length, repeats)))
        return
    rows = []
    for length in args.lengths:
        for system in args.systems:
            cmd = [sys.executable, __file__, "--one", system, str(length)]
            if args.repeats:
                cmd += ["--repeats", str(args.repeats)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{system:12s} {length:>9,d} tokens  {row['tokens_per_s']:9,.0f} tok/s  "
                f"peak +{row['peak_mib']:7.1f} MiB",
                flush=True,
            )
    kv = kv_cache_bytes_per_token()
    table = [
        "| length | system | tokens/s | vs compressive | peak MiB | store bytes / token "
        "(keys+tokens / with K/V) |"
    ]
    table.append("|---:|---|---:|---:|---:|---|")
    for length in args.lengths:
        base = next(r for r in rows if r["length"] == length and r["system"] == "compressive")
        for r in (x for x in rows if x["length"] == length):
            sb = r["store_bytes"]
            lean = (sb["keys"] + sb["tokens"] + sb["index"]) / length
            full = lean + sb["kv"] / length
            per_tok = f"{lean:.1f} / {full:.1f}" if r["system"] != "compressive" else "-"
            table.append(
                f"| {length:,} | {r['system']} | {r['tokens_per_s']:,.0f} | "
                f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x | {r['peak_mib']:.1f} | {per_tok} |"
            )
    comp = rows[0]["compressive_bytes"]
    table.append("")
    table.append(
        f"compressive memory: {comp:,} bytes in all, whatever the length; full KV cache: "
        f"{kv['float32']:.0f} bytes/token (float32), {kv['bfloat16']:.0f} (bfloat16)"
    )
    print("\n".join(table))
    out = {
        "meta": {
            "torch": torch.__version__,
            "platform": platform.platform(),
            "segment_len": SEGMENT_LEN,
            "kv_cache_bytes_per_token": kv,
            "note": "shared 2-core machine: compare systems within one run (ratios)",
        },
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
