"""Switching a MemoryStack's memory kinds on and off, to measure what each contributes with the same
weights: a switched-off kind is neither read nor written (``stack.disabled``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from memstack.memory.base import MemoryKind
from memstack.memory.store.policy import mean_entropy

if TYPE_CHECKING:
    from memstack.stack import MemoryStack


class StackSwitches:
    """The on/off half of :class:`~memstack.stack.MemoryStack`: :meth:`memory_enabled`,
    :meth:`memory_off`, :attr:`use_memory`, and the kinds the segment path reads."""

    @property
    def use_memory(self) -> bool:
        """False while every memory kind is switched off."""
        return not set(self.kinds) <= self.disabled

    def _active_kinds(self) -> dict[str, MemoryKind]:
        return {name: kind for name, kind in self.kinds.items() if name not in self.disabled}

    def _unread(
        self, state, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> frozenset[str]:
        """The kinds whose retrieval policy (memstack/policy.py) skips reading this stream segment.

        ``ids``/``mask``: the segment, for ``uncertainty`` policies, which run it once without
        those kinds (no gradient, nothing recorded) and measure its mean next-token entropy.
        """
        skip, test = set(), []
        for name, kind in self._active_kinds().items():
            policy = getattr(kind, "policy", None)
            if policy is None or not state.memories.get(name):
                continue
            if not policy.scheduled(state.segments) or policy.threshold == float("inf"):
                skip.add(name)
            elif policy.threshold is not None:
                test.append((name, policy.threshold))
        if test:
            if ids is None:
                raise ValueError("an uncertainty retrieval policy needs the segment's tokens to decide")
            entropy = self._entropy_without(state, frozenset(skip | {n for n, _ in test}), ids, mask)
            skip |= {name for name, threshold in test if not entropy > threshold}
        if state.memories.get("store") and "store" in self._active_kinds() and "store" not in skip:
            self.consulted.append(state.segments)
        return frozenset(skip)

    @torch.no_grad()
    def _entropy_without(self, state, unread: frozenset[str], ids: torch.Tensor, mask) -> float:
        """Mean next-token entropy of a segment read without the ``unread`` kinds (a dry run)."""
        from memstack.attention import SegmentContext

        padded = mask is not None and not bool(mask.all())
        inputs = self._inputs(state, 0, 0, mask.bool() if padded else None, {})
        inputs.unread = unread
        logits = self.model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=self._positions(0, ids.shape[1]),
            use_cache=False,
            memstack=SegmentContext(inputs),
        ).logits
        return mean_entropy(logits, mask.bool() if padded else None)

    @contextlib.contextmanager
    def memory_enabled(
        self, enabled: bool = True, kinds: tuple[str, ...] | None = None
    ) -> Iterator[MemoryStack]:
        """Inside a ``with`` block, switch memory kinds on or off (then restore).

        Args:
            enabled: on or off.
            kinds: the kinds to switch (default: all), e.g. ``("compressive",)``.

        Raises:
            ValueError: for a kind name this stack does not have.
        """
        names = set(self.kinds) if kinds is None else set(kinds)
        unknown = sorted(names - set(self.kinds))
        if unknown:
            raise ValueError(f"unknown memory kinds {unknown}; this stack has {sorted(self.kinds)}")
        previous = self.disabled
        self.disabled = previous - names if enabled else previous | names
        try:
            yield self
        finally:
            self.disabled = previous

    def explain(self, input_ids: torch.Tensor, tokenizer=None, max_new_tokens: int = 0):
        """Which chunks each block retrieved and each head's shares of local attention,
        compressive memory and the store (:func:`memstack.explain.explain`)."""
        from memstack.explain import explain

        return explain(self, input_ids, tokenizer, max_new_tokens)

    def memory_off(self, *kinds: str) -> contextlib.AbstractContextManager[MemoryStack]:
        """Run the same weights without memory (all kinds, or the kinds named) inside a ``with``
        block, to measure what each memory layer contributes."""
        return self.memory_enabled(False, kinds or None)
