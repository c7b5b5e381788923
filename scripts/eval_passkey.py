"""Passkey accuracy (length x depth) of a trained run, with memory on and off, plus a heatmap.

    python scripts/eval_passkey.py runs/tiny_passkey                       # lengths from its config
    python scripts/eval_passkey.py runs/tiny_passkey --lengths 1024 32768 --samples 10

Loads the run's ``config.json`` and latest checkpoint, writes ``passkey_eval.json`` and
``passkey_heatmap.png`` into the run directory (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from memstack.io import write_json
from memstack.train.evaluate import format_passkey_table, load_run, passkey_accuracy
from memstack.train.plots import passkey_heatmap


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--lengths", type=int, nargs="*", help="default: eval.passkey_lengths of the run")
    p.add_argument("--depths", type=float, nargs="*", help="default: eval.passkey_depths of the run")
    p.add_argument("--samples", type=int, help="samples per cell (default: the run's)")
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--no-memory-off", action="store_true", help="only evaluate with memory on")
    p.add_argument("--out", type=Path, help="output directory (default: the run directory)")
    args = p.parse_args(argv)

    config, stack, tokenizer = load_run(args.run_dir)
    e = config.eval
    lengths, depths = args.lengths or e.passkey_lengths, args.depths or e.passkey_depths
    samples = args.samples or e.samples_per_cell
    out_dir = args.out or args.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    main()
