"""What a MemoryStack keeps on disk: its own part of a model directory, and a whole stream's memory.

**The stack's files** (``MemoryStack.save_pretrained`` / ``from_pretrained``): only memstack's
files are written into a directory, so the stack can share it with the model's own
``save_pretrained``. The gates go to a file named after their content, the sleep adapters to a
directory named after theirs, then the manifest ``memstack_config.json`` is replaced atomically
(the commit point), then older weights of memstack's naming are removed. :func:`read_stack`
reads and checks everything before the caller touches a model.

**A stream** (``MemoryStack.save_stream`` / ``load_stream``): every kind's memory after the
segments read so far, and the segment count, so that a stream saved in one process continues in
another exactly as it would have in memory. Tensor states (compressive memory) go to one
safetensors file (:meth:`StackState.save <memstack.state.StackState.save>`); handle states (the
store, with each row's records and the tail query the next segment searches with) are written by
their kind (:meth:`MemoryKind.save_state <memstack.memory.base.MemoryKind.save_state>`). The
whole directory is written beside the target and renamed over it: a crash leaves the previous
save or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from memstack.config import StackConfig
from memstack.io import atomic_directory, atomic_file, read_manifest, umask_mode, write_json
from memstack.memory.adapters import Adapters
from memstack.memory.base import MemoryKind
from memstack.state import StackState

CONFIG_FILE = "memstack_config.json"
WEIGHTS_PREFIX = "memstack_memory"
LEGACY_WEIGHTS_FILE = "memstack_memory.safetensors"
ADAPTERS_PREFIX = "memstack_adapters"
"""Sleep's LoRA adapters go to ``memstack_adapters-<content hash>/`` (``adapters.json`` + peft's
files per adapter), named in the manifest's ``adapters`` field (absent: none)."""
FORMAT_VERSION = 2
"""Version 2 names the weights file after its content (written before the manifest, the commit
point) and its gates ``layers.<layer>.<kind>.gate``; version 1 used the fixed name
``memstack_memory.safetensors`` and ``layers.<layer>.gate`` for the compressive gate, and is
still read."""

STREAM_FILE = "stream.json"
STREAM_FORMAT = "memstack-stream"
STREAM_VERSION = 1
TENSORS_FILE = "tensors.safetensors"


def gate_name(layer: int, kind: str) -> str:
    """The tensor name of a gate in the weights file."""
    return f"layers.{layer}.{kind}.gate"


