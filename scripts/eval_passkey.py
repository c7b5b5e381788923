"""Passkey accuracy (length x depth) of a trained run, with memory on and off, plus a heatmap.

    python scripts/eval_passkey.py runs/tiny_passkey                       # lengths from its config
    python scripts/eval_passkey.py runs/tiny_passkey --lengths 1024 32768 --samples 10
    python scripts/eval_passkey.py runs/tiny_passkey --by-offset 960   # by needle offset in its segment
    python scripts/eval_passkey.py runs/tiny_passkey --filler both     # synthetic and real-text filler
    python scripts/eval_passkey.py runs/tiny_passkey --kv-needles 4    # multi-needle key-value recall

Loads the run's ``config.json`` and latest checkpoint, writes ``passkey_eval.json`` and
``passkey_heatmap.png`` (``--by-offset``: ``passkey_offsets.json`` and ``passkey_offsets.png``;
``--kv-needles``: ``kv_recall.json``) into the run directory (or ``--out``). Every cell reports
its hits, n and 95% Wilson interval. The text filler reads the filler text's test split, which
training never reads. With one filler the JSON holds ``memory_on``/``memory_off``; with
``--filler both`` it holds ``synthetic_memory_on``, ``text_memory_on`` and so on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from memstack.io import write_json
from memstack.train.config import add_set_argument
from memstack.train.evaluate import (
    format_kv_table,
    format_passkey_table,
    kv_recall_accuracy,
    load_run,
    passkey_accuracy,
    passkey_by_offset,
)
from memstack.train.plots import passkey_heatmap, passkey_offset_plot

DEFAULT_SAMPLES = 20  # per cell: a 95% interval of about +-20 points at 50%


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--lengths", type=int, nargs="*", help="default: eval.passkey_lengths of the run")
    p.add_argument("--depths", type=float, nargs="*", help="default: eval.passkey_depths of the run")
    p.add_argument(
        "--samples", type=int, help=f"samples per cell (default {DEFAULT_SAMPLES}; --by-offset: 4 per offset)"
    )
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
    p.add_argument(
        "--filler",
        choices=["synthetic", "text", "both"],
        help="filler around the needle: synthetic sentences, real text (its test split), or both, one "
        "table each (default: eval.filler of the run)",
    )
    p.add_argument(
        "--filler-path", help="text file of the text filler (default: data.filler_path of the run, else KJV)"
    )
    p.add_argument(
        "--kv-needles",
        type=int,
        metavar="N",
        help="instead of the table: key-value recall with N facts per prompt, at --lengths",
    )
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default: a whole cell)")
    add_set_argument(p)
    args = p.parse_args(argv)

    try:
        config, stack, tokenizer = load_run(args.run_dir, args.set)
    except (ValueError, FileNotFoundError) as e:  # no run yet, a bad --set: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    e = config.eval
    lengths, depths = args.lengths or e.passkey_lengths, args.depths or e.passkey_depths
    samples = args.samples or DEFAULT_SAMPLES
    fillers = _fillers(args, config)
    filler_path = args.filler_path or config.data.filler_path
    out_dir = args.out or args.run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.by_offset is not None:
        return _by_offset(args, config, stack, tokenizer, out_dir)
    if args.kv_needles is not None:
        return _kv_recall(args, config, stack, tokenizer, out_dir, lengths, samples)
    result = {}
    for filler in fillers:
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
                filler=filler,
                filler_path=filler_path,
                batch_size=args.batch_size,
            )
            result[_key(filler, on, fillers)] = table
            print(format_passkey_table(table))
    write_json(out_dir / "passkey_eval.json", result)
    passkey_heatmap(result, out_dir / "passkey_heatmap.png")
    print(f"wrote {out_dir / 'passkey_eval.json'} and {out_dir / 'passkey_heatmap.png'}")
    return result


def _fillers(args: argparse.Namespace, config: Any) -> list[str]:
    choice = args.filler or config.eval.filler
    return ["synthetic", "text"] if choice == "both" else [choice]


def _key(filler: str, on: bool, fillers: list[str]) -> str:
    """``memory_on`` / ``memory_off``, prefixed with the filler when there are two."""
    key = "memory_on" if on else "memory_off"
    return f"{filler}_{key}" if len(fillers) > 1 else key


def _kv_recall(
    args: argparse.Namespace,
    config: Any,
    stack: Any,
    tokenizer: Any,
    out_dir: Path,
    lengths: list[int],
    samples: int,
) -> dict:
    if args.kv_needles < 1:
        raise SystemExit(f"--kv-needles must be >= 1, got {args.kv_needles}")
    fillers = _fillers(args, config)
    result = {}
    for filler in fillers:
        for on in [True] if args.no_memory_off else [True, False]:
            t = kv_recall_accuracy(
                stack,
                tokenizer,
                lengths,
                args.kv_needles,
                samples,
                args.seed,
                filler,
                use_memory=on,
                instruction=config.data.instruction,
                filler_path=args.filler_path or config.data.filler_path,
                progress=True,
                batch_size=args.batch_size,
            )
            result[_key(filler, on, fillers)] = t
            print(format_kv_table(t))
    write_json(out_dir / "kv_recall.json", result)
    print(f"wrote {out_dir / 'kv_recall.json'}")
    return result


def _by_offset(args: argparse.Namespace, config: Any, stack: Any, tokenizer: Any, out_dir: Path) -> dict:
    if args.offset_stride < 1:
        raise SystemExit(f"--offset-stride must be >= 1, got {args.offset_stride}")
    offsets = list(range(0, config.stack.segment_len, args.offset_stride))
    fillers = _fillers(args, config)
    result = {}
    for filler in fillers:
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
                filler=filler,
                filler_path=args.filler_path or config.data.filler_path,
            )
            result[_key(filler, on, fillers)] = t
            o = t["overall"]
            worst = sorted(zip(t["accuracy"], t["offsets"], strict=True))[:5]
            print(
                f"memory {'on' if on else 'off'}, {filler} filler: mean {o['mean']:.0%} "
                f"[{100 * o['ci95'][0]:.0f}-{100 * o['ci95'][1]:.0f}] over {len(offsets)} offsets "
                f"(n={o['n']}); lowest {worst}"
            )
    write_json(out_dir / "passkey_offsets.json", result)
    passkey_offset_plot(result, out_dir / "passkey_offsets.png")
    print(f"wrote {out_dir / 'passkey_offsets.json'} and {out_dir / 'passkey_offsets.png'}")
    return result


if __name__ == "__main__":
    main()
