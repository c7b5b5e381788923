"""Layer 3, long-term memory: the chunk store of one stream.

A :class:`ChunkStore` keeps the past chunks of ONE stream (one batch row; a batch of streams is a
list of stores) exactly as they were (token ids, stream position, segment, write time, how often
each was retrieved, optionally their K/V at the store layers) and, per store layer, an index of key
vectors each pointing at one chunk. It knows nothing about models or attention: keys arrive as
float32 vectors of dimension ``dim`` (e.g. H_kv * head_dim), chosen by a strategy in ``keys.py``.

Design choices (docs/design.md, "Layer 3"):

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
- The class is split by responsibility: search and the per-layer keys in ``index.py``,
  K/V (in RAM or memory-mapped pages) in ``kv_pages.py``, persistence (the directory format) below.
- Persistence: a directory written atomically (:func:`memstack.io.atomic_directory`, so a crash
  leaves the previous store): ``manifest.json`` (format, version, dimensions, metadata, counts,
  the size of every file), ``arrays.safetensors`` (records, token ids, keys), ``kv.safetensors``
  (only with K/V) and ``index.<layer>.faiss`` (only where a FAISS index exists); validated on
  load (format, version, metadata, dimension, file sizes, array lengths); no pickle.
"""

from __future__ import annotations

import json
import threading
import time as _time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memstack.io import atomic_directory, read_manifest, write_json
from memstack.memory.store.index import LayerKeys, StoreIndex, grow, min_train_keys_for
from memstack.memory.store.kv_pages import KVPages, StoreKV

# ---------------------------------------------------------------- the directory format

FORMAT = "memstack.chunk_store"
FORMAT_VERSION = 1


