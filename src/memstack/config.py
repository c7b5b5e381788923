"""Configuration dataclasses.

Every field is documented where it is declared and validated in ``__post_init__``, so a bad value
fails when the config is built, not deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

UPDATE_RULES = ("linear", "delta")


@dataclass
class StackConfig:
    """What the memory stack around a causal LM looks like.

    Defaults follow the Infini-attention paper (Munkhdalai et al., 2024,
    https://arxiv.org/abs/2404.07143) where it fixes a choice.
    """

    segment_len: int = 512
    """Tokens per segment. Local attention never looks outside the current segment; positions
    restart at 0 in every segment."""

    compressive: bool = True
    """Switch layer 2 (Infini-attention compressive memory) on or off. Off: every segment is
    processed alone, exactly as the unwrapped model would process it."""

    memory_layers: str = "all"
    """Which decoder layers get compressive memory: ``"all"``, ``"none"``, ``"every:K"`` (layers
    0, K, 2K, ...), or a comma-separated list of layer indices such as ``"0,3"``. A string, so it
    can be overridden from the command line like every other field."""

    update_rule: str = "linear"
    """``"linear"`` (M += sigma(K)^T V) or ``"delta"`` (subtract what memory already returns for
    each key before writing, eq. (5) of the paper)."""

    gate_init: float = 0.0
    """Initial value of the per-head gate logit beta. sigmoid(0) = 0.5 mixes memory and local
    attention equally, as in the paper; a negative value (say -3) starts a pretrained model close
    to its original behaviour."""

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

    def __post_init__(self) -> None:
        if not isinstance(self.segment_len, int) or self.segment_len < 1:
            raise ValueError(f"segment_len must be a positive int, got {self.segment_len!r}")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if self.bptt_segments is not None and self.bptt_segments < 1:
            raise ValueError(f"bptt_segments must be None or >= 1, got {self.bptt_segments!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be None or >= 1, got {self.window!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens!r}")
        parse_layers(self.memory_layers, num_layers=None)  # syntax check now, range check at wrap

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StackConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown StackConfig keys {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


def parse_layers(spec: str, num_layers: int | None) -> list[int]:
    """Turn a ``memory_layers`` string into layer indices.

    Args:
        spec: ``"all"``, ``"none"``, ``"every:K"`` or ``"i,j,..."``.
        num_layers: number of decoder layers, or None to check the syntax only.

    Returns:
        Sorted layer indices (empty when ``num_layers`` is None and the spec needs it).

    Raises:
        ValueError: if the spec is malformed or names a layer that does not exist.
    """
    accepted = 'accepted: "all", "none", "every:K", or comma-separated indices like "0,2"'
    spec = spec.strip()
    n = num_layers if num_layers is not None else 0
    if spec == "all":
        return list(range(n))
    if spec == "none":
        return []
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad memory_layers {spec!r}; {accepted}") from None
        if k < 1:
            raise ValueError(f"memory_layers every:K needs K >= 1, got {spec!r}")
        return list(range(0, n, k))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"bad memory_layers {spec!r}; {accepted}") from None
    if not layers:
        raise ValueError(f"memory_layers {spec!r} names no layer; {accepted}")
    if num_layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"memory_layers {spec!r}: layers {bad} do not exist (model has {num_layers})")
    return layers
