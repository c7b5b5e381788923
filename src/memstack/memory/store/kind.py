"""Layer 3, long-term memory: past chunks kept as they were, found again by attention keys,
read back by attention.

The memory kind that composes :mod:`~memstack.memory.store.chunks` (where a segment is cut),
:mod:`~memstack.memory.store.keys` (how a chunk's attention becomes its index keys) and
:mod:`~memstack.memory.store.chunk_store` (one :class:`ChunkStore` per stream) in the shape every kind shares
(:mod:`memstack.memory.base`).

Write (when a segment closes, once, outside activation checkpointing): each row's valid tokens are
cut into chunks; the model's own attention over the segment (recomputed from the recorded
position-free Q/K, rotated back to their positions 0..T-1) gives each token the mass it
received; the strategy turns that into index keys; the chunk's token ids and position-free K/V
go into the row's store.

Read (causal, one search per block of queries and layer, never per token and head): the queries
of a segment are served in blocks of ``block_len``; block j searches the store with the pooled
position-free queries of the ``block_len`` tokens before it (the previous segment's last block
for j = 0), so no query's output depends on a later token, and ``generate`` searches once per
block. The hits' K/V are returned as a :class:`~memstack.memory.base.MemoryKV`:

- ``kv`` readout: they join the local attention's softmax (InfLLM), no training needed;
- ``kv_gated`` readout: attention over the hits alone, mixed in by a learned per-head gate
  (Memorizing Transformers, https://arxiv.org/abs/2203.08913).

Positions: the store holds position-free keys (rotation undone), so a search score is an attention
logit wherever the chunk once sat. When read back, every query sees every retrieved key at one
fixed relative distance ``distance`` (InfLLM, https://arxiv.org/abs/2402.04617): for rotary models
the logit is ``q R(distance) . k`` with ``R`` the model's own rotation, the same for all queries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from memstack.config import StoreConfig
from memstack.memory.base import ClosedSegment, LayerRecord, MemoryKV, ReadContext, Readout
from memstack.memory.store.chunk_store import ChunkStore
from memstack.memory.store.chunks import fixed_chunks, surprise_chunks
from memstack.memory.store.keys import chunk_keys, received_attention_mass, segment_query
from memstack.memory.store.policy import RetrievalPolicy

if TYPE_CHECKING:
    from memstack.state import StackState

KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StoreState:
    """One layer's long-term memory for a batch of streams: a store per row, and the pooled query
    of each row's last block (block 0 of the next segment searches with it)."""

    stores: list[ChunkStore]
    tail: torch.Tensor | None = None  # (B, H_kv * d_k) float32

    @property
    def batch_size(self) -> int:
        return len(self.stores)

    def num_records(self) -> list[int]:
        """Chunks held per row."""
        return [len(s) for s in self.stores]


def save_stores(state: StackState, path: str | Path) -> None:
    """Write every store of ``state`` under ``path/layer-<L>/row-<R>/`` (each atomically, by
    :meth:`ChunkStore.save`); the tensor memories are not included (``StackState.save`` has them)."""
    for layer, layer_state in state.memories.get("store", {}).items():
        for row, store in enumerate(layer_state.stores):
            store.save(Path(path) / f"layer-{layer}" / f"row-{row}")


def load_stores(path: str | Path, expect: dict[str, str] | None = None) -> StackState:
    """The stores :func:`save_stores` wrote, as a state holding only them (for ``stack.sleep``)."""
    from memstack.state import StackState

    path = Path(path)
    layers = sorted(path.glob("layer-*"), key=lambda p: int(p.name.split("-")[1]))
    if not layers:
        raise FileNotFoundError(f"{path}: no saved stores (expected layer-<L>/row-<R>/ directories)")
    memories = {}
    for layer_dir in layers:
        rows = sorted(layer_dir.glob("row-*"), key=lambda p: int(p.name.split("-")[1]))
        memories[int(layer_dir.name.split("-")[1])] = StoreState([ChunkStore.load(r, expect) for r in rows])
    return StackState(memories={"store": memories})


