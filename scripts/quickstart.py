"""What memstack is for, in a few minutes on a CPU: memory lets a small model find what it read.

    python scripts/quickstart.py                  # memory on and off, 1x and 4x, real text
    python scripts/quickstart.py --lengths 960 4032 16320 32704 --samples 4     # longer

A tiny byte-level Llama (4 layers, width 128) trained for an hour on a CPU with all three
trained memory layers (``configs/tiny_passkey_store.py``: working memory over 128-byte segments,
compressive memory, the long-term store) ships with memstack under
``results/tiny_passkey_store/run`` (4.5 MB, checked against ``SHA256SUMS``). The script asks it
for a 5-digit pass key hidden in real English it never trained on (the held-out split of the
King James Bible), at several depths, once with its memory on and once with the same weights
and memory off (then each 128-byte segment is read alone, so the key is out of sight), and
prints both tables and a heatmap. The cells use the seeds of the README's table, so they
reproduce its figures.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from memstack.io import write_json
from memstack.train.evaluate import format_passkey_table, load_run, passkey_accuracy
from memstack.train.plots import passkey_heatmap

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "results" / "tiny_passkey_store" / "run"
SEED = 10_000  # scripts/eval_passkey.py's default: the README's tables were drawn with it


def verify(run_dir: Path) -> None:
    """Check the shipped files against ``SHA256SUMS``; a clear error if one is missing or altered."""
    sums = run_dir / "SHA256SUMS"
    if not sums.is_file():
        raise SystemExit(f"error: {sums} is missing; the shipped weights are incomplete")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        path = run_dir / name.strip()
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise SystemExit(f"error: {path} is missing or does not match {sums} (a git-lfs pointer?)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[960, 4032], help="prompt lengths in bytes")
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = p.parse_args(argv)
    verify(SHIPPED)
    config, stack, tokenizer = load_run(SHIPPED)
    print("memstack: four layers of memory around a Hugging Face causal LM. The shipped tiny model:")
    print(stack.describe())
    print(
        f"\nA 5-digit pass key hidden in real English text (held out from training), at depths "
        f"{args.depths}; {args.samples} prompts per cell, each with its own key and passage. "
        f"Trained on prompts up to 1,024 bytes.\n"
    )
    result, t0 = {}, time.perf_counter()
    for on in (True, False):
        table = passkey_accuracy(
            stack,
            tokenizer,
            args.lengths,
            args.depths,
            args.samples,
            SEED,
            use_memory=on,
            instruction=config.data.instruction,
            filler="text",
        )
        result["memory_on" if on else "memory_off"] = table
        print(("memory on (compressive + store)" if on else "memory off (the same weights)") + ":")
        print(format_passkey_table(table) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "quickstart.json", result)
    passkey_heatmap(result, args.out / "quickstart_heatmap.png")
    on = [f"{r['mean']:.0%}" for r in result["memory_on"]["by_length"]]
    off = [f"{r['mean']:.0%}" for r in result["memory_off"]["by_length"]]
    print(
        f"pass key found at {', '.join(map(str, args.lengths))} bytes: memory on {' / '.join(on)}, "
        f"memory off {' / '.join(off)} ({time.perf_counter() - t0:.0f} s; "
        f"{args.out / 'quickstart.json'}, {args.out / 'quickstart_heatmap.png'})"
    )
    print(
        "Next: train it yourself (python scripts/train.py configs/demo.py), the README's tables, "
        "and sleep (python scripts/eval_sleep.py)."
    )
    return result


if __name__ == "__main__":
    main()
