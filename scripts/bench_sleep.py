"""Cost of a night's sleep on SmolLM2-135M: padded rows against packed rows, in one run.

    python scripts/bench_sleep.py                          # about 6 minutes on 2 cores
    python scripts/bench_sleep.py --steps 4 --repeats 1    # a quick look

The night is the one of ``eval_sleep_smollm2.py``'s best recipe (seed 0's first day: 30
invented facts read through the stack, each fact's paraphrases and training chats as augmented
texts, the Bible's windows as replay, 2 replay windows a step with the KL). Each row runs
``sleep()`` on a copy of the same stack, twice: with ``--steps`` steps and with none, so the
difference is the training steps alone (the night loss before and after and the adapter's set-up
cancel). Rows alternate within each repeat, so the machine's drift over the run falls on both;
the table gives each row's median seconds a step and its ratio to the first row (same run, same
machine), and what a step holds (mean over 500 batches drawn as training draws them): text
tokens, the records' tokens among them, and padding.

Rows:

- ``padded``: the recipe measured on three seeds before ``pack`` existed (8 rows a step, a text
  per row drawn by length, padded to 128 tokens);
- ``packed``: ``pack=True, record_share=0.6`` at 6 rows a step (the recipe of
  ``results/smollm2_sleep_packed``).

Writes ``results/bench/sleep.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "bench" / "sleep.json"
VARIANT = "rehearsal + paraphrases + questions + replay + KL"
ROWS = {
    "padded": {"steps": 90, "batch_size": 8, "replay_batch_size": 2, "lr": 1.5e-3},
    "packed": {
        "steps": 90,
        "batch_size": 6,
        "replay_batch_size": 2,
        "lr": 1.5e-3,
        "pack": True,
        "record_share": 0.6,
    },
}


def step_contents(docs, n_records, recipe, seq_len, eos, draws=500) -> dict[str, float]:
    """Mean text tokens, record tokens and padding a training step holds, drawn as sleep draws."""
    from memstack.sleep.data import crops, record_pools

    gen = torch.Generator().manual_seed(0)
    pools = record_pools(recipe.record_share, range(n_records), range(n_records, len(docs)))
    # the records' tokens are told apart by an offset on their ids
    offset = 10**9
    marked = [d + offset if i < n_records else d for i, d in enumerate(docs)]
    text = records = pad = 0
    for _ in range(draws):
        ids, mask, _ = crops(
            marked, None, seq_len, recipe.batch_size, gen, pools=pools, pack=recipe.pack, separator=eos
        )
        text += int(mask.sum())
        records += int((ids >= offset).sum())
        pad += int((~mask).sum())
    return {"text_tokens": text / draws, "record_tokens": records / draws, "padding": pad / draws}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="training steps timed per measurement")
    p.add_argument("--repeats", type=int, default=2, help="measurements per row (rows alternate)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 1 or args.repeats < 1:
        p.error(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_sleep_smollm2 import RECIPE, VARIANTS, paraphrase_augment, read_day

    from memstack import MemoryStack
    from memstack.data.filler import filler_text
    from memstack.evals.facts import day_text, invent_facts
    from memstack.evals.longcontext import stack_config
    from memstack.io import write_json
    from memstack.pretrained import smollm2
    from memstack.sleep import night_documents, sleep, text_windows
    from memstack.sleep.data import end_of_text
    from memstack.train.evaluate import sample_seed

    heads_file = ROOT / "results" / "smollm2" / "heads.json"
    if not heads_file.is_file():
        raise SystemExit(f"error: {heads_file} is missing; run python scripts/eval_smollm2.py --calibrate")
    model, tokenizer = smollm2()
    stack = MemoryStack(model, stack_config(json.loads(heads_file.read_text())["heads"], 512)).eval()
    words = filler_text("train").split(" ")
    facts = invent_facts(30, sample_seed("sleep-facts", 0))
    day = day_text(facts, words, random.Random(sample_seed("sleep-day", 0))) + " " + " ".join(words[:64])
    base = copy.deepcopy(stack)  # a stack with a filled store does not deep-copy (its index)
    read_day(stack, tokenizer, day)
    replay = text_windows(filler_text("train")[-400_000:], tokenizer, 128, 256)
    augment = paraphrase_augment(tokenizer, questions=True)
    records = [d for row in night_documents(stack.state)[0] for d in row]
    docs = records + [t for d in records for t in augment(d)]
    changes = VARIANTS[VARIANT][0]
    recipes = {
        name: dataclasses.replace(RECIPE, **changes, **{k: v for k, v in row.items() if k != "steps"})
        for name, row in ROWS.items()
    }
    eos = end_of_text(model.config)
    contents = {name: step_contents(docs, len(records), r, 128, eos) for name, r in recipes.items()}

    def timed(recipe, steps: int) -> float:
        night = copy.deepcopy(base)
        read_day(night, tokenizer, day)  # not timed: sleep() times itself
        cfg = dataclasses.replace(recipe, steps=steps)
        return sleep(night, cfg, replay=replay, augment=augment, progress=False).seconds

    per_step: dict[str, list[float]] = {name: [] for name in ROWS}
    t_run = time.perf_counter()
    for repeat in range(args.repeats):
        for name, recipe in recipes.items():
            with_steps, without = timed(recipe, args.steps), timed(recipe, 0)
            per_step[name].append((with_steps - without) / args.steps)
            print(f"repeat {repeat} {name}: {per_step[name][-1]:.2f} s a step", flush=True)
    first = next(iter(ROWS))
    rows = []
    for name in ROWS:
        s = statistics.median(per_step[name])
        rows.append(
            {
                "row": name,
                "recipe": {k: v for k, v in ROWS[name].items() if k != "steps"},
                "seconds_per_step": s,
                "all_seconds_per_step": per_step[name],
                "ratio": s / statistics.median(per_step[first]),
                "night_90_steps_s": 90 * s,
                **contents[name],
            }
        )
    print(f"\n| row | s a step | ratio to {first} | 90 steps (s) | text tokens a step | records' | padding |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['row']} | {r['seconds_per_step']:.2f} | {r['ratio']:.2f}x | {r['night_90_steps_s']:.0f} | "
            f"{r['text_tokens']:.0f} | {r['record_tokens']:.0f} | {r['padding']:.0f} |"
        )
    result = {
        "meta": {
            "steps": args.steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "records_tokens": sum(len(d) for d in records),
            "augmented_tokens": sum(len(d) for d in docs[len(records) :]),
            "augmented_texts": len(docs) - len(records),
            "total_s": time.perf_counter() - t_run,
        },
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
