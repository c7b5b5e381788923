"""The consolidation experiment: facts read once by day, asked closed-book after each night.

    python scripts/train.py configs/tiny_sleep.py            # the base stack (CPU, minutes)
    python scripts/eval_sleep.py runs/tiny_sleep             # nights x variants, table + JSON + plot

Each night, a stream of real text (the King James Bible's training split) with ``--facts`` facts
inserted once each ("Ada's code is 48213.") is read by the stack with every memory on, so its
chunks go into the long-term store; then the stack sleeps (memory/sleep.py). After every night,
every fact of every night so far is asked *closed-book*: compressive memory and store off,
adapters on, greedy decoding of the 5 digits, in the stored phrasing (completion) and in two
question templates never used in training. Held-out loss is measured on windows of the Bible's
test split, never in any stream. Variants (one fresh stack each, the same facts and streams):
no sleep; ``lm`` without replay; ``lm`` with replay; ``lm`` with replay and KL; ``distill``;
each sleeping variant with and without template augmentation (paraphrases of each fact in
training templates, made from the night's records by :func:`augment`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from memstack.data.filler import filler_text
from memstack.io import write_json
from memstack.sleep import SleepConfig, mean_nll, sleep, text_windows
from memstack.train.config import add_set_argument
from memstack.train.evaluate import load_run, wilson_interval

NAMES = (
    "Ada Alan Ben Cleo Dana Eli Fay Gus Hana Ivo Jade Kai Lena Milo Nora Otto Pia Quin Rosa Saul Tara Uma "
    "Vito Wren Xena Yael Zane Abel Bea Cody Dora Emil Flo Gil Hugo Iris Joel Kira Leo Mira Ned Ola Pete Rita "
    "Sam Tess Ugo Vera Walt Yuri Zoe Amos Bess Carl Dina Ezra Finn Gina Hal"
).split()
STORED = "{name}'s code is {code}."
TRAIN_TEMPLATES = (
    "{name} has the code {code}.",
    "The code of {name} is {code}.",
    "Remember {name}: code {code}.",
)
TEST_TEMPLATES = ("What is {name}'s code? It is {code}.", "{name} uses code {code}.")
FACT = re.compile(r"(\w+)'s code is (\d{5})\.")

VARIANTS: dict[str, dict[str, Any]] = {
    "no sleep": {},
    "lm": dict(objective="lm"),
    "lm + replay": dict(objective="lm", replay_ratio=0.2),
    "lm + replay + KL": dict(objective="lm", replay_ratio=0.2, kl_weight=1.0),
    "distill": dict(objective="distill"),
}


def augment_with(tokenizer: Any) -> Any:
    """An ``augment`` for sleep: each fact found in a night document, in every training template."""

    def augment(doc: torch.Tensor) -> list[torch.Tensor]:
        text = tokenizer.decode(doc.tolist())
        out = []
        for name, code in FACT.findall(text):
            for template in TRAIN_TEMPLATES:
                out.append(torch.tensor(tokenizer.encode(template.format(name=name, code=code) + " ")))
        return out

    return augment


def night_stream(rng: random.Random, words: list[str], facts: list[tuple[str, str]], n_bytes: int) -> str:
    """``n_bytes`` of consecutive training-split words from a random place, each fact inserted once
    at a random sentence-like boundary (between two words)."""
    start = rng.randrange(len(words) - n_bytes)
    chunk, size = [], 0
    for w in words[start:]:
        chunk.append(w)
        size += len(w) + 1
        if size >= n_bytes:
            break
    slots = sorted(rng.sample(range(1, len(chunk)), len(facts)))
    for offset, (slot, (name, code)) in enumerate(zip(slots, facts, strict=True)):
        chunk.insert(slot + offset, STORED.format(name=name, code=code))
    return " ".join(chunk)


@torch.no_grad()
def recall(stack: Any, tokenizer: Any, facts: list[tuple[str, str]], template: str) -> list[bool]:
    """Closed-book: memories off, greedy 5 digits after the template's prefix; exact match."""
    hits = []
    with stack.memory_off():
        for name, code in facts:
            prompt = template.format(name=name, code=code).split(code)[0]
            ids = torch.tensor([tokenizer.encode(prompt)], device=stack.device)
            out = stack.generate(ids, max_new_tokens=len(code), state=None)
            hits.append(tokenizer.decode(out[0, ids.shape[1] :].tolist()) == code)
    return hits


