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

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from memstack.fields import check_choice, check_int, check_number, parse_layers, reject_bool_ints
from memstack.io import atomic_file
from memstack.memory.base import (
    BuildContext,
    ClosedSegment,
    LayerRecord,
    MemoryKind,
    MemoryKV,
    ReadContext,
    Readout,
    register_kind,
)
from memstack.memory.store.chunk_store import ChunkStore
from memstack.memory.store.chunks import fixed_chunks, surprise_chunks
from memstack.memory.store.keys import (
    STRATEGIES,
    ChunkKeys,
    chunk_keys,
    group_mean,
    received_attention_mass,
    segment_query,
)
from memstack.memory.store.policy import RetrievalPolicy
from memstack.memory.store.readouts import READOUTS

KV_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class StoreConfig:
    """Layer 3, the long-term store: every past chunk kept as it was, found again by attention keys.

    One store per stream (batch row) and store layer. See this module.
    """

    layers: str = "every:2"
    """Decoder layers that write to and read from the store: same syntax as
    ``stack.compressive.layers``, or ``"heads"``: the layers that :attr:`heads` names."""
    heads: str | None = None
    """The query heads that search, ``"layer.head,..."`` (e.g. ``"18.7,17.3"``, heads numbered as
    the model's query heads). None: every head of a store layer searches (each KV head's group of
    query heads averaged, heads concatenated). Retrieval heads are few (Wu et al. 2024,
    https://arxiv.org/abs/2404.15574) and averaging them with the others dilutes them; find them
    with :func:`memstack.evals.heads.retrieval_heads`. A store layer that no head here names
    searches with all its heads. Only the search changes: every head of a store layer reads the hits."""
    query_pool: str = "mean"
    """How a block's queries search: ``mean``, one search with the block's pooled queries (InfLLM);
    ``max``, every query of the block searches and a chunk scores its best match over them, so one
    token that asks (the question's last words) is not averaged away by the others."""
    chunking: str = "fixed"
    """``fixed`` (``chunk_len`` tokens) or ``surprise`` (cut where the model's -log p is high,
    EM-LLM; ``chunk_len`` is then the longest chunk and ``chunk_len // 4`` the shortest)."""
    chunk_len: int = 32
    """Tokens per chunk (the longest chunk with ``surprise``)."""
    surprise_gamma: float = 1.0
    """``surprise``: cut before a token whose -log p exceeds mean + gamma * std of the segment's."""
    strategy: str = "received_attention"
    """How a chunk's attention becomes its index keys: a name registered in
    :mod:`memstack.memory.store.keys` (built in: ``received_attention``, ``attention_weighted``,
    ``mean_key``, ``mean_query``, ``every_token``)."""
    keys_per_chunk: int = 4
    """``received_attention``: keywords per chunk (InfLLM uses 4)."""
    keyword_pool: str = "mean"
    """``received_attention``: ``mean`` (one vector per chunk, InfLLM) or ``each`` (one per keyword)."""
    top_k: int = 4
    """Chunks retrieved per search."""
    neighbours: int = 0
    """Also read this many chunks before and after each hit (EM-LLM's contiguity buffer)."""
    block_len: int = 32
    """Queries are served in blocks of this many tokens; block j searches with the pooled
    position-free queries of the ``block_len`` tokens before it (the previous segment's last
    block for the first), so retrieval is causal and ``generate`` searches once per block."""
    readout: str = "kv"
    """A name registered in :mod:`memstack.memory.store.readouts`. ``kv``: the hits' keys and
    values join the local softmax (no training needed); ``kv_gated``: attention over the hits
    alone, mixed in by a learned per-head gate (Memorizing Transformers); ``tokens``: the hits'
    token ids are put back in front of the segment (any model, no training; searched once per
    segment with the previous one's tail; the chunks' K/V are then not kept)."""
    gate_init: float = -2.0
    """``kv_gated``: initial gate logit (sigmoid(-2) = 0.12: start close to the model alone)."""
    distance: int | None = None
    """Relative position at which every query sees every retrieved key (rotary models), the same
    for all (InfLLM's choice). None: ``segment_len``, just beyond the local window."""
    metric: str = "ip"
    """``ip``: search by raw inner product, an attention logit; ``cosine``: normalised."""
    index_factory: str = "Flat"
    """FAISS factory string used once a layer holds more than ``matmul_threshold`` keys
    (``Flat``, ``HNSW32``, ``IVF1024,PQ16``, ...); below it a plain matmul serves."""
    matmul_threshold: int = 65536
    max_records: int | None = None
    """Chunks kept per stream and layer (None: no limit)."""
    eviction: str = "none"
    """Past ``max_records``: ``none`` (an error, never a silent loss), ``fifo`` or ``least_retrieved``."""
    kv_dir: str | None = None
    """Keep the stored K/V in memory-mapped scratch pages in this existing directory (a fast local
    disk) instead of RAM, for long streams (``memory/kv_pages.py``); None: in RAM."""
    kv_dtype: str = "bfloat16"
    """dtype of the stored K/V (``bfloat16``, ``float16`` or ``float32``)."""
    skip_recent: int = 0
    """``tokens`` readout: never return a chunk that ends within the stream's last
    ``skip_recent`` tokens. Those are in view already when the carry kind carries them (set it to
    the carry's ``recent``), and a question would otherwise find itself first."""
    skip_initial: int = 0
    """The stream's first ``skip_initial`` tokens are stored but give no index keys: a chunk is
    searched by its other tokens' keys only (none left: found only as a neighbour). The first
    tokens of a stream are attention sinks (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453):
    every query attends to them whatever it asks, so their keys match every search and their
    chunk takes a hit from each (on SmolLM2's 20 RULER multi-query prompts at 4K, the first chunk
    was the best of the 4 hits in all 20, ``scripts/ruler_recall.py``). 0 keeps every key."""
    policy: str = "always"
    """When the store is read (memstack/memory/store/policy.py): ``always``, ``every:K`` or ``uncertainty:H``
    (only when the segment's mean next-token entropy without the store exceeds H nats). Every
    segment is written whatever the policy."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "stack.store")
        if self.layers == "heads":
            if self.heads is None:
                raise ValueError('stack.store.layers="heads" needs stack.store.heads, e.g. "18.7,17.3"')
        else:
            parse_layers(self.layers, num_layers=None, name="stack.store.layers")
        if self.heads is not None:
            parse_heads(self.heads)
        check_choice("stack.store.query_pool", self.query_pool, ("mean", "max"))
        check_choice("stack.store.chunking", self.chunking, ("fixed", "surprise"))
        RetrievalPolicy.parse(self.policy)
        check_int("stack.store.chunk_len", self.chunk_len, minimum=1)
        check_choice("stack.store.strategy", self.strategy, tuple(STRATEGIES))
        check_int("stack.store.keys_per_chunk", self.keys_per_chunk, minimum=1)
        check_choice("stack.store.keyword_pool", self.keyword_pool, ("mean", "each"))
        check_int("stack.store.top_k", self.top_k, minimum=1)
        check_int("stack.store.neighbours", self.neighbours, minimum=0)
        check_int("stack.store.block_len", self.block_len, minimum=1)
        check_int("stack.store.skip_recent", self.skip_recent, minimum=0)
        check_int("stack.store.skip_initial", self.skip_initial, minimum=0)
        check_choice("stack.store.readout", self.readout, tuple(READOUTS))
        check_number("stack.store.gate_init", self.gate_init, "a finite number", math.isfinite)
        if self.distance is not None:
            check_int("stack.store.distance", self.distance, minimum=0, optional=True)
        check_choice("stack.store.metric", self.metric, ("ip", "cosine"))
        check_int("stack.store.matmul_threshold", self.matmul_threshold, minimum=0)
        if self.max_records is not None:
            check_int("stack.store.max_records", self.max_records, minimum=1, optional=True)
        check_choice("stack.store.eviction", self.eviction, ("none", "fifo", "least_retrieved"))
        check_choice("stack.store.kv_dtype", self.kv_dtype, ("bfloat16", "float16", "float32"))


def parse_heads(spec: str) -> dict[int, tuple[int, ...]]:
    """``"18.7,17.3,18.6"`` -> ``{17: (3,), 18: (6, 7)}`` (layer -> sorted query heads).

    Raises:
        ValueError: not a comma-separated list of ``layer.head`` pairs of non-negative ints.
    """
    accepted = 'accepted: comma-separated "layer.head" pairs such as "18.7,17.3"'
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"stack.store.heads must be a non-empty string; {accepted}, got {spec!r}")
    heads: dict[int, set[int]] = {}
    for item in spec.split(","):
        parts = item.strip().split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"stack.store.heads: bad entry {item.strip()!r}; {accepted}")
        heads.setdefault(int(parts[0]), set()).add(int(parts[1]))
    return {layer: tuple(sorted(h)) for layer, h in sorted(heads.items())}


@dataclass
class StoreState:
    """One layer's long-term memory for a batch of streams: a store per row, and the pooled query
    of each row's last block (block 0 of the next segment searches with it)."""

    stores: list[ChunkStore]
    tail: torch.Tensor | None = None
    """``(B, dim)`` float32 pooled queries (``query_pool="mean"``) or ``(B, block_len, dim)`` the
    block's queries (``"max"``), ``dim`` the searching heads' concatenated width."""

    @property
    def batch_size(self) -> int:
        return len(self.stores)

    def num_records(self) -> list[int]:
        """Chunks held per row."""
        return [len(s) for s in self.stores]


