"""Plots of a run: loss curve and gate values from metrics.jsonl (and the passkey heatmap if the
run has one).

    python scripts/plot.py runs/tiny_passkey
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from memstack.train.plots import passkey_heatmap, training_curves


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not args.run_dir.is_dir():
        raise SystemExit(
            f"error: run directory {args.run_dir} does not exist; train first (scripts/train.py)"
        )
    if not metrics.is_file():
        raise SystemExit(
            f"error: {args.run_dir} has no metrics.jsonl: is it a scripts/train.py run directory?"
        )
    try:
        written = [training_curves(metrics, args.run_dir / "curves.png")]
    except ValueError as e:  # an empty metrics file
        raise SystemExit(f"error: {e}") from None
    for name in ("passkey_eval.json", "passkey.json"):
        if (args.run_dir / name).is_file():
            result = json.loads((args.run_dir / name).read_text())
            written.append(passkey_heatmap(result, args.run_dir / "passkey_heatmap.png"))
            break
    print("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