def write_stack(
    path: str | os.PathLike,
    config: StackConfig,
    model_type: str,
    num_heads: int,
    gates: dict[str, torch.Tensor],
    save_adapters: Callable[[Path], str | None],
) -> None:
    """Write the stack's files into directory ``path`` (see the module docstring for the order).

    Args:
        gates: tensor name (:func:`gate_name`) -> gate logits.
        save_adapters: writes the adapters under the directory given, returns the name of what
            it wrote (None: no adapters).

    Raises:
        ValueError: if ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory; save_pretrained writes into a directory")
    if not path.exists():
        path.mkdir(parents=True, mode=umask_mode(directory=True))
    blob = save({name: g.detach().cpu().contiguous() for name, g in gates.items()})
    weights = f"{WEIGHTS_PREFIX}-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
    with atomic_file(path / weights) as tmp:
        tmp.write_bytes(blob)
    adapters = save_adapters(path)
    manifest = {
        "format": "memstack",
        "version": FORMAT_VERSION,
        "model_type": model_type,
        "num_heads": num_heads,
        "stack": config.to_dict(),
        "weights": weights,
        "adapters": adapters,
    }
    with atomic_file(path / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    for old in path.glob(f"{WEIGHTS_PREFIX}*.safetensors"):
        if old.name != weights:
            old.unlink(missing_ok=True)
    for old in path.glob(f"{ADAPTERS_PREFIX}-*"):
        if old.name != adapters and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def write_adapters(adapters: Adapters, model: torch.nn.Module, path: Path) -> str | None:
    """Write the sleep adapters to a directory of ``path`` named after their content (before the
    manifest, like the gates); return its name, or None without adapters."""
    if not adapters.names():
        return None
    digest = hashlib.sha256(json.dumps([adapters.names(), adapters.active()]).encode())
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    name = f"{ADAPTERS_PREFIX}-{digest.hexdigest()[:16]}"
    if not (path / name).is_dir():
        adapters.save(path / name)
    return name


@dataclass
class SavedStack:
    """What :func:`read_stack` found, checked."""

    config: StackConfig
    gates: dict[str, torch.Tensor]
    """Tensor name (:func:`gate_name`) -> gate logits."""
    adapters: Path | None
    """The adapters directory (None: none saved)."""


def read_stack(path: str | os.PathLike, model_type: str) -> SavedStack:
    """Read and check the stack's files in ``path`` for a model of ``model_type``.

    Raises:
        FileNotFoundError: if the manifest, the weights file or the adapters are missing.
        ValueError: if the manifest is malformed, the saved stack belongs to another model type or
            a file is not what it should be.
    """
    path = Path(path)
    manifest = read_manifest(path / CONFIG_FILE, "memstack", FORMAT_VERSION)
    for key, kind in (("model_type", str), ("stack", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{path / CONFIG_FILE}: field {key!r} missing or not a {kind.__name__}")
    if manifest["model_type"] != model_type:
        raise ValueError(f"{path} was saved for model_type {manifest['model_type']!r}, not {model_type!r}")
    try:
        config = StackConfig.from_dict(manifest["stack"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / CONFIG_FILE}: bad stack config: {e}") from None
    weights = manifest.get("weights") if manifest["version"] >= 2 else LEGACY_WEIGHTS_FILE
    if not isinstance(weights, str) or Path(weights).name != weights:
        raise ValueError(f"{path / CONFIG_FILE}: field 'weights' must be a file name, got {weights!r}")
    if not (path / weights).is_file():
        raise FileNotFoundError(f"{path / CONFIG_FILE} names weights {weights}, which is missing")
    try:
        tensors = load_file(str(path / weights))
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise ValueError(f"{path / weights} is not a readable safetensors file: {e}") from None
    if manifest["version"] == 1:  # the compressive gate was the only one: layers.<layer>.gate
        tensors = {f"{k.rsplit('.', 1)[0]}.compressive.gate": t for k, t in tensors.items()}
    adapters = manifest.get("adapters")
    if adapters is not None and (
        not isinstance(adapters, str) or Path(adapters).name != adapters or not (path / adapters).is_dir()
    ):
        raise FileNotFoundError(f"{path / CONFIG_FILE} names adapters {adapters!r}, which are missing")
    return SavedStack(config, tensors, None if adapters is None else path / adapters)


def save_stream(state: StackState, kinds: dict[str, MemoryKind], path: str | os.PathLike) -> None:
    """Write a whole stream's memory (every kind, the store's tail queries, the segment count)
    into directory ``path``, atomically (a new directory renamed over the old one).

    Args:
        state: the stream's memory (e.g. ``stack.state``).
        kinds: the stack's kinds by name (they save their handle states themselves).

    Raises:
        ValueError: the state holds a kind the stack does not have.
    """
    unknown = sorted(set(state.memories) - set(kinds))
    if unknown:
        raise ValueError(
            f"the state holds {unknown} memory, which this stack does not have ({sorted(kinds)})"
        )
    handles = state.others()
    with atomic_directory(path) as tmp:
        StackState({k: v for k, v in state.memories.items() if k not in handles}, state.segments).save(
            tmp / TENSORS_FILE
        )
        for name, layers in handles.items():
            kinds[name].save_state(layers, tmp / name)
        write_json(
            tmp / STREAM_FILE,
            {
                "format": STREAM_FORMAT,
                "version": STREAM_VERSION,
                "segments": state.segments,
                "kinds": sorted(state.memories),
                "handles": sorted(handles),
            },
        )


def load_stream(path: str | os.PathLike, kinds: dict[str, MemoryKind], device: Any = "cpu") -> StackState:
    """Read a stream :func:`save_stream` wrote, checking it against the stack's kinds.

    Raises:
        FileNotFoundError: nothing saved at ``path``.
        ValueError: the files are malformed, or hold a kind the stack does not have.
    """
    path = Path(path)
    manifest = read_manifest(path / STREAM_FILE, STREAM_FORMAT, STREAM_VERSION)
    handles, saved = manifest.get("handles"), manifest.get("kinds")
    segments = manifest.get("segments")
    if not isinstance(handles, list) or not isinstance(saved, list) or not isinstance(segments, int):
        raise ValueError(
            f"{path / STREAM_FILE}: fields 'kinds', 'handles' (lists) and 'segments' (int) needed"
        )
    unknown = sorted(set(saved) - set(kinds))
    if unknown:
        raise ValueError(f"{path} holds {unknown} memory, which this stack does not have ({sorted(kinds)})")
    state = StackState.load(path / TENSORS_FILE, device=device)
    if state.segments != segments:
        raise ValueError(f"{path}: the tensors say {state.segments} segments, the manifest {segments}")
    memories = dict(state.memories)
    for name in handles:
        memories[name] = kinds[name].load_state(path / name)
    missing = sorted(set(saved) - set(memories))
    if missing:
        raise ValueError(f"{path}: the manifest names {missing} memory, which is not in the files")
    return StackState(memories, segments)
