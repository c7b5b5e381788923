"""Saving and loading a MemoryStack's own part: its config and learned memory parameters.

``save_pretrained`` writes only memstack's files into a directory (so the stack can share it with
the model's own ``save_pretrained``): the gates go to a file named after their content, then the
manifest ``memstack_config.json`` is replaced atomically (the commit point), then older weights
of memstack's naming are removed. ``from_pretrained`` reads and checks everything before it
touches the model, and unwraps it again if wrapping fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save
from torch import nn

from memstack.config import StackConfig
from memstack.io import atomic_file, read_manifest, umask_mode
from memstack.model.discovery import discover

if TYPE_CHECKING:
    from memstack.stack import MemoryStack

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


class StackPersistence:
    """``save_pretrained`` / ``from_pretrained`` of :class:`~memstack.stack.MemoryStack`."""

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the stack's config and memory parameters (not the base model) into directory ``path``.

        Only memstack's own files are written or removed, so the stack can live next to the
        model's own ``save_pretrained`` files. The commit is crash-safe: the weights go to a new
        file named after their content, then the manifest ``memstack_config.json`` is replaced
        atomically (the commit point), then weights files of older saves are removed. A crash at
        any moment leaves the previous save or the new one loadable, never a mix.

        Raises:
            ValueError: if ``path`` exists and is not a directory.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} exists and is not a directory; save_pretrained writes into a directory")
        if not path.exists():
            path.mkdir(parents=True, mode=umask_mode(directory=True))
        tensors = {
            f"layers.{layer}.{kind}.gate": g.detach().cpu().contiguous()
            for (layer, kind), g in self.named_gates().items()
        }
        blob = save(tensors)
        weights = f"{WEIGHTS_PREFIX}-{hashlib.sha256(blob).hexdigest()[:16]}.safetensors"
        with atomic_file(path / weights) as tmp:
            tmp.write_bytes(blob)
        adapters = self._save_adapters(path)
        manifest = {
            "format": "memstack",
            "version": FORMAT_VERSION,
            "model_type": self.model.config.model_type,
            "num_heads": self.model.config.num_attention_heads,
            "stack": self.config.to_dict(),
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

    def _save_adapters(self, path: Path) -> str | None:
        """Write the sleep adapters to a directory named after their content (before the
        manifest, like the gates); return its name, or None without adapters."""
        if not self.adapters.names():
            return None
        digest = hashlib.sha256(json.dumps([self.adapters.names(), self.adapters.active()]).encode())
        for name, p in sorted(self.model.named_parameters()):
            if "lora_" in name:
                digest.update(name.encode())
                digest.update(p.detach().float().cpu().numpy().tobytes())
        name = f"{ADAPTERS_PREFIX}-{digest.hexdigest()[:16]}"
        if not (path / name).is_dir():
            self.adapters.save(path / name)
        return name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model: nn.Module) -> MemoryStack:
        """Wrap ``model`` with the config and memory parameters saved in ``path``.

        Everything is read and checked before the model is touched; if wrapping still fails, the
        model is unwrapped again, so a failed call leaves it exactly as it was.

        Raises:
            FileNotFoundError: if the manifest or the weights file is missing.
            ValueError: if the manifest is malformed, or the saved stack belongs to another model
                type or its tensors do not fit the model.
        """
        path = Path(path)
        manifest = read_manifest(path / CONFIG_FILE, "memstack", FORMAT_VERSION)
        for key, kind in (("model_type", str), ("stack", dict)):
            if not isinstance(manifest.get(key), kind):
                raise ValueError(f"{path / CONFIG_FILE}: field {key!r} missing or not a {kind.__name__}")
        if manifest["model_type"] != model.config.model_type:
            raise ValueError(
                f"{path} was saved for model_type {manifest['model_type']!r}, not {model.config.model_type!r}"
            )
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
        # A dry run of the composition says which gates the stack will have, so that nothing
        # touches the model before every tensor is known to fit.
        arch = discover(model)
        info = cls._model_info(arch)
        expected = {}
        from memstack.stack import KINDS  # the composition lives with the stack

        for name, build in KINDS.items():
            built = build(config, info)
            if built is not None and built[1] is not None:
                expected.update({f"layers.{layer}.{name}.gate": layer for layer in built[0].layers})
        adapters = manifest.get("adapters")
        if adapters is not None and (
            not isinstance(adapters, str) or Path(adapters).name != adapters or not (path / adapters).is_dir()
        ):
            raise FileNotFoundError(f"{path / CONFIG_FILE} names adapters {adapters!r}, which are missing")
        if set(tensors) != set(expected):
            raise ValueError(f"{path}: expected tensors {sorted(expected)}, found {sorted(tensors)}")
        for name, saved in tensors.items():
            layer = expected[name]
            heads = arch.sites[layer].heads
            if tuple(saved.shape) != (heads,):
                raise ValueError(
                    f"{path}: gate of layer {layer} ({name}) has shape {tuple(saved.shape)}, "
                    f"the model needs ({heads},)"
                )
        stack = cls(model, config)
        try:
            with torch.no_grad():
                for (layer, kind), gate in stack.named_gates().items():
                    gate.copy_(tensors[f"layers.{layer}.{kind}.gate"])
            if adapters is not None:
                stack.adapters.load(path / adapters)
        except BaseException:
            stack.unwrap()
            raise
        return stack
