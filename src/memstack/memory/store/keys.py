"""Layer 3, long-term memory: how a chunk's attention becomes index keys, and a segment's a query.

Pure tensor functions, no module, no store, no model: the store (``store.py``) and benchmarks call
them directly. Everything is per stream (one batch row); the caller loops over rows, since each
row has its own padding and its own store.

Conventions:

- queries ``(H, T, D)``, keys ``(H_kv, T, D)``, grouped-query attention as HF's ``repeat_kv``:
  query head ``h`` reads KV head ``h // (H // H_kv)``.
- "position-free" (``_pf``) means the rotary rotation has been undone by the caller, so that a
  score is an attention logit wherever the chunk once sat (InfLLM's choice).
- An index vector concatenates all KV heads of a layer, ``(H_kv * D,)`` laid out as
  ``"hkv d -> (hkv d)"``; on the query side each group of ``g = H // H_kv`` query heads is first
  averaged to its KV head. The inner product of a query vector and a key vector is then the sum of
  the per-head attention logits (before scaling), and one search per layer covers every head.

Papers:

- InfLLM (representative tokens, Xiao et al. 2024): https://arxiv.org/abs/2402.04617
- EM-LLM (surprise-based segmentation, Fountas et al. 2024): https://arxiv.org/abs/2407.09450
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

from memstack.memory.store.chunks import Chunk


class ChunkKeys(NamedTuple):
    """Index vectors of a segment's chunks; ``vectors[i]`` points at ``chunks[chunk_index[i]]``."""

    vectors: torch.Tensor  # (n, H_kv * D) float32
    chunk_index: torch.Tensor  # (n,) int64


# ---------------------------------------------------------------------------------------------
# Attention mass received by each key


