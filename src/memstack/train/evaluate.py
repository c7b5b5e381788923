"""Evaluations that say what memory buys: passkey accuracy by length x depth, by needle offset,
multi-needle key-value recall, and loss by segment index on long documents. Each runs the same
weights with memory on and off.

Accuracies come with their hit counts and 95% Wilson intervals: with 20 samples a cell at 50%
is known to about +-20 points, so differences inside the intervals are noise. Every sample has
its own seed, a pure function of (table seed, task, length, depth or offset, sample index), so
no two cells test the same pass keys, and the text filler reads the filler text's test split.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memstack.data.tasks import (
    MultiNeedleSample,
    PasskeySample,
    multi_needle_sample,
    passkey_min_length,
    passkey_sample,
)
from memstack.data.tokenizer import load_tokenizer
from memstack.stack import MemoryStack
from memstack.train.checkpoint import latest_checkpoint, load_weights
from memstack.train.config import Config, apply_overrides
from memstack.train.loop import build_model, resolve_device

EVAL_SPLIT = "test"
"""Part of the filler text evaluations read (training reads ``"train"``): text the model never saw."""


def sample_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of ``parts``, e.g. ``("passkey", seed, length, depth, i)``.

    The SHA-256 of the parts' ``repr`` joined by ``|``: the same on every run, machine and Python
    version (unlike ``hash``), and unrelated for any two different tuples, so every cell of a
    table, and every sample of a cell, gets its own pass key and its own passage of filler.
    """
    digest = hashlib.sha256("|".join(map(repr, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a success rate ``hits / n`` (95% for the default ``z``).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n hits,
    which is where small evaluations often are (E. B. Wilson, 1927)::

        center = (p + z^2 / 2n) / (1 + z^2 / n)
        half = z * sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)

    Raises:
        ValueError: unless ``0 <= hits <= n`` and ``n >= 1``.
    """
    if n < 1 or not 0 <= hits <= n:
        raise ValueError(f"need 0 <= hits <= n and n >= 1, got hits={hits}, n={n}")
    p, z2 = hits / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def _rate(hits: int, n: int) -> dict[str, Any]:
    """``{"hits", "n", "mean", "ci95"}`` of one cell (or a pool of cells)."""
    return {"hits": hits, "n": n, "mean": hits / n, "ci95": list(wilson_interval(hits, n))}


def _filler_fields(filler: str, filler_path: str | Path | None) -> dict[str, Any]:
    """What a result says about its prompts' filler."""
    if filler == "synthetic":
        return {"filler": filler, "split": None, "filler_path": None}
    return {
        "filler": filler,
        "split": EVAL_SPLIT,
        "filler_path": None if filler_path is None else str(filler_path),
    }


def _greedy_hits(
    stack: MemoryStack, batch: Sequence[PasskeySample | MultiNeedleSample], batch_size: int | None = None
) -> list[bool]:
    """Whether greedy decoding reproduces each sample's answer exactly (prompts of equal length).

    ``batch_size`` rows go through ``generate`` at a time (None: all of them at once).
    """
    hits = []
    step = batch_size or len(batch)
    for lo in range(0, len(batch), step):
        part = batch[lo : lo + step]
        prompts = torch.tensor([s.prompt_ids for s in part])
        # subword tokenizers can give answers of different lengths: compare each one's prefix
        longest = max(len(s.answer_ids) for s in part)
        out = stack.generate(prompts, max_new_tokens=longest)[:, prompts.shape[1] :].cpu().tolist()
        hits += [o[: len(s.answer_ids)] == s.answer_ids for o, s in zip(out, part, strict=True)]
    return hits


@torch.no_grad()
def passkey_accuracy(
    stack: MemoryStack,
    tokenizer: Any,
    lengths: list[int],
    depths: list[float],
    samples: int = 20,
    seed: int = 0,
    use_memory: bool = True,
    progress: bool = False,
    instruction: bool = True,
    filler: str = "synthetic",
    filler_path: str | Path | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Greedy passkey retrieval accuracy for every (length, depth) cell, with 95% intervals.

    A sample counts as correct when the generated tokens equal the answer tokens exactly. Sample
    ``i`` of cell (length, depth) is drawn with seed ``sample_seed("passkey", seed, length,
    float(depth), i)``: every cell has its own pass keys and passages, and every system run with
    the same ``seed`` sees the same prompts.

    Args:
        stack: the model (anything with ``generate`` and ``memory_enabled``).
        tokenizer: the tokenizer the model was trained with.
        lengths: prompt lengths in tokens.
        depths: needle depths in [0, 1].
        samples: prompts per cell (at least 20 for a figure worth quoting: a cell's interval is
            then about +-20 points at 50%).
        seed: seed of the whole table.
        use_memory: evaluate with compressive memory on or off (the same weights).
        progress: show a progress bar.
        instruction: open prompts with the papers' instruction sentence (as in training).
        filler: ``"synthetic"`` or ``"text"`` (the text's test split, never trained on).
        filler_path: text file of the text filler (None: the King James Bible in the repository's corpora/).
        batch_size: prompts per ``generate`` call (None: a whole cell).

    Returns:
        JSON-serialisable ``{"lengths", "depths", "accuracy": [[mean per depth] per length],
        "hits": [[...]], "ci95": [[[low, high] per depth] per length], "by_length": [{"length",
        "hits", "n", "mean", "ci95"} pooled over depths], "n", "samples" (both the samples per
        cell), "use_memory", "seed", "filler", "split", "filler_path"}``.
    """
    cells = [(length, float(depth)) for length in lengths for depth in depths]
    rates: dict[tuple[int, float], dict[str, Any]] = {}
    with stack.memory_enabled(use_memory):
        for length, depth in tqdm(cells, disable=not progress, desc=f"passkey ({filler})"):
            batch = [
                passkey_sample(
                    tokenizer,
                    length,
                    depth,
                    sample_seed("passkey", seed, length, depth, i),
                    instruction=instruction,
                    filler=filler,
                    filler_path=filler_path,
                    split=EVAL_SPLIT,
                )
                for i in range(samples)
            ]
            rates[(length, depth)] = _rate(sum(_greedy_hits(stack, batch, batch_size)), samples)
    rows = [[rates[(length, float(d))] for d in depths] for length in lengths]
    by_length = []
    for length, row in zip(lengths, rows, strict=True):
        by_length.append({"length": length, **_rate(sum(r["hits"] for r in row), samples * len(row))})
    return {
        "lengths": list(lengths),
        "depths": list(depths),
        "accuracy": [[r["mean"] for r in row] for row in rows],
        "hits": [[r["hits"] for r in row] for row in rows],
        "ci95": [[r["ci95"] for r in row] for row in rows],
        "by_length": by_length,
        "n": samples,
        "samples": samples,
        "use_memory": use_memory,
        "seed": seed,
        **_filler_fields(filler, filler_path),
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
    filler: str = "synthetic",
    filler_path: str | Path | None = None,
) -> dict[str, Any]:
    """Greedy passkey accuracy by the needle's offset inside its segment, at one prompt length.

    A segment boundary that cuts the needle (worst: through the key's digits) leaves part of it
    without its local context when its keys and values are computed, so retrieval may depend on
    where in a segment the needle starts. For each offset ``o`` the needle starts at
    ``o + k * segment_len`` for ``samples`` values of ``k`` spread over the prompt; sample ``i``
    of offset ``o`` has seed ``sample_seed("offset", seed, length, o, i)``, so every offset has
    its own keys and passages. Exact for the byte tokenizer, with either filler; a subword
    tokenizer can split some keys into more tokens and shift a needle by a token or two, so
    ``needle_starts`` reports where each one really is.

    Returns:
        ``{"length", "segment_len", "offsets", "accuracy": [per offset], "hits": [per offset],
        "ci95": [[low, high] per offset], "overall": {"hits", "n", "mean", "ci95"},
        "needle_starts": [[per sample] per offset], "use_memory", "samples", "n", "seed",
        "filler", "split", "filler_path"}``.

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
    rates, starts_by_offset = [], []
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
                    tokenizer,
                    length,
                    (p - head) / max(1, n_filler),
                    sample_seed("offset", seed, length, off, i),
                    instruction=instruction,
                    filler=filler,
                    filler_path=filler_path,
                    split=EVAL_SPLIT,
                )
                for i, p in enumerate(picks)
            ]
            rates.append(_rate(sum(_greedy_hits(stack, batch)), samples))
            starts_by_offset.append([s.needle_start for s in batch])
    return {
        "length": length,
        "segment_len": seg,
        "offsets": list(offsets),
        "accuracy": [r["mean"] for r in rates],
        "hits": [r["hits"] for r in rates],
        "ci95": [r["ci95"] for r in rates],
        "overall": _rate(sum(r["hits"] for r in rates), samples * len(rates)),
        "needle_starts": starts_by_offset,
        "use_memory": use_memory,
        "samples": samples,
        "n": samples,
        "seed": seed,
        **_filler_fields(filler, filler_path),
    }


@torch.no_grad()
def kv_recall_accuracy(
    stack: MemoryStack,
    tokenizer: Any,
    lengths: list[int],
    num_needles: int,
    samples: int = 20,
    seed: int = 0,
    filler: str = "synthetic",
    *,
    use_memory: bool = True,
    instruction: bool = True,
    filler_path: str | Path | None = None,
    progress: bool = False,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Greedy multi-needle key-value recall: ``num_needles`` facts per prompt, one asked for.

    Each prompt (:func:`~memstack.data.tasks.multi_needle_sample`) spreads ``num_needles``
    facts "The value of key KKKK is VVVVV." evenly over the filler and asks for one of them; a
    sample is correct when greedy decoding gives the asked value's tokens exactly. Sample ``i``
    at a length has seed ``sample_seed("kv", seed, length, num_needles, i)``.

    Args:
        stack, tokenizer, samples, seed, use_memory, instruction, filler_path, progress,
            batch_size: as for :func:`passkey_accuracy`.
        lengths: prompt lengths in tokens.
        num_needles: facts per prompt.
        filler: ``"synthetic"`` or ``"text"`` (the text's test split).

    Returns:
        ``{"lengths", "num_needles", "accuracy": [per length], "hits", "ci95", "n", "samples",
        "use_memory", "seed", "filler", "split", "filler_path"}``.
    """
    rates = []
    with stack.memory_enabled(use_memory):
        for length in tqdm(lengths, disable=not progress, desc=f"kv recall ({filler})"):
            batch = [
                multi_needle_sample(
                    tokenizer,
                    length,
                    num_needles,
                    sample_seed("kv", seed, length, num_needles, i),
                    instruction=instruction,
                    filler=filler,
                    filler_path=filler_path,
                    split=EVAL_SPLIT,
                )
                for i in range(samples)
            ]
            rates.append(_rate(sum(_greedy_hits(stack, batch, batch_size)), samples))
    return {
        "lengths": list(lengths),
        "num_needles": num_needles,
        "accuracy": [r["mean"] for r in rates],
        "hits": [r["hits"] for r in rates],
        "ci95": [r["ci95"] for r in rates],
        "n": samples,
        "samples": samples,
        "use_memory": use_memory,
        "seed": seed,
        **_filler_fields(filler, filler_path),
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


def format_rate(mean: float, low: float, high: float) -> str:
    """``56% [37-73]``: a rate and its interval, in percent."""
    return f"{mean:.0%} [{100 * low:.0f}-{100 * high:.0f}]"


def _hits_of(table: dict, row: list[float], i: int) -> list[int]:
    # tables written before hits were recorded: each mean is hits / samples exactly
    if "hits" in table:
        return list(table["hits"][i])
    return [round(a * table["samples"]) for a in row]


def _describe(table: dict) -> str:
    filler = table.get("filler", "synthetic")
    split = f", {table['split']} split" if table.get("split") else ""
    return f"{filler} filler{split}"


def format_passkey_table(table: dict) -> str:
    """Markdown: one row per length, one column per depth, plus the mean over depths.

    Each cell is its accuracy and 95% Wilson interval (``56% [37-73]``); the mean pools the
    row's samples, so its interval is narrower.
    """
    depths, n = table["depths"], table["samples"]
    head = (
        f"memory {'on' if table['use_memory'] else 'off'}: passkey accuracy, {_describe(table)}, "
        f"n={n} per cell [95% Wilson interval]"
    )
    lines = [
        head,
        "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |",
        "|---" * (len(depths) + 2) + "|",
    ]
    for i, (length, row) in enumerate(zip(table["lengths"], table["accuracy"], strict=True)):
        hits = _hits_of(table, row, i)
        cells = [format_rate(h / n, *wilson_interval(h, n)) for h in hits]
        pooled = sum(hits), n * len(hits)
        mean = format_rate(pooled[0] / pooled[1], *wilson_interval(*pooled))
        lines.append(f"| {length} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def format_kv_table(table: dict) -> str:
    """Markdown: key-value recall accuracy by length, with 95% Wilson intervals."""
    n = table["samples"]
    head = (
        f"memory {'on' if table['use_memory'] else 'off'}: key-value recall, {table['num_needles']} "
        f"needles, {_describe(table)}, n={n} per length [95% Wilson interval]"
    )
    lines = [head, "| length | accuracy |", "|---|---|"]
    for length, hits in zip(table["lengths"], table["hits"], strict=True):
        lines.append(f"| {length} | {format_rate(hits / n, *wilson_interval(hits, n))} |")
    return "\n".join(lines)


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, MemoryStack, Any]:
    """(config, stack with the latest checkpoint's weights, tokenizer) of a training run.

    ``overrides`` (``a.b=value``, as on the train.py command line) change the saved config
    before the stack is built: evaluate the same weights with e.g. ``stack.segment_len=2048``.

    Raises:
        FileNotFoundError: if the directory does not exist, or has no config.json or no checkpoint.
        ValueError: for a bad override, or weights that do not fit the overridden stack.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"run directory {run_dir} does not exist; train first: "
            f"python scripts/train.py CONFIG run.out_dir={run_dir}"
        )
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.json: is it a scripts/train.py run directory?")
    config = apply_overrides(Config.from_dict(json.loads(cfg_path.read_text())), overrides or [])
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint (step-NNNNNN/) yet: training has not saved one")
    device = resolve_device(config.run.device)
    stack = MemoryStack(build_model(config.model, config.run.seed), config.stack).to(device)
    load_weights(ckpt, stack)
    stack.eval()
    return config, stack, load_tokenizer(config.data.tokenizer)
