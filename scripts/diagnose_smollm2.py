"""Did the store find the key, or did the model fail to read it? Where the needle's chunk ranks at
the answer's search, per store layer and fused, with the untrained ``store`` row of
``scripts/eval_smollm2.py``.

    python scripts/diagnose_smollm2.py --length 32768 --samples 8 --seed 20000

Each prompt is answered exactly as the evaluation answers it (``generate(close_prompt=True)``);
the readout's search is wrapped to also record each store layer's 64 best chunks at every search
(the chunks it returns are unchanged). For the answer's search (the last one, one per store
layer) a line of ``<out>/diagnose.jsonl`` gives the rank of the first chunk whose text holds the
key, per layer (None: not among the 64) and in the layers' reciprocal-rank fusion recomputed
from those lists, beside whether the answer held the key. Use a ``--seed`` other than the
evaluation's (10,000) so that what is learned here is not tuned on the tables' prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from memstack import MemoryStack
from memstack.data.tasks import passkey_sample
from memstack.data.tokenizer import HFTokenizer
from memstack.evals.longcontext import ANSWER_TOKENS, stack_config
from memstack.memory.store import readouts
from memstack.train.evaluate import sample_seed

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 64


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "smollm2")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from memstack.pretrained import smollm2

    heads = json.loads((args.out / "heads.json").read_text())["heads"]
    model, hf = smollm2()
    tok = HFTokenizer(hf)
    stack = MemoryStack(model, stack_config(heads))
    searches: list[tuple] = []
    search = readouts._search_skipping_recent

    def recording(kind, store, vectors):
        recent = kind.config.skip_recent
        every = store.ids()
        fields = store.records(every)
        ends = fields["start"] + fields["length"]
        skip = set(every[ends > int(ends.max()) - recent].tolist()) if recent else set()
        _, ids = kind.search(store, vectors, DEPTH + len(skip))
        searches.append((store, [i for i in ids.tolist() if i not in skip][:DEPTH]))
        return search(kind, store, vectors)

    readouts._search_skipping_recent = recording
    layers = len(stack.kinds["store"].layers)
    results = []
    try:
        for i in range(args.samples):
            depth = (i + 0.5) / args.samples
            s = passkey_sample(
                tok, args.length, depth, sample_seed("smollm2", args.seed, args.length, i), split="test"
            )
            searches.clear()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = stack.generate(
                    torch.tensor([s.prompt_ids]), max_new_tokens=ANSWER_TOKENS, close_prompt=True
                )
            answer = tok.decode(out[0, len(s.prompt_ids) :].tolist())
            store = searches[-1][0]
            text = {
                c: tok.decode(torch.cat(store.tokens(torch.tensor([c]))).tolist())
                for c in store.ids().tolist()
            }
            holds = {c for c, t in text.items() if s.passkey in t}
            ranks, votes = [], {}
            for _, ranked in searches[-layers:]:  # the answer's search, one per store layer
                ranks.append(next((r for r, c in enumerate(ranked) if c in holds), None))
                for r, c in enumerate(ranked):
                    votes[c] = votes.get(c, 0.0) + 1.0 / (1 + r)
            fused = sorted(votes, key=lambda c: (-votes[c], c))
            rec = {
                "length": args.length,
                "seed": args.seed,
                "sample": i,
                "depth": depth,
                "found": s.passkey in answer,
                "answer": answer,
                "layer_ranks": ranks,
                "fused_rank": next((r for r, c in enumerate(fused) if c in holds), None),
                "top_k": stack.config.store.top_k,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            results.append(rec)
            print(json.dumps(rec), flush=True)
    finally:
        readouts._search_skipping_recent = search
    with (args.out / "diagnose.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return results


if __name__ == "__main__":
    main()
