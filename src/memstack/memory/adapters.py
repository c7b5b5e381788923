"""Layer 4's weights: the named LoRA adapters (peft) that sleep trains on the stack's model.

Each sleep adds one adapter, ``sleep-0001``, ``sleep-0002``, ...; by default all stay active
together (their deltas add up). peft injects the LoRA layers into the wrapped model in place, so
the stack's attention modules, rotary and memory are untouched and ``stack(...)`` runs the
adapted model; the :class:`~peft.PeftModel` is kept only as the handle for peft's operations.

peft facts this module guards against (peft 0.21, and the issue tracker):

- ``add_adapter`` with an existing name silently re-initialises it and ``add_weighted_adapter``
  with an existing name silently keeps the old one: every name is checked here first.
- ``add_weighted_adapter(combination_type="cat")`` is the only exact sum of LoRA adapters
  (``linear`` averages A and B separately; ``svd`` is exact only within its rank).
- peft freezes every base weight when it wraps a model; the stack's training must not notice,
  so :meth:`Adapters.add` restores the ``requires_grad`` flags it found.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from memstack.io import atomic_directory, write_json

PREFIX = "sleep-"
INDEX_FILE = "adapters.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_targets(model: nn.Module, attention_linears: Sequence[str] | None = None) -> list[str]:
    """LoRA target modules: peft's per-architecture default, else the linear layers found inside
    the model's attention modules (:attr:`memstack.model.discovery.Architecture.lora_targets`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) or attention_linears
    if not targets:
        raise ValueError(
            f"no default LoRA target modules for model_type {model_type!r}; pass "
            f"SleepConfig(target_modules=[...]) with names of its linear layers"
        )
    return list(targets)


class Adapters:
    """The sleep adapters on one model: add, activate, merge, save and load them by name.

    Args:
        model: the (wrapped) Hugging Face model; peft injects LoRA layers into it in place.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.peft: PeftModel | None = None
        self._highest = 0  # numbering survives a merge into the base, which removes every name

    def names(self) -> list[str]:
        """Every adapter on the model, in the order they were added."""
        return [] if self.peft is None else list(self.peft.peft_config)

    def active(self) -> list[str]:
        """Adapters whose deltas the model applies now."""
        return [] if self.peft is None else list(self.peft.base_model.active_adapters)

    def next_name(self) -> str:
        """``sleep-NNNN`` one past the highest number in any sleep adapter's name so far (a merged
        ``sleep-0001-0003`` counts as 3)."""
        numbers = [int(x) for n in self.names() if n.startswith(PREFIX) for x in re.findall(r"\d+", n)]
        return f"{PREFIX}{max([*numbers, self._highest]) + 1:04d}"

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"adapter name {name!r}: use letters, digits, '-', '_' and '.'")
        if name in self.names():
            raise ValueError(f"an adapter named {name!r} exists already (adapters: {self.names()})")

    def add(self, name: str, config: LoraConfig) -> list[nn.Parameter]:
        """Add a fresh adapter (its B is zero: the model's outputs do not change); return its
        parameters. Every other parameter keeps the ``requires_grad`` it had."""
        self._check_new(name)
        flags = {p: p.requires_grad for p in self.model.parameters()}
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        return self.parameters(name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA parameters of adapter ``name``."""
        if name not in self.names():
            raise ValueError(f"no adapter named {name!r} (adapters: {self.names()})")
        return [p for n, p in self.model.named_parameters() if "lora_" in n and n.split(".")[-2] == name]

    def activate(self, names: Sequence[str]) -> None:
        """Apply exactly these adapters (together: their deltas add up). Trainability is left as is."""
        unknown = [n for n in names if n not in self.names()]
        if unknown or not names:
            raise ValueError(f"cannot activate {list(names)!r}: adapters are {self.names()}")
        flags = {p: p.requires_grad for p in self.model.parameters()}
        self.peft.base_model.set_adapter(list(names))  # peft also marks them trainable: undo
        for p, flag in flags.items():
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model, every adapter off, for as long as the block runs."""
        if self.peft is None:
            yield
        else:
            with self.peft.disable_adapter():
                yield

    def merge(self, names: Sequence[str], new_name: str) -> None:
        """Replace ``names`` by one adapter ``new_name`` equal to their sum (peft ``cat``, exact),
        active with the adapters that were active besides them."""
        self._check_new(new_name)
        missing = [n for n in names if n not in self.names()]
        if missing or len(names) < 1:
            raise ValueError(f"cannot merge {list(names)!r}: adapters are {self.names()}")
        keep = [n for n in self.active() if n not in names]
        self.peft.add_weighted_adapter(list(names), [1.0] * len(names), new_name, combination_type="cat")
        for n in names:
            self.peft.delete_adapter(n)
        self.activate([*keep, new_name])
        for p in self.parameters(new_name):
            p.requires_grad_(False)

    def merge_into_base(self) -> None:
        """Add the active adapters' deltas into the base weights and remove every adapter (the
        numbering of later sleeps continues)."""
        if self.peft is not None:
            self._highest = int(self.next_name()[len(PREFIX) :]) - 1
            self.peft.merge_and_unload()
            self.peft = None

    def save(self, path: str | Path) -> None:
        """Write every adapter (peft's files, ``<path>/<name>/``) and ``adapters.json`` (names,
        active ones) atomically: a crash leaves the previous save."""
        index = {"format": "memstack.adapters", "version": 1, "names": self.names(), "active": self.active()}
        with atomic_directory(Path(path)) as tmp:
            if self.peft is not None:
                self.peft.save_pretrained(str(tmp), selected_adapters=self.names())
            write_json(tmp / INDEX_FILE, index)

    def load(self, path: str | Path) -> None:
        """Add the adapters saved in ``path`` (names must be new) and activate those that were."""
        path = Path(path)
        if not (path / INDEX_FILE).is_file():
            raise FileNotFoundError(f"{path / INDEX_FILE}: no saved adapters there")
        index = json.loads((path / INDEX_FILE).read_text())
        if index.get("format") != "memstack.adapters" or index.get("version") != 1:
            raise ValueError(f"{path / INDEX_FILE}: not a memstack adapters index of version 1")
        for name in index["names"]:
            self._check_new(name)
            if not (path / name / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{path / name}: adapter {name!r} listed but missing")
        flags = {p: p.requires_grad for p in self.model.parameters()}
        for name in index["names"]:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(path / name), adapter_name=name)
            else:
                self.peft.load_adapter(str(path / name), adapter_name=name)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for name in index["names"]:
            for p in self.parameters(name):
                p.requires_grad_(False)
        if index["active"]:
            self.activate(index["active"])


def lora_config(targets: Sequence[str], rank: int, alpha: float, dropout: float) -> LoraConfig:
    """A LoRA config for causal-LM adapters on ``targets``."""
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
    )
