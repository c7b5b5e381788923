"""Layer 3, long-term memory: the chunk store of one stream.

A :class:`ChunkStore` keeps the past chunks of ONE stream (one batch row; a batch of streams is a
list of stores) exactly as they were (token ids, stream position, segment, write time, how often
each was retrieved, optionally their K/V at the store layers) and, per store layer, an index of key
vectors each pointing at one chunk. It knows nothing about models or attention: keys arrive as
float32 vectors of dimension ``dim`` (e.g. H_kv * head_dim), chosen by a strategy in ``keys.py``.

Design choices (see DESIGN.md, "Long-term memory (layer 3)"):

- Search returns the top-k *distinct* records: several keys of one chunk (InfLLM's representative
  tokens, the ``received_attention`` keywords) count once, with their best score.
- Small layers are searched by a plain matmul on the queries' device; beyond ``matmul_threshold``
  keys a FAISS index from ``index_factory`` takes over (``Flat``, ``HNSW32``, ``IVF1024,PQ16``...).
  Indexes that need training are trained once enough keys exist; until then the matmul serves.
  The FAISS path re-scores its candidates exactly from the kept float32 keys, so scores are the
  same inner products whichever path ran, and a Flat index gives the matmul's results.
- The float32 keys are always kept (the FAISS index is derived data): they make persistence
  bit-identical, let a compressed (PQ) index re-rank exactly, and let an index be rebuilt.
- Eviction is an explicit policy, never a silent reset (memorizing-transformers-pytorch's FAISS
  memory hard-reset when full, lucidrains/memorizing-transformers-pytorch#9). Evicted records are
  *tombstoned*: their rows stay until a quarter of the rows are dead, then arrays are compacted
  and the index rebuilt from the kept keys. Why tombstones rather than ``remove_ids``: HNSW has no
  ``remove_ids``, and on Flat/IVF ``remove_ids`` compacts the whole index on every call, so FIFO
  eviction at each add would be quadratic; one code path with amortised compaction serves all.
- Record ids increase monotonically and are never reused; eviction never shifts them.
- Thread safety: one ``threading.RLock`` guards every public method, so a ``search`` running while
  another thread calls ``add`` sees the store before or after that add, never half of it.
- Persistence: a directory with ``manifest.json``, safetensors arrays and ``faiss.write_index``
  files, written through :func:`memstack.io.atomic_directory`; no pickle anywhere.
"""

from __future__ import annotations

import math
import threading
import time as _time
from collections.abc import Mapping, Sequence
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from .store_files import FORMAT, FORMAT_VERSION, StorePersistence  # noqa: F401  (re-exported)

METRICS = ("cosine", "ip")
EVICTIONS = ("none", "fifo", "least_retrieved")
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FACTORY_EXAMPLES = "'Flat', 'HNSW32', 'IVF1024,Flat', 'IVF1024,PQ16', 'IVF4096,SQ8'"
# Compact tombstoned rows once this fraction of rows is dead (and at least _COMPACT_MIN_DEAD of
# them): amortised O(1) per eviction, at most 1/3 extra memory.
_COMPACT_FRACTION = 0.25
_COMPACT_MIN_DEAD = 256
# k-means warns below 39 points per centroid; train only once that many keys exist.
_TRAIN_POINTS_PER_CENTROID = 39
_MAX_TRAIN_POINTS_PER_CENTROID = 256  # faiss would subsample beyond this anyway
_INT32 = np.iinfo(np.int32)


class StoreFullError(RuntimeError):
    """An add would exceed ``max_records`` under ``eviction="none"``."""


