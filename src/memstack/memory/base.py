"""The shape every memory kind shares.

A memory kind (compressive memory, the long-term store, any later one) is four things:

- an empty state per layer (:meth:`MemoryKind.empty`), made from the first segment it sees;
- a read with the segment's position-free queries (:meth:`MemoryKind.read`) that returns a
  :class:`Readout`, mixed into the local attention output by the layer's
  :class:`~memstack.memory.mixer.MemoryMixer`;
- a write of the closed segment (:meth:`MemoryKind.write`) from the :class:`LayerRecord` each
  attention layer keeps of it (position-free keys, values, optionally queries) and the
  segment's validity mask;
- a per-layer state that is a ``NamedTuple`` of tensors, so that :class:`~memstack.stack.StackState`
  can detach, move, flatten (for activation checkpointing) and save every kind the same way, under
  the tensor names ``{kind}.{layer}.{field}``.

A kind is ``differentiable`` when gradients flow through its state across segments (compressive
memory: backpropagation through time). The stack commits such kinds inside the (possibly
checkpointed) segment; it commits the others exactly once, outside it, because activation
checkpointing re-runs a segment in the backward pass and a store must never be written twice.

Adding a kind is its own file plus one line in :data:`memstack.stack.KINDS`.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Protocol

import torch


class LayerRecord(NamedTuple):
    """What one attention layer saw of a segment, with the rotary rotation undone."""

    key: torch.Tensor  # (B, H_kv, T, d_k)
    value: torch.Tensor  # (B, H_kv, T, d_v)
    query: torch.Tensor | None = None  # (B, H, T, d_k), kept only when a kind needs it

    @staticmethod
    def cat(parts: list[LayerRecord]) -> LayerRecord:
        """Join records of consecutive pieces of one segment (decoding token by token)."""
        query = None if parts[0].query is None else torch.cat([p.query for p in parts], dim=2)
        return LayerRecord(
            torch.cat([p.key for p in parts], dim=2), torch.cat([p.value for p in parts], dim=2), query
        )


class Readout(NamedTuple):
    """One kind's contribution to a layer's output for the current queries."""

    output: torch.Tensor  # (B, T, H, d_v) float32
    empty: torch.Tensor | None = None  # (B, H) bool: nothing stored yet, the mixer keeps local attention


class MemoryKind(Protocol):
    """One memory layer kind; instances hold configuration only, never per-stream state."""

    name: ClassVar[str]
    differentiable: ClassVar[bool]
    needs_query: ClassVar[bool]
    """True if :meth:`write` uses the queries of the segment (their record is kept only then)."""
    layers: frozenset[int]
    """The decoder layers (``layer_idx``) this kind serves."""

    def empty(self, record: LayerRecord) -> Any:
        """The empty state of one layer, shaped for ``record``'s batch and heads."""

    def read(self, state: Any, query: torch.Tensor) -> Readout:
        """Read ``state`` with position-free queries ``(B, H, T, d_k)``."""

    def write(self, state: Any, record: LayerRecord, valid: torch.Tensor | None) -> Any:
        """The state after writing one closed segment (``valid``: ``(B, T)``, False = padding)."""
