"""The retrieval-policy trade: pass-key accuracy and tokens/s for each store policy.

    python scripts/eval_policy.py                                  # shipped weights, 32K, 20 prompts
    python scripts/eval_policy.py RUN --lengths 32768 1048576 --samples 4 4
    python scripts/eval_policy.py --lengths 1048512 --depths 0.5 --samples 1 \
        --out results/retrieval_policy_1m.json                     # 1M: one prompt per policy

For each policy (``StoreConfig.policy``: ``always``, ``every:K``, ``uncertainty:H``; see
memstack/policy.py) the same weights answer the same pass-key prompts (real-text filler, the
held-out split; each prompt its own key and passage, drawn by seed), and the script reports the
accuracy with its 95% interval, the prompt tokens per second of the whole evaluation, and the
share of segments that read the store (of those after the first, which has nothing to read);
the JSON keeps what each prompt generated (``records``).
``uncertainty:median`` stands for the median of the
segments' mean next-token entropies without the store, measured on the first prompt.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from memstack.io import write_json
from memstack.memory.store.policy import RetrievalPolicy, mean_entropy
from memstack.train.evaluate import load_run, passkey_accuracy

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "results" / "tiny_passkey_store" / "run"
SEED = 20_000


def median_entropy(stack, tokenizer, length: int) -> float:
    """Median over segments of the mean next-token entropy without the store, on one prompt."""
    from memstack.data.filler import filler_text

    text = filler_text(split="test")[:length]
    ids = torch.tensor([tokenizer.encode(text)[:length]])
    seg = stack.config.segment_len
    with torch.no_grad(), stack.memory_off("store"):
        logits = stack(ids).logits
    return statistics.median(mean_entropy(logits[:, s : s + seg], None) for s in range(0, ids.shape[1], seg))


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", type=Path, default=SHIPPED, help="a training run (default: shipped)")
    # Not a multiple of the segment length: a prompt that ends a segment leaves the answer a
    # fresh segment with nothing of the question in local attention.
    p.add_argument("--lengths", type=int, nargs="+", default=[32704], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, nargs="+", default=[20], help="prompts per length (one per length)")
    p.add_argument(
        "--policies",
        nargs="+",
        default=["always", "every:4", "uncertainty:median", "uncertainty:inf"],
    )
    p.add_argument(
        "--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]"
    )
    p.add_argument("--out", type=Path, default=Path("results/retrieval_policy.json"))
    args = p.parse_args(argv)
    if len(args.samples) not in (1, len(args.lengths)):
        p.error("--samples takes one count, or one per length")
    samples = args.samples * len(args.lengths) if len(args.samples) == 1 else args.samples
    _, stack, tokenizer = load_run(args.run)
    rows = []
    for length, n in zip(args.lengths, samples, strict=True):
        threshold = median_entropy(stack, tokenizer, min(length, 32768))
        for spec in args.policies:
            spec = spec.replace("median", f"{threshold:.3f}")
            stack.kinds["store"].policy = RetrievalPolicy.parse(spec)
            consulted, segments, generated = [], [], []
            generate = stack.generate

            def counting(
                *a, _generate=generate, _consulted=consulted, _segments=segments, _out=generated, **k
            ):
                ids = _generate(*a, **k)  # and count the segments that read the store
                _consulted.append(len(stack.consulted))
                _segments.append(-(-ids.shape[1] // stack.config.segment_len) - 1)  # all but the first
                _out.extend(ids[:, a[0].shape[1] :].tolist())  # what each prompt answered
                return ids

            stack.generate = counting
            t0 = time.perf_counter()
            per_depth = max(1, n // len(args.depths))
            result = passkey_accuracy(
                stack,
                tokenizer,
                [length],
                args.depths,
                samples=per_depth,
                seed=SEED,
                filler="text",
                batch_size=1,
            )
            seconds = time.perf_counter() - t0
            del stack.generate
            pooled = result["by_length"][0]
            # one record per prompt, in passkey_accuracy's order (depth, then sample; batch_size=1);
            # prompt (depth, i) was drawn with seed sample_seed("passkey", SEED, length, depth, i)
            cells = [(depth, i) for depth in args.depths for i in range(per_depth)]
            records = [
                {"depth": depth, "sample": i, "generated": tokenizer.decode(ids), "generated_ids": ids}
                for (depth, i), ids in zip(cells, generated, strict=True)
            ]
            rows.append(
                {
                    "policy": spec,
                    "length": length,
                    "n": pooled["n"],
                    "accuracy": pooled["mean"],
                    "ci95": pooled["ci95"],
                    "tokens_per_s": pooled["n"] * length / seconds,
                    "consulted_share": sum(consulted) / max(1, sum(segments)),
                    "seconds": seconds,
                    "records": records,
                }
            )
            r = rows[-1]
            low, high = r["ci95"]
            print(
                f"{length:>8} {spec:22s} accuracy {r['accuracy']:.0%} [{low:.0%}-{high:.0%}] n={r['n']}  "
                f"{r['tokens_per_s']:,.0f} tok/s  store read in {r['consulted_share']:.0%} of segments",
                flush=True,
            )
    write_json(args.out, {"run": str(args.run), "seed": SEED, "rows": rows})
    print(f"wrote {args.out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
