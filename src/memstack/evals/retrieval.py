"""Chunk retrieval side by side: attention keys, raw token keys, dense embeddings and BM25.

The pieces behind ``scripts/bench_retrieval.py``, kept here so that tests can check them against
brute force. Every system ranks the *same* chunks of the *same* text for the *same* questions:

- a text is cut into fixed chunks of ``chunk_len`` characters (bytes: the corpora are ASCII, so a
  character is one token of the byte-level models), and read in segments of ``segment_len``
  characters, a multiple of ``chunk_len``, each segment on its own, as the store keys a segment
  from that segment's attention;
- facts and needles are written *over* the text at a word boundary (``data/retrieval_tasks.py``),
  so a sample changes only the segments its sentence touches;
- a question is read alone, or after the text's last characters (``question_context``, as a
  prompt's end precedes its question in the store's reading segment), and the pooled
  position-free queries of its own tokens (:func:`keys.segment_query`) search the index, as the
  store's read does.

Attention systems read Q, K and the attention weights of every layer with forward hooks
(:class:`AttentionReader`): for a Llama-style causal LM the outputs of ``q_proj``/``k_proj``
(before rotary: position-free, InfLLM's choice), for a BERT encoder those of ``query``/``key``
(absolute positions are in the hidden states, as they are for that model everywhere). The mass a
key received is the model's own attention weights summed over the segment's queries and the
query heads of its KV group, :func:`keys.received_attention_mass`'s quantity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from einops import rearrange, reduce
from torch import nn

from memstack.memory.store.keys import STRATEGIES as KEY_STRATEGIES
from memstack.memory.store.keys import chunk_keys, group_mean, segment_query
from memstack.train.evaluate import wilson_interval

# ---------------------------------------------------------------------------------------------
# Metrics


def rank_metrics(ranking: Sequence[int], relevant: set[int]) -> dict[str, float]:
    """recall@1, recall@5 (a relevant chunk in the top 1 / 5) and reciprocal rank of the first one.

    The reciprocal rank is 0 when no relevant chunk is in ``ranking`` (the reported MRR is thus
    MRR@len(ranking)).
    """
    rank = next((i + 1 for i, c in enumerate(ranking) if c in relevant), None)
    return {
        "recall@1": float(rank == 1),
        "recall@5": float(rank is not None and rank <= 5),
        "mrr": 0.0 if rank is None else 1.0 / rank,
    }


def summarise(rows: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and 95% interval of each metric over samples.

    Recalls are rates: Wilson interval. MRR is a mean of values in [0, 1]: normal interval
    ``mean +- 1.96 sd / sqrt(n)``, clipped to [0, 1]. Timings and sizes get the mean only.
    """
    out: dict[str, dict[str, float]] = {}
    n = len(rows)
    for name in rows[0]:
        values = np.array([r[name] for r in rows], dtype=np.float64)
        mean = float(values.mean())
        if name.startswith("recall"):
            low, high = wilson_interval(int(round(values.sum())), n)
        elif name == "mrr":
            half = 1.96 * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
            low, high = max(0.0, mean - half), min(1.0, mean + half)
        else:
            out[name] = {"mean": mean}
            continue
        out[name] = {"mean": mean, "low": low, "high": high}
    out["n"] = {"mean": float(n)}
    return out


# ---------------------------------------------------------------------------------------------
# Reporting: per system and strategy, the variant chosen on held-out questions


