"""StackState: the per-stream memory of a whole stack, for every memory kind alike.

A kind whose ``state_type`` is a ``NamedTuple`` of tensors (compressive memory:
``CompressiveState(M, z)``) keeps one per layer; the state detaches, moves, flattens (activation
checkpointing passes tensors, not structures) and saves every such kind the same way, under the
tensor names ``{kind}.{layer}.{field}``. Which tuple a kind's tensors rebuild comes from the kind
(:func:`memstack.memory.base.tensor_state_types`); a kind whose state is a handle (the store) is
carried as it is and saved by the kind itself (:func:`memstack.saving.save_stream` saves both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from memstack.io import atomic_file
from memstack.memory.base import KINDS, tensor_state_types

STATE_FORMAT = "memstack-state"
STATE_VERSION = 1

Name = tuple[str, int, str]  # (kind, layer, field)


@dataclass
class StackState:
    """Memory of a batch of streams: constant size for differentiable kinds, however long the stream.

    ``memories`` maps a kind's name to ``{layer: state}``; ``segments`` counts the segments
    written so far (it drives the ``bptt_segments`` cut).

    Tensor states (compressive memory) are values: a new state comes out of every segment and the
    old one stays valid. A long-term store is a handle: passing a state with a store to
    ``forward`` again continues that stream, appending to the same stores.
    """

    memories: dict[str, dict[int, Any]] = field(default_factory=dict)
    segments: int = 0

    @property
    def compressive(self) -> dict[int, Any]:
        """Compressive memory per layer (empty dict when none)."""
        return self.memories.get("compressive", {})

    def _map(self, fn) -> StackState:
        # Kinds without tensor state (a store's handle) are carried as they are.
        types = tensor_state_types()
        return StackState(
            {
                kind: {layer: fn(s) for layer, s in layers.items()} if kind in types else layers
                for kind, layers in self.memories.items()
            },
            self.segments,
        )

    def others(self) -> dict[str, dict[int, Any]]:
        """The kinds whose state is not a tuple of tensors (not flattened, detached or saved here)."""
        types = tensor_state_types()
        return {kind: layers for kind, layers in self.memories.items() if kind not in types}

    def detach(self) -> StackState:
        """Same memory, cut from the autograd graph."""
        return self._map(lambda s: type(s)(*(t.detach() for t in s)))

    def to(self, device: torch.device | str) -> StackState:
        """Move every tensor to ``device`` (dtypes kept: accumulators stay float32)."""
        return self._map(lambda s: type(s)(*(t.to(device) for t in s)))

    def flatten(self) -> tuple[list[Name], list[torch.Tensor]]:
        """Every tensor with its ``(kind, layer, field)`` name, in a fixed order (tensor kinds only)."""
        names, tensors = [], []
        for kind in sorted(set(self.memories) & set(tensor_state_types())):
            for layer in sorted(self.memories[kind]):
                s = self.memories[kind][layer]
                for name, t in zip(s._fields, s, strict=True):
                    names.append((kind, layer, name))
                    tensors.append(t)
        return names, tensors

    @staticmethod
    def unflatten(names: list[Name], tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> dict:
        """Inverse of :meth:`flatten`: ``{kind: {layer: state}}``."""
        fields: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for (kind, layer, name), t in zip(names, tensors, strict=True):
            fields.setdefault(kind, {}).setdefault(layer, {})[name] = t
        types = tensor_state_types()
        return {
            kind: {layer: types[kind](**f) for layer, f in layers.items()} for kind, layers in fields.items()
        }

    def num_bytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.flatten()[1])

    @property
    def batch_size(self) -> int | None:
        """Streams held (None while empty)."""
        tensors = self.flatten()[1]
        return tensors[0].shape[0] if tensors else None

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to one safetensors file, atomically.

        The bytes go to a temporary sibling, fsynced and renamed over ``path``: a crash leaves the
        previous file or the new one, never a torn one; temporaries left by a killed earlier save
        are removed.
        """
        if self.others():
            raise ValueError(
                f"this state holds {sorted(self.others())} memory, which a single file cannot hold; save "
                "the whole stream with memstack.saving.save_stream(stack, directory) (or stack.save_stream)"
            )
        names, tensors = self.flatten()
        flat, seen = {}, set()
        for n, t in zip(names, tensors, strict=True):
            t = t.detach().contiguous().cpu()
            if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
                t = t.clone()
            seen.add(t.data_ptr())
            flat[".".join(map(str, n))] = t
        meta = {"format": STATE_FORMAT, "version": str(STATE_VERSION), "segments": str(self.segments)}
        # to bytes first: safetensors' save_file leaves temporary files behind if killed
        blob = save(flat, metadata=meta)
        with atomic_file(path) as tmp:
            tmp.write_bytes(blob)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> StackState:
        """Read a state written by :meth:`save`, checking format, version, names and shapes.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if it is a directory, not a memstack state file, of a newer version, or
                holds tensors that are not a well-formed state. Every message names ``path``.
        """
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; expected a state file written by StackState.save")
        if not path.is_file():
            raise FileNotFoundError(f"no memstack state file at {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATE_FORMAT:
                    raise ValueError(f"{path} is not a memstack state file (format={meta.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, RuntimeError, SafetensorError) as e:  # a truncated or foreign file
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
        version, segments = meta.get("version", ""), meta.get("segments", "0")
        if not version.isdigit() or not 1 <= int(version) <= STATE_VERSION:
            raise ValueError(
                f"{path} has state version {version!r}; this memstack reads versions 1 to {STATE_VERSION}"
            )
        if not segments.isdigit():
            raise ValueError(f"{path}: segment count {segments!r} is not a non-negative integer")
        STATE_TYPES = tensor_state_types()
        names: list[Name] = []
        for key in tensors:
            parts = key.split(".")
            ok = len(parts) == 3 and parts[0] in STATE_TYPES and parts[1].isdigit()
            if not ok or parts[2] not in STATE_TYPES[parts[0]]._fields:
                expected = ", ".join(f"{k}.<layer>.{{{','.join(t._fields)}}}" for k, t in STATE_TYPES.items())
                raise ValueError(f"{path}: unexpected tensor {key!r}; a state holds {expected}")
            names.append((parts[0], int(parts[1]), parts[2]))
        present: dict[tuple[str, int], set[str]] = {}
        for kind, layer, name in names:
            present.setdefault((kind, layer), set()).add(name)
        missing = [
            f"{kind}.{layer}.{name}"
            for (kind, layer), have in sorted(present.items())
            for name in STATE_TYPES[kind]._fields
            if name not in have
        ]
        if missing:
            raise ValueError(f"{path} is an incomplete memstack state: missing {missing}")
        memories = cls.unflatten(names, [tensors[".".join(map(str, n))] for n in names])
        for kind, layers in memories.items():
            for layer, s in layers.items():
                KINDS[kind].kind.check_loaded(layer, s, str(path))
        for kind, layers in memories.items():
            for layer, s in layers.items():
                if any(t.is_floating_point() and t.dtype != torch.float32 for t in s):
                    raise ValueError(f"{path}: {kind} layer {layer} is not float32; memory is float32")
        state = cls(memories, int(segments))
        if len({t.shape[0] for t in state.flatten()[1]}) > 1:
            raise ValueError(f"{path}: layers disagree on the batch size")
        return state
