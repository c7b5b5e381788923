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

Adding a kind is one subclass of :class:`MemoryKind` and one call, :func:`register_kind`, with the
dataclass of its config section: the stack builds it from ``StackConfig.kinds[name]`` (the two
built-in kinds have their own fields, ``StackConfig.compressive`` and ``StackConfig.store``),
mixes it in registration order, saves and loads its state, describes and explains it. Every
optional hook is declared on :class:`MemoryKind` with its default; nothing is read with
``getattr``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from memstack.fields import parse_layers


class LayerRecord(NamedTuple):
    """What one attention layer saw of a segment, with the rotary rotation undone."""

    key: torch.Tensor  # (B, H_kv, T, d_k)
    value: torch.Tensor  # (B, H_kv, T, d_v)
    query: torch.Tensor | None = None  # (B, H, T, d_k), kept only when a kind needs it
    layer: int | None = None  # the decoder layer (a kind may configure layers differently)

    def sliced(self, start: int) -> LayerRecord:
        """The record from position ``start`` on (a prefix the segment does not own cut off)."""
        if start == 0:
            return self
        query = None if self.query is None else self.query[:, :, start:]
        return LayerRecord(self.key[:, :, start:], self.value[:, :, start:], query, self.layer)

    @staticmethod
    def cat(parts: list[LayerRecord]) -> LayerRecord:
        """Join records of consecutive pieces of one segment (decoding token by token)."""
        if len(parts) == 1:  # a whole segment in one call: no copy (it would also be kept for backward)
            return parts[0]
        query = None if parts[0].query is None else torch.cat([p.query for p in parts], dim=2)
        return LayerRecord(
            torch.cat([p.key for p in parts], dim=2),
            torch.cat([p.value for p in parts], dim=2),
            query,
            parts[0].layer,
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
    layer: int | None = None  # the decoder layer being read


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


class RetrievalSchedule(Protocol):
    """When a kind is read (a store's retrieval policy, memstack/memory/store/policy.py)."""

    threshold: float | None
    """Read only when the segment's mean next-token entropy without the kind exceeds this (None:
    no test; ``inf``: never)."""

    def scheduled(self, segment: int) -> bool:
        """Whether stream segment ``segment`` (0-based) may read, before any entropy test."""


class BuildContext(NamedTuple):
    """What a kind's :meth:`MemoryKind.build` may know about the stack and the wrapped model."""

    num_layers: int
    """Layer numbers run from 0 to ``num_layers - 1``."""
    attention_layers: tuple[int, ...]
    """The layers with attention (all of them but in hybrid models)."""
    model_type: str
    segment_len: int

    def layers(self, spec: str, name: str) -> list[int]:
        """The attention layers a selection names: ``all`` skips a hybrid's other layers; naming
        one of them explicitly is an error."""
        chosen = parse_layers(spec, self.num_layers, name=name)
        if spec.strip() in ("all", "none") or spec.strip().startswith("every:"):
            return [i for i in chosen if i in self.attention_layers]
        other = [i for i in chosen if i not in self.attention_layers]
        if other:
            raise ValueError(
                f"{name} {spec!r}: layers {other} have no attention "
                f"(attention layers: {list(self.attention_layers)})"
            )
        return chosen


class MemoryKind(ABC):
    """One memory layer kind; instances hold configuration only, never per-stream state.

    Subclasses set :attr:`name` and the class flags, implement :meth:`build`, :meth:`empty`,
    :meth:`read` and :meth:`write`, and override the optional hooks they need.
    """

    name: ClassVar[str]
    """The kind's name: its config section (``StackConfig.kinds[name]``), state and gate key."""
    differentiable: ClassVar[bool] = False
    """Gradients flow through the state across segments (committed inside the segment)."""
    needs_query: ClassVar[bool] = False
    """:meth:`write` uses the segment's queries (their record is kept only then)."""
    state_type: ClassVar[type | None] = None
    """The per-layer state when it is a ``NamedTuple`` of tensors: then :class:`~memstack.state.StackState`
    detaches, moves, flattens and saves it (``{kind}.{layer}.{field}``). None: the state is a handle
    (a store), saved by :meth:`save_state` and loaded by :meth:`load_state`."""
    colour: ClassVar[str] = "tab:gray"
    """This kind's colour in :meth:`Explanation.plot <memstack.explain.Explanation.plot>`."""
    prefix_last: ClassVar[bool] = False
    """Put this kind's :meth:`prefix` after the other kinds' (closest to the segment)."""

    layers: frozenset[int] = frozenset()
    """The decoder layers (``layer_idx``) this kind serves."""
    gate_init: float | None = None
    """Initial per-head gate logit when the kind's readout is mixed in by a gate (its ``output``);
    None: the kind has no gate (it joins the local softmax, or puts tokens before the segment)."""
    needs_surprise: bool = False
    """:meth:`write` needs ``segment.nll``, the -log p of each token (surprise chunking)."""
    policy: RetrievalSchedule | None = None
    """When the kind is read; None: every segment."""

    @classmethod
    @abstractmethod
    def build(cls, config: Any, ctx: BuildContext) -> MemoryKind:
        """The kind for the stack, from its config section (not None)."""
        ...

    @abstractmethod
    def empty(self, record: LayerRecord) -> Any:
        """The empty state of one layer, shaped for ``record``'s batch and heads."""
        ...

    @abstractmethod
    def read(self, state: Any, query: torch.Tensor, ctx: ReadContext) -> Readout:
        """Read ``state`` with position-free queries ``(B, H, T, d_k)``."""
        ...

    @abstractmethod
    def write(self, state: Any, record: LayerRecord, segment: ClosedSegment) -> Any:
        """The state after writing one closed segment (``segment.valid``: False = padding)."""
        ...

    # ------------------------------------------------------------------ optional hooks

    def prefix(self, layers: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids ``(B, P)`` (left-padded) and their validity to put before the next segment,
        from the kind's state ``{layer: state}``; None (the default): nothing."""
        return None

    def opening(self, layers: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Like :meth:`prefix`, but put first, before every kind's prefix (a stream's opening
        tokens, as InfLLM keeps them before what it retrieves); None (the default): nothing."""
        return None

    def describe(self) -> str:
        """This kind's line in :meth:`MemoryStack.describe <memstack.stack.MemoryStack.describe>`."""
        return f"{self.name}: layers {sorted(self.layers)}"

    def check_state(self, layer: int, state: Any, batch: int, heads: tuple[int, int, int]) -> None:
        """Raise ValueError when ``state`` of ``layer`` cannot serve this model and batch;
        ``heads`` is the layer's ``(kv_heads, d_k, d_v)``. Default: any state passes."""
        return None

    @classmethod
    def check_loaded(cls, layer: int, state: Any, source: str) -> None:
        """Raise ValueError when a state read from a file (``source``) is malformed (tensor states).
        Default: any state passes."""
        return None

    def save_state(self, layers: dict[int, Any], directory: Path) -> None:
        """Write a handle state (``state_type`` None) of every layer under ``directory``."""
        raise TypeError(
            f"memory kind {self.name!r} keeps a handle state (state_type None) but defines no "
            "save_state: implement it to save a stream with this kind"
        )

    def load_state(self, directory: Path) -> dict[int, Any]:
        """Read what :meth:`save_state` wrote."""
        raise TypeError(
            f"memory kind {self.name!r} keeps a handle state (state_type None) but defines no "
            "load_state: implement it to load a stream with this kind"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={sorted(self.layers)})"


@dataclass(frozen=True)
class KindSpec:
    """A registered memory kind: its class and the dataclass of its config section."""

    kind: type[MemoryKind]
    config: type


KINDS: dict[str, KindSpec] = {}
"""The registered kinds by name, in mixing order (registration order). Change it through
:func:`register_kind` and :func:`unregister_kind`."""


def register_kind(kind: type[MemoryKind], config: type) -> type[MemoryKind]:
    """Make ``kind`` available to every :class:`~memstack.stack.MemoryStack`.

    Args:
        kind: a :class:`MemoryKind` subclass with a ``name``.
        config: the dataclass of its section in ``StackConfig.kinds[kind.name]`` (with
            ``to_dict``-able fields; it validates itself in ``__post_init__``).

    Returns:
        ``kind`` (so it can decorate the class).

    Raises:
        ValueError: a different kind already has the name, or ``kind`` is not a MemoryKind.
    """
    if not (isinstance(kind, type) and issubclass(kind, MemoryKind)) or not isinstance(
        getattr(kind, "name", None), str
    ):
        raise ValueError(f"register_kind takes a MemoryKind subclass with a name, got {kind!r}")
    old = KINDS.get(kind.name)
    if old is not None and old.kind is not kind:
        raise ValueError(f"a memory kind named {kind.name!r} is already registered ({old.kind.__name__})")
    KINDS[kind.name] = KindSpec(kind, config)
    return kind


def unregister_kind(name: str) -> None:
    """Forget a registered kind (tests, notebooks); stacks already built keep theirs."""
    if name not in KINDS:
        raise ValueError(f"no memory kind named {name!r}; registered: {sorted(KINDS)}")
    del KINDS[name]


def tensor_state_types() -> dict[str, type]:
    """``{kind: state_type}`` of the registered kinds whose state is a tuple of tensors."""
    return {name: spec.kind.state_type for name, spec in KINDS.items() if spec.kind.state_type is not None}
