"""How the long-term store's hits come back into the model: the readout registry.

A readout is one registered class. The store (:mod:`memstack.memory.store.kind`) searches once
per block of queries and hands the hits to the readout as a
:class:`~memstack.memory.base.MemoryKV` (keys and values rotated for the fixed read-back
distance, and which query sees which hit); the readout turns them into the
:class:`~memstack.memory.base.Readout` the layer mixes in. A readout that works on tokens instead
(``per_block = False``) is asked for a :meth:`StoreReadout.prefix` before each segment.

Built in:

- ``kv``: the hits' keys and values join the local softmax (InfLLM), no training needed;
- ``kv_gated``: attention over the hits alone, mixed in by a learned per-head gate (Memorizing
  Transformers, https://arxiv.org/abs/2203.08913);
- ``tokens``: the hits' token ids are put back in front of the segment (any model, no training;
  searched once per segment with the previous segment's tail query).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from memstack.memory.base import MemoryKV, ReadContext, Readout


class StoreReadout:
    """One way of reading the store's hits back. Subclass, set ``name``, register."""

    name: ClassVar[str]
    gated: ClassVar[bool] = False
    """Mixed in by a learned per-head gate (initial logit ``StoreConfig.gate_init``)."""
    per_block: ClassVar[bool] = True
    """Searches per query block inside attention (:meth:`read`); False: before the segment
    (:meth:`prefix`)."""

    def read(self, memory: MemoryKV, ctx: ReadContext) -> Readout:
        """The layer's readout from one call's hits (``per_block`` readouts)."""
        return Readout(None)

    def prefix(self, kind: Any, layers: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids ``(B, P)`` and validity to put before the next segment, or None. ``kind`` is
        the store kind (its ``config`` and ``search``), ``layers`` each store layer's
        ``StoreState`` (``stores``, ``tail``); typed loosely because the store kind imports this
        module."""
        return None


READOUTS: dict[str, StoreReadout] = {}
"""The readouts by name; ``StoreConfig.readout`` accepts exactly these."""


def register_readout(cls: type[StoreReadout]) -> type[StoreReadout]:
    """Register a readout class under its ``name`` (usable as a class decorator).

    Raises:
        ValueError: not a StoreReadout subclass with a name, or the name is taken by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, StoreReadout)) or not isinstance(
        getattr(cls, "name", None), str
    ):
        raise ValueError(f"register_readout takes a StoreReadout subclass with a name, got {cls!r}")
    old = READOUTS.get(cls.name)
    if old is not None and type(old) is not cls:
        raise ValueError(f"a store readout named {cls.name!r} is already registered")
    READOUTS[cls.name] = cls()
    return cls


def unregister_readout(name: str) -> None:
    """Forget a registered readout (tests, notebooks)."""
    if name not in READOUTS:
        raise ValueError(f"no store readout named {name!r}; registered: {sorted(READOUTS)}")
    del READOUTS[name]


@register_readout
class KVReadout(StoreReadout):
    """The hits join the local softmax: one attention over local and retrieved keys (no gate)."""

    name = "kv"

    def read(self, memory: MemoryKV, ctx: ReadContext) -> Readout:
        return Readout(None, None, memory)


@register_readout
class GatedKVReadout(StoreReadout):
    """Attention over the hits alone, mixed in by the layer's gate for the store."""

    name = "kv_gated"
    gated = True

    def read(self, memory: MemoryKV, ctx: ReadContext) -> Readout:
        b, h, t_q, _ = memory.query.shape
        nothing = ~memory.visible.any(-1)[:, :, None].expand(b, t_q, h)  # keep the running output there
        return Readout(memory.attend(ctx.scaling), nothing, None)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]]) -> list[int]:
    """Ids ranked by their fused score ``sum over rankings of 1 / (1 + rank)`` (rank 0 is a
    ranking's best), ties to the smaller id: how the store fuses its layers' searches (Cormack et
    al. 2009 add 60 to the rank, which only matters for long lists)."""
    votes: dict[int, float] = {}
    for ranking in rankings:
        for rank, i in enumerate(ranking):
            votes[int(i)] = votes.get(int(i), 0.0) + 1.0 / (1 + rank)
    return sorted(votes, key=lambda i: (-votes[i], i))


def _search_skipping_recent(kind: Any, store: Any, vectors: torch.Tensor) -> torch.Tensor:
    """The ``top_k`` best chunk ids, leaving out chunks that end within the stream's last
    ``skip_recent`` tokens (searched deep enough that ``top_k`` others remain when they exist)."""
    c = kind.config
    if not c.skip_recent:
        return kind.search(store, vectors)[1]
    every = store.ids()
    fields = store.records(every)
    ends = fields["start"] + fields["length"]
    recent = set(every[ends > int(ends.max()) - c.skip_recent].tolist())
    _, ids = kind.search(store, vectors, c.top_k + len(recent))
    return torch.tensor([i for i in ids.tolist() if i not in recent][: c.top_k], dtype=torch.long)


@register_readout
class TokensReadout(StoreReadout):
    """The hits' token ids, in stream order, before the segment (left-padded per row)."""

    name = "tokens"
    per_block = False

    def hits(self, kind: Any, layers: dict[int, Any]) -> list[torch.Tensor] | None:
        """Each row's ``top_k`` chunk ids for the next segment, best first, before neighbours are
        added; None when no layer has a tail to search with.

        Searched once per segment with the previous segment's tail queries (causal: nothing of
        the coming segment is used), on every store layer; the layers' rankings are fused by
        :func:`reciprocal_rank_fusion`, ties to the earlier chunk."""
        c = kind.config
        if all(state.tail is None for state in layers.values()):
            return None
        rows: list[torch.Tensor] = []
        for row in range(next(iter(layers.values())).batch_size):
            rankings = []
            for state in layers.values():
                store = state.stores[row]
                if state.tail is None or len(store) == 0 or not bool(state.tail[row].any()):
                    continue
                rankings.append(_search_skipping_recent(kind, store, state.tail[row]).tolist())
            best = reciprocal_rank_fusion(rankings)[: c.top_k]
            rows.append(torch.tensor(best, dtype=torch.long))
        return rows

    def prefix(self, kind: Any, layers: dict[int, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The :meth:`hits` with ``neighbours`` chunks before and after each, as token ids in
        stream order (the chunks read as they were written), left-padded per row; None when no
        row retrieved anything."""
        best = self.hits(kind, layers)
        if best is None:
            return None
        stores = next(iter(layers.values())).stores  # chunk ids agree across layers
        rows: list[torch.Tensor] = []
        for store, ids in zip(stores, best, strict=True):
            if len(ids) and kind.config.neighbours:
                ids = store.neighbours(ids, kind.config.neighbours)
            ids = ids.sort().values
            rows.append(torch.cat(store.tokens(ids)) if len(ids) else torch.zeros(0, dtype=torch.long))
        width = max(len(r) for r in rows)
        if width == 0:
            return None
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, width - len(r) :], valid[i, width - len(r) :] = r, True
        return ids, valid
