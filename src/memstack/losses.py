"""Next-token losses shared by the stack, sleep and the evaluations: the targets of a long input
cut into segments, per-token NLL within a segment, and the mean NLL of a batch of windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position t's target is ``labels[t+1]``; -100 where either position is padding or at the end.

    Shifting once over the whole input (not per segment) means the last token of a segment
    predicts the first token of the next one, as in the unwrapped model.
    """
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        pad = attention_mask == 0
        targets[pad] = -100
        targets[:, :-1][pad[:, 1:]] = -100
    return targets


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float32 -log p(ids[t] | ids[<t]) within one segment, NaN at position 0 (its
    prediction belongs to the segment before)."""
    nll = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=ids.device)
    if ids.shape[1] > 1:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll[:, 1:] = -logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]
    return nll


def prediction_mask(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, L)`` bool: positions whose next token is a target (the positions :func:`lm_loss` averages)."""
    return next_token_targets(ids, mask) != -100


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token NLL over predicted positions of whole windows; ``mask`` (B, L) excludes padding."""
    targets = next_token_targets(ids, mask)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
