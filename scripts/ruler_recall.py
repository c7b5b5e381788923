"""Search alone on RULER's prompts: how many of the asked values each retriever brings back.

    python scripts/ruler_recall.py --lengths 16384 --tasks niah_multiquery niah_multivalue --samples 20
    python scripts/ruler_recall.py --windows 16 32 64 --lengths 4096 16384

``scripts/eval_ruler.py`` scores what the model answers, which mixes two things: whether the
retriever found the needles, and whether a 135M model reads them back. This script measures the
first alone, on the same prompts (``sample_seed("ruler", seed, task, length, i)``, so sample ``i``
here is sample ``i`` there): a sample's score is the share of its expected strings present in the
text its row's reader gets from the context, at the same budget as eval_ruler's ``_near`` rows
(the 4 best 32-token chunks and each one's neighbour before and after):

- ``store_near`` (and ``store_near+wN`` for each ``--windows`` N other than 16): the chunks the
  store on the calibrated heads finds with the prompt's last N queries (its ``tokens`` readout's
  search before the answer's segment), plus the carried last ``RECENT`` tokens of the prompt,
  which that row's answer reads as well (with ``--keep-initial N``, rows ``+iN``: the prompt's
  first N tokens kept in view and out of the search);
- ``rag_bm25_near`` and ``rag_minilm_near`` (with the ``retrieval`` extra): the chunks BM25 and
  MiniLM choose for the question: those rows' whole prompts.

Instruction and question hold no expected string (they name keys, the answers are values), so
counting over the whole text a reader gets counts what retrieval brought.

One forward pass of the store stack per prompt and window (each segment's search shapes the
stream that follows, so a window is a run of its own). Only the tasks whose answers are strings
placed in the context are measured (the needle tasks and variable tracking): common and frequent
words are aggregations, their words present everywhere. Results append to
``<out>/recall.jsonl`` (a rerun skips what is there); the table per length with 95% intervals
and the paired differences on the same prompts (eval_ruler's :func:`summarise`, :data:`PAIRS`)
go to ``recall.json`` and ``recall.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import eval_ruler as E
import torch

from memstack.data.tokenizer import HFTokenizer
from memstack.evals.longcontext import NEAR, load_heads, stack_config
from memstack.evals.ruler import TASK_NAMES, make_sample
from memstack.io import write_json
from memstack.stack import MemoryStack
from memstack.train.evaluate import sample_seed

TASKS = tuple(t for t in TASK_NAMES if t not in ("common_words", "frequent_words"))
"""The tasks whose expected strings are placed in the context (aggregations left out)."""


def found(answers: tuple[str, ...] | list[str], text: str) -> float:
    """The share of ``answers`` present in ``text`` (RULER's score, applied to retrieved text)."""
    return sum(a in text for a in answers) / len(answers)


def store_reads(stack: MemoryStack, ids: list[int]) -> tuple[list[int], list[int]]:
    """The tokens the store row's answer reads from the context of prompt ``ids``, and where its
    hits start.

    The tokens: the prompt's first tokens its carry keeps (``initial``), the store's hits with
    their neighbours (its ``tokens`` readout's prefix, searched with the prompt's last
    ``block_len`` queries) and the prompt's last tokens the carry keeps (``recent``). The starts:
    the prompt positions of the ``top_k`` chunks the search chose, best first, before neighbours
    (0 is the prompt's first chunk, which holds a RULER prompt's instruction).

    One forward pass per stack: the window cannot be varied on a finished stream, because each
    segment's own search put its hits in front of that segment, and they shape every later layer's
    keys and queries (``tests/test_ruler_recall.py`` shows a stream read with one window and
    searched with another's tail find other chunks)."""
    kind = stack.kinds["store"]
    if kind.config.readout != "tokens":
        raise ValueError(
            f"store_reads needs a store with the tokens readout, got readout={kind.config.readout!r}"
        )
    carry = stack.config.kinds.get("carry")
    initial, recent = (carry.initial, carry.recent) if carry is not None else (0, 0)
    with torch.no_grad():
        state = stack.forward(torch.tensor([ids], device=stack.device), return_logits=False).state
    layers = state.memories["store"]
    prefix = kind.prefix(layers)
    tokens = [] if prefix is None else prefix[0][0][prefix[1][0]].tolist()
    best = kind.readout.hits(kind, layers)
    store = next(iter(layers.values())).stores[0]
    starts = [] if not best or not len(best[0]) else store.records(best[0])["start"].tolist()
    return ids[:initial] + tokens + (ids[-recent:] if recent else []), starts


def row_name(window: int, initial: int = 0) -> str:
    """The store row of a search window and ``--keep-initial``, named as eval_ruler records it."""
    return (
        "store_near"
        + (f"+w{window}" if window != E.WINDOW_QUERIES else "")
        + (f"+i{initial}" if initial else "")
    )


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """eval_ruler's :func:`~eval_ruler.summarise` per length: each length's average is over the
    tasks run at that length (the long lengths measure fewer tasks, the search-bound ones)."""
    parts = [
        E.summarise([r for r in records if r["length"] == n]) for n in sorted({r["length"] for r in records})
    ]
    summary = {key: [item for part in parts for item in part[key]] for key in ("cells", "paired")}
    summary["first_chunk"] = first_chunk_hits(records)
    return summary


def first_chunk_hits(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per store row, length and task: in how many of the prompts whose hits were recorded the
    search chose the prompt's first chunk (start 0, a RULER prompt's instruction) among its
    ``top_k`` hits, with the 95% interval of that share (records without ``hit_starts``, written
    before they were recorded, are left out)."""
    groups: dict[tuple[str, int, str], list[float]] = {}
    for r in records:
        if "hit_starts" in r:
            groups.setdefault((r["row"], r["length"], r["task"]), []).append(float(0 in r["hit_starts"]))
    return [
        {"row": row, "length": n, "task": task, "prompts": len(v), "first_chunk": int(sum(v))}
        | {"share": E.mean_interval(v)}
        for (row, n, task), v in sorted(groups.items())
    ]


def first_chunk_markdown(items: list[dict[str, Any]]) -> str:
    """The :func:`first_chunk_hits` as a list under the recall tables."""
    if not items:
        return ""
    lines = ["The prompt's first chunk (the instruction) among the store's hits:", ""]
    lines += [
        f"- {i['row']}, {i['task']} at {i['length']}: {i['first_chunk']} of {i['prompts']}" for i in items
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--lengths", type=int, nargs="+", default=[16384])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--windows", type=int, nargs="+", default=[E.WINDOW_QUERIES, 32])
    p.add_argument(
        "--keep-initial",
        type=int,
        default=0,
        help="the store keeps the prompt's first N tokens in view and unsearched (eval_ruler's +iN)",
    )
    p.add_argument("--rag", nargs="*", choices=("bm25", "minilm"), default=["bm25", "minilm"])
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--seed", type=int, default=30_000)
    p.add_argument("--heads", type=Path, default=E.HEADS, help="the folder of heads.json (calibrated heads)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=E.OUT)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.samples < 1 or any(n < 1 for n in args.lengths) or any(w < 1 for w in args.windows):
        p.error("--samples, --lengths and --windows take positive integers")
    if args.keep_initial < 0:
        p.error(f"--keep-initial {args.keep_initial}: expected an integer >= 0")
    try:
        heads = load_heads(args.heads)
        scorers = {f"rag_{name}_near": getattr(E, f"{name}_scorer")() for name in args.rag}
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    except ImportError as e:
        raise SystemExit(f"error: the RAG rows need the retrieval extra ({e.name} is missing)") from None
    torch.set_num_threads(args.threads)
    from memstack.pretrained import smollm2

    model, hf_tok = smollm2()
    tok = HFTokenizer(hf_tok)

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "recall.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["row"], r["task"], r["length"], r["sample"]) for r in records}
    rows = [row_name(w, args.keep_initial) for w in args.windows] + list(scorers)
    for length in args.lengths:
        for task in args.tasks:
            for i in range(args.samples):
                if all((row, task, length, i) in done for row in rows):
                    continue
                s = make_sample(task, tok, length, sample_seed("ruler", args.seed, task, length, i))
                read: dict[str, tuple[list[int], list[int] | None, float]] = {}  # row: (tokens, starts, s)
                for row in rows:
                    if (row, task, length, i) in done:
                        continue
                    t0 = time.perf_counter()
                    starts = None
                    if row in scorers:
                        ids = E.rag_prompt(tok, s.text, scorers[row], neighbours=NEAR)
                    else:
                        w = args.windows[rows.index(row)]
                        config = stack_config(heads, args.segment, NEAR, window=w, initial=args.keep_initial)
                        stack = MemoryStack(model, config)
                        ids, starts = store_reads(stack, s.ids)
                        stack.unwrap()
                    read[row] = (ids, starts, round(time.perf_counter() - t0, 2))
                new = [
                    {
                        "row": row,
                        "task": task,
                        "length": length,
                        "sample": i,
                        "answers": list(s.answers),
                        "score": found(s.answers, tok.decode(ids)),
                        "seconds": seconds,
                    }
                    | ({} if starts is None else {"hit_starts": starts})
                    for row, (ids, starts, seconds) in read.items()
                ]
                with log.open("a") as f:
                    f.writelines(json.dumps(rec) + "\n" for rec in new)
                records += new
                print(
                    f"{task:18s} {length:6d} #{i:2d}: "
                    + " ".join(f"{r['row']}={r['score']:.2f}" for r in new)
                )
    summary = summarise(records)
    summary["command"] = "python scripts/ruler_recall.py " + " ".join(argv)
    summary["heads"] = heads
    write_json(args.out / "recall.json", summary)
    md = E.markdown(summary) + "\n" + first_chunk_markdown(summary["first_chunk"])
    (args.out / "recall.md").write_text(md)
    print(md)
    return summary


if __name__ == "__main__":
    main()
