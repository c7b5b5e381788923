"""The losses of sleep (memstack/sleep/consolidate.py) beside :func:`memstack.losses.lm_loss`:
full KL, and the bucketed KL of distillation from a teacher kept as its top-k log-probabilities
plus one bucket for the rest."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kl_full(p_logits: torch.Tensor, q_logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` summed over the vocabulary, averaged over positions where ``where`` holds."""
    p_log = F.log_softmax(p_logits.float(), dim=-1)
    q_log = F.log_softmax(q_logits.float(), dim=-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)
    return kl[where].mean()


def teacher_targets(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher kept compactly: top-k token ids ``(..., k)`` and log-probs ``(..., k + 1)``,
    the last being the log of the mass on every other token."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    k = min(top_k, log_p.shape[-1])
    top, idx = log_p.topk(k, dim=-1)
    rest = _log_rest(log_p, idx)
    return idx, torch.cat([top, rest[..., None]], dim=-1)


def _log_rest(log_p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``idx``: logsumexp over the other tokens (stable)."""
    masked = log_p.scatter(-1, idx, -math.inf)
    return torch.logsumexp(masked, dim=-1)


def kl_bucketed(
    t_idx: torch.Tensor, t_logp: torch.Tensor, s_logits: torch.Tensor, where: torch.Tensor
) -> torch.Tensor:
    """``KL(teacher || student)`` over the teacher's top-k tokens plus one bucket for the rest."""
    s_log = F.log_softmax(s_logits.float(), dim=-1)
    s_bucket = torch.cat([s_log.gather(-1, t_idx), _log_rest(s_log, t_idx)[..., None]], dim=-1)
    t_p = t_logp.exp()
    # 0 * log 0 is 0: the rest bucket is empty when k covers the vocabulary
    kl = torch.where(t_p > 0, t_p * (t_logp - s_bucket), torch.zeros_like(t_p)).sum(-1)
    return kl[where].mean()