def save_stores(layers: dict[int, StoreState], path: str | Path) -> None:
    """Write every row's store of every layer under ``path/layer-<L>/row-<R>/`` (each atomically,
    by :meth:`ChunkStore.save`), and each layer's tail query (``path/layer-<L>/tail.safetensors``,
    what the next segment's first block searches with) when it has one."""
    for layer, layer_state in layers.items():
        for row, store in enumerate(layer_state.stores):
            store.save(Path(path) / f"layer-{layer}" / f"row-{row}")
        tail = Path(path) / f"layer-{layer}" / TAIL_FILE
        if layer_state.tail is not None:
            with atomic_file(tail) as tmp:
                tmp.write_bytes(save({"tail": layer_state.tail.detach().float().cpu().contiguous()}))
        else:
            tail.unlink(missing_ok=True)


def load_stores(path: str | Path, expect: dict[str, str] | None = None) -> dict[int, StoreState]:
    """The stores (and tails) :func:`save_stores` wrote, ``{layer: StoreState}``.

    Raises:
        FileNotFoundError: nothing saved there.
        ValueError: a store or tail file is malformed or disagrees with the rows saved.
    """
    path = Path(path)
    layers = sorted(path.glob("layer-*"), key=lambda p: int(p.name.split("-")[1]))
    if not layers:
        raise FileNotFoundError(f"{path}: no saved stores (expected layer-<L>/row-<R>/ directories)")
    memories = {}
    for layer_dir in layers:
        rows = sorted(layer_dir.glob("row-*"), key=lambda p: int(p.name.split("-")[1]))
        stores = [ChunkStore.load(r, expect) for r in rows]
        tail = None
        if (layer_dir / TAIL_FILE).is_file():
            try:
                tail = load_file(str(layer_dir / TAIL_FILE))["tail"]
            except (OSError, KeyError, SafetensorError) as e:
                raise ValueError(f"{layer_dir / TAIL_FILE} is not a tail query file: {e}") from None
            if tail.ndim not in (2, 3) or tail.shape[0] != len(stores) or tail.dtype != torch.float32:
                raise ValueError(
                    f"{layer_dir / TAIL_FILE}: tail {tuple(tail.shape)} {tail.dtype}; expected float32 "
                    f"({len(stores)} rows, [block_len,] search width)"
                )
        memories[int(layer_dir.name.split("-")[1])] = StoreState(stores, tail)
    return memories


