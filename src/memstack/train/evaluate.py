"""Evaluations that say what memory buys: passkey accuracy by length x depth, and loss by
segment index on long documents. Each runs the same weights with memory on and off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import Config, apply_overrides
from ..data.tasks import PasskeySample, passkey_min_length, passkey_sample
from ..data.tokenizer import load_tokenizer
from ..stack import MemoryStack
from .checkpoint import latest_checkpoint, load_weights
from .loop import build_model, resolve_device


def _greedy_hits(stack: MemoryStack, batch: list[PasskeySample]) -> list[bool]:
    """Whether greedy decoding reproduces each sample's answer exactly (prompts of equal length)."""
    prompts = torch.tensor([s.prompt_ids for s in batch])
    # subword tokenizers can give answers of different lengths: compare each one's prefix
    longest = max(len(s.answer_ids) for s in batch)
    out = stack.generate(prompts, max_new_tokens=longest)[:, prompts.shape[1] :].cpu().tolist()
    return [o[: len(s.answer_ids)] == s.answer_ids for o, s in zip(out, batch, strict=True)]


@torch.no_grad()
def passkey_accuracy(
    stack: MemoryStack,
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    samples: int = 5,
    seed: int = 0,
    use_memory: bool = True,
    progress: bool = False,
    instruction: bool = True,
) -> dict[str, Any]:
    """Greedy passkey retrieval accuracy for every (length, depth) cell.

    A sample counts as correct when the generated tokens equal the answer tokens exactly. Samples
    are drawn with seeds ``seed + 1000 * i`` so every system sees the same prompts.
    ``instruction`` says whether prompts open with the papers' instruction sentence (use what
    the model was trained with).

    Returns:
        ``{"lengths", "depths", "accuracy": [[acc per depth] per length], "use_memory",
        "samples"}`` (JSON-serialisable).
    """
    table = []
    cells = [(length, depth) for length in lengths for depth in depths]
    with stack.memory_enabled(use_memory):
        accs: dict[tuple[int, float], float] = {}
        for length, depth in tqdm(cells, disable=not progress, desc="passkey"):
            batch = [
                passkey_sample(tokenizer, length, depth, seed + 1000 * i, instruction=instruction)
                for i in range(samples)
            ]
            hits = _greedy_hits(stack, batch)
            accs[(length, depth)] = sum(hits) / len(hits)
        for length in lengths:
            table.append([accs[(length, depth)] for depth in depths])
    return {
        "lengths": lengths,
        "depths": depths,
        "accuracy": table,
        "use_memory": use_memory,
        "samples": samples,
    }


@torch.no_grad()
def passkey_by_offset(
    stack: MemoryStack,
    tokenizer: Any,
    length: int,
    offsets: list[int],
    samples: int = 4,
    seed: int = 0,
    use_memory: bool = True,
    instruction: bool = True,
) -> dict[str, Any]:
    """Greedy passkey accuracy by the needle's offset inside its segment, at one prompt length.

    A segment boundary that cuts the needle (worst: through the key's digits) leaves part of it
    without its local context when its keys and values are computed, so retrieval may depend on
    where in a segment the needle starts. For each offset ``o`` the needle starts at
    ``o + k * segment_len`` for ``samples`` values of ``k`` spread over the prompt (the samples'
    seeds are ``seed + 1000 * i``, as in :func:`passkey_accuracy`). Exact for the byte tokenizer;
    a subword tokenizer can split some keys into more tokens and shift a needle by a token or
    two, so ``needle_starts`` reports where each one really is.

    Returns:
        ``{"length", "segment_len", "offsets", "accuracy": [per offset], "needle_starts":
        [[per sample] per offset], "use_memory", "samples"}``.

    Raises:
        ValueError: if an offset is outside ``[0, segment_len)`` or the prompt holds no needle
            start at some offset.
    """
    seg = stack.config.segment_len
    bad = [o for o in offsets if not 0 <= o < seg]
    if bad:
        raise ValueError(f"offsets must be in [0, segment_len={seg}), got {bad}")
    head = passkey_sample(tokenizer, length, 0.0, seed, instruction=instruction).needle_start
    n_filler = length - passkey_min_length(tokenizer, instruction=instruction)
    accuracy, starts_by_offset = [], []
    with stack.memory_enabled(use_memory):
        for off in offsets:
            # needle starts head..head+n_filler; pick `samples` of those that sit at this offset
            first = head + (off - head) % seg
            candidates = list(range(first, head + n_filler + 1, seg))
            if not candidates:
                raise ValueError(f"a {length}-token prompt has no needle start at segment offset {off}")
            spread = (len(candidates) - 1) / max(1, samples - 1)
            picks = [candidates[round(i * spread)] for i in range(samples)]
            batch = [
                passkey_sample(
                    tokenizer, length, (p - head) / max(1, n_filler), seed + 1000 * i, instruction=instruction
                )
                for i, p in enumerate(picks)
            ]
            hits = _greedy_hits(stack, batch)
            accuracy.append(sum(hits) / len(hits))
            starts_by_offset.append([s.needle_start for s in batch])
    return {
        "length": length,
        "segment_len": seg,
        "offsets": list(offsets),
        "accuracy": accuracy,
        "needle_starts": starts_by_offset,
        "use_memory": use_memory,
        "samples": samples,
    }


