"""Can memstack wrap my model? Checks the core invariants against the unwrapped model.

    python scripts/can_i_wrap.py                       # every causal-LM type, built tiny
    python scripts/can_i_wrap.py --types llama gemma2  # some types
    python scripts/can_i_wrap.py --model path/to/checkpoint [--out verdict.json]

Each model type of the installed transformers' causal-LM auto mapping is built tiny from its
default config (random weights, nothing downloaded) and wrapped with compressive memory; it is
supported when every invariant of :mod:`memstack.evals.compat` holds, refused when wrapping raises
UnsupportedModelError (with its reason), and "no tiny build" when transformers cannot build or
run it tiny here. ``--model`` checks one real checkpoint (a local path, or a hub id you can
reach) instead. The table is printed; the full survey also writes it as JSON to
``results/compat.json`` (the shipped table). ``--model`` and ``--types`` check only part of it, so
they write JSON only to an explicit ``--out``: the shipped table is never replaced by a part.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers.utils import logging

from memstack.evals.compat import check_model, counts, survey, table
from memstack.io import write_json

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "compat.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", nargs="*", help="model types to check (default: every causal-LM type)")
    parser.add_argument("--model", help="a checkpoint (local path or hub id) to check instead")
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write the verdicts as JSON (default: results/compat.json for the full survey; "
        "nowhere for --model or --types)",
    )
    parser.add_argument("--progress", action="store_true", help="print each type as it is checked")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    start = time.perf_counter()
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        verdicts = [check_model(model)]
    else:
        verdicts = survey(args.types, progress=args.progress)
    print(table(verdicts))
    elapsed = time.perf_counter() - start
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {elapsed:.0f} s")
    # a part of the survey (one checkpoint, some types) never replaces the shipped full table
    partial = bool(args.model or args.types)
    out = args.out if args.out is not None else (None if partial else DEFAULT_OUT)
    if out is None:
        print("not written (pass --out PATH to save these verdicts as JSON)")
    else:
        write_json(
            out,
            {
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "counts": counts(verdicts),
                "verdicts": [dataclasses.asdict(v) for v in verdicts],
            },
        )
        print(f"wrote {out}")
    return 0 if all(v.status != "fails" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
