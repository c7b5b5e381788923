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
  which that row's answer reads as well;
- ``rag_bm25_near`` and ``rag_minilm_near`` (with the ``retrieval`` extra): the chunks BM25 and
  MiniLM choose for the question: those rows' whole prompts.

Instruction and question hold no expected string (they name keys, the answers are values), so
counting over the whole text a reader gets counts what retrieval brought.

One forward of the store stack per prompt serves every window: the windows are tails of the
longest one's queries. Only the tasks whose answers are strings placed in the context are
measured (the needle tasks and variable tracking): common and frequent words are aggregations,
their words present everywhere. Results append to ``<out>/recall.jsonl`` (a rerun skips what is
there); the table per length with 95% intervals and the paired differences on the same prompts
(eval_ruler's :func:`summarise`, :data:`PAIRS`) go to ``recall.json`` and ``recall.md``.
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
from memstack.evals.longcontext import NEAR, RECENT, load_heads, stack_config
from memstack.evals.ruler import TASK_NAMES, make_sample
from memstack.io import write_json
from memstack.memory.store.kind import StoreState
from memstack.stack import MemoryStack
from memstack.train.evaluate import sample_seed

TASKS = tuple(t for t in TASK_NAMES if t not in ("common_words", "frequent_words"))
"""The tasks whose expected strings are placed in the context (aggregations left out)."""


def found(answers: tuple[str, ...] | list[str], text: str) -> float:
    """The share of ``answers`` present in ``text`` (RULER's score, applied to retrieved text)."""
    return sum(a in text for a in answers) / len(answers)


def store_reads(
    stack: MemoryStack, ids: list[int], windows: list[int], recent: int = RECENT
) -> dict[int, list[int]]:
    """The tokens the store row's answer reads from the context of prompt ``ids``, per search
    window: the store's hits (its ``tokens`` readout's prefix, searched with the prompt's last
    ``w`` queries) followed by the prompt's last ``recent`` tokens (the carry).

    ``stack`` must have a ``tokens`` store with ``query_pool="max"`` and ``block_len`` at least
    ``max(windows)``: its tail holds one search vector per query, oldest first, so the last ``w``
    of them are exactly the tail a stack with ``block_len=w`` keeps (``tests/test_ruler_recall.py``)."""
    c = stack.kinds["store"].config
    if c.readout != "tokens" or c.query_pool != "max" or max(windows) > c.block_len:
        raise ValueError(
            f"store_reads needs a tokens store with query_pool='max' and block_len >= {max(windows)}, "
            f"got readout={c.readout!r}, query_pool={c.query_pool!r}, block_len={c.block_len}"
        )
    with torch.no_grad():
        layers = stack.forward(torch.tensor([ids], device=stack.device), return_logits=False).state.memories[
            "store"
        ]
    out = {}
    for w in windows:
        prefix = stack.kinds["store"].prefix(
            {n: StoreState(s.stores, s.tail[:, -w:]) for n, s in layers.items()}
        )
        hits = [] if prefix is None else prefix[0][0][prefix[1][0]].tolist()
        out[w] = hits + ids[-recent:]
    return out


def row_name(window: int) -> str:
    """The store row of a search window, named as eval_ruler records it."""
    return "store_near" if window == E.WINDOW_QUERIES else f"store_near+w{window}"


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """eval_ruler's :func:`~eval_ruler.summarise` per length: each length's average is over the
    tasks run at that length (the long lengths measure fewer tasks, the search-bound ones)."""
    parts = [
        E.summarise([r for r in records if r["length"] == n]) for n in sorted({r["length"] for r in records})
    ]
    return {key: [item for part in parts for item in part[key]] for key in ("cells", "paired")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--lengths", type=int, nargs="+", default=[16384])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--windows", type=int, nargs="+", default=[E.WINDOW_QUERIES, 32])
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
    stack = MemoryStack(model, stack_config(heads, args.segment, NEAR, window=max(args.windows)))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "recall.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    done = {(r["row"], r["task"], r["length"], r["sample"]) for r in records}
    rows = [row_name(w) for w in args.windows] + list(scorers)
    for length in args.lengths:
        for task in args.tasks:
            for i in range(args.samples):
                if all((row, task, length, i) in done for row in rows):
                    continue
                s = make_sample(task, tok, length, sample_seed("ruler", args.seed, task, length, i))
                t0 = time.perf_counter()
                read = {row_name(w): ids for w, ids in store_reads(stack, s.ids, args.windows).items()}
                for row, scorer in scorers.items():
                    read[row] = E.rag_prompt(tok, s.text, scorer, neighbours=NEAR)
                seconds = round(time.perf_counter() - t0, 2)
                with log.open("a") as f:
                    for row, ids in read.items():
                        if (row, task, length, i) in done:
                            continue
                        rec = {
                            "row": row,
                            "task": task,
                            "length": length,
                            "sample": i,
                            "answers": list(s.answers),
                            "score": found(s.answers, tok.decode(ids)),
                            "seconds": seconds,
                        }
                        f.write(json.dumps(rec) + "\n")
                        records.append(rec)
                print(
                    f"{task:18s} {length:6d} #{i:2d}: "
                    + " ".join(f"{r['row']}={r['score']:.2f}" for r in records[-len(read) :]),
                    flush=True,
                )
    summary = summarise(records)
    summary["command"] = "python scripts/ruler_recall.py " + " ".join(argv)
    summary["heads"] = heads
    write_json(args.out / "recall.json", summary)
    (args.out / "recall.md").write_text(E.markdown(summary))
    print(E.markdown(summary))
    return summary


if __name__ == "__main__":
    main()