class StorePersistence:
    """``save``/``load`` of :class:`ChunkStore` (a mixin: it reads the store's own arrays)."""

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``keys`` (float32 + row pointers), ``tokens`` (ids + per-record fields), ``kv``,
        ``index`` (serialised FAISS size). Dead rows awaiting compaction count; spare capacity does not.
        With ``kv_dir``, ``kv`` counts bytes in the memory-mapped pages (disk, paged in on demand).
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
                "consolidated": self._consolidated[:r],
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

    def save(self, path: str | Path) -> None:
        """Write the store to directory ``path`` atomically: a crash leaves the previous store.

        Files: ``manifest.json``, ``arrays.safetensors`` (records, tokens, keys), ``kv.safetensors``
        (only with K/V), ``index.<layer>.faiss`` (only where a FAISS index exists).
        """
        path = Path(path)
        with self._lock, atomic_directory(path) as tmp:
            arrays = self.arrays()
            kv = {k: v for k, v in arrays.items() if k.split(".")[0] in ("k", "v", "kv_rows")}
            save_file({k: v for k, v in arrays.items() if k not in kv}, str(tmp / "arrays.safetensors"))
            if kv:
                save_file(kv, str(tmp / "kv.safetensors"))
            for layer, lk in self._layer.items():
                if lk.index is not None:
                    faiss.write_index(lk.index, str(tmp / f"index.{layer}.faiss"))
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            write_json(tmp / "manifest.json", self._manifest(files))

    def _manifest(self, files: dict[str, int]) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "layers": self.layers,
            "metric": self.metric,
            "index_factory": self.index_factory,
            "matmul_threshold": self.matmul_threshold,
            "max_records": self.max_records,
            "eviction": self.eviction,
            "kv_dtype": str(self.kv_dtype).removeprefix("torch."),
            "search_params": self.search_params,
            "refine": self.refine,
            "min_train_keys": self.min_train_keys,
            "metadata": self.metadata,
            "next_id": self._next_id,
            "counts": {
                "rows": self._rows,
                "records": self._n_alive,
                "tokens": self._n_tokens,
                "keys": {str(la): self._layer[la].n for la in self.layers},
                "live_keys": {str(la): self._layer[la].n_alive for la in self.layers},
                "train_seconds": {str(la): self._layer[la].train_seconds for la in self.layers},
                "max_keys_per_record": {str(la): self._layer[la].max_keys_per_record for la in self.layers},
                "kv_shape": {str(la): self._layer[la].kv_shape for la in self.layers},
            },
            "files": files,
        }

    @classmethod
    def load(
        cls,
        path: str | Path,
        expect: Mapping[str, str] | None = None,
        *,
        expect_dim: int | None = None,
        kv_dir: str | Path | None = None,
    ) -> ChunkStore:
        """Read a store written by :meth:`save`, validating everything against its manifest.

        Args:
            path: the store directory. If it is missing but a complete copy sits in an
                ``.<name>.old-*`` sibling (a crash between ``atomic_directory``'s two renames), that
                copy is read.
            expect: metadata that must match (e.g. ``{"model_fingerprint": ...}``).
            expect_dim: key dimension the caller will search with.
            kv_dir: keep the loaded K/V in memory-mapped scratch pages there (see ``ChunkStore``);
                where K/V live is a property of this process, not of the saved store.

        Raises:
            FileNotFoundError: no store at ``path`` or a file it lists is missing.
            ValueError: wrong format or version, metadata or dimension mismatch, a truncated or
                unreadable file, arrays that disagree with the manifest. Messages name the path.
        """
        path = Path(path)
        if not path.exists():
            old = sorted(path.parent.glob(f".{path.name}.old-*/{path.name}/manifest.json"))
            if old:
                path = old[-1].parent
        m = read_manifest(path / "manifest.json", FORMAT, FORMAT_VERSION)
        for key, value in (expect or {}).items():
            if m["metadata"].get(key) != value:
                raise ValueError(
                    f"{path}: store metadata {key}={m['metadata'].get(key)!r} does not match the "
                    f"expected {value!r} (a store written for another model or strategy?)"
                )
        if expect_dim is not None and m["dim"] != expect_dim:
            raise ValueError(f"{path}: store has key dim {m['dim']}, expected dim {expect_dim}")
        for name, size in m["files"].items():
            f = path / name
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (listed in {path / 'manifest.json'})")
            if f.stat().st_size != size:
                raise ValueError(
                    f"{f}: {f.stat().st_size} bytes, manifest says {size} (truncated or altered)"
                )
        store = cls(
            m["layers"],
            m["dim"],
            index_factory=m["index_factory"],
            metric=m["metric"],
            matmul_threshold=m["matmul_threshold"],
            max_records=m["max_records"],
            eviction=m["eviction"],
            kv_dtype={"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
                m["kv_dtype"]
            ],
            metadata=m["metadata"],
            search_params=m["search_params"],
            refine=m["refine"],
            min_train_keys=m["min_train_keys"],
            kv_dir=kv_dir,
        )
        arrays = _read_safetensors(path / "arrays.safetensors")
        if "kv.safetensors" in m["files"]:
            arrays.update(_read_safetensors(path / "kv.safetensors"))
        store._restore(path, m, arrays)
        return store

    def _restore(self, path: Path, m: dict[str, Any], a: dict[str, torch.Tensor]) -> None:
        c = m["counts"]
        r, nt = c["rows"], c["tokens"]

        def get(name: str, length: int, dtype: tuple[torch.dtype, ...], file: str = "arrays.safetensors"):
            if name not in a:
                raise ValueError(f"{path / file}: array {name!r} is missing")
            t = a[name]
            if t.shape[0] != length or t.dtype not in dtype:
                raise ValueError(
                    f"{path / file}: array {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                    f"the manifest implies {length} rows of {dtype[0]}"
                )
            return t

        i64 = (torch.int64,)
        self._ids = get("ids", r, i64).numpy().copy()
        self._starts = get("starts", r, i64).numpy().copy()
        self._segments = get("segments", r, i64).numpy().copy()
        self._times = get("times", r, (torch.float64,)).numpy().copy()
        self._retrievals = get("retrievals", r, i64).numpy().copy()
        # absent in stores saved before sleep existed: nothing was consolidated then
        if "consolidated" in a:
            self._consolidated = get("consolidated", r, (torch.bool,)).numpy().copy()
        else:
            self._consolidated = np.zeros(r, dtype=bool)
        self._alive = get("alive", r, (torch.bool,)).numpy().copy()
        self._token_offsets = get("token_offsets", r + 1, i64).numpy().copy()
        self._tokens = get("tokens", nt, (torch.int32, torch.int64)).numpy().copy()
        if self._token_offsets[-1] != nt or int(self._alive.sum()) != c["records"]:
            raise ValueError(
                f"{path / 'arrays.safetensors'}: token offsets or alive flags disagree with the manifest"
            )
        self._rows, self._n_tokens, self._n_alive, self._next_id = r, nt, c["records"], m["next_id"]
        for layer in self.layers:
            lk, n = self._layer[layer], c["keys"][str(layer)]
            keys = get(f"keys.{layer}", n, (torch.float32,)).numpy()
            if keys.ndim != 2 or keys.shape[1] != self.dim:
                raise ValueError(f"{path}: keys.{layer} has shape {keys.shape}, expected (n, {self.dim})")
            rec = get(f"key_records.{layer}", n, i64).numpy()
            rows = np.searchsorted(self._ids, rec)
            found = (rec >= 0) & (rows < r)
            found[found] = self._ids[rows[found]] == rec[found]
            lk.keys, lk.key_row, lk.n = keys.copy(), np.where(found, rows, -1), n
            lk.n_alive = int(self._key_alive(lk).sum())
            if lk.n_alive != c["live_keys"][str(layer)]:
                raise ValueError(
                    f"{path}: layer {layer} has {lk.n_alive} live keys, manifest says {c['live_keys']}"
                )
            self._key_counts[layer] = np.bincount(lk.key_row[found], minlength=r).astype(np.int32)
            lk.max_keys_per_record = c["max_keys_per_record"][str(layer)]
            lk.train_seconds = c["train_seconds"][str(layer)]
            shape = c["kv_shape"][str(layer)]
            if shape and len(shape) == 2:  # saved before values could differ in size: (H_kv, D)
                shape = [*shape, shape[1]]
            lk.kv_shape = tuple(shape) if shape else None
            self._kv[layer] = [None] * r
            if f"kv_rows.{layer}" in a:
                kv_rows = a[f"kv_rows.{layer}"].tolist()
                lengths = np.diff(self._token_offsets)[kv_rows].tolist()
                parts = [a[f"{n}.{layer}"] for n in "kv"]
                if any(p.dtype != self.kv_dtype or p.shape[1] != sum(lengths) for p in parts):
                    raise ValueError(
                        f"{path / 'kv.safetensors'}: K/V of layer {layer} disagree with the manifest"
                    )
                split = [p.split(lengths, dim=1) for p in parts]
                for row, kk, vv in zip(kv_rows, *split, strict=True):
                    self._kv[layer][row] = self._keep_kv(layer, kk, vv)
            f = path / f"index.{layer}.faiss"
            if f.name in m["files"]:
                try:
                    index = faiss.read_index(str(f))
                except RuntimeError as e:
                    raise ValueError(f"{f}: not a readable FAISS index ({str(e).splitlines()[-1]})") from None
                if index.ntotal != n or index.d != self.dim:
                    raise ValueError(
                        f"{f}: index holds {index.ntotal} x {index.d}, expected {n} x {self.dim}"
                    )
                self._apply_search_params(index)
                lk.index = index
        self._version += 1


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot be read as safetensors ({e})") from None


