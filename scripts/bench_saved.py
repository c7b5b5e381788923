"""What a training step keeps for backward: bytes of the tensors autograd saves, per system.

    python scripts/bench_saved.py                 # 2048 and 8192 tokens, bench_memory's tiny Llama

Counts each saved tensor's storage once (``torch.autograd.graph.saved_tensors_hooks``), for the
same systems and inputs as ``bench_memory.py``'s training mode; unlike its peak RSS this leaves
out transient buffers and the allocator. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bench_memory import SEED, VOCAB, build_model, make_step


def saved_mib(system: str, length: int) -> float:
    """MiB of distinct storages autograd saves during one training step of ``system``."""
    model = build_model("cpu")
    model.train()
    step = make_step(system, "train", model)
    ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(SEED + length))
    step(ids[:, :64])  # warm-up, as bench_memory does
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(ids)
    return sum(sizes.values()) / 2**20


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--out", type=Path, default=Path("results/bench/saved.json"))
    args = p.parse_args(argv)
    rows = []
    print("| length | bare_segments MiB | memstack MiB | memstack / bare_segments |\n|---:|---:|---:|---:|")
    for length in args.lengths:
        bare, mem = saved_mib("bare_segments", length), saved_mib("memstack", length)
        rows.append({"length": length, "bare_segments_mib": bare, "memstack_mib": mem, "ratio": mem / bare})
        print(f"| {length} | {bare:.1f} | {mem:.1f} | {mem / bare:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
