"""What memstack is for, in a few minutes on a CPU: memory lets a small model find what it read.

    python scripts/quickstart_tiny.py             # memory on, memory off, full attention; 1x and 4x
    python scripts/quickstart_tiny.py --lengths 960 4032 16320 32704 --samples 4     # longer

A tiny byte-level Llama (4 layers, width 128) trained for an hour on a CPU with all three
trained memory layers (``configs/tiny_passkey_store.py``: working memory over 128-byte segments,
compressive memory, the long-term store) ships with memstack under
``results/tiny_passkey_store/run`` (4.5 MB, checked against ``SHA256SUMS``). The script asks it
for a 5-digit pass key hidden in real English it never trained on (the held-out split of the
King James Bible), at several depths, on the same prompts three ways:

- memory on: the stack as trained (segments of 128 bytes, compressive memory, the store);
- memory off: the same weights with memory removed, still in 128-byte segments, each attending
  only to itself. What it measures is what memory adds to that segment-local reading: the key
  is out of its sight unless it lies in the answer's own segment (at depth 1 the needle's second
  mention of the key can);
- full attention, the baseline without memstack: the same weights unwrapped (``stack.unwrap()``,
  the plain transformers model), one causal pass over the whole prompt, greedy as generate. The
  key is always in sight, but the model never attended past a 128-byte segment in training, nor
  saw positions past 1,024.

It prints the three tables and a heatmap of them. The cells use the seeds of the
table in docs/results.md, so they reproduce its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import time
from pathlib import Path

import torch

from memstack.io import write_json
from memstack.train.evaluate import format_passkey_table, load_run, passkey_accuracy
from memstack.train.plots import passkey_heatmap

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "results" / "tiny_passkey_store" / "run"
SEED = 10_000  # scripts/eval_passkey.py's default: docs/results.md's tables were drawn with it


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


class FullAttention:
    """A plain causal LM as :func:`passkey_accuracy` drives a stack: greedy ``generate`` by
    transformers itself, one causal pass over the whole prompt, then one token at a time."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @contextlib.contextmanager
    def memory_enabled(self, enabled: bool = True):
        yield self  # it has no memory to switch

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )


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
    # the baseline: a second copy of the same weights, unwrapped into the plain transformers model
    full = FullAttention(load_run(SHIPPED)[1].unwrap())
    runs = [  # (name, model, memory on, title)
        ("memory_on", stack, True, "memory on (compressive + store)"),
        (
            "memory_off",
            stack,
            False,
            "memory off (the same weights, memory removed: 128-byte segments alone)",
        ),
        (
            "full_attention",
            full,
            False,
            "full attention (the same weights unwrapped: the whole prompt at once)",
        ),
    ]
    result, t0 = {}, time.perf_counter()
    for name, model, on, title in runs:
        table = passkey_accuracy(
            model,
            tokenizer,
            args.lengths,
            args.depths,
            args.samples,
            SEED,
            use_memory=on,
            instruction=config.data.instruction,
            filler="text",
        )
        result[name] = table
        text = format_passkey_table(table)
        if name == "full_attention":  # no memory to switch, rather than memory off
            text = "full attention" + text[text.index(":") :]
        print(title + ":")
        print(text + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "quickstart.json", result)
    passkey_heatmap(result, args.out / "quickstart_heatmap.png")
    found = {
        name: " / ".join(f"{r['mean']:.0%}" for r in table["by_length"]) for name, table in result.items()
    }
    print(
        f"pass key found at {', '.join(map(str, args.lengths))} bytes: memory on {found['memory_on']}, "
        f"memory off {found['memory_off']}, full attention {found['full_attention']} "
        f"({time.perf_counter() - t0:.0f} s; {args.out / 'quickstart.json'}, "
        f"{args.out / 'quickstart_heatmap.png'})"
    )
    print(
        "Next: train it yourself (python scripts/train.py configs/demo.py), docs/results.md, "
        "and sleep (python scripts/eval_sleep.py)."
    )
    return result


if __name__ == "__main__":
    main()
