"""Switching a MemoryStack's memory kinds on and off, to measure what each contributes with the same
weights: a switched-off kind is neither read nor written (``stack.disabled``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .memory.base import MemoryKind

if TYPE_CHECKING:
    from .stack import MemoryStack


class StackSwitches:
    """The on/off half of :class:`~memstack.stack.MemoryStack`: :meth:`memory_enabled`,
    :meth:`memory_off`, :attr:`use_memory`, and the kinds the segment path reads."""

    @property
    def use_memory(self) -> bool:
        """False while every memory kind is switched off."""
        return not set(self.kinds) <= self.disabled

    def _active_kinds(self) -> dict[str, MemoryKind]:
        return {name: kind for name, kind in self.kinds.items() if name not in self.disabled}

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

    def memory_off(self, *kinds: str) -> contextlib.AbstractContextManager[MemoryStack]:
        """Run the same weights without memory (all kinds, or the kinds named) inside a ``with``
        block, to measure what each memory layer contributes."""
        return self.memory_enabled(False, kinds or None)
