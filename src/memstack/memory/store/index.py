"""Search side of a :class:`~memstack.memory.store.chunk_store.ChunkStore`: the per-layer keys and index.

Small layers are searched by a plain matmul on the queries' device; beyond ``matmul_threshold``
keys a FAISS index from ``index_factory`` takes over, trained once enough keys exist. The FAISS
path re-scores its candidates exactly from the kept float32 keys, so scores are the same inner
products whichever path ran. Search returns the top-k *distinct* records: several keys of one
chunk count once, with their best score.
"""

from __future__ import annotations

import math
import time as _time
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

FACTORY_EXAMPLES = "'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ16np', 'IVF4096,SQ8'"
# k-means warns below 39 points per centroid; train only once that many keys exist.
_TRAIN_POINTS_PER_CENTROID = 39
_MAX_TRAIN_POINTS_PER_CENTROID = 256  # faiss would subsample beyond this anyway


def grow(arr: np.ndarray, needed: int) -> np.ndarray:
    """``arr`` with room for ``needed`` rows (capacity doubles, so appends are amortised O(1))."""
    if needed <= len(arr):
        return arr
    new = np.zeros((max(needed, 2 * len(arr), 16), *arr.shape[1:]), dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


def min_train_keys_for(index: faiss.Index) -> int:
    """How many keys an untrained index needs: 39 per IVF list and per PQ/SQ centroid."""
    need = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, _TRAIN_POINTS_PER_CENTROID * ivf.nlist)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None:
        need = max(need, _TRAIN_POINTS_PER_CENTROID * pq.ksub)
    return need


class LayerKeys:
    """The keys of one store layer: float32 rows (dead ones included until compaction) + index."""

    def __init__(self, dim: int) -> None:
        self.keys = np.zeros((0, dim), dtype=np.float32)  # (cap, dim), rows [:n] used
        self.key_row = np.zeros(0, dtype=np.int64)  # (cap,) record row of each key; -1: gone
        self.n = 0  # rows used, dead included
        self.n_alive = 0
        self.index: faiss.Index | None = None  # holds exactly rows [:n], in order
        self.train_seconds = 0.0
        self.max_keys_per_record = 0
        self.kv_shape: tuple[int, int, int] | None = None  # (H_kv, D_k, D_v) of this layer's K/V
        self.cache: tuple | None = None  # (version, device, ...) for the matmul path


