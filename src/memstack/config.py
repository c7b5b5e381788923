"""What the memory stack around a causal LM looks like: :class:`StackConfig`.

Each memory kind's section comes from the kind: :class:`~memstack.memory.compressive.CompressiveConfig`
(layer 2) and :class:`~memstack.memory.store.kind.StoreConfig` (layer 3) are declared beside their
kinds and have their own fields here (``compressive``, ``store``); any other registered kind
(:func:`memstack.memory.base.register_kind`) has its section in ``kinds[name]``. Layer 4's recipe
is not part of the stack: :class:`memstack.sleep.SleepConfig`. A training run's config (model,
data, optimiser, command line) is :mod:`memstack.train.config`.

Every field is documented where it is declared and validated in ``__post_init__``, so a bad value
fails when the config is built, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from memstack.fields import check_int, from_dict
from memstack.memory.base import KINDS
from memstack.memory.carry import CarryConfig  # noqa: F401  (registers the carry kind)
from memstack.memory.compressive import CompressiveConfig
from memstack.memory.store.kind import StoreConfig

BUILT_IN_SECTIONS = ("compressive", "store")
"""Kinds whose sections are fields of :class:`StackConfig` (the others live in ``kinds``)."""


@dataclass
class StackConfig:
    """What the memory stack around a causal LM looks like.

    Defaults follow the Infini-attention paper (Munkhdalai et al., 2024,
    https://arxiv.org/abs/2404.07143) where it fixes a choice.
    """

    keys_to_ignore_at_inference: ClassVar[list[str]] = ["state", "num_tokens", "segment_loss"]
    """Not a field: the :class:`~memstack.stack.StackOutput` entries that are not predictions.
    ``transformers.Trainer`` reads ``model.config.keys_to_ignore_at_inference`` and leaves them
    out of the logits it gathers in evaluation."""

    segment_len: int = 512
    """Tokens per segment. Local attention never looks outside the current segment; positions
    restart at 0 in every segment."""

    compressive: CompressiveConfig | None = dataclasses.field(default_factory=CompressiveConfig)
    """Layer 2, Infini-attention compressive memory (None: off, every segment is processed alone,
    exactly as the unwrapped model would process it). ``stack.compressive=none`` on the command
    line switches it off, ``stack.compressive=on`` on with defaults, ``stack.compressive.layers=0,3``
    sets a field (and switches it on)."""

    bptt_segments: int | None = None
    """Truncate backpropagation through the memory every this many segments (None: never)."""

    checkpoint_segments: bool = False
    """Recompute each segment's activations in the backward pass (torch.utils.checkpoint), so a
    long unroll keeps only the memory state per segment."""

    window: int | None = None
    """Optional sliding window inside the segment: a token sees at most this many tokens
    (itself included). None: the whole causal segment."""

    sink_tokens: int = 0
    """With a window: the first ``sink_tokens`` tokens of the segment stay visible to every
    query (attention sinks, Xiao et al. 2023)."""

    store: StoreConfig | None = None
    """Layer 3, the long-term store (None: off). ``stack.store=on`` on the command line switches
    it on with defaults, ``stack.store.top_k=8`` sets a field (and switches it on)."""

    kinds: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Sections of the other registered memory kinds (:func:`memstack.memory.base.register_kind`),
    by kind name, each an instance of the config class the kind registered with; a kind absent
    here is off."""

    def section(self, name: str) -> Any:
        """The config section of memory kind ``name`` (None: off)."""
        return getattr(self, name) if name in BUILT_IN_SECTIONS else self.kinds.get(name)

    def __post_init__(self) -> None:
        check_int("segment_len", self.segment_len, minimum=1)
        if self.compressive is not None and not isinstance(self.compressive, CompressiveConfig):
            raise ValueError(
                "stack.compressive must be a CompressiveConfig or None (off), got "
                f"{self.compressive!r}; compressive=False is now compressive=None"
            )
        if self.bptt_segments is not None:
            check_int("bptt_segments", self.bptt_segments, minimum=1, optional=True)
        if not isinstance(self.checkpoint_segments, bool):
            raise ValueError(f"checkpoint_segments must be true or false, got {self.checkpoint_segments!r}")
        if self.window is not None:
            check_int("window", self.window, minimum=1, optional=True)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        if self.store is not None and not isinstance(self.store, StoreConfig):
            raise ValueError(f"store must be a StoreConfig or None, got {type(self.store).__name__}")
        if not isinstance(self.kinds, dict):
            raise ValueError(f"kinds must be a dict {{kind name: its config}}, got {self.kinds!r}")
        for name, section in self.kinds.items():
            spec = KINDS.get(name)
            if name in BUILT_IN_SECTIONS or spec is None:
                other = sorted(set(KINDS) - set(BUILT_IN_SECTIONS))
                raise ValueError(
                    f"kinds[{name!r}]: not a registered memory kind outside the built-in sections "
                    f"{list(BUILT_IN_SECTIONS)} (registered: {other}); register it with "
                    "memstack.memory.base.register_kind"
                )
            if not isinstance(section, spec.config):
                raise ValueError(
                    f"kinds[{name!r}] must be a {spec.config.__name__}, got {type(section).__name__}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackConfig:
        """Build from a dict (sections included), rejecting unknown keys with the valid ones.

        The flat format saved before layer 2 became a section (``compressive: true/false``,
        ``memory_layers``, ``update_rule``, ``gate_init``) is still read: see
        :func:`upgrade_flat_compressive`."""
        data = upgrade_flat_compressive(data)
        if isinstance(data, dict) and isinstance(data.get("kinds"), dict):
            sections = {}
            for name, section in data["kinds"].items():
                spec = KINDS.get(name)
                if spec is None or name in BUILT_IN_SECTIONS:
                    raise ValueError(
                        f"stack.kinds.{name}: no memory kind {name!r} is registered (import the module "
                        f"that registers it first); registered: {sorted(KINDS)}"
                    )
                sections[name] = from_dict(spec.config, section, prefix=f"stack.kinds.{name}.")
            data = {**data, "kinds": sections}
        return from_dict(cls, data, prefix="stack.")


_dataclass_init = StackConfig.__init__


def _init_naming_moved_fields(self: StackConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, with the old flat compressive fields named in the error."""
    moved = [k for k in kwargs if k in LEGACY_COMPRESSIVE_FIELDS or k == "memory_layers"]
    if moved:
        fields = ", ".join(f"{LEGACY_COMPRESSIVE_FIELDS[k]}=..." for k in moved)
        raise TypeError(
            f"StackConfig() no longer takes {', '.join(moved)}: layer 2 is a section now; write "
            f"StackConfig(compressive=CompressiveConfig({fields})) "
            "(from memstack import CompressiveConfig)"
        )
    _dataclass_init(self, *args, **kwargs)


StackConfig.__init__ = _init_naming_moved_fields  # type: ignore[method-assign]

_MOVED = {
    **{
        name: "memstack.train.config"
        for name in (
            "Config",
            "ModelConfig",
            "DataConfig",
            "OptimConfig",
            "ScheduleConfig",
            "RunConfig",
            "EvalConfig",
            "apply_overrides",
            "load_config",
            "valid_keys",
            "add_set_argument",
            "unknown_key_message",
            "TASKS",
            "DTYPES",
            "FILLERS",
            "LEGACY_OVERRIDES",
        )
    },
    "SleepConfig": "memstack.sleep",
}


def __getattr__(name: str) -> Any:
    """Names that moved out of this module fail with their new home."""
    if name in _MOVED:
        raise ImportError(
            f"memstack.config.{name} moved: import it from {_MOVED[name]} (from {_MOVED[name]} import {name})"
        )
    raise AttributeError(f"module 'memstack.config' has no attribute {name!r}")


LEGACY_COMPRESSIVE_FIELDS = {
    "memory_layers": "layers",
    "update_rule": "update_rule",
    "gate_init": "gate_init",
}
"""Flat ``StackConfig`` fields of old saves and commands -> their ``CompressiveConfig`` field."""


def upgrade_flat_compressive(data: Any) -> Any:
    """A stack dict in the old flat format -> the current one with a ``compressive`` section.

    Old: ``compressive: true`` (or absent) with ``memory_layers``, ``update_rule``, ``gate_init``
    at the top level -> ``compressive: {layers, update_rule, gate_init}``; ``compressive: false``
    -> ``compressive: None`` (layer 2 off; the flat fields had no effect then and are dropped).
    A dict in the current format is returned as it is.

    Raises:
        ValueError: for a dict mixing a ``compressive`` section with old flat fields.
    """
    if not isinstance(data, dict):
        return data
    flat = {k: data[k] for k in LEGACY_COMPRESSIVE_FIELDS if k in data}
    switch = data.get("compressive", True)
    if not isinstance(switch, bool):
        if flat:
            moved = ", ".join(f"stack.{k} -> stack.compressive.{LEGACY_COMPRESSIVE_FIELDS[k]}" for k in flat)
            raise ValueError(f"old flat config keys next to a stack.compressive section; move them: {moved}")
        return data
    upgraded = {k: v for k, v in data.items() if k not in LEGACY_COMPRESSIVE_FIELDS}
    upgraded["compressive"] = {LEGACY_COMPRESSIVE_FIELDS[k]: v for k, v in flat.items()} if switch else None
    return upgraded