def headline(results: dict) -> dict:
    """Per system and strategy (or the one variant of dense/BM25) the layer and metric (inner
    product or cosine) chosen by MRR on the held-out facts, and their figures on every task.

    ``best_on_test`` adds, per task, the best layer and metric *on that task's own samples*: an
    upper bound for the attention systems (a choice a user could not make without answers),
    shown beside the honest figure.
    """
    dev = results["facts_dev"]
    table: dict[str, dict] = {}
    for system, variants in dev.items():
        for name in sorted({v.split("/")[-1] for v in variants}):
            layers = sorted(v for v in variants if v.split("/")[-1] == name)  # ties: the same pick always
            best = max(layers, key=lambda v: variants[v]["mrr"]["mean"])
            label = system if name in ("dense", "bm25") else f"{system}: {name}"
            tasks = [t for t in results if t != "facts_dev"]
            table[label] = {"system": system, "variant": best, **{t: results[t][system][best] for t in tasks}}
            table[label]["best_on_test"] = {}
            for t in tasks:
                top = max(layers, key=lambda v, t=t: results[t][system][v]["mrr"]["mean"])
                table[label]["best_on_test"][t] = {
                    "variant": top,
                    "mrr": results[t][system][top]["mrr"]["mean"],
                }
    return table


def markdown(table: dict, tasks: list[str], dev: dict) -> str:
    """The README's two tables: every metric for MiniLM, BM25, each attention model's strategy
    with the best held-out MRR and the store's own search on its calibrated heads
    (:data:`STORE_HEADS`, nothing chosen); then every strategy's MRR, held-out choice / best on
    the task."""
    models = sorted({label.split(": ")[0] for label in table if ": " in label})
    best = {
        m: max((lab for lab in table if lab.startswith(m + ": ")), key=lambda lab: _dev_mrr(table[lab], dev))
        for m in models
    }
    fixed = [lab for lab in sorted(table) if lab.endswith(f": {STORE_HEADS}") and lab not in best.values()]
    main = [lab for lab in ("minilm_dense", "bm25") if lab in table] + list(best.values()) + fixed
    lines = [
        "| task | system (layer/metric/head chosen on held-out facts) | recall@1 [95% CI] | recall@5 | "
        "MRR [95% CI] | ms / query | index bytes / token |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for task in tasks:
        for label in main:
            m = table[label][task]
            lines.append(
                f"| {task} | {label} (`{table[label]['variant']}`) | {_ci(m['recall@1'])} | "
                f"{m['recall@5']['mean']:.2f} | {_ci(m['mrr'])} | {m['ms']['mean']:.2f} | "
                f"{m['bytes_per_token']['mean']:.1f} |"
            )
    lines += ["", "| attention keys | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for label in sorted(lab for lab in table if ": " in lab):
        row = table[label]
        cells = [f"{row[t]['mrr']['mean']:.2f} / {row['best_on_test'][t]['mrr']:.2f}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dev_mrr(row: dict, dev: dict) -> float:
    system, variant = row["system"], row["variant"]
    return dev[system][variant]["mrr"]["mean"]


def _ci(m: dict) -> str:
    return f"{m['mean']:.2f} [{m['low']:.2f}-{m['high']:.2f}]"


# ---------------------------------------------------------------------------------------------
# Searching


class ChunkIndex:
    """Chunk vectors in a FAISS flat inner-product index, built once and searched per question.

    Several vectors may point at one chunk (``keyword_pool="each"``): a chunk's score is its best
    vector's, as a store that retrieves vectors then dedupes chunks would rank them.
    """

    def __init__(self, vectors: np.ndarray, chunk_index: np.ndarray):
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.chunk_index = chunk_index
        self.per_chunk = max(1, math.ceil(len(vectors) / max(1, int(chunk_index.max()) + 1)))
        self.nbytes = self.index.ntotal * self.index.d * 4

    def rank(self, query: np.ndarray, depth: int) -> tuple[list[int], float]:
        """``(up to depth chunks, best first; search seconds)`` for one ``(dim,)`` query."""
        started = time.perf_counter()
        _, ids = self.index.search(
            np.ascontiguousarray(query[None], dtype=np.float32),
            min(self.index.ntotal, depth * self.per_chunk),
        )
        seconds = time.perf_counter() - started
        ranking: list[int] = []
        for i in ids[0]:
            c = int(self.chunk_index[i]) if i >= 0 else -1
            if c >= 0 and c not in ranking:
                ranking.append(c)
        return ranking[:depth], seconds


class TokenIndex:
    """Memorizing Transformers' kNN attention, summed per chunk.

    Every token's key is indexed; each query token retrieves its ``k`` nearest keys by inner
    product and spreads a softmax (logits times ``scale``) over them; a chunk's score is the
    total weight its tokens received from all query tokens.
    """

    def __init__(self, keys: np.ndarray, token_chunk: np.ndarray, k: int, scale: float):
        self.index = faiss.IndexFlatIP(keys.shape[1])
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))
        self.token_chunk, self.k, self.scale = token_chunk, k, scale
        self.nbytes = self.index.ntotal * self.index.d * 4

    def rank(self, queries: np.ndarray, depth: int) -> tuple[list[int], float]:
        """``(up to depth chunks, best first; search seconds)`` for ``(m, dim)`` query tokens."""
        started = time.perf_counter()
        scores, ids = self.index.search(
            np.ascontiguousarray(queries, dtype=np.float32), min(self.k, self.index.ntotal)
        )
        logits = scores.astype(np.float64) * self.scale
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        total: dict[int, float] = {}
        for row_ids, row_w in zip(ids, weights, strict=True):
            for i, w in zip(row_ids, row_w, strict=True):
                if i >= 0:
                    c = int(self.token_chunk[i])
                    total[c] = total.get(c, 0.0) + float(w)
        seconds = time.perf_counter() - started
        return sorted(total, key=lambda c: -total[c])[:depth], seconds


def rank_by_vectors(
    vectors: np.ndarray, chunk_index: np.ndarray, query: np.ndarray, depth: int
) -> tuple[list[int], float, int]:
    """One search of a one-off :class:`ChunkIndex`: ``(ranking, search seconds, index bytes)``."""
    index = ChunkIndex(vectors, chunk_index)
    return (*index.rank(query, depth), index.nbytes)


def rank_by_tokens(
    keys: np.ndarray, token_chunk: np.ndarray, queries: np.ndarray, k: int, scale: float, depth: int
) -> tuple[list[int], float, int]:
    """One search of a one-off :class:`TokenIndex`: ``(ranking, search seconds, index bytes)``."""
    index = TokenIndex(keys, token_chunk, k, scale)
    return (*index.rank(queries, depth), index.nbytes)


def rank_by_heads(
    keys: np.ndarray,
    token_chunk: np.ndarray,
    queries: np.ndarray,
    heads: Sequence[int],
    group: int,
    depth: int,
) -> tuple[list[int], float]:
    """One layer of the long-term store's own search on named query heads (``StoreConfig(
    strategy="every_token", heads=..., query_pool="max")``): ``(up to depth chunks, best first;
    search seconds)``.

    ``keys`` ``(T, H_kv * D)``: every token's position-free key at the layer; ``token_chunk``:
    each token's chunk; ``queries`` ``(H, m, D)``: the question's per-token queries at every query
    head. Query head ``h`` reads KV head ``h // group`` (Hugging Face's ``repeat_kv``) and the
    store joins the named heads into one search vector, so a (query token, key token) pair scores
    the sum over the named heads of ``q_h . k_(h // group)``; every query token searches and a
    chunk scores its best pair. Ties go to the earlier chunk."""
    started = time.perf_counter()
    d = queries.shape[-1]
    scores = sum(queries[h] @ keys[:, (h // group) * d : (h // group + 1) * d].T for h in heads)  # (m, T)
    per_chunk = np.full(int(token_chunk.max()) + 1, -np.inf)
    np.maximum.at(per_chunk, token_chunk, scores.max(axis=0))
    order = np.argsort(-per_chunk, kind="stable")
    ranking = [int(c) for c in order[:depth] if np.isfinite(per_chunk[c])]
    return ranking, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# Reading attention


@dataclass
class LayerView:
    """One layer's attention for a batch of segments."""

    query: torch.Tensor  # (B, H, T, D) float32, before rotary
    key: torch.Tensor  # (B, H_kv, T, D) float32, before rotary
    mass: torch.Tensor  # (B, H_kv, T) float32: weights summed over valid queries and each KV group


class AttentionReader:
    """Q, K and received attention of every attention layer of a Hugging Face model.

    Llama-style modules (``q_proj``/``k_proj``) and BERT's (``query``/``key``) are recognised;
    where a module normalises Q and K (``q_norm``/``k_norm``: Qwen3, Gemma 3, OLMo 2) the norms'
    outputs are read, since those are what attention rotates. The model is switched to eager
    attention, which returns the weights; with ``eager=False`` it keeps its own attention and
    only :meth:`queries_and_keys` reads it (no weights, no ``(T, T)`` map per layer).

    Raises:
        ValueError: the model has no attention module of either kind.
    """

    def __init__(self, model: nn.Module, eager: bool = True):
        self.model = model.eval()
        self.eager = eager
        if eager:
            model.set_attn_implementation("eager")
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.projections: list[tuple[nn.Module, nn.Module]] = []
        for module in model.modules():
            if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
                if isinstance(getattr(module, "q_norm", None), nn.Module) and isinstance(
                    getattr(module, "k_norm", None), nn.Module
                ):
                    self.projections.append((module.q_norm, module.k_norm))
                else:
                    self.projections.append((module.q_proj, module.k_proj))
            elif isinstance(getattr(module, "query", None), nn.Linear) and isinstance(
                getattr(module, "key", None), nn.Linear
            ):
                self.projections.append((module.query, module.key))
        if not self.projections:
            raise ValueError(f"{type(model).__name__} has no q_proj/k_proj or query/key attention modules")

    @property
    def num_layers(self) -> int:
        """Attention layers found."""
        return len(self.projections)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[LayerView]:
        """Run the model on ``(B, T)`` ids (``attention_mask`` 1 for real tokens) and read every layer.

        Raises:
            RuntimeError: the reader was built with ``eager=False`` (no attention weights).
        """
        if not self.eager:
            raise RuntimeError("this AttentionReader was built with eager=False: use queries_and_keys")
        qk, out = self._read(input_ids, attention_mask, weights=True)
        valid = attention_mask.float()
        views = []
        for (query, key), weights in zip(qk, out.attentions, strict=True):
            received = reduce(weights.float() * valid[:, None, :, None], "b h q t -> b h t", "sum")
            mass = reduce(received, "b (hkv g) t -> b hkv t", "sum", hkv=self.kv_heads)
            views.append(LayerView(query, key, mass * valid[:, None, :]))
        return views

    @torch.no_grad()
    def queries_and_keys(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(query (B, H, T, D), key (B, H_kv, T, D))``, float32, before rotary, from one
        forward under the model's current attention implementation."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._read(input_ids, attention_mask, weights=False)[0]

    def _read(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: bool
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], object]:
        captured: dict[nn.Module, torch.Tensor] = {}

        def keep(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            # per-head norms return (B, T, heads, D); projections and full-width norms (B, T, heads * D)
            captured[module] = output.detach().float().flatten(2)

        hooks = [proj.register_forward_hook(keep) for pair in self.projections for proj in pair]
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=weights)
        finally:
            for h in hooks:
                h.remove()
        qk = [
            (
                rearrange(captured[q_proj], "b t (h d) -> b h t d", h=self.heads),
                rearrange(captured[k_proj], "b t (h d) -> b h t d", h=self.kv_heads),
            )
            for q_proj, k_proj in self.projections
        ]
        return qk, out


# ---------------------------------------------------------------------------------------------
# An attention system: strategies on top of a reader


@dataclass(frozen=True)
class KeyStrategy:
    """A key strategy of ``memory/keys.py`` with its options; ``name`` is how tables show it."""

    name: str
    strategy: str
    keyword_pool: str = "mean"
    keys_per_chunk: int = 4


def key_strategies() -> tuple[KeyStrategy, ...]:
    """Every registered key strategy (:data:`memstack.memory.store.keys.STRATEGIES`) with its
    default options, plus ``received_attention`` with one vector per keyword: a strategy
    registered anywhere joins the benchmark."""
    variants = []
    for name in KEY_STRATEGIES:
        variants.append(KeyStrategy(name, name))
        if name == "received_attention":
            variants.append(KeyStrategy("received_attention_each", name, keyword_pool="each"))
    return tuple(variants)


STORE_HEADS = "store_heads"
"""The store's own search on named retrieval heads (:func:`rank_by_heads` at each of their layers,
fused by :func:`memstack.memory.store.readouts.reciprocal_rank_fusion`), shown beside the
strategies with nothing chosen on held-out facts: the heads come from their own calibration."""

TOKENS = "token_keys"
"""The raw per-token key search (Memorizing Transformers), shown beside the strategies."""


Tokenize = Callable[[Sequence[str]], tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]]
"""texts -> (ids (B, T), attention_mask (B, T), per text the character span of each token; (0, 0)
for special tokens and padding)."""


@dataclass
class SegmentKeys:
    """Everything a segment contributes to one layer's indexes: per strategy and for raw tokens."""

    vectors: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (vectors, chunk index within segment)
    tokens: tuple[np.ndarray, np.ndarray]  # (token keys (m, H_kv*D), chunk index within segment)


def token_chunk_spans(
    offsets: Sequence[tuple[int, int]], chunk_len: int, n_chunks: int
) -> list[tuple[int, int]]:
    """Per chunk of a segment, the span of tokens that start inside it (``(0, 0)`` if none).

    A token belongs to the chunk its first character is in; special tokens (empty span) to none.
    """
    spans = []
    starts = [a if b > a else -1 for a, b in offsets]
    for c in range(n_chunks):
        inside = [i for i, a in enumerate(starts) if c * chunk_len <= a < (c + 1) * chunk_len]
        spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
    return spans


class AttentionKeyer:
    """Keys every chunk of a segment under every strategy, and pools a question, at each layer."""

    def __init__(self, reader: AttentionReader, tokenize: Tokenize, chunk_len: int, batch_size: int = 32):
        self.reader, self.tokenize, self.chunk_len, self.batch_size = reader, tokenize, chunk_len, batch_size

    def segments(self, texts: Sequence[str], prefix: str = "") -> list[list[SegmentKeys]]:
        """Per segment text, per layer, its :class:`SegmentKeys` (chunk indices local to the segment).

        ``prefix``: read before every segment and kept out of its keys, as the store's
        ``keep_initial`` keeps a prompt's first tokens in view of every segment and out of its
        search; the prefix then holds the attention sink, which otherwise is the segment's first
        token, a key every query matches (a token that straddles the prefix's end is dropped).
        """
        out: list[list[SegmentKeys]] = []
        p = len(prefix)
        for lo in range(0, len(texts), self.batch_size):
            batch = texts[lo : lo + self.batch_size]
            ids, mask, offsets = self.tokenize([prefix + t for t in batch])
            views = self.reader(ids, mask)
            for row, text in enumerate(batch):
                n_chunks = math.ceil(len(text) / self.chunk_len)
                own = [(a - p, b - p) if b > a >= p else (0, 0) for a, b in offsets[row]]
                spans = token_chunk_spans(own, self.chunk_len, n_chunks)
                out.append([self._key_row(v, row, spans) for v in views])
        return out

    def _key_row(self, view: LayerView, row: int, spans: list[tuple[int, int]]) -> SegmentKeys:
        present = [(c, s) for c, s in enumerate(spans) if s[1] > s[0]]
        chunks = [s for _, s in present]
        local = np.array([c for c, _ in present], dtype=np.int64)
        key, query, mass = view.key[row], view.query[row], view.mass[row]
        vectors = {}
        for ks in key_strategies():
            got = chunk_keys(ks.strategy, chunks, key, query, mass, ks.keys_per_chunk, ks.keyword_pool)
            vectors[ks.name] = (got.vectors.numpy(), local[got.chunk_index.numpy()])
        token_ids = np.concatenate([np.arange(a, b) for a, b in chunks]) if chunks else np.zeros(0, np.int64)
        token_chunk = np.concatenate([np.full(b - a, c) for c, (a, b) in present]) if chunks else token_ids
        tokens = rearrange(key[:, token_ids], "hkv t d -> t (hkv d)").numpy()
        token_chunk = token_chunk.astype(np.int64)
        for v, c in vectors.values():
            # ``every_token`` keys are these same keys: keep one copy, since a 1M-character text's
            # keys at every layer of a 135M LM are about 10 GB, and twice that does not fit in 24 GB
            if v.shape == tokens.shape and np.array_equal(v, tokens) and np.array_equal(c, token_chunk):
                tokens, token_chunk = v, c
                break
        return SegmentKeys(vectors, (tokens, token_chunk))

    def question(self, text: str, context: str = "") -> list[tuple[np.ndarray, np.ndarray]]:
        """Per layer: the pooled query (``segment_query`` over the question's tokens) and the
        group-averaged per-token queries ``(m, H_kv*D)`` for the token search.

        ``context``: text read before the question, as the end of a prompt precedes its question
        in the store's reading segment; only the question's own tokens are pooled. Empty: the
        question is read alone, at the first positions, where a causal LM's attention sink is.
        """
        views, content = self._read_question(text, context)
        out = []
        for v in views:
            pooled = segment_query(v.query[0], self.reader.kv_heads, content).numpy()
            per_token = rearrange(
                group_mean(v.query[0], self.reader.kv_heads)[:, content], "hkv t d -> t (hkv d)"
            )
            out.append((pooled, per_token.numpy()))
        return out

    def question_heads(self, text: str, context: str = "") -> list[np.ndarray]:
        """Per layer, the question's own tokens' queries at every query head, ``(H, m, D)``, not
        averaged over KV groups: what the store's search on named heads (:func:`rank_by_heads`)
        searches with. ``context`` as in :meth:`question`."""
        views, content = self._read_question(text, context)
        return [v.query[0][:, content].numpy() for v in views]

    def _read_question(self, text: str, context: str) -> tuple[list[LayerView], torch.Tensor]:
        ids, mask, offsets = self.tokenize([context + text])
        content = torch.tensor([b > a and a >= len(context) for a, b in offsets[0]])
        if not bool(content.any()):
            raise ValueError(f"the question {text!r} has no token of its own after its context")
        return self.reader(ids, mask), content


def byte_tokenize(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """The byte-level models' :data:`Tokenize`: one token per byte, right-padded with 0."""
    encoded = [list(t.encode("utf-8")) for t in texts]
    if any(len(e) != len(t) for e, t in zip(encoded, texts, strict=True)):
        raise ValueError("the retrieval benchmark's texts must be ASCII (one byte per character)")
    width = max(len(e) for e in encoded)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    offsets = [[(j, j + 1) if j < len(e) else (0, 0) for j in range(width)] for e in encoded]
    return ids, mask, offsets


def hf_tokenize(tokenizer) -> Tokenize:
    """A fast Hugging Face tokenizer as a :data:`Tokenize` (special tokens get an empty span)."""

    def tokenize(texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
        enc = tokenizer(
            list(texts), padding=True, truncation=True, return_offsets_mapping=True, return_tensors="pt"
        )
        mask = enc["attention_mask"]
        offsets = [
            [(int(a), int(b)) if mask[i, j] else (0, 0) for j, (a, b) in enumerate(row.tolist())]
            for i, row in enumerate(enc["offset_mapping"])
        ]
        return enc["input_ids"], mask, offsets

    return tokenize
