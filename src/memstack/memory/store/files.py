"""Persistence of a :class:`~memstack.memory.store.chunk_store.ChunkStore`: a directory written atomically.

Files: ``manifest.json`` (format, version, dimensions, metadata, counts, the size of every
file), ``arrays.safetensors`` (records, token ids, keys), ``kv.safetensors`` (only with K/V) and
``index.<layer>.faiss`` (only where a FAISS index exists, via ``faiss.write_index``). Written
through :func:`memstack.io.atomic_directory`, so a crash leaves the previous store; validated on
load (format, version, metadata, dimension, file sizes, array lengths); no pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memstack.io import atomic_directory, read_manifest, write_json

if TYPE_CHECKING:
    from memstack.memory.store.chunk_store import ChunkStore

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
