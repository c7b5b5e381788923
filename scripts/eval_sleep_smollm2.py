"""Sleep on a real model: invented facts read once by day, asked closed-book after each night.

    python scripts/eval_sleep_smollm2.py --variants "no sleep" lm --seeds 0 1 2
    python scripts/eval_sleep_smollm2.py --variants "lm + paraphrases" --set sleep.steps=40

SmolLM2-135M-Instruct (:func:`memstack.pretrained.smollm2`) wrapped with the store row's stack
(``results/smollm2/heads.json``'s calibrated heads, tokens readout, carried tokens). Each day the
stack reads ``--facts`` new invented facts (:mod:`memstack.evals.facts`: "Talvo Quenning's locker
number is 4821.", "... was born in Brimholt."), each after 20 words of the King James Bible's
training split, so the text goes into the long-term store; then it sleeps (one night). After
every night every fact so far is asked *closed-book* (every memory off, adapters on):

- ``stored``: completion of the stored phrasing, plain text ("Talvo Quenning's locker number is");
- ``unseen``: two questions never trained on, through the chat template, the assistant's reply
  opened with the answer's first words;
- ``night 1``: the stored-phrasing recall of the first night's facts (what later nights keep);
  with one adapter per night also ``night 1 alone``, the same with only the first adapter active
  (whether a later adapter overrides the first or the first was damaged);
- forgetting: mean loss on held-out windows of Python's language reference (a kind of text the
  facts never use) and of the Bible's test split, and the general questions the base model
  answers right (:data:`memstack.evals.facts.GENERAL`).

Rows: ``no sleep`` (closed-book, the floor), ``open book`` (no sleep, the store on: each
question answered by ``generate(close_prompt=True)`` from the day's memory, the ceiling), and
the sleeping variants of :data:`VARIANTS`, each from one fresh copy of the stack and the same
facts per seed. A seed draws new facts and new filler. Recall is exact greedy match of the
value's tokens (:func:`memstack.evals.facts.greedy_hits`). Cells pool the seeds' facts (Wilson
95% interval) and give the per-seed range.

Replay (``--replay``, for the variants with replay and KL): ``kjv``, 256 windows of the Bible's
training split; or ``kjv+self``, 128 of them and 128 windows the base model writes itself
(:func:`memstack.sleep.generated_windows`, 8 samples from each of :data:`REPLAY_PROMPTS`, chat
requests of many kinds, none of them a general question), so the KL holds the model to the base
on chat and code as well as on the Bible.

Results: one line per (variant, seed, night) in ``<out>/sleep.jsonl`` (a rerun skips what is
there), the table in ``<out>/sleep.md`` and ``sleep.json``, the plot ``sleep.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memstack import MemoryStack
from memstack.data.filler import filler_text
from memstack.evals.facts import (
    GENERAL,
    PARAPHRASES,
    QUESTIONS,
    Fact,
    day_text,
    find_facts,
    greedy_hits,
    invent_facts,
    question_prompt,
    stored_prompt,
    training_chat,
)
from memstack.evals.longcontext import stack_config
from memstack.io import write_json, write_text
from memstack.sleep import SleepConfig, generated_windows, mean_nll, night_documents, sleep, text_windows
from memstack.train.config import Config, apply_overrides
from memstack.train.evaluate import sample_seed, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "smollm2_sleep"
RECIPE = SleepConfig(
    rank=16,
    alpha=32.0,
    lr=1e-3,
    steps=40,
    batch_size=8,
    seq_len=128,
    rehearsal=0.0,  # the variants add it (the library's default is 1.0)
    target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
)
"""Every sleeping variant's recipe before its own changes (``--set sleep.KEY=VALUE`` edits it)."""

VARIANTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "lm": ({}, None),
    "lm + replay + KL": ({"replay_ratio": 0.2, "kl_weight": 1.0}, None),
    "lm + paraphrases": ({}, "paraphrases"),
    "distill + paraphrases": ({"objective": "distill"}, "paraphrases"),
    "self-generated": ({}, "self"),
    "one adapter": ({"adapter": "continue"}, None),
    "rehearsal": ({"rehearsal": 1.0}, None),
    "rehearsal + replay + KL": ({"rehearsal": 1.0, "replay_ratio": 0.2, "kl_weight": 1.0}, None),
    "rehearsal + paraphrases + replay + KL": (
        {"rehearsal": 1.0, "replay_ratio": 0.2, "kl_weight": 1.0},
        "paraphrases",
    ),
    "rehearsal + paraphrases + questions + replay + KL": (
        {"rehearsal": 1.0, "replay_ratio": 0.2, "kl_weight": 1.0},
        "paraphrases + questions",
    ),
}
"""Sleeping variants: (changes to the recipe, augmentation: None, ``paraphrases`` (each fact
found in a night's records restated in :data:`~memstack.evals.facts.PARAPHRASES`),
``paraphrases + questions`` (those, and each fact asked and answered in a two-turn chat of
:data:`~memstack.evals.facts.TRAINING_QUESTIONS`, other questions than the unseen ones) or ``self``
(the model's own questions and restatements of each sentence of the records, by its ``generate``
before the night's adapter exists))."""
ROWS = ("no sleep", "open book", *VARIANTS)
REPLAY_PROMPTS = (
    "Write a short poem about autumn leaves.",
    "Write a Python function that returns the largest item of a list.",
    "Give me three tips for studying for an exam.",
    "Tell me a short story about a lost dog who finds his way home.",
    "Explain what a for loop does in programming.",
    "Write a polite email asking a colleague to move our meeting to Friday.",
    "How do I make a good cup of tea?",
    "List some healthy breakfast ideas.",
    "Explain the difference between a list and a tuple in Python.",
    "What should I pack for a weekend camping trip?",
    "Write a haiku about the sea.",
    "Explain recursion to a beginner.",
    "Write a SQL query that counts the rows of a table named orders.",
    "Describe a busy market in the morning.",
    "Why is regular exercise good for health?",
    "Summarize the benefits of reading books.",
)
"""Chat requests the base model answers for the ``kjv+self`` replay: writing, code, advice and
explanation, disjoint from :data:`~memstack.evals.facts.GENERAL` (the forgetting probe)."""
SELF_PROMPT = (
    "Here is a sentence: {sentence}\n"
    "Restate it in other words, then write one question about it and its answer."
)


def user_turn(tokenizer: Any, content: str) -> list[int]:
    """``content`` as the user's turn through the chat template, the assistant's reply opened."""
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(chat, add_special_tokens=False)


def paraphrase_augment(tokenizer: Any, questions: bool = False):
    """Each fact stated in a night document, restated in every training paraphrase; with
    ``questions`` also asked and answered in a two-turn chat (:func:`training_chat`)."""

    def augment(doc: torch.Tensor) -> list[torch.Tensor]:
        facts = find_facts(tokenizer.decode(doc.tolist()))
        texts = [" " + f.sentence(t) for f in facts for t in PARAPHRASES[f.relation]]
        if questions:
            texts += [training_chat(tokenizer, f) for f in facts]
        return [torch.tensor(tokenizer.encode(t, add_special_tokens=False)) for t in texts]

    return augment


