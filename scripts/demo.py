"""A five-minute tour of memstack on a CPU: wrap a tiny byte-level Llama, train it briefly with
compressive memory on and off, and look at what memory does.

    python scripts/demo.py                       # synthetic text, nothing downloaded
    python scripts/demo.py --data ../shared/data/kjv.txt

It prints the loss by segment index (does the loss fall further into a sequence when memory is
on?), the gate values (how much each head reads from memory), the state size after a long
stream (constant), and a greedy continuation.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig
from memstack.train.config import ModelConfig
from memstack.train.loop import build_model


def tiny_llama(seed: int) -> torch.nn.Module:
    """A ~0.9M-parameter byte-level Llama built from a config (no download)."""
    shape = ModelConfig(
        arch="llama",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=4096,
    )
    return build_model(shape, seed)


def synthetic_text(n_bytes: int, seed: int) -> bytes:
    """Documents that repeat facts made up at their start, so earlier segments help later ones."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "indigo", "juniper"]
    out = []
    while sum(map(len, out)) < n_bytes:
        names = {w: rng.randint(100, 999) for w in rng.sample(words, 4)}
        doc = " ".join(f"The code of {w} is {n}." for w, n in names.items())
        for _ in range(12):
            w = rng.choice(list(names))
            doc += f" Recall: the code of {w} is {names[w]}."
        out.append(doc + "\n")
    return "".join(out).encode()[:n_bytes]


def batches(data: torch.Tensor, batch: int, length: int, gen: torch.Generator):
    """Random windows of ``length`` bytes, forever."""
    while True:
        starts = torch.randint(0, len(data) - length, (batch,), generator=gen)
        yield torch.stack([data[s : s + length] for s in starts.tolist()])


def loss_by_segment(stack: MemoryStack, ids: torch.Tensor) -> list[float]:
    """Mean next-token loss of each segment of ``ids``."""
    with torch.no_grad():
        logits = stack(ids).logits
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    ).view(ids.shape[0], -1)
    seg = stack.config.segment_len
    return [losses[:, s : s + seg].mean().item() for s in range(0, losses.shape[1], seg)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a text file (default: synthetic text)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--segment-len", type=int, default=64)
    p.add_argument("--segments", type=int, default=4, help="segments per training sequence")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    raw = args.data.read_bytes() if args.data else synthetic_text(400_000, args.seed)
    data = torch.tensor(list(raw), dtype=torch.long)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    length = args.segment_len * args.segments
    eval_ids = next(batches(held_out, 16, length, torch.Generator().manual_seed(1)))

    results = {}
    for memory_on in (True, False):
        compressive = CompressiveConfig(gate_init=0.0) if memory_on else None
        config = StackConfig(segment_len=args.segment_len, compressive=compressive)
        stack = MemoryStack(tiny_llama(args.seed), config)
        opt = torch.optim.AdamW(stack.param_groups(lr=3e-3, weight_decay=0.01, gate_lr_mult=10))
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        for step, ids in zip(range(args.steps), batches(train, 16, length, gen), strict=False):
            loss = stack(ids, labels=ids, return_logits=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(stack.parameters(), 1.0)
            opt.step()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"memory={'on ' if memory_on else 'off'} step {step:4d} loss {loss.item():.3f}")
        results[memory_on] = (loss_by_segment(stack, eval_ids), time.perf_counter() - t0, stack)

    print("\nheld-out loss (nats/byte) by segment index:")
    print("| memory | " + " | ".join(f"seg {i}" for i in range(args.segments)) + " | train s |")
    print("|---" * (args.segments + 2) + "|")
    for on in (True, False):
        per_seg, secs, _ = results[on]
        print(f"| {'on' if on else 'off'} | " + " | ".join(f"{x:.3f}" for x in per_seg) + f" | {secs:.0f} |")

    stack = results[True][2]
    print("\ngate sigmoid(beta) per layer (share of each head's output read from memory):")
    for layer, g in stack.gate_values().items():
        print(f"  layer {layer}: " + " ".join(f"{x:.2f}" for x in g.tolist()))

    with torch.no_grad():
        short = stack(eval_ids[:1, : 2 * args.segment_len]).state.num_bytes()
        long_ids = data[: 64 * args.segment_len][None]
        long = stack(long_ids, return_logits=False).state.num_bytes()
    print(f"\nmemory state: {short} bytes after 2 segments, {long} bytes after 64 segments")

    prompt = eval_ids[:1, : 2 * args.segment_len + 10]
    out = stack.generate(prompt, max_new_tokens=60)
    text = bytes(out[0, prompt.shape[1] :].tolist()).decode("utf-8", errors="replace")
    print(f"greedy continuation: {text!r}")


if __name__ == "__main__":
    main()
