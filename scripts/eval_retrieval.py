"""Does the long-term store find the needle? Recall of the pass-key chunk by the question's query.

For ``--samples`` pass-key prompts (real-text filler, test split, needle depths spread over 0..1),
the run's weights read each prompt with the store on; then, at every store layer, the store is
searched once with the pooled position-free queries of the prompt's last ``block_len`` tokens
(the question: the query the answer's block searches with) and a hit counts when the retrieved
chunks contain the pass key's digits. Chance is about ``top_k * chunk_len / length``.

    python scripts/eval_retrieval.py runs/tiny_passkey_store --length 4032 --samples 20
    python scripts/eval_retrieval.py runs/tiny_passkey --set stack.store=on stack.store.layers=1,3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from memstack.data.tasks import passkey_sample
from memstack.train.config import add_set_argument
from memstack.train.evaluate import load_run, sample_seed, wilson_interval


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--length", type=int, default=4032)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--strategies", nargs="*", help="key strategies to compare (default: the run's)")
    p.add_argument("--out", type=Path, help="JSON file (default: RUN/retrieval.json)")
    add_set_argument(p)
    args = p.parse_args(argv)
    results = {}
    for strategy in args.strategies or [None]:
        overrides = list(args.set) + ([f"stack.store.strategy={strategy}"] if strategy else [])
        try:
            config, stack, tokenizer = load_run(args.run_dir, overrides)
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        if config.stack.store is None:
            sys.exit("error: the run has no store; add --set stack.store=on")
        hits: dict[int, int] = {}
        for i in range(args.samples):
            depth = i / max(1, args.samples - 1)
            seed = sample_seed("retrieval", args.length, i)
            sample = passkey_sample(
                tokenizer, args.length, depth=depth, seed=seed, filler="text", split="test"
            )
            with torch.no_grad():
                state = stack(torch.tensor([sample.prompt_ids]), return_logits=False).state
            for layer, layer_state in state.memories["store"].items():
                store = layer_state.stores[0]
                _, ids = store.search(0, layer_state.tail[0][None], config.stack.store.top_k)
                retrieved = [tokenizer.decode(t.tolist()) for t in store.tokens(ids[0][ids[0] >= 0])]
                hits[layer] = hits.get(layer, 0) + (sample.passkey in "".join(retrieved))
        name = strategy or config.stack.store.strategy
        results[name] = {
            str(layer): {
                "hits": h,
                "n": args.samples,
                "recall": h / args.samples,
                "ci95": wilson_interval(h, args.samples),
            }
            for layer, h in sorted(hits.items())
        }
        print(name, {layer: f"{r['hits']}/{r['n']}" for layer, r in results[name].items()}, flush=True)
    out = args.out or args.run_dir / "retrieval.json"
    out.write_text(json.dumps({"length": args.length, "overrides": args.set, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
