"""When the long-term store is consulted: a retrieval policy (``StoreConfig.policy``).

- ``always``: every segment reads the store (once it holds anything);
- ``every:K``: only the K-th segments of a stream read it (stream segments ``K-1, 2K-1, ...``,
  0-based), the others see working and compressive memory only;
- ``uncertainty:H``: a segment reads the store only when the mean next-token entropy (nats) of
  its own tokens under working and compressive memory exceeds ``H``: the stack first runs the
  segment without the store (no gradient, nothing written), then again with it when it must.
  ``uncertainty:inf`` never consults. ``generate`` cannot know a segment's tokens before it
  decodes them, so it decides from the tokens known when the segment opens: the prompt's part
  of it, or else the whole segment before it (so ``generate`` may then differ from greedy
  ``forward``, which decides from the segment's own tokens).

Whatever the policy, every segment is *written* to the store; only reading is skipped. The
stack's :attr:`~memstack.stack.MemoryStack.consulted` lists the stream segments that read it in
the last call, so the trade (accuracy against tokens/s) can be measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACCEPTED = '"always", "every:K" (K >= 1) or "uncertainty:H" (H >= 0 nats, or inf)'


@dataclass(frozen=True)
class RetrievalPolicy:
    """A parsed ``StoreConfig.policy``."""

    every: int = 1
    """Consult on stream segments ``every - 1, 2 * every - 1, ...`` (1: all)."""
    threshold: float | None = None
    """``uncertainty``: consult when the segment's mean entropy exceeds this (None: no test)."""

    @classmethod
    def parse(cls, spec: str) -> RetrievalPolicy:
        """Parse ``always``, ``every:K`` or ``uncertainty:H``; a clear error for anything else."""
        if not isinstance(spec, str):
            raise ValueError(f"stack.store.policy must be a string, got {spec!r}; accepted: {ACCEPTED}")
        name, _, value = spec.strip().partition(":")
        try:
            if name == "always" and not value:
                return cls()
            if name == "every" and int(value) >= 1:
                return cls(every=int(value))
            if name == "uncertainty" and float(value) >= 0 and not math.isnan(float(value)):
                return cls(threshold=float(value))
        except ValueError:
            pass
        raise ValueError(f"stack.store.policy {spec!r} is not valid; accepted: {ACCEPTED}")

    def scheduled(self, segment: int) -> bool:
        """Whether stream segment ``segment`` (0-based) may consult, before any entropy test."""
        return (segment + 1) % self.every == 0


def mean_entropy(logits: torch.Tensor, valid: torch.Tensor | None) -> float:
    """Mean next-token entropy (nats) of ``logits (B, T, V)`` over the valid positions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    if valid is not None:
        return float(entropy[valid].mean()) if bool(valid.any()) else 0.0
    return float(entropy.mean())
