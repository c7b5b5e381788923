"""Layer 3, long-term memory: cutting a row's tokens into the chunks the store keeps.

``fixed`` chunks of ``chunk_len`` tokens, or ``surprise`` chunks cut where the model's -log p is
high (EM-LLM, Fountas et al. 2024, https://arxiv.org/abs/2407.09450). Per stream (one batch row);
padded positions are never inside a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Chunk = tuple[int, int]  # half-open token span [start, end) of one row


def _valid_runs(valid: torch.Tensor) -> list[Chunk]:
    """Maximal runs of consecutive True positions of a ``(T,)`` bool mask, as ``[start, end)``."""
    if valid.ndim != 1 or valid.dtype != torch.bool:
        raise ValueError(f"valid must be a 1-D bool tensor (T,), got {tuple(valid.shape)} {valid.dtype}")
    edges = torch.diff(F.pad(valid.to(torch.int8), (1, 1)))  # +1 where a run starts, -1 after it ends
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, ends, strict=True))


def fixed_chunks(valid: torch.Tensor, chunk_len: int) -> list[Chunk]:
    """Cut one row's valid tokens into consecutive chunks of ``chunk_len`` tokens.

    Chunks are counted from the first valid token of each run of valid tokens, so a left-padded
    row is chunked from its own first token. A last partial chunk is kept (a segment need not be a
    multiple of ``chunk_len``). Holes (padding inside the row) end the current chunk early and
    chunking restarts after the hole: a chunk is a span of *consecutive* tokens, so it never
    contains a padded position, and the chunk before a hole may be shorter than ``chunk_len``.

    Args:
        valid: ``(T,)`` bool, True for real tokens.
        chunk_len: tokens per chunk, >= 1.

    Returns:
        Half-open spans ``[(start, end), ...]`` in order; every valid index is in exactly one.

    Raises:
        ValueError: ``chunk_len < 1`` or ``valid`` is not a 1-D bool tensor.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    return [
        (s, min(s + chunk_len, end))
        for start, end in _valid_runs(valid)
        for s in range(start, end, chunk_len)
    ]


def surprise_chunks(
    nll: torch.Tensor, valid: torch.Tensor, min_len: int, max_len: int, gamma: float = 1.0
) -> list[Chunk]:
    """Cut one row where the model is surprised, EM-LLM's segmentation (https://arxiv.org/abs/2407.09450).

    The rule (EM-LLM section 3.2, eq. 1, with the row's valid tokens as the window and without the
    paper's later boundary refinement):

    1. ``threshold = mean + gamma * std`` of ``nll`` over the valid positions whose value is
       finite (population std, ``correction=0``). Put NaN where there is no prediction, e.g. at the
       row's first token; such positions never start a chunk by surprise.
    2. Walk each run of consecutive valid tokens (padding holes cut as in :func:`fixed_chunks`)
       with a chunk open at ``start``. Before token ``t`` (``t > start``) a boundary is placed if
       ``t - start == max_len`` (cut at max_len), or if ``nll[t] > threshold`` and
       ``t - start >= min_len``; the new chunk starts at ``t``. A surprising token that comes too
       early is simply not a boundary (it stays inside the current chunk).
    3. The run's last chunk is kept whatever its length.

    So every chunk has ``min_len <= length <= max_len`` except the last chunk of each run of valid
    tokens, which has ``1 <= length <= max_len``.

    Args:
        nll: ``(T,)`` surprise ``-log p(x_t | x_<t)`` of each token (any float dtype).
        valid: ``(T,)`` bool, True for real tokens.
        min_len: shortest chunk (except the last), >= 1.
        max_len: longest chunk, >= min_len.
        gamma: threshold in standard deviations above the mean.

    Returns:
        Half-open spans ``[(start, end), ...]`` in order; every valid index is in exactly one.

    Raises:
        ValueError: bad lengths or shapes.
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    if nll.shape != valid.shape:
        raise ValueError(f"nll {tuple(nll.shape)} and valid {tuple(valid.shape)} must both be (T,)")
    runs = _valid_runs(valid)
    nll = nll.detach().double()
    counted = valid & nll.isfinite()
    if counted.any():
        values = nll[counted]
        threshold = values.mean() + gamma * values.std(correction=0)
        surprising = (counted & (nll > threshold)).tolist()
    else:  # nothing to measure surprise by: only max_len cuts
        surprising = [False] * valid.numel()

    chunks: list[Chunk] = []
    for run_start, run_end in runs:
        start = run_start
        for t in range(run_start + 1, run_end):
            length = t - start
            if length == max_len or (surprising[t] and length >= min_len):
                chunks.append((start, t))
                start = t
        chunks.append((start, run_end))
    return chunks