@torch.no_grad()
def loss_by_segment(stack: MemoryStack, input_ids: torch.Tensor, use_memory: bool = True) -> list[float]:
    """Mean next-token loss (nats/token) of each segment index over a batch of long documents.

    Does the loss fall further into a document when memory is on? Compare ``use_memory`` True
    and False on the same weights.
    """
    with stack.memory_enabled(use_memory):
        seg = stack.config.segment_len
        state, sums, counts = None, [], []
        for start in range(0, input_ids.shape[1], seg):
            # one segment at a time: only that segment's logits are ever held
            chunk = input_ids[:, start : start + seg + 1]
            out = stack(chunk[:, :seg], state=state)
            state = out.state
            logits = out.logits[:, : chunk.shape[1] - 1]
            loss = F.cross_entropy(
                logits.flatten(0, 1).float(), chunk[:, 1:].flatten().to(logits.device), reduction="sum"
            )
            sums.append(loss.item())
            counts.append(chunk[:, 1:].numel())
    return [s / max(c, 1) for s, c in zip(sums, counts, strict=True)]


def format_passkey_table(table: dict) -> str:
    """Markdown: one row per length, one column per depth, plus the mean."""
    depths = table["depths"]
    head = (
        f"memory {'on' if table['use_memory'] else 'off'}: passkey accuracy ({table['samples']} samples/cell)"
    )
    lines = [
        head,
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
        "|---" * (len(depths) + 2) + "|",
    ]
    for length, row in zip(table["lengths"], table["accuracy"], strict=True):
        lines.append(
            f"| {length} | " + " | ".join(f"{a:.0%}" for a in row) + f" | {sum(row) / len(row):.0%} |"
        )
    return "\n".join(lines)


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, MemoryStack, Any]:
    """(config, stack with the latest checkpoint's weights, tokenizer) of a training run.

    ``overrides`` (``a.b=value``, as on the train.py command line) change the saved config
    before the stack is built: evaluate the same weights with e.g. ``stack.segment_len=2048``.

    Raises:
        FileNotFoundError: if the directory has no config.json or no checkpoint.
        ValueError: for a bad override, or weights that do not fit the overridden stack.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a scripts/train.py run directory?")
    config = apply_overrides(Config.from_dict(json.loads(cfg_path.read_text())), overrides or [])
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (step-NNNNNN/)")
    device = resolve_device(config.run.device)
    stack = MemoryStack(build_model(config.model, config.run.seed), config.stack).to(device)
    load_weights(ckpt, stack)
    stack.eval()
    return config, stack, load_tokenizer(config.data.tokenizer)
