"""Pass key on a real pretrained model (SmolLM2-135M-Instruct), in model tokens, memory on and off.

    python scripts/eval_smollm2.py --lengths 4096 16384 --samples 20 --rows bare off store
    python scripts/eval_smollm2.py --calibrate          # choose the retrieval heads (about 30 s)
    python scripts/eval_smollm2.py --calibrate --calibrate-by search --out results/smollm2_search_heads
    python scripts/eval_smollm2.py --run runs/smollm2_passkey --rows tuned tuned_off --lengths 32768
    python scripts/eval_smollm2.py --run runs/smollm2_passkey --heldout   # text loss before/after

Every prompt is the papers' pass-key format (memstack.data.tasks.passkey_sample) in SmolLM2's
own tokens: instruction, filler (``--filler synthetic``: the repeated sentences of Landmark /
Infini-attention; ``text``: the held-out split of the King James Bible), the needle at depth
``(i + 0.5) / samples`` for prompt ``i``, its own key and passage per prompt (seeded by row-free
``sample_seed``, so every row sees the same prompts), and the question "What is the pass key?
The pass key is". A prompt counts as found when the key's digits appear in the 8 greedy tokens
that follow. Rows:

- ``bare``: the model alone, full attention over the whole prompt (its window is 8,192 tokens;
  longer prompts are skipped unless ``--past-window``);
- ``off``: memstack in segments of ``--segment`` tokens with the store switched off; each
  segment sees the previous one's last 256 tokens (the carry kind), so the answer sees the
  question but nothing older;
- ``store``: the same plus the long-term store, training-free: every token's key at the
  calibrated retrieval heads is indexed, the question's last queries search it (``close_prompt``:
  the prompt's end closes a segment and the answer opens a fresh one), and the best chunks' tokens
  are put back before the carried tokens (the ``tokens`` readout), fused over the heads' layers;
- ``compressive``: Infini-attention's compressive memory on every layer, gates untrained, no store;
- ``store_all``: the store as configured before calibration existed (every layer, all heads,
  InfLLM's representative tokens), same readout and protocol;
- ``tuned`` / ``tuned_off``: the stack ``configs/smollm2_passkey.py`` fine-tuned (``--run``), with
  every memory on, and with all but the carried tokens off.

``--chat`` puts every prompt through SmolLM2's chat template (the text and question as the user's
message, "The pass key is" opening the assistant's reply); its cells are filed under the filler
``synthetic+chat`` or ``text+chat``. ``--calibrate`` ranks every head on 12 synthetic needles in
Python's language reference and writes the best ``--top-heads`` to ``<out>/heads.json``: by the
attention the question pays the needle (``--calibrate-by attention``, the default:
``memstack.evals.heads.retrieval_heads``), or by how well each head's own position-free search,
the store's, finds the needle's chunk (``search``: ``memstack.evals.heads.search_heads``, about 3
minutes). ``--heldout`` measures the ``--run`` stack's loss on held-out
text before and after training (``heldout.json``).

Results append to ``<out>/passkey.jsonl`` one prompt per line (a rerun skips what is there, so a
long run can be stopped and resumed) and the table with Wilson 95% intervals goes to
``<out>/passkey.json``. The weights are the GGUF's Q4_1 weights de-quantized: results carry that
quantization error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memstack.data.tasks import passkey_sample
from memstack.data.tokenizer import HFTokenizer
from memstack.evals.longcontext import (
    ROWS,
    Rows,
    answer,
    chat_prompt,
    heldout_passages,
    load_heads,
    mean_interval,
    passage_losses,
)
from memstack.io import write_json
from memstack.train.evaluate import load_run, sample_seed, wilson_interval
from memstack.train.loop import build_stack

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "smollm2"
WINDOW = 8192  # SmolLM2's trained context


def markdown(cells: list[dict[str, Any]]) -> str:
    """One table per filler: a row per system, a column per length, ``hits/n = mean [interval]``."""
    out = []
    for filler in sorted({c["filler"] for c in cells}):
        mine = [c for c in cells if c["filler"] == filler]
        lengths = sorted({c["length"] for c in mine})
        out.append(f"{filler} filler | " + " | ".join(f"{n:,} tokens" for n in lengths))
        out.append("---|" + "|".join("---" for _ in lengths))
        for row in [r for r in ROWS if any(c["row"] == r for c in mine)]:
            got = {c["length"]: c for c in mine if c["row"] == row}
            shown = []
            for n in lengths:
                c = got.get(n)
                shown.append(
                    ""
                    if c is None
                    else f"{c['hits']}/{c['n']} = {c['mean']:.0%} [{c['ci95'][0]:.0%}, {c['ci95'][1]:.0%}]"
                )
            out.append(f"{row} | " + " | ".join(shown))
        out.append("")
    return "\n".join(out)


def summarise(path: Path) -> dict[str, Any]:
    """Hits, n and Wilson interval per (filler, row, length) of the JSONL results."""
    cells: dict[tuple[str, str, int], list[bool]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        cells.setdefault((r["filler"], r["row"], r["length"]), []).append(r["found"])
    table = []
    for (filler, row, length), found in sorted(cells.items()):
        hits, n = sum(found), len(found)
        table.append(
            {
                "filler": filler,
                "row": row,
                "length": length,
                "hits": hits,
                "n": n,
                "mean": hits / n,
                "ci95": list(wilson_interval(hits, n)),
            }
        )
    return {"cells": table}


def heldout(args: argparse.Namespace, tok: HFTokenizer, argv: list[str] | None) -> dict:
    """Loss on held-out text of the ``--run`` stack before training (the same config, adapters
    and gates as initialised) and after, on the same passages: the KJV's test split and Python's
    language reference, neither of which the recipe trains on."""
    from pydoc_data.topics import topics

    from memstack.data.tasks import filler_text

    try:
        config, tuned, _ = load_run(args.run)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    length = 2 * config.stack.segment_len  # two segments: the second reads the first through memory
    texts = {"kjv_test": filler_text("test"), "python_reference": " ".join(topics[k] for k in sorted(topics))}
    before = build_stack(config).eval()
    result: dict[str, Any] = {"run": str(args.run), "passage_tokens": length, "texts": {}}
    for name, text in texts.items():
        passages = heldout_passages(tok, text, args.passages, length)
        t0 = time.perf_counter()
        b, a = passage_losses(before, passages), passage_losses(tuned, passages)
        result["texts"][name] = {
            "before": {"losses": b, **mean_interval(b)},
            "after": {"losses": a, **mean_interval(a)},
            "after_minus_before": mean_interval([y - x for x, y in zip(b, a, strict=True)]),
            "seconds": time.perf_counter() - t0,
        }
        r = result["texts"][name]
        print(
            f"{name:17s} before {r['before']['mean']:.4f}  after {r['after']['mean']:.4f}  "
            f"change {r['after_minus_before']['mean']:+.4f} [{r['after_minus_before']['ci95'][0]:+.4f}, "
            f"{r['after_minus_before']['ci95'][1]:+.4f}]  ({len(passages)} passages of {length} tokens)"
        )
    result["command"] = "python scripts/eval_smollm2.py " + " ".join(argv)
    write_json(args.out / "heldout.json", result)
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=ROWS, default=["bare", "off", "store"])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--filler", choices=["synthetic", "text"], default="synthetic")
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--past-window", action="store_true", help="run `bare` past 8,192 tokens too")
    p.add_argument("--calibrate", action="store_true", help="find the retrieval heads, write heads.json")
    p.add_argument(
        "--calibrate-by",
        choices=["attention", "search"],
        default="attention",
        help="--calibrate: rank heads by attention share on the needle, or by their own search's MRR",
    )
    p.add_argument("--top-heads", type=int, default=8)
    p.add_argument("--run", type=Path, help="a configs/smollm2_passkey.py run: the tuned rows' weights")
    p.add_argument(
        "--chat", action="store_true", help="put each prompt through the chat template (filler `NAME+chat`)"
    )
    p.add_argument(
        "--heldout",
        action="store_true",
        help="held-out text loss of --run's stack before and after training, write heldout.json",
    )
    p.add_argument("--passages", type=int, default=8, help="--heldout: passages per text")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    argv = sys.argv[1:] if argv is None else argv  # recorded with the results
    args = p.parse_args(argv)
    tuned = [r for r in args.rows if r.startswith("tuned")]
    if (tuned or args.heldout) and args.run is None:
        p.error(
            f"{'--heldout' if args.heldout else ' and '.join(tuned)} needs --run DIR (a scripts/train.py run)"
        )
    if args.run is not None and not (args.run / "config.json").is_file():
        raise SystemExit(
            f"error: {args.run} is not a training run (no config.json); train first: "
            f"python scripts/train.py configs/smollm2_passkey.py run.out_dir={args.run}"
        )
    torch.set_num_threads(args.threads)
    from memstack.pretrained import smollm2

    model, hf_tok = smollm2()
    tok = HFTokenizer(hf_tok)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        from memstack.evals.heads import heads_spec, retrieval_heads, search_heads

        t0 = time.perf_counter()
        by_search = args.calibrate_by == "search"
        scores = (search_heads if by_search else retrieval_heads)(model, hf_tok, prompts=12, length=1536)
        metric = "mrr" if by_search else "share"
        result = {
            "heads": heads_spec(scores, args.top_heads),
            "by": args.calibrate_by,
            "top": [{"layer": s.layer, "head": s.head, metric: s.score} for s in scores[:20]],
            "prompts": 12,
            "length": 1536,
            "seconds": time.perf_counter() - t0,
            "command": "python scripts/eval_smollm2.py " + " ".join(argv),
        }
        write_json(args.out / "heads.json", result)
        print(f"retrieval heads: {result['heads']} ({result['seconds']:.0f} s)")
        return result
    if args.heldout:
        return heldout(args, tok, argv)
    try:
        rows = Rows(model, load_heads(args.out), args.segment, args.run)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    filler = args.filler + ("+chat" if args.chat else "")
    log = args.out / "passkey.jsonl"
    done = set()
    if log.is_file():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done.add((r["filler"], r["row"], r["length"], r["sample"], round(r["depth"], 6)))
    for length in args.lengths:
        for row in args.rows:
            if row == "bare" and length > WINDOW and not args.past_window:
                continue
            for i in range(args.samples):
                depth = (i + 0.5) / args.samples
                if (filler, row, length, i, round(depth, 6)) in done:
                    continue
                s = passkey_sample(
                    tok,
                    length,
                    depth,
                    sample_seed("smollm2", args.seed, length, i),
                    filler=args.filler,
                    split="test",
                )
                ids = chat_prompt(hf_tok, s.prompt_ids) if args.chat else s.prompt_ids
                t0 = time.perf_counter()
                out = answer(row, model, rows.stack(row), ids)
                text = tok.decode(out)
                rec = {
                    "filler": filler,
                    "row": row,
                    "length": length,
                    "sample": i,
                    "depth": depth,
                    "passkey": s.passkey,
                    "answer": text,
                    "found": s.passkey in text,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                with log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    summary = summarise(log)
    summary["heads"] = rows.heads
    summary["command"] = "python scripts/eval_smollm2.py " + " ".join(argv)
    write_json(args.out / "passkey.json", summary)
    (args.out / "passkey.md").write_text(markdown(summary["cells"]))
    for c in summary["cells"]:
        lo, hi = c["ci95"]
        print(
            f"{c['filler']:9s} {c['row']:9s} {c['length']:7d}  {c['hits']:2d}/{c['n']:2d} = "
            f"{c['mean']:4.0%}  [{lo:.0%}, {hi:.0%}]"
        )
    return summary


if __name__ == "__main__":
    main()
