"""Cost of memstack's memory on SmolLM2-135M: time, store bytes per token and peak memory.

    python scripts/bench_smollm2.py                       # one 32K-token prompt, ~5 min on 2 cores
    python scripts/bench_smollm2.py --length 8192 --rows off store

Reads one pass-key prompt of ``--length`` tokens (``stack(ids)``, every segment, as the
evaluations do before answering) once per row, each row in its own process so that its peak
resident memory is its own:

- ``off``: the evaluations' stack (segments of 2,048 tokens, the previous one's last 256 tokens
  carried) with the store switched off: the baseline every ratio divides by;
- ``store``: the same with the store on the calibrated retrieval heads (``results/smollm2/heads.json``);
- ``store_all``: the store on all 30 layers and heads (InfLLM's representative tokens).

It prints a table and writes ``results/smollm2/bench.json``: seconds, tokens/s, time ratio to
``off`` (same run, same machine), store bytes per token (keys, token ids and the stored K/V,
summed over the store's layers; :meth:`ChunkStore.nbytes`) and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "smollm2" / "bench.json"
ROWS = ("off", "store", "store_all")


def run_row(row: str, length: int, threads: int) -> dict:
    """One row in this process: read the prompt, measure."""
    from memstack import MemoryStack
    from memstack.data.tasks import passkey_sample
    from memstack.data.tokenizer import HFTokenizer
    from memstack.evals.longcontext import stack_config
    from memstack.pretrained import smollm2

    torch.set_num_threads(threads)
    model, hf_tok = smollm2()
    tok = HFTokenizer(hf_tok)
    heads = json.loads((ROOT / "results" / "smollm2" / "heads.json").read_text())["heads"]
    stack = MemoryStack(model, stack_config(None if row == "store_all" else heads))
    ids = torch.tensor([passkey_sample(tok, length, 0.5, 1).prompt_ids])
    with torch.no_grad(), stack.memory_enabled(row != "off", kinds=("store",)):
        t0 = time.perf_counter()
        state = stack(ids, return_logits=False).state
        seconds = time.perf_counter() - t0
    stored = 0
    for layer_state in state.memories.get("store", {}).values():
        for store in layer_state.stores:
            stored += sum(store.nbytes().values())
    return {
        "row": row,
        "length": length,
        "seconds": seconds,
        "tokens_per_s": length / seconds,
        "store_bytes_per_token": stored / length,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--one", choices=ROWS, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_row(args.one, args.length, args.threads)), flush=True)
        return {}
    results = []
    for row in args.rows:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            row,
            "--length",
            str(args.length),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    base = next((r["seconds"] for r in results if r["row"] == "off"), None)
    header = ("row", "tokens", "seconds", "tok/s", "x off", "store B/token", "peak RSS MB")
    print("{:10s} {:>7s} {:>8s} {:>6s} {:>6s} {:>13s} {:>11s}".format(*header))
    for r in results:
        r["ratio_to_off"] = r["seconds"] / base if base else None
        ratio = f"{r['ratio_to_off']:.2f}" if base else "-"
        print(
            f"{r['row']:10s} {r['length']:7d} {r['seconds']:8.1f} {r['tokens_per_s']:6.0f} {ratio:>6s} "
            f"{r['store_bytes_per_token']:13.0f} {r['peak_rss_mb']:11.0f}"
        )
    result = {
        "length": args.length,
        "threads": args.threads,
        "rows": results,
        "command": "python scripts/bench_smollm2.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from memstack.io import write_json

    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