METRICS = ("cosine", "ip")
EVICTIONS = ("none", "fifo", "least_retrieved")
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Compact tombstoned rows once this fraction of rows is dead (and at least _COMPACT_MIN_DEAD of
# them): amortised O(1) per eviction, at most 1/3 extra memory.
_COMPACT_FRACTION = 0.25
_COMPACT_MIN_DEAD = 256
_INT32 = np.iinfo(np.int32)
# Per-record arrays, one row each, grown and compacted together.
RECORD_FIELDS = ("_ids", "_starts", "_segments", "_times", "_retrievals", "_consolidated", "_alive")


class StoreFullError(RuntimeError):
    """An add would exceed ``max_records`` under ``eviction="none"``."""


class ChunkStore(StoreIndex, StoreKV, StorePersistence):
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
        kv_dir: keep stored K/V in memory-mapped scratch pages under this existing directory
            instead of RAM (:mod:`memstack.memory.store.kv_pages`); None keeps them in RAM.
        kv_page_tokens: tokens per scratch page with ``kv_dir``.
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
        kv_dir: str | Path | None = None,
        kv_page_tokens: int = 16384,
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
        self.min_train_keys = int(min_train_keys) if min_train_keys else min_train_keys_for(probe)
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
        self._consolidated = np.zeros(0, dtype=bool)  # consolidated into weights by a sleep
        self._alive = np.zeros(0, dtype=bool)
        self._tokens = np.zeros(0, dtype=np.int32)  # flat; widened to int64 if an id needs it
        self._token_offsets = np.zeros(1, dtype=np.int64)  # (rows + 1,)
        self._n_tokens = 0
        self._key_counts = {layer: np.zeros(0, dtype=np.int32) for layer in layers}  # per row
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {la: [] for la in layers}
        self._layer = {layer: LayerKeys(self.dim) for layer in layers}
        self.kv_dir = None if kv_dir is None else Path(kv_dir)
        self._kv_pages = (
            {la: KVPages(kv_dir, kv_dtype, kv_page_tokens) for la in layers} if kv_dir is not None else None
        )

    # ------------------------------------------------------------------------------ helpers

    def _check_layer(self, layer: int) -> LayerKeys:
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
            kv: optional per store layer ``(K, V)``: each a sequence of ``n`` tensors ``(H_kv, L_i, D)``
                or one ``(n, H_kv, L, D)`` tensor, ``D_k`` for K and ``D_v`` for V (they may differ,
                as in DeepSeek's MLA); stored in ``kv_dtype``.
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
            for layer, (k, v) in new_kv.items():  # K/V shape must agree with earlier records
                shape = (k[0].shape[0], k[0].shape[2], v[0].shape[2])
                known = self._layer[layer].kv_shape
                if known is not None and known != shape:
                    raise ValueError(
                        f"kv[{layer}] has (H_kv, D_k, D_v)={shape}; earlier records have {known}"
                    )
            first_row, first_id = self._rows, self._next_id
            ids = np.arange(first_id, first_id + n, dtype=np.int64)
            self._append_records(ids, starts, segment, when, chunks, lengths)
            for layer in self.layers:
                counts = self._key_counts[layer] = grow(self._key_counts[layer], self._rows)
                counts[first_row : self._rows] = 0
                self._kv[layer].extend([None] * n)
            for layer, (k, v) in new_kv.items():
                self._layer[layer].kv_shape = (k[0].shape[0], k[0].shape[2], v[0].shape[2])
                pairs = zip(k, v, strict=True)
                self._kv[layer][first_row:] = [self._keep_kv(layer, kk, vv) for kk, vv in pairs]
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

    def _append_records(self, ids, starts, segment, when, chunks, lengths) -> None:
        n, r = len(ids), self._rows
        for name in RECORD_FIELDS:
            setattr(self, name, grow(getattr(self, name), r + n))
        self._ids[r : r + n] = ids
        self._starts[r : r + n] = np.asarray(starts, dtype=np.int64)
        self._segments[r : r + n] = int(segment)
        self._times[r : r + n] = when
        self._retrievals[r : r + n] = 0
        self._consolidated[r : r + n] = False
        self._alive[r : r + n] = True
        flat = np.concatenate(chunks)
        if self._tokens.dtype == np.int32 and (flat.min() < _INT32.min or flat.max() > _INT32.max):
            self._tokens = self._tokens.astype(np.int64)  # token ids are kept exactly as they were
        self._tokens = grow(self._tokens, self._n_tokens + len(flat))
        self._tokens[self._n_tokens : self._n_tokens + len(flat)] = flat
        self._token_offsets = grow(self._token_offsets, r + n + 1)
        self._token_offsets[r + 1 : r + n + 1] = self._n_tokens + np.cumsum(lengths)
        self._n_tokens += len(flat)
        self._rows += n
        self._n_alive += n

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
        self._tombstone(victims)

    def _tombstone(self, victims: np.ndarray) -> None:
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
        for name in RECORD_FIELDS:
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

    # ------------------------------------------------------------------------------ reading

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

    def remove(self, record_ids: torch.Tensor | Sequence[int]) -> None:
        """Evict these records now (e.g. once a sleep consolidated them); unknown ids raise."""
        with self._lock:
            rows = np.unique(self._rows_of(record_ids))
            if len(rows):
                self._tombstone(rows)

    def mark_consolidated(self, record_ids: torch.Tensor | Sequence[int]) -> None:
        """Mark records as consolidated into the weights (sleep); they stay searchable."""
        with self._lock:
            self._consolidated[self._rows_of(record_ids)] = True
            self._version += 1

    def tokens(self, record_ids: torch.Tensor | Sequence[int]) -> list[torch.Tensor]:
        """The records' token ids as they were, ``(L_i,)`` int64 each."""
        with self._lock:
            rows = self._rows_of(record_ids)
            off = self._token_offsets
            return [torch.from_numpy(self._tokens[off[r] : off[r + 1]].astype(np.int64)) for r in rows]

    def records(self, record_ids: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
        """Per-record fields: ``start``, ``segment``, ``time``, ``retrievals``, ``length``,
        ``consolidated``."""
        with self._lock:
            rows = self._rows_of(record_ids)
            return {
                "start": torch.from_numpy(self._starts[rows]),
                "segment": torch.from_numpy(self._segments[rows]),
                "time": torch.from_numpy(self._times[rows]),
                "retrievals": torch.from_numpy(self._retrievals[rows]),
                "length": torch.from_numpy(np.diff(self._token_offsets)[rows]),
                "consolidated": torch.from_numpy(self._consolidated[rows]),
            }

    def ids(self, consolidated: bool | None = None) -> torch.Tensor:
        """Ids of existing records, oldest first; only (not) consolidated ones if ``consolidated``
        is True (False)."""
        with self._lock:
            keep = self._alive[: self._rows].copy()
            if consolidated is not None:
                keep &= self._consolidated[: self._rows] == bool(consolidated)
            return torch.from_numpy(self._ids[: self._rows][keep])

    def __len__(self) -> int:
        return self._n_alive
