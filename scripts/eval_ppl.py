"""Loss by segment index on long documents, memory on and off: does the loss fall further into a
document when memory is on?

    python scripts/eval_ppl.py runs/tiny_text --data ../shared/data/kjv.txt --doc-len 16384 --docs 8

Writes ``ppl_by_segment.json`` and ``ppl_by_segment.png`` into the run directory (or ``--out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from memstack.data.text import load_text_dataset, tokenize_dataset
from memstack.io import write_json
from memstack.train.config import add_set_argument
from memstack.train.evaluate import load_run, loss_by_segment
from memstack.train.plots import loss_by_segment_plot


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", required=True, help="text file, directory or dataset name")
    p.add_argument(
        "--doc-separator", default=None, help="regex splitting a file into documents (default: the run's)"
    )
    p.add_argument("--doc-len", type=int, default=8192, help="tokens per document (longer ones are cut)")
    p.add_argument("--docs", type=int, default=8, help="documents (those of at least doc-len tokens)")
    p.add_argument("--out", type=Path)
    add_set_argument(p)
    args = p.parse_args(argv)

    try:
        config, stack, tokenizer = load_run(args.run_dir, args.set)
    except (ValueError, FileNotFoundError) as e:  # no run yet, a bad --set: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    separator = args.doc_separator or config.data.doc_separator
    try:
        docs = tokenize_dataset(load_text_dataset(args.data, doc_separator=separator), tokenizer)
    except (ValueError, FileNotFoundError) as e:  # a missing --data file, a bad separator
        raise SystemExit(f"error: {e}") from None
    long_docs = [d[: args.doc_len] for d in docs["input_ids"] if len(d) >= args.doc_len][: args.docs]
    if not long_docs:
        raise SystemExit(f"error: no document in {args.data} has {args.doc_len} tokens; lower --doc-len")
    ids = torch.tensor(long_docs, dtype=torch.long)
    result = {"doc_len": args.doc_len, "docs": len(long_docs), "segment_len": stack.config.segment_len}
    for on in (True, False):
        result["memory_on" if on else "memory_off"] = loss_by_segment(stack, ids, use_memory=on)
    out_dir = args.out or args.run_dir
    write_json(out_dir / "ppl_by_segment.json", result)
    loss_by_segment_plot(result, out_dir / "ppl_by_segment.png")
    print("| segment | loss, memory on | loss, memory off |\n|---|---|---|")
    for i, (a, b) in enumerate(zip(result["memory_on"], result["memory_off"], strict=True)):
        print(f"| {i} | {a:.3f} | {b:.3f} |")
    return result


if __name__ == "__main__":
    main()