def received_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float | None = None,
    valid: torch.Tensor | None = None,
    *,
    mean_over_queries: bool = False,
    query_block: int = 128,
) -> torch.Tensor:
    """Attention mass each key receives from an observation window of queries (H2O / InfLLM style).

    For every observation query the softmax runs over the keys it can see: ``key_pos <= query_pos``
    and ``valid``. Those weights are summed over the observation queries and over the ``g`` query
    heads that read each KV head. These should be the model's real attention weights, so pass the
    *rotated* Q/K that attention used (not the position-free ones). The map is built for
    ``query_block`` queries at a time, ``(H, query_block, T)``, never for the whole input.

    Args:
        query: ``(H, Tq, D)``, the observation queries only (e.g. the last tokens of the segment).
        key: ``(H_kv, T, D)``.
        query_positions: ``(Tq,)`` position of each query.
        key_positions: ``(T,)`` position of each key.
        scaling: softmax scale; None means ``1/sqrt(D)``.
        valid: ``(T,)`` bool, False for padded keys (they get no mass and no share of any
            softmax); None means all valid.
        mean_over_queries: divide each key's mass by the number of observation queries that could
            see it (0 where none could). Off by default: the plain sum is the attention mass as
            H2O and InfLLM use it, and with the usual observation window (queries after the
            chunks) every key of a chunk is seen by the same number of queries, so the ranking
            inside a chunk is unchanged anyway. When the window overlaps the keys, the mean
            removes the advantage of earlier keys (seen by more queries) but lets a key seen by
            one or two queries, whose weight is dominated by attention to itself, weigh as much as
            one seen by all.
        query_block: queries per block of the map (memory ``H * query_block * T`` floats).

    Returns:
        ``(H_kv, T)`` float32, zero at padded keys and at keys no query could see.

    Raises:
        ValueError: bad shapes.
    """
    if query.ndim != 3 or key.ndim != 3 or query.shape[-1] != key.shape[-1]:
        raise ValueError(
            f"need query (H, Tq, D) and key (H_kv, T, D), got {tuple(query.shape)}, {tuple(key.shape)}"
        )
    h, q_len, d = query.shape
    h_kv, kv_len = key.shape[0], key.shape[1]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if query_positions.shape != (q_len,) or key_positions.shape != (kv_len,):
        raise ValueError(
            f"query_positions {tuple(query_positions.shape)} must be ({q_len},) and "
            f"key_positions {tuple(key_positions.shape)} must be ({kv_len},)"
        )
    if valid is not None and (valid.shape != (kv_len,) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a ({kv_len},) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")
    scale = 1.0 / math.sqrt(d) if scaling is None else scaling

    # float32 whatever the model ran in: a bf16 softmax summed over many queries loses the ranking
    q = rearrange(query.float(), "(hkv g) q d -> hkv g q d", hkv=h_kv)
    k = key.float()
    mass = torch.zeros(h_kv, kv_len, dtype=torch.float32, device=key.device)
    seen = torch.zeros(kv_len, dtype=torch.float32, device=key.device)
    for lo in range(0, q_len, query_block):
        hi = min(lo + query_block, q_len)
        allowed = key_positions[None, :] <= query_positions[lo:hi, None]  # (q, T)
        if valid is not None:
            allowed = allowed & valid[None, :]
        scores = einsum(q[:, :, lo:hi], k, "hkv g q d, hkv t d -> hkv g q t") * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        # a query that sees no key would give NaN (softmax of all -inf): it contributes nothing
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        mass += einsum(weights, "hkv g q t -> hkv t")
        seen += allowed.sum(dim=0)
    if mean_over_queries:
        mass = mass / seen.clamp_min(1.0)
    return mass


# ---------------------------------------------------------------------------------------------
# Key strategies: a chunk -> index vectors


def group_mean(query: torch.Tensor, h_kv: int) -> torch.Tensor:
    """Average each group of query heads to its KV head: ``(H, T, D) -> (H_kv, T, D)`` float32.

    Groups follow HF's ``repeat_kv``: query heads ``k*g .. k*g+g-1`` read KV head ``k``.
    """
    if query.ndim != 3 or h_kv < 1 or query.shape[0] % h_kv:
        raise ValueError(f"query {tuple(query.shape)} must be (H, T, D) with H a multiple of h_kv={h_kv}")
    return rearrange(query.float(), "(hkv g) t d -> hkv g t d", hkv=h_kv).mean(dim=1)


def _check_inputs(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None,
    mass: torch.Tensor | None,
) -> None:
    if key_pf.ndim != 3:
        raise ValueError(f"key_pf must be (H_kv, T, D), got {tuple(key_pf.shape)}")
    h_kv, t, d = key_pf.shape
    if query_pf is not None and (
        query_pf.ndim != 3 or query_pf.shape[1:] != (t, d) or query_pf.shape[0] % h_kv
    ):
        raise ValueError(
            f"query_pf {tuple(query_pf.shape)} must be (H, {t}, {d}) with H a multiple of H_kv={h_kv}"
        )
    if mass is not None and mass.shape != (h_kv, t):
        raise ValueError(f"mass must be (H_kv, T) = ({h_kv}, {t}), got {tuple(mass.shape)}")
    for start, end in chunks:
        if not 0 <= start < end <= t:
            raise ValueError(f"chunk ({start}, {end}) is not a non-empty span of [0, {t})")


def _token_chunk_ids(chunks: Sequence[Chunk], length: int, device: torch.device) -> torch.Tensor:
    """``(T,)`` int64: the chunk each token belongs to, -1 outside every chunk."""
    ids = torch.full((length,), -1, dtype=torch.int64, device=device)
    for i, (start, end) in enumerate(chunks):
        ids[start:end] = i
    return ids


def _weighted_chunk_mean(chunks: Sequence[Chunk], x: torch.Tensor, weights: torch.Tensor) -> ChunkKeys:
    """Per chunk and head, ``sum_t w[h, t] x[h, t] / sum_t w[h, t]``; x ``(H_kv, T, D)``, w ``(H_kv, T)``."""
    h_kv, length, d = x.shape
    n = len(chunks)
    ids = _token_chunk_ids(chunks, length, x.device)
    inside = ids >= 0
    ids, x, w = ids[inside], x[:, inside].float(), weights[:, inside].float()  # (m,), (H_kv, m, D), (H_kv, m)
    total = torch.zeros(n, h_kv, dtype=torch.float32, device=x.device).index_add_(0, ids, w.T)
    # a chunk that got no mass on a head (no query saw it) falls back to its plain mean there
    w = w + (total == 0).T.float()[:, ids]
    total = torch.zeros(n, h_kv, dtype=torch.float32, device=x.device).index_add_(0, ids, w.T)
    summed = torch.zeros(n, h_kv, d, dtype=torch.float32, device=x.device)
    summed.index_add_(0, ids, rearrange(x * w[..., None], "hkv m d -> m hkv d"))
    vectors = rearrange(summed / total[..., None], "n hkv d -> n (hkv d)")
    return ChunkKeys(vectors, torch.arange(n, dtype=torch.int64, device=x.device))


def received_attention(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    *,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """A chunk's keywords, the tokens that received the most attention (InfLLM's representative tokens).

    InfLLM, section 3.2 "representative tokens", https://arxiv.org/abs/2402.04617. A token's score
    is its mass summed over the KV heads, so one keyword set serves every head and each index
    vector is one real token's key on all heads. The ``keys_per_chunk`` highest-scoring tokens of
    a chunk are its keywords (all its tokens if the chunk is shorter), in position order.

    Args:
        chunks: ``[(start, end), ...]`` spans of the row.
        key_pf: ``(H_kv, T, D)`` position-free keys.
        query_pf: unused (uniform strategy signature).
        mass: ``(H_kv, T)`` from :func:`received_attention_mass`; required.
        keys_per_chunk: keywords per chunk.
        keyword_pool: ``"mean"``: one vector per chunk, the mean of its keywords' keys (InfLLM);
            ``"each"``: every keyword's key is its own vector pointing at the chunk.

    Returns:
        :class:`ChunkKeys`; with ``"each"``, a chunk's vectors are consecutive.

    Raises:
        ValueError: missing mass, bad shapes or spans, unknown ``keyword_pool``.
    """
    if mass is None:
        raise ValueError("strategy 'received_attention' needs mass (from received_attention_mass)")
    if keyword_pool not in ("mean", "each"):
        raise ValueError(f"keyword_pool must be 'mean' or 'each', got {keyword_pool!r}")
    if keys_per_chunk < 1:
        raise ValueError(f"keys_per_chunk must be >= 1, got {keys_per_chunk}")
    _check_inputs(chunks, key_pf, query_pf, mass)
    tokens = rearrange(key_pf.float(), "hkv t d -> t (hkv d)")
    score = mass.float().sum(dim=0)  # (T,)
    vectors, chunk_index = [], []
    for i, (start, end) in enumerate(chunks):
        k = min(keys_per_chunk, end - start)
        keywords = start + score[start:end].topk(k).indices.sort().values  # (k,)
        if keyword_pool == "mean":
            vectors.append(tokens[keywords].mean(dim=0, keepdim=True))
            chunk_index.append(i)
        else:
            vectors.append(tokens[keywords])
            chunk_index.extend([i] * k)
    if not vectors:
        return ChunkKeys(
            tokens.new_zeros(0, tokens.shape[1]), torch.zeros(0, dtype=torch.int64, device=tokens.device)
        )
    return ChunkKeys(torch.cat(vectors), torch.tensor(chunk_index, dtype=torch.int64, device=tokens.device))


def attention_weighted(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    *,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """One vector per chunk: the attention-weighted mean of its position-free keys.

    Per KV head ``k`` and chunk ``c``: ``sum_{t in c} mass[k, t] key[k, t] / sum_{t in c} mass[k, t]``
    (a head on which the chunk got no mass at all falls back to the plain mean). The heads are
    then concatenated. ``query_pf``, ``keys_per_chunk`` and ``keyword_pool`` are unused.

    Raises:
        ValueError: missing mass, bad shapes or spans.
    """
    if mass is None:
        raise ValueError("strategy 'attention_weighted' needs mass (from received_attention_mass)")
    _check_inputs(chunks, key_pf, query_pf, mass)
    return _weighted_chunk_mean(chunks, key_pf, mass)


def mean_key(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    *,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """Baseline: one vector per chunk, the mean of its position-free keys (heads concatenated).

    Only ``chunks`` and ``key_pf`` are used.
    """
    _check_inputs(chunks, key_pf, query_pf, mass)
    return _weighted_chunk_mean(chunks, key_pf, torch.ones(key_pf.shape[:2], device=key_pf.device))


def mean_query(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    *,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """Baseline: one vector per chunk, the mean of its queries, group-averaged to each KV head.

    The chunk's vector is what :func:`segment_query` would give for the chunk's tokens, so a
    segment that asks what a chunk asked finds it. ``key_pf`` gives ``H_kv`` and the shapes.

    Raises:
        ValueError: ``query_pf`` missing, bad shapes or spans.
    """
    if query_pf is None:
        raise ValueError("strategy 'mean_query' needs query_pf")
    _check_inputs(chunks, key_pf, query_pf, mass)
    grouped = group_mean(query_pf, key_pf.shape[0])  # (H_kv, T, D)
    return _weighted_chunk_mean(chunks, grouped, torch.ones(grouped.shape[:2], device=grouped.device))


def every_token(
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None = None,
    mass: torch.Tensor | None = None,
    *,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """Every token's position-free key is its own index vector (heads concatenated), pointing at
    its chunk, so a chunk scores its best token: an attention logit of one real key, which a
    retrieval head's query aims at exactly (a pass key's digits are 2-3 tokens of a 32-token
    chunk; a mean of keywords blurs them). The index holds one vector per token, as the stored
    K/V do anyway. Only ``chunks`` and ``key_pf`` are used.
    """
    _check_inputs(chunks, key_pf, query_pf, mass)
    tokens = rearrange(key_pf.float(), "hkv t d -> t (hkv d)")
    ids = _token_chunk_ids(chunks, tokens.shape[0], tokens.device)
    inside = ids >= 0
    return ChunkKeys(tokens[inside], ids[inside])


StrategyFn = Callable[..., ChunkKeys]
"""``fn(chunks, key_pf, query_pf, mass, *, keys_per_chunk, keyword_pool) -> ChunkKeys``."""


@dataclass(frozen=True)
class Strategy:
    """A registered key strategy: the function and what it needs the store to compute for it."""

    fn: StrategyFn
    needs_mass: bool = False
    """Needs ``mass``, the attention each token received within its segment (costs one attention
    recomputation per stored segment)."""
    needs_query: bool = False
    """Needs ``query_pf``, the segment's position-free queries."""


STRATEGIES: dict[str, Strategy] = {}
"""The key strategies by name; ``StoreConfig.strategy`` accepts exactly these."""


def register_strategy(
    name: str, fn: StrategyFn | None = None, *, needs_mass: bool = False, needs_query: bool = False
) -> Any:
    """Register a key strategy (also usable as a decorator: ``@register_strategy("name")``).

    Args:
        name: the value of ``StoreConfig.strategy`` that selects it.
        fn: ``fn(chunks, key_pf, query_pf, mass, *, keys_per_chunk, keyword_pool) -> ChunkKeys``.
        needs_mass / needs_query: the inputs it reads (the others arrive as None).

    Raises:
        ValueError: the name is taken by another function.
    """
    if fn is None:
        return lambda f: register_strategy(name, f, needs_mass=needs_mass, needs_query=needs_query)
    old = STRATEGIES.get(name)
    if old is not None and old.fn is not fn:
        raise ValueError(f"a key strategy named {name!r} is already registered")
    STRATEGIES[name] = Strategy(fn, needs_mass, needs_query)
    return fn


def unregister_strategy(name: str) -> None:
    """Forget a registered strategy (tests, notebooks)."""
    if name not in STRATEGIES:
        raise ValueError(f"no key strategy named {name!r}; registered: {sorted(STRATEGIES)}")
    del STRATEGIES[name]


register_strategy("received_attention", received_attention, needs_mass=True)
register_strategy("attention_weighted", attention_weighted, needs_mass=True)
register_strategy("mean_key", mean_key)
register_strategy("mean_query", mean_query, needs_query=True)
register_strategy("every_token", every_token)


def chunk_keys(
    strategy: str,
    chunks: Sequence[Chunk],
    key_pf: torch.Tensor,
    query_pf: torch.Tensor | None,
    mass: torch.Tensor | None,
    keys_per_chunk: int = 4,
    keyword_pool: str = "mean",
) -> ChunkKeys:
    """Index vectors of one row's chunks under the named strategy (see :data:`STRATEGIES`).

    Args:
        strategy: a key of :data:`STRATEGIES`.
        chunks: ``[(start, end), ...]`` spans of the row (from :func:`fixed_chunks` or
            :func:`surprise_chunks`).
        key_pf: ``(H_kv, T, D)`` position-free keys of one layer.
        query_pf: ``(H, T, D)`` position-free queries of the same layer (needed by ``mean_query``).
        mass: ``(H_kv, T)`` received attention (needed by ``received_attention`` and
            ``attention_weighted``).
        keys_per_chunk, keyword_pool: see :func:`received_attention`.

    Returns:
        :class:`ChunkKeys` ``(vectors (n, H_kv * D) float32, chunk_index (n,) int64)``.

    Raises:
        ValueError: unknown strategy (the message lists the accepted ones), missing input, bad shapes.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown key strategy {strategy!r}; accepted: {', '.join(STRATEGIES)}")
    return STRATEGIES[strategy].fn(
        chunks, key_pf, query_pf, mass, keys_per_chunk=keys_per_chunk, keyword_pool=keyword_pool
    )


# ---------------------------------------------------------------------------------------------
# Query side


def segment_query(
    query_pf: torch.Tensor, h_kv: int, valid: torch.Tensor | None = None, window: int | None = None
) -> torch.Tensor:
    """The search query of a segment (or of a block of decoded tokens) at one layer.

    The mean of the group-averaged position-free queries over the last ``window`` valid positions,
    heads concatenated like the index vectors. One call per segment and layer, one search for all
    heads: per-token, per-head search is what made earlier systems slow.

    Args:
        query_pf: ``(H, T, D)`` position-free queries.
        h_kv: KV heads (``H`` must be a multiple).
        valid: ``(T,)`` bool, True for real tokens; None means all valid.
        window: pool only the last ``window`` valid positions; None means all of them.

    Returns:
        ``(H_kv * D,)`` float32; all zeros if the row has no valid position (a zero query scores
        0 against every key and stays zero through :func:`normalise`).

    Raises:
        ValueError: bad shapes or ``window < 1``.
    """
    grouped = group_mean(query_pf, h_kv)  # (H_kv, T, D)
    length = grouped.shape[1]
    if valid is not None and (valid.shape != (length,) or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a ({length},) bool tensor, got {tuple(valid.shape)} {valid.dtype}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    positions = torch.arange(length, device=grouped.device) if valid is None else valid.nonzero().flatten()
    if window is not None:
        positions = positions[-window:]
    if positions.numel() == 0:
        return grouped.new_zeros(grouped.shape[0] * grouped.shape[2])
    return rearrange(grouped[:, positions].mean(dim=1), "hkv d -> (hkv d)")


def normalise(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise along the last dimension, for cosine search; a zero vector stays zero."""
    return F.normalize(vectors.float(), p=2.0, dim=-1, eps=eps)