class StoreIndex:
    """Index building and search of :class:`ChunkStore` (a mixin: it reads the store's arrays)."""

    def _new_index(self) -> faiss.Index:
        try:
            return faiss.index_factory(self.dim, self.index_factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1]
            raise ValueError(
                f"index_factory={self.index_factory!r} is not a FAISS factory string for inner "
                f"product at dim {self.dim} ({msg}); accepted are e.g. {FACTORY_EXAMPLES}"
            ) from None

    @staticmethod
    def _default_params(index: faiss.Index) -> dict[str, float]:
        if faiss.try_extract_index_ivf(index) is not None:
            return {"nprobe": 16}
        if "HNSW" in type(faiss.downcast_index(index)).__name__:
            return {"efSearch": 64}
        return {}

    def _apply_search_params(self, index: faiss.Index) -> None:
        space = faiss.ParameterSpace()
        for name, value in self.search_params.items():
            try:
                space.set_index_parameter(index, name, float(value))
            except RuntimeError:
                raise ValueError(
                    f"search_params={self.search_params!r}: {name!r} does not apply to "
                    f"index_factory={self.index_factory!r} (HNSW takes efSearch, IVF takes nprobe)"
                ) from None

    def set_search_params(self, **params: float) -> None:
        """Change FAISS search parameters (e.g. ``efSearch=128``, ``nprobe=32``) of every layer."""
        with self._lock:
            old = self.search_params
            self.search_params = {**old, **params}
            try:
                self._apply_search_params(self._new_index())
            except ValueError:
                self.search_params = old
                raise
            for lk in self._layer.values():
                if lk.index is not None:
                    self._apply_search_params(lk.index)

    def _maybe_build_index(self, layer: int) -> None:
        lk = self._layer[layer]
        if lk.index is not None or lk.n_alive <= self.matmul_threshold:
            return
        if lk.n_alive < self.min_train_keys:
            return  # an untrained index cannot answer: the matmul serves until enough keys exist
        if lk.n - lk.n_alive:
            self._compact_keys(layer)  # start the index from live keys only
        index = self._new_index()
        if not index.is_trained:
            t0 = _time.perf_counter()
            limit = _MAX_TRAIN_POINTS_PER_CENTROID * max(1, self.min_train_keys // _TRAIN_POINTS_PER_CENTROID)
            sample = lk.keys[: lk.n]
            if lk.n > limit:  # seeded, so a rebuilt store trains the same way
                sample = sample[np.sort(np.random.default_rng(0).choice(lk.n, limit, replace=False))]
            index.train(sample)
            lk.train_seconds = _time.perf_counter() - t0
        self._apply_search_params(index)
        index.add(lk.keys[: lk.n])
        lk.index = index

    def search(self, layer: int, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k distinct records per query, by each record's best key score.

        Args:
            layer: a store layer.
            queries: ``(q, dim)``; normalised here for ``metric="cosine"``.
            top_k: records per query.

        Returns:
            ``(scores (q, k) float32, record_ids (q, k) int64)`` on the queries' device, best first,
            scored in float32 whatever the autocast;
            padded with score ``-inf`` and id ``-1`` where fewer than k records have keys here.
            Each returned record's retrieval count goes up by one per query that returned it.
        """
        lk = self._check_layer(layer)
        if not isinstance(queries, torch.Tensor) or queries.dim() != 2 or queries.shape[1] != self.dim:
            shape = tuple(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"queries has shape {shape}; expected (q, {self.dim})")
        if int(top_k) < 1:
            raise ValueError(f"top_k={top_k!r}: expected an int >= 1")
        device, k = queries.device, int(top_k)
        q = queries.detach().float()
        if self.metric == "cosine":
            q = F.normalize(q, dim=-1)
        # scores in float32 under autocast too: bf16 would reorder near-ties and mix dtypes in the max
        with self._lock, torch.autocast(device_type=device.type, enabled=False):
            if lk.index is not None and lk.n_alive > self.matmul_threshold:
                scores, rows = self._search_faiss(lk, q.cpu(), k)
            else:
                scores, rows = self._search_matmul(lk, q, k)
            rows = rows.cpu().numpy()
            hit = rows >= 0
            np.add.at(self._retrievals, rows[hit], 1)
            # rows are -1 wherever there is no hit (an empty store included): index safely
            safe = self._ids[np.maximum(rows, 0)] if self._ids.size else np.zeros_like(rows)
            ids = np.where(hit, safe, -1)
        return scores.to(device), torch.from_numpy(ids).to(device)

    def _search_matmul(self, lk: LayerKeys, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if lk.cache is None or lk.cache[:2] != (self._version, q.device):
            alive = self._key_alive(lk)
            keys = lk.keys[: lk.n] if alive.all() else lk.keys[: lk.n][alive]
            uniq, dense = np.unique(lk.key_row[: lk.n][alive], return_inverse=True)
            lk.cache = (
                self._version,
                q.device,
                torch.from_numpy(keys).to(q.device),
                torch.from_numpy(dense.reshape(-1)).to(q.device),
                torch.from_numpy(uniq).to(q.device),
            )
        _, _, keys, dense, uniq = lk.cache
        scores = q @ keys.T  # (q, n_keys)
        best = torch.full((q.shape[0], len(uniq)), -math.inf, device=q.device)
        best.scatter_reduce_(1, dense.expand(q.shape[0], -1), scores, "amax")  # (q, records)
        top, arg = best.topk(min(k, len(uniq)), dim=1)
        rows = uniq[arg]
        return self._pad(top, rows, k)

    def _search_faiss(self, lk: LayerKeys, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.from_numpy(lk.keys[: lk.n])
        qn = q.numpy()
        want = k * self.refine * max(1, lk.max_keys_per_record)
        while True:
            n_cand = min(lk.n, want + (lk.n - lk.n_alive) // 64)  # some slack for tombstones
            _, cand = lk.index.search(qn, n_cand)  # (q, n_cand) positions in lk.keys, -1 if none
            cand_t = torch.from_numpy(cand)
            exact = torch.einsum("qd,qcd->qc", q, keys[cand_t.clamp_min(0)])  # re-score exactly
            rows = lk.key_row[np.maximum(cand, 0)]
            ok = (cand >= 0) & (rows >= 0)
            ok[ok] = self._alive[rows[ok]]
            exact[torch.from_numpy(~ok)] = -math.inf
            order = torch.argsort(exact, dim=1, descending=True, stable=True).numpy()
            out_s = torch.full((len(qn), k), -math.inf)
            out_r = torch.full((len(qn), k), -1, dtype=torch.int64)
            short = False
            for i in range(len(qn)):
                o = order[i][ok[i][order[i]]]
                _, first = np.unique(rows[i][o], return_index=True)
                o = o[np.sort(first)][:k]  # each record once, at its best key
                out_s[i, : len(o)] = exact[i, o]
                out_r[i, : len(o)] = torch.from_numpy(rows[i][o])
                short |= len(o) < k
            if not short or n_cand >= lk.n:
                return out_s, out_r
            want *= 4  # many keys per record or many tombstones among the candidates: look deeper

    @staticmethod
    def _pad(scores: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q, have = scores.shape
        out_s = torch.full((q, k), -math.inf, device=scores.device)
        out_r = torch.full((q, k), -1, dtype=torch.int64, device=scores.device)
        out_s[:, :have], out_r[:, :have] = scores, rows
        out_r[out_s == -math.inf] = -1
        return out_s, out_r

    def num_keys(self, layer: int) -> int:
        """Live keys at ``layer`` (keys of evicted records excluded)."""
        return self._check_layer(layer).n_alive

    def index_info(self, layer: int) -> dict[str, Any]:
        """Which path serves ``layer`` now (``matmul``/``faiss``), index size, training time."""
        lk = self._check_layer(layer)
        with self._lock:
            use_faiss = lk.index is not None and lk.n_alive > self.matmul_threshold
            return {
                "backend": "faiss" if use_faiss else "matmul",
                "built": lk.index is not None,
                "trained": lk.index is not None and lk.index.is_trained,
                "ntotal": 0 if lk.index is None else lk.index.ntotal,
                "train_seconds": lk.train_seconds,
                "min_train_keys": self.min_train_keys,
            }

    def _check_keys(self, layer: int, value: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_layer(layer)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"keys[{layer}] must be a pair (vectors (m, dim), chunk (m,) int64)")
        vectors, chunk = torch.as_tensor(value[0]), torch.as_tensor(value[1])
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"keys[{layer}] vectors have shape {tuple(vectors.shape)}; expected (m, {self.dim})"
            )
        if chunk.shape != (vectors.shape[0],) or chunk.dtype.is_floating_point:
            raise ValueError(
                f"keys[{layer}] chunk has shape {tuple(chunk.shape)}; expected ({vectors.shape[0]},) int"
            )
        chunk = chunk.cpu().numpy().astype(np.int64)
        if len(chunk) and (chunk.min() < 0 or chunk.max() >= n):
            raise ValueError(
                f"keys[{layer}] chunk indices must lie in [0, {n}); got {chunk.min()}..{chunk.max()}"
            )
        vectors = vectors.detach().float()
        if self.metric == "cosine":
            vectors = F.normalize(vectors, dim=-1)
        return vectors.cpu().numpy(), chunk

    def _append_keys(self, layer: int, vectors: np.ndarray, rows: np.ndarray) -> None:
        lk, m = self._layer[layer], len(vectors)
        lk.keys = grow(lk.keys, lk.n + m)
        lk.key_row = grow(lk.key_row, lk.n + m)
        lk.keys[lk.n : lk.n + m] = vectors
        lk.key_row[lk.n : lk.n + m] = rows
        if lk.index is not None:
            lk.index.add(vectors)
        lk.n += m
        lk.n_alive += m
        np.add.at(self._key_counts[layer], rows, 1)
        if m:
            lk.max_keys_per_record = max(lk.max_keys_per_record, int(self._key_counts[layer][rows].max()))

    def _key_alive(self, lk: LayerKeys) -> np.ndarray:
        rows = lk.key_row[: lk.n]
        ok = rows >= 0
        ok[ok] = self._alive[rows[ok]]
        return ok

    def _compact_keys(self, layer: int) -> None:
        lk = self._layer[layer]
        keep = self._key_alive(lk)
        lk.keys, lk.key_row = lk.keys[: lk.n][keep], lk.key_row[: lk.n][keep]
        lk.n = lk.n_alive = len(lk.keys)
        if lk.index is not None:  # rebuild from the kept float32 keys; reset() keeps training
            lk.index.reset()
            lk.index.add(lk.keys)
        self._version += 1
