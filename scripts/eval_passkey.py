"""Passkey accuracy (length x depth) of a trained run, with memory on and off, plus a heatmap.

    python scripts/eval_passkey.py runs/tiny_passkey                       # lengths from its config
    python scripts/eval_passkey.py runs/tiny_passkey --lengths 1024 32768 --samples 10
    python scripts/eval_passkey.py runs/tiny_passkey --by-offset 960   # by needle offset in its segment

Loads the run's ``config.json`` and latest checkpoint, writes ``passkey_eval.json`` and
``passkey_heatmap.png`` (``--by-offset``: ``passkey_offsets.json`` and ``passkey_offsets.png``)
into the run directory (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memstack.config import add_set_argument
from memstack.io import write_json
from memstack.train.evaluate import format_passkey_table, load_run, passkey_accuracy, passkey_by_offset
from memstack.train.plots import passkey_heatmap, passkey_offset_plot


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--lengths", type=int, nargs="*", help="default: eval.passkey_lengths of the run")
    p.add_argument("--depths", type=float, nargs="*", help="default: eval.passkey_depths of the run")
    p.add_argument("--samples", type=int, help="samples per cell (default: the run's)")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--no-memory-off", action="store_true", help="only evaluate with memory on")
    p.add_argument("--out", type=Path, help="output directory (default: the run directory)")
    p.add_argument(
        "--by-offset",
        type=int,
        metavar="LENGTH",
        help="instead of the table: accuracy by the needle's offset inside its segment at this length",
    )
    p.add_argument("--offset-stride", type=int, default=4, help="--by-offset: offsets 0, stride, 2*stride...")
    add_set_argument(p)
    args = p.parse_args(argv)

    config, stack, tokenizer = load_run(args.run_dir, args.set)
    e = config.eval
    lengths, depths = args.lengths or e.passkey_lengths, args.depths or e.passkey_depths
    samples = args.samples or e.samples_per_cell
    out_dir = args.out or args.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.by_offset is not None:
        return _by_offset(args, config, stack, tokenizer, out_dir)
    result = {}
    for on in [True] if args.no_memory_off else [True, False]:
        table = passkey_accuracy(
            stack,
            tokenizer,
            lengths,
            depths,
            samples,
            args.seed,
            use_memory=on,
            progress=True,
            instruction=config.data.instruction,
        )
        result["memory_on" if on else "memory_off"] = table
        print(format_passkey_table(table))
    write_json(out_dir / "passkey_eval.json", result)
    passkey_heatmap(result, out_dir / "passkey_heatmap.png")
    print(f"wrote {out_dir / 'passkey_eval.json'} and {out_dir / 'passkey_heatmap.png'}")
    return result


def _by_offset(args: argparse.Namespace, config: Any, stack: Any, tokenizer: Any, out_dir: Path) -> dict:
    if args.offset_stride < 1:
        raise SystemExit(f"--offset-stride must be >= 1, got {args.offset_stride}")
    offsets = list(range(0, config.stack.segment_len, args.offset_stride))
    result = {}
    for on in [True] if args.no_memory_off else [True, False]:
        t = passkey_by_offset(
            stack,
            tokenizer,
            args.by_offset,
            offsets,
            args.samples or 4,
            args.seed,
            use_memory=on,
            instruction=config.data.instruction,
        )
        result["memory_on" if on else "memory_off"] = t
        mean = sum(t["accuracy"]) / len(t["accuracy"])
        worst = sorted(zip(t["accuracy"], t["offsets"], strict=True))[:5]
        print(f"memory {'on' if on else 'off'}: mean {mean:.0%} over {len(offsets)} offsets; lowest {worst}")
    write_json(out_dir / "passkey_offsets.json", result)
    passkey_offset_plot(result, out_dir / "passkey_offsets.png")
    print(f"wrote {out_dir / 'passkey_offsets.json'} and {out_dir / 'passkey_offsets.png'}")
    return result


if __name__ == "__main__":
    main()