def self_augment(stack: MemoryStack, tokenizer: Any, max_new_tokens: int = 48):
    """Self-study: for each sentence of a night document, the model's own restatement and
    question (greedy, memories off, the adapters as they are before the night), appended to the
    sentence: the text it then trains on."""

    def augment(doc: torch.Tensor) -> list[torch.Tensor]:
        text = tokenizer.decode(doc.tolist())
        out = []
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            if len(sentence.split()) < 4:
                continue
            ids = torch.tensor([user_turn(tokenizer, SELF_PROMPT.format(sentence=sentence.strip()))])
            ids = ids.to(stack.device)
            with stack.memory_off():
                new = stack.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            reply = tokenizer.decode(new[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            out.append(torch.tensor(tokenizer.encode(" " + sentence.strip() + " " + reply.strip())))
        return out

    return augment


def process_memory_gb() -> dict[str, float] | None:
    """This process's resident memory in GB from ``/proc/self/status`` (Linux): ``rss`` now and
    ``peak`` (VmHWM) since the last :func:`reset_peak_memory`; ``None`` where there is no /proc."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
    if len(kib) < 2:
        return None
    return {"rss": kib["VmRSS"] / 2**20, "peak": kib["VmHWM"] / 2**20}


def reset_peak_memory() -> None:
    """Restart the peak (VmHWM) from the current RSS, so each night's peak is its own (Linux's
    ``clear_refs`` 5; a no-op where it is not writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def night_memory() -> dict[str, float] | None:
    """The night's peak and end RSS, and the RSS after glibc's ``malloc_trim(0)`` hands free
    heap back to the OS. Why: resident memory grew night over night (7.8 to 16 GB); if the
    trimmed RSS stays flat while the peak grows, the growth is each night's working set (or the
    allocator keeping freed memory), not objects held from earlier nights."""
    import ctypes

    mem = process_memory_gb()
    if mem is None:
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: no trim, the figure is the plain RSS
        pass
    trimmed = process_memory_gb()
    return {**mem, "rss_trimmed": trimmed["rss"] if trimmed else mem["rss"]}


def logits_off(stack: MemoryStack):
    """``(ids, mask) -> logits`` of the stack with every memory off (adapters on)."""

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with stack.memory_off():
            return stack(ids.to(stack.device), attention_mask=mask.to(stack.device)).logits

    return run


def prompts(tokenizer: Any, facts: list[Fact]) -> dict[str, list[tuple[list[int], list[int]]]]:
    """The stored-phrasing and unseen-question prompts of ``facts``."""
    return {
        "stored": [stored_prompt(tokenizer, f) for f in facts],
        "unseen": [question_prompt(tokenizer, f, w) for w in range(2) for f in facts],
    }


@torch.no_grad()
def open_book(stack: MemoryStack, pairs: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Each prompt answered from the day's memory (store on): greedy tokens equal the value."""
    hits = []
    for p, q in pairs:
        ids = torch.tensor([p], device=stack.device)
        out = stack.generate(ids, max_new_tokens=len(q), state=stack.state, close_prompt=True)
        hits.append(out[0, len(p) :].tolist() == q)
    return hits


@torch.no_grad()
def general(stack: MemoryStack, tokenizer: Any) -> list[bool]:
    """Whether each general question's greedy answer (memories off) contains its word."""
    hits = []
    for question, word in GENERAL:
        ids = torch.tensor([user_turn(tokenizer, question)], device=stack.device)
        with stack.memory_off():
            out = stack.generate(ids, max_new_tokens=16)
        hits.append(word.lower() in tokenizer.decode(out[0, ids.shape[1] :].tolist()).lower())
    return hits


def read_day(stack: MemoryStack, tokenizer: Any, text: str) -> int:
    """The stack reads ``text`` segment by segment (its store fills); returns the token count."""
    ids = torch.tensor([tokenizer.encode(" " + text)], device=stack.device)
    seg = stack.config.segment_len
    for a in range(0, ids.shape[1], seg):
        stack.step(ids[:, a : a + seg])
    return ids.shape[1]


def run_one(
    base: MemoryStack,
    tokenizer: Any,
    variant: str,
    seed: int,
    args: argparse.Namespace,
    recipe: SleepConfig,
    data: dict[str, Any],
    base_general: list[bool],
    emit: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One variant and seed: every night's read, sleep and measurements; ``emit(row)`` is called
    as each night's row is ready (so an interrupted run keeps the nights it finished)."""
    facts = invent_facts(args.nights * args.facts, sample_seed("sleep-facts", seed))
    nights = [facts[n * args.facts : (n + 1) * args.facts] for n in range(args.nights)]
    rng = random.Random(sample_seed("sleep-day", seed))
    tail = " ".join(data["train_words"][:64])  # the stream ends in filler: the last fact's chunk closes
    days = [day_text(fs, data["train_words"], rng) + " " + tail for fs in nights]
    stack = copy.deepcopy(base)
    stack.reset()
    changes, aug = VARIANTS.get(variant, ({}, None))
    cfg = dataclasses.replace(recipe, seed=seed, **changes)
    rows = []
    for night in range(args.nights):
        reset_peak_memory()
        t0 = time.perf_counter()
        n_tokens = read_day(stack, tokenizer, days[night])
        docs = [d for row in night_documents(stack.state)[0] for d in row]
        stored_text = tokenizer.decode(torch.cat(docs).tolist()) if docs else ""
        in_store = sum(f.sentence() in stored_text for f in nights[night])
        report = None
        if variant in VARIANTS:
            augment = {
                None: None,
                "paraphrases": paraphrase_augment(tokenizer),
                "paraphrases + questions": paraphrase_augment(tokenizer, questions=True),
                "self": self_augment(stack, tokenizer),
            }[aug]
            report = sleep(
                stack,
                cfg,
                replay=data["replay"],
                held_out=None,  # measured below on two texts, after every night and every row
                augment=augment,
                progress=False,
            ).to_dict()
        t_sleep = time.perf_counter()
        so_far = [f for fs in nights[: night + 1] for f in fs]
        ask = prompts(tokenizer, so_far)
        first = ask["stored"][: args.facts]
        if variant == "open book":
            stored, unseen = open_book(stack, ask["stored"]), open_book(stack, ask["unseen"])
        else:
            run = logits_off(stack)
            pad = tokenizer.pad_token_id or 0
            stored = greedy_hits(run, ask["stored"], pad_id=pad)
            unseen = greedy_hits(run, ask["unseen"], pad_id=pad)
        first_hits = stored[: args.facts]  # night 1's facts come first
        row = {
            "variant": variant,
            "seed": seed,
            "night": night + 1,
            "facts": len(so_far),
            "day_tokens": n_tokens,
            "facts_in_store": in_store,
            "stored": stored,
            "unseen": unseen,
            "night1": first_hits,
            "general": [g for g, b in zip(general(stack, tokenizer), base_general, strict=True) if b],
            "python_loss": mean_nll(stack, data["python"], None, 8),
            "kjv_loss": mean_nll(stack, data["kjv"], None, 8),
            "sleep_seconds": t_sleep - t0,
            "report": report,
        }
        if variant in VARIANTS and cfg.adapter == "new" and night > 0 and cfg.merge == "none":
            adapters = stack.adapters
            active = adapters.active()
            adapters.activate(active[:1])
            row["night1_alone"] = greedy_hits(logits_off(stack), first, pad_id=tokenizer.pad_token_id or 0)
            adapters.activate(active)
        row["seconds"] = time.perf_counter() - t0
        row["memory_gb"] = night_memory()
        rows.append(row)
        if emit is not None:
            emit(row)
        print(
            f"{variant:22s} seed {seed} night {night + 1}: stored {sum(stored)}/{len(stored)}  "
            f"unseen {sum(unseen)}/{len(unseen)}  night 1 {sum(first_hits)}/{len(first_hits)}"
            + (f" (alone {sum(row['night1_alone'])})" if "night1_alone" in row else "")
            + f"  python {row['python_loss']:.3f}  general {sum(row['general'])}/{sum(base_general)}"
            f"  in store {in_store}/{args.facts}  {row['seconds']:.0f} s"
            + (
                f"  peak {row['memory_gb']['peak']:.1f} GB, trimmed {row['memory_gb']['rss_trimmed']:.1f} GB"
                if row["memory_gb"]
                else ""
            ),
            flush=True,
        )
    return rows


def same_run(row: dict[str, Any], same: dict[str, Any]) -> bool:
    """Whether a logged row has this run's recipe, nights and facts per night (``same``); a recipe
    field the row predates had its default then, so old rows still count."""
    recipe = {**dataclasses.asdict(SleepConfig()), **row.get("recipe", {})}
    return (
        recipe == same["recipe"]
        and row.get("replay", "kjv") == same.get("replay", "kjv")
        and all(row.get(k) == same[k] for k in ("nights", "per_night"))
    )


def rate(lists: list[list[bool]]) -> dict[str, Any]:
    """Pooled hits over seeds, Wilson 95% interval, and the per-seed range of the rate."""
    hits, n = sum(sum(x) for x in lists), sum(len(x) for x in lists)
    lo, hi = wilson_interval(hits, n)
    per_seed = [sum(x) / len(x) for x in lists if x]
    return {
        "hits": hits,
        "n": n,
        "mean": hits / n,
        "ci95": [lo, hi],
        "seeds": len(lists),
        "seed_min": min(per_seed),
        "seed_max": max(per_seed),
    }


def summarise(records: list[dict[str, Any]], base_loss: dict[str, float]) -> dict[str, Any]:
    """Per variant and night: pooled rates and the mean held-out change against the base."""
    table: dict[str, Any] = {}
    for variant in ROWS:
        mine = [r for r in records if r["variant"] == variant]
        for night in sorted({r["night"] for r in mine}):
            rs = [r for r in mine if r["night"] == night]
            cell = {k: rate([r[k] for r in rs]) for k in ("stored", "unseen", "night1", "general")}
            if all("night1_alone" in r for r in rs):
                cell["night1_alone"] = rate([r["night1_alone"] for r in rs])
            for text in ("python", "kjv"):
                cell[f"{text}_change"] = sum(r[f"{text}_loss"] for r in rs) / len(rs) / base_loss[text] - 1
            cell["night_seconds"] = sum(r["sleep_seconds"] for r in rs) / len(rs)
            if all(r.get("memory_gb") for r in rs):  # rows from before the measure have none
                cell["peak_gb"] = max(r["memory_gb"]["peak"] for r in rs)
                cell["rss_trimmed_gb"] = max(r["memory_gb"]["rss_trimmed"] for r in rs)
            table.setdefault(variant, {})[str(night)] = cell
    return table


def markdown(table: dict[str, Any]) -> str:
    """One table per measure: a row per variant, a column per night. A rate is pooled over seeds
    with its Wilson interval, and with more than one seed the range of the per-seed rates beside
    it (the interval treats facts as independent; the range shows what the seed alone moves)."""

    def pct(c: dict[str, Any]) -> str:
        lo, hi = c["ci95"]
        spread = f" (seeds {c['seed_min']:.0%}-{c['seed_max']:.0%})" if c["seeds"] > 1 else ""
        return f"{c['mean']:.0%} [{lo:.0%}, {hi:.0%}]{spread}"

    nights = sorted({int(n) for cells in table.values() for n in cells})
    out = []
    measures = [
        ("stored phrasing, all facts so far", lambda c: pct(c["stored"])),
        ("unseen questions (chat), all facts so far", lambda c: pct(c["unseen"])),
        ("night 1's facts, stored phrasing", lambda c: pct(c["night1"])),
        (
            "night 1's facts with only the first adapter active",
            lambda c: pct(c["night1_alone"]) if "night1_alone" in c else "",
        ),
        (
            "held-out loss change, Python reference / KJV test; general questions kept",
            lambda c: (
                f"{c['python_change']:+.1%} / {c['kjv_change']:+.1%}; "
                f"{c['general']['hits']}/{c['general']['n']}"
            ),
        ),
        ("seconds per day and night (read, sleep)", lambda c: f"{c['night_seconds']:.0f}"),
        (
            "resident memory, GB: the night's peak / after the night, free heap returned (most over seeds)",
            lambda c: f"{c['peak_gb']:.1f} / {c['rss_trimmed_gb']:.1f}" if "peak_gb" in c else "",
        ),
    ]
    for title, cell in measures:
        rows = {
            variant: [cell(cells[str(n)]) if str(n) in cells else "" for n in nights]
            for variant, cells in table.items()
        }
        if not any(any(row) for row in rows.values()):
            continue  # a measure no row has (memory, in runs from before it was taken)
        out += [
            f"**{title}**",
            "",
            "variant | " + " | ".join(f"night {n}" for n in nights),
            "---|" + "---|" * len(nights),
        ]
        out += [f"{variant} | " + " | ".join(row) for variant, row in rows.items()]
        out.append("")
    return "\n".join(out)


def plot(table: dict[str, Any], path: Path) -> None:
    """Stored-phrasing, unseen-question and night-1 recall per night, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for variant, cells in table.items():
        nights = sorted(int(n) for n in cells)
        for ax, key in zip(axes, ("stored", "unseen", "night1"), strict=True):
            ax.plot(nights, [cells[str(n)][key]["mean"] for n in nights], marker="o", label=variant)
    for ax, title in zip(axes, ("stored phrasing", "unseen questions", "night 1's facts"), strict=True):
        ax.set(xlabel="night", ylabel="recall", title=title, ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=ROWS, default=["no sleep", "lm"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nights", type=int, default=3)
    p.add_argument("--facts", type=int, default=30, help="new facts per night")
    p.add_argument("--segment", type=int, default=512, help="the stack's segment length (tokens)")
    p.add_argument("--set", nargs="*", default=[], metavar="sleep.KEY=VALUE", help="edit the recipe")
    p.add_argument("--replay", choices=("kjv", "kjv+self"), default="kjv", help="replay text (see above)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    bad = [s for s in args.set if not s.startswith("sleep.")]
    if bad:
        p.error(f"--set takes sleep.KEY=VALUE (a SleepConfig field), got {bad}")
    try:
        recipe = apply_overrides(Config(sleep=RECIPE), args.set).sleep
    except ValueError as e:
        p.error(str(e))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from pydoc_data.topics import topics

    from memstack.pretrained import smollm2

    heads_file = ROOT / "results" / "smollm2" / "heads.json"
    if not heads_file.is_file():
        raise SystemExit(f"error: {heads_file} is missing; run python scripts/eval_smollm2.py --calibrate")
    model, tokenizer = smollm2()
    base = MemoryStack(model, stack_config(json.loads(heads_file.read_text())["heads"], args.segment)).eval()
    python_text = " ".join(topics[k] for k in sorted(topics))
    data = {
        "train_words": filler_text("train").split(" "),
        "python": text_windows(python_text, tokenizer, 256, 16),
        "kjv": text_windows(filler_text("test"), tokenizer, 256, 16),
        "replay": text_windows(filler_text("train")[-400_000:], tokenizer, 128, 256),
    }
    if args.replay == "kjv+self":
        prompts = [user_turn(tokenizer, q) for q in REPLAY_PROMPTS]
        own = generated_windows(base, prompts, per_prompt=8, seq_len=128)
        data["replay"] = torch.cat([data["replay"][:128], own])
    base_loss = {
        "python": mean_nll(base, data["python"], None, 8),
        "kjv": mean_nll(base, data["kjv"], None, 8),
    }
    base_general = general(base, tokenizer)
    print(
        f"base: python {base_loss['python']:.4f}  kjv {base_loss['kjv']:.4f}  "
        f"general {sum(base_general)}/{len(GENERAL)}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "sleep.jsonl"
    same = {
        "recipe": dataclasses.asdict(recipe),
        "nights": args.nights,
        "per_night": args.facts,
        "replay": args.replay,
    }
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    records = [r for r in records if same_run(r, same)]  # this recipe's only
    done = {(r["variant"], r["seed"]) for r in records if r["night"] == args.nights}

    def emit(row: dict[str, Any]) -> None:
        row = {**row, **same, "argv": argv}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        records.append(row)

    todo = [(v, s) for v in args.variants for s in args.seeds if (v, s) not in done]

    def stale(r: dict[str, Any]) -> bool:
        """A partial row of a variant-seed about to run again from its first night."""
        return (r["variant"], r["seed"]) in todo and same_run(r, same)

    if todo and log.is_file():
        lines = [line for line in log.read_text().splitlines() if line]
        write_text(log, "".join(line + "\n" for line in lines if not stale(json.loads(line))))
    records[:] = [r for r in records if not stale(r)]
    for variant, seed in todo:
        run_one(base, tokenizer, variant, seed, args, recipe, data, base_general, emit)
    table = summarise(records, base_loss)
    result = {
        "command": "python scripts/eval_sleep_smollm2.py " + " ".join(argv),
        "base": {**base_loss, "general": base_general},
        "questions": {k: [q for q, _ in v] for k, v in QUESTIONS.items()},
        "recipe": dataclasses.asdict(recipe),
        "replay": args.replay,
        "table": table,
    }
    write_json(args.out / "sleep.json", result)
    (args.out / "sleep.md").write_text(markdown(table))
    plot(table, args.out / "sleep.png")
    print(markdown(table))
    return result


if __name__ == "__main__":
    main()