TAIL_FILE = "tail.safetensors"


class LongTermMemory(MemoryKind):
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
    colour = "tab:green"

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
        self.heads = parse_heads(config.heads) if config.heads is not None else {}
        """``{layer: query heads}`` that search (:attr:`StoreConfig.heads`); empty: all heads."""
        stray = sorted(set(self.heads) - self.layers)
        if stray:
            raise ValueError(
                f"stack.store.heads names layers {stray}, which have no store (store layers: "
                f'{sorted(self.layers)}); add them to stack.store.layers or use layers="heads"'
            )
        self.policy = RetrievalPolicy.parse(config.policy)
        """When this store is read (memstack/memory/store/policy.py)."""
        self.distance = segment_len if config.distance is None else config.distance
        self.metadata = dict(metadata or {})
        self.readout = READOUTS[config.readout]
        self.gate_init = config.gate_init if self.readout.gated else None

    @classmethod
    def build(cls, config: StoreConfig, ctx: BuildContext) -> LongTermMemory:
        """The store on the layers ``config.layers`` names; saved stores carry the model type."""
        if config.layers == "heads":
            layers = ctx.layers(",".join(str(la) for la in parse_heads(config.heads)), "stack.store.heads")
        else:
            layers = ctx.layers(config.layers, "stack.store.layers")
        return cls(layers, config, ctx.segment_len, metadata={"model_type": ctx.model_type})

    def describe(self) -> str:
        c = self.config
        searched = f", searched by heads {c.heads}" if c.heads else ""
        return (
            f"3. long-term store: layers {sorted(self.layers)}, {c.chunk_len}-token chunks keyed by "
            f"{c.strategy}{searched}, top {c.top_k} per {c.block_len}-query block ({c.query_pool}), "
            f"{c.readout} readout"
        )

    def check_state(self, layer: int, state: Any, batch: int, heads: tuple[int, int, int]) -> None:
        """One store per input row."""
        if state.batch_size != batch:
            raise ValueError(
                f"state's store memory of layer {layer} holds {state.batch_size} streams, the input has "
                f"{batch} rows; call reset() or pass a state made for the same batch"
            )

    def save_state(self, layers: dict[int, Any], directory: Path) -> None:
        """Every row's store and tail query (:func:`save_stores`)."""
        save_stores(layers, directory)

    def load_state(self, directory: Path) -> dict[int, Any]:
        """What :meth:`save_state` wrote, checked against this store's strategy."""
        return load_stores(directory, expect={"strategy": self.config.strategy})

    # ------------------------------------------------------------------ write

    def empty(self, record: LayerRecord) -> StoreState:
        """A fresh store per row of ``record``'s batch."""
        b, h_kv, _, d_k = record.key.shape
        c = self.config
        searching = len(self.heads.get(record.layer, ())) or h_kv
        stores = [
            ChunkStore(
                [0],
                searching * d_k,
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
        # the searching heads' Q/K: index keys, mass and tail queries are theirs alone
        q_s, k_s = self._searching(record.layer, query, key)
        q_rot, k_rot = q_s, k_s
        if segment.rotate is not None:  # the model's real attention: rotated Q/K at 0..T-1
            q_rot, k_rot = segment.rotate(q_s, 0), segment.rotate(k_s, 0)
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
            tails.append(self._tail_query(q_s[row], valid, k_s.shape[1]))
            if not chunks:
                continue
            mass = None
            if STRATEGIES[c.strategy].needs_mass:
                mass = received_attention_mass(q_rot[row], k_rot[row], positions, positions, valid=valid)
            keys = self._keys(chunks, segment.index * segment.segment_len, k_s[row], q_s[row], mass)
            state.stores[row].add(
                [segment.ids[row, a:e].cpu() for a, e in chunks],
                [segment.index * segment.segment_len + a for a, e in chunks],
                segment.index,
                {0: (keys.vectors.cpu(), keys.chunk_index.cpu())},
                # a readout that never reads K/V back (``tokens``) does not keep them
                kv=(
                    {
                        0: (
                            [key[row, :, a:e].cpu() for a, e in chunks],
                            [value[row, :, a:e].cpu() for a, e in chunks],
                        )
                    }
                    if self.readout.per_block
                    else None
                ),
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

    def _keys(
        self,
        chunks: list[tuple[int, int]],
        offset: int,
        key: torch.Tensor,
        query: torch.Tensor,
        mass: torch.Tensor | None,
    ) -> ChunkKeys:
        """The index keys of one row's ``chunks`` (segment positions; the segment starts at stream
        position ``offset``), leaving out the tokens before stream position ``skip_initial``."""
        c = self.config
        first = c.skip_initial - offset  # segment positions before it are the stream's first tokens
        keyed = [(max(a, first), e) for a, e in chunks] if first > 0 else chunks
        kept = [i for i, (a, e) in enumerate(keyed) if a < e]
        if not kept:
            return ChunkKeys(key.new_zeros(0, key.shape[0] * key.shape[2]), torch.zeros(0, dtype=torch.int64))
        keys = chunk_keys(
            c.strategy, [keyed[i] for i in kept], key, query, mass, c.keys_per_chunk, c.keyword_pool
        )
        if len(kept) == len(chunks):
            return keys
        return ChunkKeys(keys.vectors, torch.tensor(kept, device=keys.chunk_index.device)[keys.chunk_index])

    def _searching(
        self, layer: int | None, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The searching heads' queries and keys, ``(B, H', T, D)`` each (:attr:`StoreConfig.heads`):
        the named query heads and the KV head each reads (so H' = H_kv' and groups of one), or
        all heads unchanged."""
        heads = self.heads.get(layer)
        if not heads:
            return query, key
        h, h_kv = query.shape[1], key.shape[1]
        if heads[-1] >= h:
            raise ValueError(
                f"stack.store.heads names query head {heads[-1]} of layer {layer}, which has {h} query "
                f"heads (0..{h - 1})"
            )
        group = h // h_kv  # HF's repeat_kv: query head i reads KV head i // group
        return query[:, list(heads)], key[:, [i // group for i in heads]]

    def _block_search(self, query: torch.Tensor, h_kv: int, valid: torch.Tensor | None) -> torch.Tensor:
        """The search vectors of one block of a row's searching queries ``(H', T, D)``:
        ``(1, dim)`` pooled (``query_pool="mean"``) or ``(T, dim)`` one per query (``"max"``; a
        padded position repeats a valid one, which changes no maximum)."""
        if self.config.query_pool == "mean":
            return segment_query(query, h_kv, valid)[None]
        per_token = rearrange(group_mean(query, h_kv), "hkv t d -> t (hkv d)")
        if valid is not None and bool(valid.any()) and not bool(valid.all()):
            first = int(valid.nonzero()[0])
            per_token = torch.where(valid[:, None], per_token, per_token[first])
        return per_token

    def _tail_query(self, query: torch.Tensor, valid: torch.Tensor, h_kv: int) -> torch.Tensor | None:
        """The search of the next segment's first block: from the last ``block_len`` valid
        tokens of a row (:meth:`_block_search` of them, squeezed to ``(dim,)`` when pooled)."""
        if not bool(valid.any()):
            return None
        positions = valid.nonzero().flatten()[-self.config.block_len :]
        window = torch.zeros_like(valid)
        window[positions] = True
        last = query[:, int(positions[0]) : int(positions[-1]) + 1]
        vectors = self._block_search(last, h_kv, window[int(positions[0]) : int(positions[-1]) + 1])
        if self.config.query_pool == "mean":
            return vectors[0]
        if vectors.shape[0] < self.config.block_len:  # a short row: repeat, for one tail shape
            vectors = torch.cat([vectors, vectors[:1].expand(self.config.block_len - vectors.shape[0], -1)])
        return vectors

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
        if not self.readout.per_block:  # e.g. ``tokens``: the chunks come back before the segment
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
        return self.readout.read(memory, ctx)

    def prefix(self, layers: dict[int, StoreState]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The readout's tokens before the next segment (``tokens``), or None."""
        return self.readout.prefix(self, layers)

    def search(
        self, store: ChunkStore, vectors: torch.Tensor, top_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` (default ``config.top_k``) best distinct chunks of ``store`` for search
        vectors ``(dim,)`` or ``(n, dim)`` (a chunk scores its best match over them):
        ``(scores, ids)``, best first."""
        k = self.config.top_k if top_k is None else top_k
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        scores, ids = store.search(0, vectors.to(torch.float32).cpu(), k)
        return _best_distinct(scores, ids, k)

    def _hits(
        self, state: StoreState, q_all: torch.Tensor, block: int, ctx: ReadContext
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``(B, H_kv, N, d)`` and validity ``(B, N)`` of block ``block``'s hits (cached)."""
        cached = ctx.scratch.get(("hits", block))
        if cached is not None:
            return cached
        c = self.config
        b, h, _, d_k = q_all.shape
        searching = state.stores[0].dim // d_k  # heads of an index vector
        heads = self.heads.get(ctx.layer)
        bl = c.block_len
        per_row = []
        for row in range(b):
            if block == 0:
                search = None if state.tail is None else state.tail[row]
                if search is not None and search.ndim == 1:
                    search = search[None]
            else:
                window_valid = None if ctx.valid is None else ctx.valid[row, (block - 1) * bl : block * bl]
                q_block = q_all[row, :, (block - 1) * bl : block * bl]
                if heads:
                    q_block = q_block[list(heads)]  # checked by the writes that filled the store
                search = self._block_search(q_block, searching, window_valid)
                if window_valid is not None and not bool(window_valid.any()):
                    search = None
            store = state.stores[row]
            if search is None or len(store) == 0 or not bool(search.any()):
                per_row.append(None)
                continue
            scores, ids = self.search(store, search)
            if ctx.trace is not None:  # explaining (memstack/explain.py)
                ctx.trace.append((block, row, ids.tolist(), scores.tolist(), store))
            if c.neighbours:
                ids = store.neighbours(ids, c.neighbours)
            per_row.append(store.kv(0, ids) if len(ids) else None)
        # KV heads of the stored K/V (1 where nothing is stored yet: zero hits broadcast anyway)
        h_kv = next((h for h in (s.kv_heads(0) for s in state.stores) if h is not None), 1)
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


def _best_distinct(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best distinct records of several queries' results ``(q, k)``, best first: a
    record scores its best match over the queries (exact: a record among the overall top k is
    among the top k of the query where it scores best)."""
    scores, ids = scores.flatten(), ids.flatten()
    found = ids >= 0
    scores, ids = scores[found], ids[found]
    order = scores.argsort(descending=True, stable=True)
    chosen, seen = [], set()
    for i in order.tolist():
        if int(ids[i]) not in seen:
            seen.add(int(ids[i]))
            chosen.append(i)
            if len(chosen) == k:
                break
    chosen_t = torch.tensor(chosen, dtype=torch.int64)
    return scores[chosen_t], ids[chosen_t]


register_kind(LongTermMemory, StoreConfig)