class LongTermMemory:
    """The long-term store as a memory kind. Holds configuration only; the stores are state.

    Args:
        layers: decoder layers with a store.
        config: the store section of the stack config.
        segment_len: the stack's segment length (the default read-back ``distance``).
        metadata: written into every saved store (model type, config fingerprint).
    """

    name = "store"
    differentiable = False  # written once per segment, outside activation checkpointing
    needs_query = True  # keys of received_attention / mean_query and the tail query

    def __init__(
        self,
        layers: Iterable[int],
        config: StoreConfig,
        segment_len: int,
        metadata: dict[str, str] | None = None,
    ):
        self.needs_surprise = config.chunking == "surprise"
        """The stack hands -log p of each token to :meth:`write` (EM-LLM's surprise chunking)."""
        self.layers = frozenset(layers)
        self.config = config
        self.policy = RetrievalPolicy.parse(config.policy)
        """When this store is read (memstack/policy.py)."""
        self.distance = segment_len if config.distance is None else config.distance
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ write

    def empty(self, record: LayerRecord) -> StoreState:
        """A fresh store per row of ``record``'s batch."""
        b, h_kv, _, d_k = record.key.shape
        c = self.config
        stores = [
            ChunkStore(
                [0],
                h_kv * d_k,
                index_factory=c.index_factory,
                metric="cosine" if c.metric == "cosine" else "ip",
                matmul_threshold=c.matmul_threshold,
                max_records=c.max_records,
                eviction=c.eviction,
                kv_dtype=KV_DTYPES[c.kv_dtype],
                kv_dir=c.kv_dir,
                metadata={**self.metadata, "strategy": c.strategy},
            )
            for _ in range(b)
        ]
        return StoreState(stores)

    def write(self, state: StoreState, record: LayerRecord, segment: ClosedSegment) -> StoreState:
        """Cut each row's valid tokens into chunks, key them by attention, add them to the row's store."""
        c = self.config
        key, value, query = (t.detach().float() for t in (record.key, record.value, record.query))
        b, h_kv, t_len, _ = key.shape
        positions = torch.arange(t_len, device=key.device)
        q_rot, k_rot = query, key
        if segment.rotate is not None:  # the model's real attention: rotated Q/K at 0..T-1
            q_rot, k_rot = segment.rotate(query, 0), segment.rotate(key, 0)
        tails = []
        for row in range(b):
            valid = (
                segment.valid[row]
                if segment.valid is not None
                else torch.ones_like(positions, dtype=torch.bool)
            )
            if self.needs_surprise:
                if segment.nll is None:
                    raise ValueError("surprise chunking needs segment.nll (-log p of each token)")
                min_len = max(1, c.chunk_len // 4)
                chunks = surprise_chunks(
                    segment.nll[row].cpu(), valid.cpu(), min_len, c.chunk_len, c.surprise_gamma
                )
            else:
                chunks = fixed_chunks(valid.cpu(), c.chunk_len)
            tails.append(self._tail_query(query[row], valid, h_kv))
            if not chunks:
                continue
            mass = None
            if c.strategy in ("received_attention", "attention_weighted"):
                mass = received_attention_mass(q_rot[row], k_rot[row], positions, positions, valid=valid)
            keys = chunk_keys(
                c.strategy, chunks, key[row], query[row], mass, c.keys_per_chunk, c.keyword_pool
            )
            state.stores[row].add(
                [segment.ids[row, a:e].cpu() for a, e in chunks],
                [segment.index * segment.segment_len + a for a, e in chunks],
                segment.index,
                {0: (keys.vectors.cpu(), keys.chunk_index.cpu())},
                kv={
                    0: (
                        [key[row, :, a:e].cpu() for a, e in chunks],
                        [value[row, :, a:e].cpu() for a, e in chunks],
                    )
                },
            )
        if all(t is None for t in tails):  # only padding in this segment: keep the previous tails
            return state
        fallback = next(t for t in tails if t is not None)
        old = state.tail
        tail = torch.stack(
            [
                t if t is not None else (old[i] if old is not None else torch.zeros_like(fallback))
                for i, t in enumerate(tails)
            ]
        )
        return StoreState(state.stores, tail)

    def _tail_query(self, query: torch.Tensor, valid: torch.Tensor, h_kv: int) -> torch.Tensor | None:
        """Pooled position-free queries of the last ``block_len`` valid tokens of a row."""
        if not bool(valid.any()):
            return None
        return segment_query(query, h_kv, valid, window=self.config.block_len)

    # ------------------------------------------------------------------ read

    def read(self, state: StoreState, query: torch.Tensor, ctx: ReadContext) -> Readout:
        """Retrieve for every block the call's queries fall in, and return the hits' K/V.

        Args:
            state: the stores before this segment.
            query: ``(B, H, Tq, d_k)`` position-free queries at segment positions
                ``ctx.start .. ctx.start + Tq - 1``.
            ctx: the call's validity, positions, rotation and per-segment scratch (hits are
                cached there, so a checkpoint re-run reads exactly what the forward pass read).

        Returns:
            A :class:`Readout` whose ``memory`` holds the hits' K/V, rotated for the fixed
            distance, and which query sees which.
        """
        c = self.config
        if c.readout == "tokens":  # the chunks come back as token ids before the segment (prefix)
            return Readout(None)
        b, h, t_q, d_k = query.shape
        # Queries of this segment so far (decoding hands them over one call at a time).
        seen = ctx.scratch.get("queries")
        q_all = (
            query.detach().float()
            if ctx.start == 0 or seen is None
            else torch.cat([seen, query.detach().float()], 2)
        )
        ctx.scratch["queries"] = q_all
        first, last = ctx.start // c.block_len, (ctx.start + t_q - 1) // c.block_len
        blocks = {j: self._hits(state, q_all, j, ctx) for j in range(first, last + 1)}
        # One memory tensor for the call: blocks side by side, each query sees its block's hits.
        keys = torch.cat([blocks[j][0] for j in blocks], dim=2)  # (B, H_kv, N, d_k)
        values = torch.cat([blocks[j][1] for j in blocks], dim=2)
        valid = torch.cat([blocks[j][2] for j in blocks], dim=1)  # (B, N)
        owner = torch.cat(
            [torch.full((blocks[j][2].shape[1],), j, device=query.device) for j in blocks]
        )  # (N,)
        q_block = torch.arange(ctx.start, ctx.start + t_q, device=query.device) // c.block_len  # (Tq,)
        visible = (q_block[:, None] == owner[None, :])[None] & valid[:, None, :]  # (B, Tq, N)
        q_mem = query.float()
        if ctx.rotate is not None:
            # every query at +distance from every retrieved key: q R(distance) . R(0) k
            q_mem = ctx.rotate(q_mem, self.distance, step=0)
            keys = ctx.rotate(keys, 0, step=0)
        spans, col = [], 0
        for j in blocks:
            rows = (
                max(j * c.block_len, ctx.start) - ctx.start,
                min((j + 1) * c.block_len, ctx.start + t_q) - ctx.start,
            )
            spans.append((*rows, col, col + blocks[j][2].shape[1]))
            col += blocks[j][2].shape[1]
        memory = MemoryKV(q_mem, keys, values, visible, tuple(spans))
        if c.readout == "kv":
            return Readout(None, None, memory)
        nothing = ~visible.any(-1)[:, :, None].expand(b, t_q, h)  # (B, Tq, H): keep the running output
        return Readout(memory.attend(ctx.scaling), nothing, None)  # kv_gated

    def prefix(self, state: StoreState) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``tokens`` readout: the token ids of each row's hits, in stream order, left-padded.

        Searched once per segment with the previous segment's tail query (causal: nothing of the
        coming segment is used). Returns ``(ids (B, P) int64, valid (B, P) bool)`` or None when
        no row retrieved anything (or the readout is not ``tokens``).
        """
        c = self.config
        if c.readout != "tokens" or state.tail is None:
            return None
        rows = []
        for row, store in enumerate(state.stores):
            pooled = state.tail[row]
            if len(store) == 0 or not bool(pooled.any()):
                rows.append(torch.zeros(0, dtype=torch.long))
                continue
            _, ids = store.search(0, pooled[None].float().cpu(), c.top_k)
            ids = ids[0][ids[0] >= 0]
            if c.neighbours:
                ids = store.neighbours(ids, c.neighbours)
            ids = ids.sort().values  # stream order: the chunks read as they were written
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

    def _hits(
        self, state: StoreState, q_all: torch.Tensor, block: int, ctx: ReadContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``(B, H_kv, N, d)`` and validity ``(B, N)`` of block ``block``'s hits (cached)."""
        cached = ctx.scratch.get(("hits", block))
        if cached is not None:
            return cached
        c = self.config
        b, h, _, d_k = q_all.shape
        h_kv = state.stores[0].dim // d_k  # an index vector concatenates the KV heads
        bl = c.block_len
        per_row = []
        for row in range(b):
            if block == 0:
                pooled = None if state.tail is None else state.tail[row]
            else:
                window_valid = None if ctx.valid is None else ctx.valid[row, (block - 1) * bl : block * bl]
                pooled = segment_query(q_all[row, :, (block - 1) * bl : block * bl], h_kv, window_valid)
                if window_valid is not None and not bool(window_valid.any()):
                    pooled = None
            store = state.stores[row]
            if pooled is None or len(store) == 0 or not bool(pooled.any()):
                per_row.append(None)
                continue
            scores, ids = store.search(0, pooled[None].to(torch.float32).cpu(), c.top_k)
            scores, ids = scores[0][ids[0] >= 0], ids[0][ids[0] >= 0]
            if ctx.trace is not None:  # explaining (memstack/explain.py)
                ctx.trace.append((block, row, ids.tolist(), scores.tolist(), store))
            if c.neighbours:
                ids = store.neighbours(ids, c.neighbours)
            per_row.append(store.kv(0, ids) if len(ids) else None)
        n = max((k.shape[0] * k.shape[2] for k, _, _ in filter(None, per_row)), default=0)
        device = q_all.device
        keys = torch.zeros(b, h_kv, n, d_k, device=device)
        d_v = next((v.shape[-1] for _, v, _ in filter(None, per_row)), d_k)
        values = torch.zeros(b, h_kv, n, d_v, device=device)
        valid = torch.zeros(b, n, dtype=torch.bool, device=device)
        for row, hit in enumerate(per_row):
            if hit is None:
                continue
            k, v, lengths = hit  # (n_hits, H_kv, L, d), lengths (n_hits,)
            m = k.shape[0] * k.shape[2]
            keys[row, :, :m] = k.float().permute(1, 0, 2, 3).reshape(h_kv, m, d_k).to(device)
            values[row, :, :m] = v.float().permute(1, 0, 2, 3).reshape(h_kv, m, -1).to(device)
            token_ok = torch.arange(k.shape[2])[None, :] < torch.as_tensor(lengths)[:, None]  # (n_hits, L)
            valid[row, :m] = token_ok.reshape(-1).to(device)
        ctx.scratch[("hits", block)] = (keys, values, valid)
        return keys, values, valid

    def __repr__(self) -> str:
        return f"LongTermMemory(layers={sorted(self.layers)}, {self.config})"
