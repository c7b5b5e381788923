"""Where does the answer come from? ``stack.explain`` on one pass-key prompt.

    python scripts/explain_passkey.py                       # shipped weights, 4,032 tokens
    python scripts/explain_passkey.py RUN --length 4032 --depth 0.5 --seed 3

Generates the answer with tracing, then prints, for each store layer, the chunks the answer's
query block retrieved (rank, score, stream position, text) and whether the needle's chunk is
among them, and each layer's per-head shares of local attention, compressive memory and the
store; writes the plot and the JSON next to each other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from memstack.data.tasks import passkey_sample
from memstack.io import write_json
from memstack.train.evaluate import load_run

SHIPPED = Path(__file__).resolve().parents[1] / "results" / "tiny_passkey_store" / "run"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path, default=SHIPPED)
    p.add_argument("--length", type=int, default=4032)
    p.add_argument("--depth", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("results/explain_passkey"))
    args = p.parse_args(argv)
    _, stack, tok = load_run(args.run)
    sample = passkey_sample(tok, args.length, args.depth, args.seed, filler="text", split="test")
    found = stack.explain(
        torch.tensor(sample.prompt_ids), tokenizer=tok, max_new_tokens=len(sample.answer_ids)
    )
    answer = tok.decode(found.output[0, args.length :].tolist())
    from memstack.data.tasks import PASSKEY_NEEDLE

    needle_len = len(tok.encode(PASSKEY_NEEDLE.format(key=sample.passkey)))
    needle = (sample.needle_start, sample.needle_start + needle_len)
    print(f"pass key {sample.passkey} hidden at tokens {needle[0]}-{needle[1]}; the model answers {answer!r}")
    store_layers = sorted({r.layer for r in found.retrievals})
    for layer in store_layers:
        hits = found.for_block(layer, args.length)  # the block of the answer's first token
        print(f"layer {layer}: the answer's block retrieved")
        for r in hits:
            holds = r.start < needle[1] and needle[0] < r.start + r.length
            mark = "  <- the needle" if holds else ""
            print(
                f"  #{r.rank} score {r.score:6.3f}  tokens {r.start}-{r.start + r.length}: {r.text!r}{mark}"
            )
    for layer, shares in found.shares.items():
        text = ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in shares.items())
        print(f"layer {layer} shares (mean over heads and queries): {text}")
    args.out.mkdir(parents=True, exist_ok=True)
    found.plot(args.out / "explain.png")
    report = {"passkey": sample.passkey, "answer": answer, "needle": needle, **found.to_dict()}
    write_json(args.out / "explain.json", report)
    print(f"wrote {args.out / 'explain.png'} and explain.json")
    return report


if __name__ == "__main__":
    main()