def _grow(arr: np.ndarray, needed: int) -> np.ndarray:
    """``arr`` with room for ``needed`` rows (capacity doubles, so appends are amortised O(1))."""
    if needed <= len(arr):
        return arr
    new = np.zeros((max(needed, 2 * len(arr), 16), *arr.shape[1:]), dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


def _min_train_keys(index: faiss.Index) -> int:
    """How many keys an untrained index needs: 39 per IVF list and per PQ/SQ centroid."""
    need = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        need = max(need, _TRAIN_POINTS_PER_CENTROID * ivf.nlist)
    pq = getattr(faiss.downcast_index(ivf if ivf is not None else index), "pq", None)
    if pq is not None:
        need = max(need, _TRAIN_POINTS_PER_CENTROID * pq.ksub)
    return need


class _LayerKeys:
    """The keys of one store layer: float32 rows (dead ones included until compaction) + index."""

    def __init__(self, dim: int) -> None:
        self.keys = np.zeros((0, dim), dtype=np.float32)  # (cap, dim), rows [:n] used
        self.key_row = np.zeros(0, dtype=np.int64)  # (cap,) record row of each key; -1: gone
        self.n = 0  # rows used, dead included
        self.n_alive = 0
        self.index: faiss.Index | None = None  # holds exactly rows [:n], in order
        self.train_seconds = 0.0
        self.max_keys_per_record = 0
        self.kv_shape: tuple[int, int] | None = None  # (H_kv, D_k) of the K/V stored at this layer
        self.cache: tuple | None = None  # (version, device, ...) for the matmul path


class ChunkStore(StorePersistence):
    """Long-term memory of one stream: its past chunks and, per store layer, an index of keys.

    Args:
        layers: model layers that have an index (and optionally K/V) in this store.
        dim: key dimension, e.g. ``H_kv * head_dim``.
        index_factory: FAISS factory string used beyond ``matmul_threshold`` keys.
        metric: ``"cosine"`` (keys and queries L2-normalised) or ``"ip"`` (raw inner products).
        matmul_threshold: a layer with at most this many live keys is searched with a torch
            matmul on the queries' device; above it the FAISS index is built and used.
        max_records: most records kept after an add; ``None`` is unlimited.
        eviction: ``"none"`` (a full store raises :class:`StoreFullError`), ``"fifo"`` (drop the
            oldest) or ``"least_retrieved"`` (drop the least retrieved, oldest first on ties; the
            records of the current add are exempt, or a well-read store would refuse all news).
        kv_dtype: dtype of stored K/V (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``).
        metadata: strings saved in the manifest (model_type, config fingerprint, key strategy...);
            :meth:`load` can check them.
        search_params: FAISS search parameters, e.g. ``{"efSearch": 128}`` or ``{"nprobe": 32}``
            (``faiss.ParameterSpace`` names). Defaults: efSearch 64 for HNSW, nprobe 16 for IVF.
        refine: the FAISS path fetches ``refine`` times more candidates than needed and re-ranks
            them exactly with the kept keys; worth 4-10 for PQ/SQ codes, 1 for Flat/HNSW.
        min_train_keys: keys needed before an index that needs training is trained (default: 39
            per IVF list and per PQ centroid).
    """

    def __init__(
        self,
        layers: Sequence[int],
        dim: int,
        *,
        index_factory: str = "Flat",
        metric: str = "cosine",
        matmul_threshold: int = 65536,
        max_records: int | None = None,
        eviction: str = "none",
        kv_dtype: torch.dtype = torch.bfloat16,
        metadata: Mapping[str, str] | None = None,
        search_params: Mapping[str, float] | None = None,
        refine: int = 1,
        min_train_keys: int | None = None,
    ) -> None:
        layers = [int(layer) for layer in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"layers={layers!r}: expected a non-empty list of distinct layer indices")
        if int(dim) < 1:
            raise ValueError(f"dim={dim!r}: expected a positive key dimension")
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}: expected one of {METRICS}")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction={eviction!r}: expected one of {EVICTIONS}")
        if max_records is not None and int(max_records) < 1:
            raise ValueError(f"max_records={max_records!r}: expected a positive int or None")
        if eviction != "none" and max_records is None:
            raise ValueError(f"eviction={eviction!r} needs max_records (got None)")
        if kv_dtype not in KV_DTYPES.values():
            raise ValueError(f"kv_dtype={kv_dtype!r}: expected one of {list(KV_DTYPES.values())}")
        if int(refine) < 1:
            raise ValueError(f"refine={refine!r}: expected an int >= 1")
        metadata = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"metadata={metadata!r}: expected a dict of str to str")
        self.layers = layers
        self.dim = int(dim)
        self.index_factory = index_factory
        self.metric = metric
        self.matmul_threshold = int(matmul_threshold)
        self.max_records = None if max_records is None else int(max_records)
        self.eviction = eviction
        self.kv_dtype = kv_dtype
        self.metadata = metadata
        self.refine = int(refine)
        probe = self._new_index()  # validates the factory string now, not at the 65537th key
        self.min_train_keys = int(min_train_keys) if min_train_keys else _min_train_keys(probe)
        self.search_params = dict(search_params) if search_params is not None else self._default_params(probe)
        self._apply_search_params(probe)  # validates the parameter names now

        self._lock = threading.RLock()
        self._version = 0  # bumped by every change, keys the matmul path's cache
        self._next_id = 0
        # Records: one row each, in id order; dead (evicted) rows stay until compaction.
        self._rows = 0
        self._n_alive = 0
        self._ids = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(0, dtype=np.int64)
        self._segments = np.zeros(0, dtype=np.int64)
        self._times = np.zeros(0, dtype=np.float64)
        self._retrievals = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._tokens = np.zeros(0, dtype=np.int32)  # flat; widened to int64 if an id needs it
        self._token_offsets = np.zeros(1, dtype=np.int64)  # (rows + 1,)
        self._n_tokens = 0
        self._key_counts = {layer: np.zeros(0, dtype=np.int32) for layer in layers}  # per row
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {la: [] for la in layers}
        self._layer = {layer: _LayerKeys(self.dim) for layer in layers}

    # ------------------------------------------------------------------------------ helpers

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

    def _check_layer(self, layer: int) -> _LayerKeys:
        if layer not in self._layer:
            raise ValueError(f"layer={layer!r} is not a store layer; store layers are {self.layers}")
        return self._layer[layer]

    def _rows_of(self, record_ids: torch.Tensor | Sequence[int], name: str = "record_ids") -> np.ndarray:
        """Rows of existing (not evicted) records, in the given order; ValueError otherwise."""
        ids = torch.as_tensor(record_ids).reshape(-1).cpu().numpy().astype(np.int64)
        rows = np.searchsorted(self._ids[: self._rows], ids)
        rows_c = np.minimum(rows, max(self._rows - 1, 0))
        ok = (
            (rows < self._rows) & (self._ids[rows_c] == ids) & self._alive[rows_c]
            if self._rows
            else ids != ids
        )
        if not ok.all():
            bad = ids[~ok][:5].tolist()
            raise ValueError(f"{name} contains ids that are not in the store (never added or evicted): {bad}")
        return rows_c

    # ------------------------------------------------------------------------------ writing

    def add(
        self,
        token_ids: Sequence[torch.Tensor],
        starts: Sequence[int],
        segment: int,
        keys: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
        kv: Mapping[int, tuple[Any, Any]] | None = None,
        time: float | None = None,
    ) -> torch.Tensor:
        """Write a segment's closed chunks as new records.

        Args:
            token_ids: ``n`` chunks, each ``(L_i,)`` int64 with ``L_i >= 1``.
            starts: ``n`` stream positions of the chunks' first tokens.
            segment: index of the segment the chunks came from.
            keys: per store layer ``(vectors (m, dim) float, chunk (m,) int64)``: each key points at
                chunk ``chunk[j]`` of this call. A layer may be absent; a chunk may have no key.
            kv: optional per store layer ``(K, V)``: a sequence of ``n`` tensors ``(H_kv, L_i, D_k)``
                or one ``(n, H_kv, L, D_k)`` tensor; stored in ``kv_dtype``.
            time: write time; wall-clock ``time.time()`` if None.

        Returns:
            ``(n,)`` int64 ids of the new records (monotonic, never reused).

        Raises:
            ValueError: malformed arguments (nothing is written).
            StoreFullError: ``eviction="none"`` and the add would exceed ``max_records``.
        """
        n = len(token_ids)
        chunks = [self._check_chunk(i, t) for i, t in enumerate(token_ids)]
        if len(starts) != n:
            raise ValueError(f"starts has {len(starts)} entries; expected one per chunk ({n})")
        lengths = np.array([len(c) for c in chunks], dtype=np.int64)
        new_keys = {layer: self._check_keys(layer, k, n) for layer, k in keys.items()}
        new_kv = {layer: self._check_kv(layer, k, lengths) for layer, k in (kv or {}).items()}
        if n == 0:
            return torch.zeros(0, dtype=torch.int64)
        when = _time.time() if time is None else float(time)
        with self._lock:
            if self.max_records is not None:
                if n > self.max_records:
                    raise ValueError(f"add of {n} chunks exceeds max_records={self.max_records} by itself")
                if self.eviction == "none" and self._n_alive + n > self.max_records:
                    raise StoreFullError(
                        f"store is full: {self._n_alive} records + {n} new > max_records="
                        f"{self.max_records} with eviction='none'; choose eviction='fifo' or "
                        f"'least_retrieved', or a larger max_records"
                    )
            for layer, (k, _) in new_kv.items():  # K/V shape must agree with earlier records
                shape = (k[0].shape[0], k[0].shape[2])
                known = self._layer[layer].kv_shape
                if known is not None and known != shape:
                    raise ValueError(f"kv[{layer}] has (H_kv, D_k)={shape}; earlier records have {known}")
            first_row, first_id = self._rows, self._next_id
            ids = np.arange(first_id, first_id + n, dtype=np.int64)
            self._append_records(ids, starts, segment, when, chunks, lengths)
            for layer in self.layers:
                counts = self._key_counts[layer] = _grow(self._key_counts[layer], self._rows)
                counts[first_row : self._rows] = 0
                self._kv[layer].extend([None] * n)
            for layer, (k, v) in new_kv.items():
                self._layer[layer].kv_shape = (k[0].shape[0], k[0].shape[2])
                self._kv[layer][first_row:] = list(zip(k, v, strict=True))
            for layer, (vectors, chunk) in new_keys.items():
                self._append_keys(layer, vectors, chunk + first_row)
            self._next_id += n
            self._version += 1
            self._evict(protect_from=first_row)
            for layer in self.layers:
                self._maybe_build_index(layer)
            return torch.from_numpy(ids)

    def _check_chunk(self, i: int, t: torch.Tensor) -> np.ndarray:
        t = torch.as_tensor(t)
        if t.dim() != 1 or t.numel() < 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(
                f"token_ids[{i}] has shape {tuple(t.shape)} and dtype {t.dtype}; expected a non-empty "
                f"1-D integer tensor (L_i,) with L_i >= 1"
            )
        return t.cpu().numpy().astype(np.int64, copy=False)

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

    def _check_kv(self, layer: int, value: Any, lengths: np.ndarray) -> tuple[list, list]:
        self._check_layer(layer)
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"kv[{layer}] must be a pair (K, V)")
        out = []
        for name, part in zip("KV", value, strict=True):
            part = list(part.unbind(0)) if isinstance(part, torch.Tensor) else list(part)
            if len(part) != len(lengths):
                raise ValueError(f"kv[{layer}] {name} has {len(part)} chunks; expected {len(lengths)}")
            for i, (x, length) in enumerate(zip(part, lengths, strict=True)):
                if x.dim() != 3 or x.shape[1] != length or x.shape[::2] != part[0].shape[::2]:
                    raise ValueError(
                        f"kv[{layer}] {name}[{i}] has shape {tuple(x.shape)}; expected "
                        f"(H_kv, {length}, D_k) like the other chunks of the call"
                    )
            out.append([x.detach().to("cpu", self.kv_dtype).contiguous() for x in part])
        if any(k.shape != v.shape for k, v in zip(*out, strict=True)):
            raise ValueError(f"kv[{layer}]: K and V must have the same shape per chunk")
        return out[0], out[1]

    def _append_records(self, ids, starts, segment, when, chunks, lengths) -> None:
        n, r = len(ids), self._rows
        for name in ("_ids", "_starts", "_segments", "_times", "_retrievals", "_alive"):
            setattr(self, name, _grow(getattr(self, name), r + n))
        self._ids[r : r + n] = ids
        self._starts[r : r + n] = np.asarray(starts, dtype=np.int64)
        self._segments[r : r + n] = int(segment)
        self._times[r : r + n] = when
        self._retrievals[r : r + n] = 0
        self._alive[r : r + n] = True
        flat = np.concatenate(chunks)
        if self._tokens.dtype == np.int32 and (flat.min() < _INT32.min or flat.max() > _INT32.max):
            self._tokens = self._tokens.astype(np.int64)  # token ids are kept exactly as they were
        self._tokens = _grow(self._tokens, self._n_tokens + len(flat))
        self._tokens[self._n_tokens : self._n_tokens + len(flat)] = flat
        self._token_offsets = _grow(self._token_offsets, r + n + 1)
        self._token_offsets[r + 1 : r + n + 1] = self._n_tokens + np.cumsum(lengths)
        self._n_tokens += len(flat)
        self._rows += n
        self._n_alive += n

    def _append_keys(self, layer: int, vectors: np.ndarray, rows: np.ndarray) -> None:
        lk, m = self._layer[layer], len(vectors)
        lk.keys = _grow(lk.keys, lk.n + m)
        lk.key_row = _grow(lk.key_row, lk.n + m)
        lk.keys[lk.n : lk.n + m] = vectors
        lk.key_row[lk.n : lk.n + m] = rows
        if lk.index is not None:
            lk.index.add(vectors)
        lk.n += m
        lk.n_alive += m
        np.add.at(self._key_counts[layer], rows, 1)
        if m:
            lk.max_keys_per_record = max(lk.max_keys_per_record, int(self._key_counts[layer][rows].max()))

    # ------------------------------------------------------------------------------ eviction

    def _evict(self, protect_from: int) -> None:
        """Tombstone records beyond ``max_records`` by the policy; rows >= protect_from are new."""
        if self.max_records is None or self._n_alive <= self.max_records:
            return
        excess = self._n_alive - self.max_records
        alive = np.flatnonzero(self._alive[: self._rows])
        if self.eviction == "fifo":
            victims = alive[:excess]  # rows are in id order: the first alive rows are the oldest
        else:  # least_retrieved, ties broken by age; this add's records are exempt
            old = alive[alive < protect_from]
            counts = self._retrievals[old]
            kth = np.partition(counts, excess - 1)[excess - 1]
            below = old[counts < kth]
            victims = np.concatenate([below, old[counts == kth][: excess - len(below)]])
        self._alive[victims] = False
        self._n_alive -= len(victims)
        for layer in self.layers:
            self._layer[layer].n_alive -= int(self._key_counts[layer][victims].sum())
            kv = self._kv[layer]
            for row in victims.tolist():
                kv[row] = None  # free K/V memory now, rows go at compaction
        self._version += 1
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        dead = self._rows - self._n_alive
        if dead >= _COMPACT_MIN_DEAD and dead > _COMPACT_FRACTION * self._rows:
            self._compact_records()
        for layer in self.layers:
            lk = self._layer[layer]
            dead = lk.n - lk.n_alive
            if dead >= _COMPACT_MIN_DEAD and dead > _COMPACT_FRACTION * lk.n:
                self._compact_keys(layer)

    def _compact_records(self) -> None:
        r, keep = self._rows, self._alive[: self._rows].copy()
        new_row = np.cumsum(keep) - 1
        lengths = np.diff(self._token_offsets[: r + 1])
        self._tokens = self._tokens[: self._n_tokens][np.repeat(keep, lengths)]
        self._n_tokens = len(self._tokens)
        self._token_offsets = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        for name in ("_ids", "_starts", "_segments", "_times", "_retrievals", "_alive"):
            setattr(self, name, getattr(self, name)[:r][keep])
        for layer in self.layers:
            self._key_counts[layer] = self._key_counts[layer][:r][keep]
            self._kv[layer] = [x for x, k in zip(self._kv[layer], keep, strict=True) if k]
            lk = self._layer[layer]
            rows = lk.key_row[: lk.n]
            ok = rows >= 0
            ok[ok] = keep[rows[ok]]
            rows[:] = np.where(ok, new_row[np.maximum(rows, 0)], -1)
        self._rows = int(keep.sum())
        self._version += 1

    def _key_alive(self, lk: _LayerKeys) -> np.ndarray:
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

    # ------------------------------------------------------------------------------ reading

    def search(self, layer: int, queries: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k distinct records per query, by each record's best key score.

        Args:
            layer: a store layer.
            queries: ``(q, dim)``; normalised here for ``metric="cosine"``.
            top_k: records per query.

        Returns:
            ``(scores (q, k) float32, record_ids (q, k) int64)`` on the queries' device, best first;
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
        with self._lock:
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

    def _search_matmul(self, lk: _LayerKeys, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def _search_faiss(self, lk: _LayerKeys, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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

    def neighbours(self, record_ids: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
        """Hits and the records within ``n`` chunks before/after each (EM-LLM's contiguity buffer).

        Chunks are written in stream order, so "n chunks before" is "n ids before". Evicted or
        never-written neighbours are skipped (a gap is not bridged: the chunk beyond it was not
        adjacent in the text); ids ``-1`` (search padding) are ignored.

        Returns:
            sorted (stream-ordered) unique int64 ids of existing records, hits included.
        """
        if int(n) < 0:
            raise ValueError(f"n={n!r}: expected an int >= 0")
        ids = torch.as_tensor(record_ids).reshape(-1).cpu().numpy().astype(np.int64)
        ids = ids[ids >= 0]
        cand = np.unique((ids[:, None] + np.arange(-int(n), int(n) + 1)[None, :]).reshape(-1))
        with self._lock:
            rows = np.searchsorted(self._ids[: self._rows], cand)
            rows_c = np.minimum(rows, max(self._rows - 1, 0))
            ok = (rows < self._rows) & (self._ids[rows_c] == cand) & self._alive[rows_c]
        return torch.from_numpy(cand[ok])

    def tokens(self, record_ids: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
        """The records' token ids as they were, ``(L_i,)`` int64 each."""
        with self._lock:
            rows = self._rows_of(record_ids)
            off = self._token_offsets
            return [torch.from_numpy(self._tokens[off[r] : off[r + 1]].astype(np.int64)) for r in rows]

    def records(self, record_ids: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-record fields: ``start``, ``segment``, ``time``, ``retrievals``, ``length``."""
        with self._lock:
            rows = self._rows_of(record_ids)
            return {
                "start": torch.from_numpy(self._starts[rows]),
                "segment": torch.from_numpy(self._segments[rows]),
                "time": torch.from_numpy(self._times[rows]),
                "retrievals": torch.from_numpy(self._retrievals[rows]),
                "length": torch.from_numpy(np.diff(self._token_offsets)[rows]),
            }

    def ids(self) -> torch.Tensor:
        """Ids of all existing records, oldest first."""
        with self._lock:
            return torch.from_numpy(self._ids[: self._rows][self._alive[: self._rows]])

    def kv(
        self, layer: int, record_ids: torch.Tensor | Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The records' stored K/V at ``layer``, zero-padded to the longest.

        Returns:
            ``K (n, H_kv, L, D_k)``, ``V`` (same shape) in ``kv_dtype`` and ``lengths (n,)`` int64.

        Raises:
            ValueError: unknown layer or id, or a record written without K/V at this layer.
        """
        lk = self._check_layer(layer)
        with self._lock:
            rows = self._rows_of(record_ids)
            pairs = [self._kv[layer][r] for r in rows]
        missing = [int(self._ids[r]) for r, p in zip(rows, pairs, strict=True) if p is None]
        if missing:
            raise ValueError(f"records {missing[:5]} were written without K/V at layer {layer}")
        h, d = lk.kv_shape if lk.kv_shape else (0, 0)
        lengths = torch.tensor([p[0].shape[1] for p in pairs], dtype=torch.int64)
        longest = int(lengths.max()) if len(pairs) else 0
        out = [torch.zeros(len(pairs), h, longest, d, dtype=self.kv_dtype) for _ in range(2)]
        for i, p in enumerate(pairs):
            for j in range(2):
                out[j][i, :, : p[j].shape[1]] = p[j]
        return out[0], out[1], lengths

    def __len__(self) -> int:
        return self._n_alive

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

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``keys`` (float32 + row pointers), ``tokens`` (ids + per-record fields), ``kv``,
        ``index`` (serialised FAISS size). Dead rows awaiting compaction count; spare capacity does not.
        """
        with self._lock:
            keys = sum(lk.n * (self.dim * 4 + 8) for lk in self._layer.values())
            per_record = 8 * 5 + 1 + 8 + 4 * len(self.layers)  # fields, alive, offset, key counts
            tokens = self._n_tokens * self._tokens.itemsize + self._rows * per_record
            kv = sum(t.nbytes for pairs in self._kv.values() for p in pairs if p is not None for t in p)
            index = sum(
                faiss.serialize_index(lk.index).nbytes for lk in self._layer.values() if lk.index is not None
            )
            return {"keys": keys, "tokens": tokens, "kv": kv, "index": index}

    # ------------------------------------------------------------------------------ persistence

    def arrays(self) -> dict[str, torch.Tensor]:
        """Every record and key array as saved (``kv.*`` entries only for layers with K/V)."""
        with self._lock:
            r = self._rows
            out = {
                "ids": self._ids[:r],
                "starts": self._starts[:r],
                "segments": self._segments[:r],
                "times": self._times[:r],
                "retrievals": self._retrievals[:r],
                "alive": self._alive[:r],
                "token_offsets": self._token_offsets[: r + 1],
                "tokens": self._tokens[: self._n_tokens],
            }
            for layer, lk in self._layer.items():
                rows = lk.key_row[: lk.n]
                out[f"keys.{layer}"] = lk.keys[: lk.n]
                out[f"key_records.{layer}"] = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
            tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in out.items()}
            for layer in self.layers:
                have = [i for i, p in enumerate(self._kv[layer]) if p is not None]
                if have:
                    tensors[f"kv_rows.{layer}"] = torch.tensor(have, dtype=torch.int64)
                    for j, name in enumerate("kv"):
                        tensors[f"{name}.{layer}"] = torch.cat([self._kv[layer][i][j] for i in have], dim=1)
            return tensors
