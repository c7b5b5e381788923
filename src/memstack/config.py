"""What the memory stack around a causal LM looks like: :class:`StackConfig` and its optional
sections, :class:`CompressiveConfig` (layer 2) and :class:`StoreConfig` (layer 3), and
:class:`SleepConfig` (layer 4, the recipe of ``stack.sleep()``).

Every field is documented where it is declared and validated in ``__post_init__``, so a bad value
fails when the config is built, not deep inside a forward pass. Import them from
:mod:`memstack.train.config` (or :mod:`memstack`), which re-exports them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from memstack.fields import _check_choice, _check_int, _check_number, _from_dict, _reject_bool_ints
from memstack.memory.store.policy import RetrievalPolicy

UPDATE_RULES = ("linear", "delta")


@dataclass
class CompressiveConfig:
    """Layer 2, Infini-attention compressive memory: a matrix ``M`` and normaliser ``z`` per layer
    and KV head, written once per segment, read by every query. See ``memstack/memory/compressive.py``.
    """

    layers: str = "all"
    """Decoder layers that get compressive memory: ``"all"``, ``"none"``, ``"every:K"`` (layers
    0, K, 2K, ...), or a comma-separated list of layer indices such as ``"0,3"``. A string, so it
    can be overridden from the command line like every other field."""
    update_rule: str = "linear"
    """``"linear"`` (M += sigma(K)^T V) or ``"delta"`` (subtract what memory already returns for
    each key before writing, eq. (5) of the paper)."""
    gate_init: float = 0.0
    """Initial value of the per-head gate logit beta. sigmoid(0) = 0.5 mixes memory and local
    attention equally, as in the paper; a negative value (say -3) starts a pretrained model close
    to its original behaviour."""

    def __post_init__(self) -> None:
        parse_layers(self.layers, num_layers=None, name="stack.compressive.layers")
        _check_choice("stack.compressive.update_rule", self.update_rule, UPDATE_RULES)
        _check_number("stack.compressive.gate_init", self.gate_init, "a finite number", math.isfinite)


@dataclass
class StoreConfig:
    """Layer 3, the long-term store: every past chunk kept as it was, found again by attention keys.

    One store per stream (batch row) and store layer. See ``memstack/memory/longterm.py``.
    """

    layers: str = "every:2"
    """Decoder layers that write to and read from the store: same syntax as
    ``stack.compressive.layers``."""
    chunking: str = "fixed"
    """``fixed`` (``chunk_len`` tokens) or ``surprise`` (cut where the model's -log p is high,
    EM-LLM; ``chunk_len`` is then the longest chunk and ``chunk_len // 4`` the shortest)."""
    chunk_len: int = 32
    """Tokens per chunk (the longest chunk with ``surprise``)."""
    surprise_gamma: float = 1.0
    """``surprise``: cut before a token whose -log p exceeds mean + gamma * std of the segment's."""
    strategy: str = "received_attention"
    """How a chunk's attention becomes its index keys (memory/keys.py): ``received_attention``,
    ``attention_weighted``, ``mean_key`` or ``mean_query``."""
    keys_per_chunk: int = 4
    """``received_attention``: keywords per chunk (InfLLM uses 4)."""
    keyword_pool: str = "mean"
    """``received_attention``: ``mean`` (one vector per chunk, InfLLM) or ``each`` (one per keyword)."""
    top_k: int = 4
    """Chunks retrieved per search."""
    neighbours: int = 0
    """Also read this many chunks before and after each hit (EM-LLM's contiguity buffer)."""
    block_len: int = 32
    """Queries are served in blocks of this many tokens; block j searches with the pooled
    position-free queries of the ``block_len`` tokens before it (the previous segment's last
    block for the first), so retrieval is causal and ``generate`` searches once per block."""
    readout: str = "kv"
    """``kv``: the hits' keys and values join the local softmax (no training needed);
    ``kv_gated``: attention over the hits alone, mixed in by a learned per-head gate
    (Memorizing Transformers); ``tokens``: the hits' token ids are put back in front of the
    segment (any model, no training; searched once per segment with the previous one's tail)."""
    gate_init: float = -2.0
    """``kv_gated``: initial gate logit (sigmoid(-2) = 0.12: start close to the model alone)."""
    distance: int | None = None
    """Relative position at which every query sees every retrieved key (rotary models), the same
    for all (InfLLM's choice). None: ``segment_len``, just beyond the local window."""
    metric: str = "ip"
    """``ip``: search by raw inner product, an attention logit; ``cosine``: normalised."""
    index_factory: str = "Flat"
    """FAISS factory string used once a layer holds more than ``matmul_threshold`` keys
    (``Flat``, ``HNSW32``, ``IVF1024,PQ16``, ...); below it a plain matmul serves."""
    matmul_threshold: int = 65536
    max_records: int | None = None
    """Chunks kept per stream and layer (None: no limit)."""
    eviction: str = "none"
    """Past ``max_records``: ``none`` (an error, never a silent loss), ``fifo`` or ``least_retrieved``."""
    kv_dir: str | None = None
    """Keep the stored K/V in memory-mapped scratch pages in this existing directory (a fast local
    disk) instead of RAM, for long streams (``memory/kv_pages.py``); None: in RAM."""
    kv_dtype: str = "bfloat16"
    """dtype of the stored K/V (``bfloat16``, ``float16`` or ``float32``)."""
    policy: str = "always"
    """When the store is read (memstack/policy.py): ``always``, ``every:K`` or ``uncertainty:H``
    (only when the segment's mean next-token entropy without the store exceeds H nats). Every
    segment is written whatever the policy."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "stack.store")
        parse_layers(self.layers, num_layers=None, name="stack.store.layers")
        _check_choice("stack.store.chunking", self.chunking, ("fixed", "surprise"))
        RetrievalPolicy.parse(self.policy)
        _check_int("stack.store.chunk_len", self.chunk_len, minimum=1)
        _check_choice(
            "stack.store.strategy",
            self.strategy,
            ("received_attention", "attention_weighted", "mean_key", "mean_query"),
        )
        _check_int("stack.store.keys_per_chunk", self.keys_per_chunk, minimum=1)
        _check_choice("stack.store.keyword_pool", self.keyword_pool, ("mean", "each"))
        _check_int("stack.store.top_k", self.top_k, minimum=1)
        _check_int("stack.store.neighbours", self.neighbours, minimum=0)
        _check_int("stack.store.block_len", self.block_len, minimum=1)
        _check_choice("stack.store.readout", self.readout, ("kv", "kv_gated", "tokens"))
        _check_number("stack.store.gate_init", self.gate_init, "a finite number", math.isfinite)
        if self.distance is not None:
            _check_int("stack.store.distance", self.distance, minimum=0, optional=True)
        _check_choice("stack.store.metric", self.metric, ("ip", "cosine"))
        _check_int("stack.store.matmul_threshold", self.matmul_threshold, minimum=0)
        if self.max_records is not None:
            _check_int("stack.store.max_records", self.max_records, minimum=1, optional=True)
        _check_choice("stack.store.eviction", self.eviction, ("none", "fifo", "least_retrieved"))
        _check_choice("stack.store.kv_dtype", self.kv_dtype, ("bfloat16", "float16", "float32"))


@dataclass
class StackConfig:
    """What the memory stack around a causal LM looks like.

    Defaults follow the Infini-attention paper (Munkhdalai et al., 2024,
    https://arxiv.org/abs/2404.07143) where it fixes a choice.
    """

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

    def __post_init__(self) -> None:
        _check_int("segment_len", self.segment_len, minimum=1)
        if self.compressive is not None and not isinstance(self.compressive, CompressiveConfig):
            raise ValueError(
                "stack.compressive must be a CompressiveConfig or None (off), got "
                f"{self.compressive!r}; compressive=False is now compressive=None"
            )
        if self.bptt_segments is not None:
            _check_int("bptt_segments", self.bptt_segments, minimum=1, optional=True)
        if not isinstance(self.checkpoint_segments, bool):
            raise ValueError(f"checkpoint_segments must be true or false, got {self.checkpoint_segments!r}")
        if self.window is not None:
            _check_int("window", self.window, minimum=1, optional=True)
        _check_int("sink_tokens", self.sink_tokens, minimum=0)
        if self.store is not None and not isinstance(self.store, StoreConfig):
            raise ValueError(f"store must be a StoreConfig or None, got {type(self.store).__name__}")

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
        return _from_dict(cls, data, prefix="stack.")

    @staticmethod
    def _upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
        return upgrade_flat_compressive(data)


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


def parse_layers(spec: str, num_layers: int | None, name: str = "layers") -> list[int]:
    """Turn a layer selection string (``stack.compressive.layers``, ``stack.store.layers``) into
    layer indices.

    Args:
        spec: ``"all"``, ``"none"``, ``"every:K"`` or ``"i,j,..."``.
        num_layers: number of decoder layers, or None to check the syntax only.
        name: the field's name in error messages.

    Returns:
        Sorted layer indices (empty when ``num_layers`` is None and the spec needs it).

    Raises:
        ValueError: if the spec is malformed or names a layer that does not exist.
    """
    accepted = 'accepted: "all", "none", "every:K", or comma-separated indices like "0,2"'
    if not isinstance(spec, str):
        raise ValueError(f"{name} must be a string such as 'all' or '0,3', got {spec!r}")
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
            raise ValueError(f"bad {name} {spec!r}; {accepted}") from None
        if k < 1:
            raise ValueError(f"{name} every:K needs K >= 1, got {spec!r}")
        return list(range(0, n, k))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"bad {name} {spec!r}; {accepted}") from None
    if not layers:
        raise ValueError(f"{name} {spec!r} names no layer; {accepted}")
    if num_layers is not None:
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"{name} {spec!r}: layers {bad} do not exist (model has {num_layers})")
    return layers


@dataclass
class SleepConfig:
    """Layer 4, sleep: how the store's new records become a LoRA adapter (memory/sleep.py)."""

    objective: str = "lm"
    """``lm``: next-token loss on the records; ``distill``: KL from the stack with its memories on
    (teacher) to the adapted model with memories off (student) on the same tokens."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: str | None = None
    """Comma-separated module names LoRA adapts (``q_proj,v_proj``); None: peft's default for the
    model type, else the linear layers found inside the model's attention (memstack/discovery.py)."""
    steps: int = 100
    """Optimiser steps (ignored when ``epochs`` is set)."""
    epochs: float | None = None
    """Passes over the night's windows instead of ``steps`` (rounded up to whole steps)."""
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int | None = None
    """Tokens per training window; None: the stack's segment length."""
    replay_ratio: float = 0.0
    """Weight r of general-text replay: loss = (1 - r) * night + r * replay (needs replay data)."""
    kl_weight: float = 0.0
    """Weight of KL(base || adapted) on the replay batches, against forgetting."""
    rehearsal: float = 0.0
    """Fraction of earlier, already consolidated records trained on again with the night's."""
    distill_top_k: int = 64
    """``distill``: teacher log-probs kept per token (plus one bucket for the rest)."""
    merge: str = "none"
    """After the sleep: ``none`` (adapters stay separate, active together), ``cat`` (the active
    sleep adapters become one, their exact sum) or ``base`` (merged into the base weights)."""
    evict_consolidated: bool = False
    """Remove the consolidated records from the store (default: keep them, marked)."""
    seed: int = 0
    every_steps: int | None = None
    """Training runs (``scripts/train.py``): sleep every this many optimiser steps (None: never)."""
    every_records: int | None = None
    """Training runs: sleep once the day's store holds this many new records (None: never)."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "sleep")
        _check_choice("sleep.objective", self.objective, ("lm", "distill"))
        _check_int("sleep.rank", self.rank, minimum=1)
        for name in ("alpha", "lr"):
            _check_number(f"sleep.{name}", getattr(self, name), "a number > 0", lambda v: v > 0)
        for name in ("dropout", "replay_ratio", "rehearsal"):
            _check_number(f"sleep.{name}", getattr(self, name), "a number in [0, 1]", lambda v: 0 <= v <= 1)
        _check_number("sleep.kl_weight", self.kl_weight, "a number >= 0", lambda v: v >= 0)
        _check_int("sleep.steps", self.steps, minimum=0)
        if self.epochs is not None:
            _check_number("sleep.epochs", self.epochs, "a number > 0 or None", lambda v: v > 0)
        _check_int("sleep.batch_size", self.batch_size, minimum=1)
        if self.seq_len is not None:
            _check_int("sleep.seq_len", self.seq_len, minimum=2, optional=True)
        _check_int("sleep.distill_top_k", self.distill_top_k, minimum=1)
        _check_choice("sleep.merge", self.merge, ("none", "cat", "base"))
        if not isinstance(self.evict_consolidated, bool):
            raise ValueError(
                f"sleep.evict_consolidated must be true or false, got {self.evict_consolidated!r}"
            )
        if self.target_modules is not None and (
            not isinstance(self.target_modules, str) or not all(self.target_modules.split(","))
        ):
            raise ValueError(
                f"sleep.target_modules must be None or comma-separated module names such as "
                f"'q_proj,v_proj', got {self.target_modules!r}"
            )
        for name in ("every_steps", "every_records"):
            if getattr(self, name) is not None:
                _check_int(f"sleep.{name}", getattr(self, name), minimum=1, optional=True)
        _check_int("sleep.seed", self.seed, minimum=0)
