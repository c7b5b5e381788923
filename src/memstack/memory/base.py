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

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol

import torch


class LayerRecord(NamedTuple):
    """What one attention layer saw of a segment, with the rotary rotation undone."""

    key: torch.Tensor  # (B, H_kv, T, d_k)
    value: torch.Tensor  # (B, H_kv, T, d_v)
    query: torch.Tensor | None = None  # (B, H, T, d_k), kept only when a kind needs it

    def sliced(self, start: int) -> LayerRecord:
        """The record from position ``start`` on (a prefix the segment does not own cut off)."""
        if start == 0:
            return self
        query = None if self.query is None else self.query[:, :, start:]
        return LayerRecord(self.key[:, :, start:], self.value[:, :, start:], query)

    @staticmethod
    def cat(parts: list[LayerRecord]) -> LayerRecord:
        """Join records of consecutive pieces of one segment (decoding token by token)."""
        if len(parts) == 1:  # a whole segment in one call: no copy (it would also be kept for backward)
            return parts[0]
        query = None if parts[0].query is None else torch.cat([p.query for p in parts], dim=2)
        return LayerRecord(
            torch.cat([p.key for p in parts], dim=2), torch.cat([p.value for p in parts], dim=2), query
        )


class MemoryKV(NamedTuple):
    """Retrieved keys and values that join (or replace) the local softmax, with the queries that
    score them: local attention computes ``q_local . k_local`` and ``query . key`` in one softmax."""

    query: torch.Tensor  # (B, H, Tq, d_k): the queries as they score memory (rotated at a fixed distance)
    key: torch.Tensor  # (B, H_kv, N, d_k)
    value: torch.Tensor  # (B, H_kv, N, d_v)
    visible: torch.Tensor  # (B, Tq, N) bool: which query sees which memory token
    spans: tuple[tuple[int, int, int, int], ...] | None = None
    """``(a, e, c, f)``: query rows ``[a, e)`` can only see memory tokens ``[c, f)`` (a block and its
    hits), so attention runs block by block; None: any query may see any memory token."""

    def attend(self, scaling: float | None) -> torch.Tensor:
        """Softmax attention over the memory alone: ``(B, Tq, H, d_v)`` float32 (0 where nothing is seen)."""
        h, h_kv = self.query.shape[1], self.key.shape[1]
        scale = scaling if scaling is not None else self.query.shape[-1] ** -0.5
        key = self.key.float().repeat_interleave(h // h_kv, dim=1)
        value = self.value.float().repeat_interleave(h // h_kv, dim=1)
        logits = torch.einsum("bhqd,bhnd->bhqn", self.query.float(), key) * scale
        logits = logits.masked_fill(~self.visible[:, None], float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query that sees nothing: 0
        return torch.einsum("bhqn,bhnd->bqhd", weights, value)


class Readout(NamedTuple):
    """One kind's contribution to a layer's output for the current queries."""

    output: torch.Tensor | None  # (B, T, H, d_v) float32, mixed in by the layer's gate for this kind
    empty: torch.Tensor | None = None
    """(B, H) or (B, T, H) bool: nothing to read there, the mixer keeps the running output."""
    memory: MemoryKV | None = None
    """Keys and values that join the local softmax (no gate)."""


RotateFn = Callable[..., torch.Tensor]
"""``rotate(x (B, H, T, D), first, step=1)``: the model's own rotary rotation of the layer at
positions ``first + step * t`` (``step=0``: every token at ``first``)."""


class ReadContext(NamedTuple):
    """What a read may need besides the state and the queries."""

    start: int  # segment position of the first query
    valid: torch.Tensor | None  # (B, T) of the whole segment; None: all valid
    rotate: RotateFn | None  # None for models without rotary embeddings
    scaling: float | None  # the layer's softmax scale (None: 1/sqrt(d))
    scratch: dict  # per segment, kind and layer; survives activation checkpointing's re-run
    trace: list | None = None  # when explaining (memstack/explain.py): a read appends what it found


class ClosedSegment(NamedTuple):
    """What every kind's write sees of a closed segment besides the layer's record."""

    ids: torch.Tensor  # (B, T) token ids
    valid: torch.Tensor | None  # (B, T) bool, False at padding (never written); None: all valid
    index: int  # segments before this one in the stream
    segment_len: int
    rotate: RotateFn | None
    nll: torch.Tensor | None = None
    """(B, T) float32 -log p of each token under the stack (NaN at position 0), when a kind asks
    for it (surprise chunking); None otherwise."""


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

    def read(self, state: Any, query: torch.Tensor, ctx: ReadContext) -> Readout:
        """Read ``state`` with position-free queries ``(B, H, T, d_k)``."""

    def write(self, state: Any, record: LayerRecord, segment: ClosedSegment) -> Any:
        """The state after writing one closed segment (``segment.valid``: False = padding)."""