def rate(hits: list[bool]) -> dict[str, Any]:
    """Mean with its 95% Wilson interval."""
    lo, hi = wilson_interval(sum(hits), len(hits))
    return {"hits": sum(hits), "n": len(hits), "mean": sum(hits) / max(len(hits), 1), "low": lo, "high": hi}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--nights", type=int, default=3)
    p.add_argument("--facts", type=int, default=10, help="new facts per night")
    p.add_argument("--stream-bytes", type=int, default=3000, help="text read per day")
    p.add_argument("--held-out", type=int, default=16, help="held-out windows (test split)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--augment",
        choices=["both", "on", "off"],
        default="both",
        help="run each sleeping variant with template augmentation, without, or both",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/sleep_eval)")
    add_set_argument(p)  # e.g. --set sleep.steps=200: the recipe every sleeping variant starts from
    args = p.parse_args(argv)
    config, base_stack, tokenizer = load_run(args.run_dir, args.set)
    out_dir = Path(args.out or Path(args.run_dir) / "sleep_eval")
    recipe = config.sleep or SleepConfig()
    seg = base_stack.config.segment_len

    rng = random.Random(args.seed)
    names = rng.sample(NAMES, args.nights * args.facts)
    nights = [
        [(names[n * args.facts + i], f"{rng.randrange(10**4, 10**5)}") for i in range(args.facts)]
        for n in range(args.nights)
    ]
    words = filler_text("train").split(" ")
    streams = [night_stream(rng, words, facts, args.stream_bytes) for facts in nights]
    test_words = filler_text("test")
    held_out = text_windows(test_words, tokenizer, seg, args.held_out)
    replay = text_windows(" ".join(words[:20000]), tokenizer, seg)
    base_loss = mean_nll(base_stack, held_out, None, 8)

    runs = [(v, False) for v in args.variants if args.augment != "on" or v == "no sleep"]
    runs += [(v, True) for v in args.variants if v != "no sleep" and args.augment != "off"]
    results: dict[str, Any] = {"meta": {"args": vars(args), "facts": nights}, "variants": {}}
    t_all = time.perf_counter()
    for variant, aug in runs:
        label = variant + (" + templates" if aug else "")
        stack = copy.deepcopy(base_stack)
        stack.reset()
        rows = []
        for night in range(len(nights)):
            ids = torch.tensor([tokenizer.encode(streams[night])], device=stack.device)
            for a in range(0, ids.shape[1], seg):
                stack.step(ids[:, a : a + seg])
            report = None
            if variant != "no sleep":
                cfg = dataclasses.replace(recipe, **VARIANTS[variant])
                report = sleep(
                    stack,
                    cfg,
                    replay=replay,
                    held_out=held_out,
                    augment=augment_with(tokenizer) if aug else None,
                    progress=False,
                )
            so_far = [f for fs in nights[: night + 1] for f in fs]
            held = mean_nll(stack, held_out, None, 8)
            row = {
                "night": night + 1,
                "completion": rate(recall(stack, tokenizer, so_far, STORED)),
                "unseen_templates": rate(
                    [h for t in TEST_TEMPLATES for h in recall(stack, tokenizer, so_far, t)]
                ),
                "first_night_completion": rate(recall(stack, tokenizer, nights[0], STORED)),
                "held_out_loss": held,
                "report": None if report is None else report.to_dict(),
            }
            rows.append(row)
            c, u = row["completion"], row["unseen_templates"]
            print(
                f"{label:28s} night {night + 1}: completion {c['hits']}/{c['n']}"
                f"  unseen {u['hits']}/{u['n']}  held-out {held:.4f}",
                flush=True,
            )
        for row in rows:
            row["held_out_change"] = row["held_out_loss"] / base_loss - 1
        results["variants"][label] = rows
    results["meta"]["seconds"] = time.perf_counter() - t_all
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "sleep_eval.json", results)
    print()
    print(format_table(results))
    _plot(results, out_dir / "sleep_eval.png")
    return results


def format_table(results: dict) -> str:
    """Markdown: completion and unseen-template recall after each night, held-out loss change."""
    nights = max(len(rows) for rows in results["variants"].values())
    head = (
        "| variant | "
        + " | ".join(f"night {n + 1}: stored / unseen / held-out" for n in range(nights))
        + " |"
    )
    lines = [head, "|---|" + "---|" * nights]
    for label, rows in results["variants"].items():
        cells = []
        for r in rows:
            c, u = r["completion"], r["unseen_templates"]
            stored = f"{c['mean']:.0%} [{c['low']:.0%}-{c['high']:.0%}]"
            cells.append(f"{stored} / {u['mean']:.0%} / {r['held_out_change']:+.1%}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in results["variants"].items():
        n = [r["night"] for r in rows]
        ax1.plot(n, [r["completion"]["mean"] for r in rows], marker="o", label=label)
        ax2.plot(n, [100 * r["held_out_change"] for r in rows], marker="o", label=label)
    nights = sorted({r["night"] for rows in results["variants"].values() for r in rows})
    for ax in (ax1, ax2):
        ax.set_xticks(nights)
    ax1.set(xlabel="night", ylabel="completion recall, facts so far", ylim=(-0.02, 1.02))
    ax2.set(xlabel="night", ylabel="held-out loss change (%)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
