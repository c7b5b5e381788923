"""Configuration dataclasses.

Every field is documented where it is declared and validated in ``__post_init__``, so a bad value
fails when the config is built, not deep inside a forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import runpy
import types
import typing
from dataclasses import dataclass
from typing import Any

UPDATE_RULES = ("linear", "delta")


def _check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Reject non-ints (bools included: ``True`` is an int in Python) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        accepted = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


@dataclass
class StoreConfig:
    """Layer 3, the long-term store: every past chunk kept as it was, found again by attention keys.

    One store per stream (batch row) and store layer. See ``memstack/memory/longterm.py``.
    """

    layers: str = "every:2"
    """Decoder layers that write to and read from the store: same syntax as ``memory_layers``."""
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
    kv_dtype: str = "bfloat16"
    """dtype of the stored K/V (``bfloat16``, ``float16`` or ``float32``)."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "stack.store")
        parse_layers(self.layers, num_layers=None)
        _check_choice("stack.store.chunking", self.chunking, ("fixed", "surprise"))
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

    store: StoreConfig | None = None
    """Layer 3, the long-term store (None: off). ``stack.store=on`` on the command line switches
    it on with defaults, ``stack.store.top_k=8`` sets a field (and switches it on)."""

    def __post_init__(self) -> None:
        _check_int("segment_len", self.segment_len, minimum=1)
        if not isinstance(self.compressive, bool):
            raise ValueError(f"compressive must be true or false, got {self.compressive!r}")
        if not isinstance(self.memory_layers, str):
            raise ValueError(
                f"memory_layers must be a string such as 'all' or '0,3', got {self.memory_layers!r}"
            )
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)):
            raise ValueError(f"gate_init must be a finite number, got {self.gate_init!r}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init must be a finite number (a gate logit), got {self.gate_init!r}")
        if self.bptt_segments is not None:
            _check_int("bptt_segments", self.bptt_segments, minimum=1, optional=True)
        if not isinstance(self.checkpoint_segments, bool):
            raise ValueError(f"checkpoint_segments must be true or false, got {self.checkpoint_segments!r}")
        if self.window is not None:
            _check_int("window", self.window, minimum=1, optional=True)
        _check_int("sink_tokens", self.sink_tokens, minimum=0)
        parse_layers(self.memory_layers, num_layers=None)  # syntax check now, range check at wrap
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
        """Build from a dict (sections included), rejecting unknown keys with the valid ones."""
        return _from_dict(cls, data, prefix="stack.")


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


# ---------------------------------------------------------------------- training configs

TASKS = ("passkey", "text")
DTYPES = ("float32", "bfloat16", "float16")
FILLERS = ("synthetic", "text", "mix")


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def _check_number(name: str, value: Any, accepted: str, ok: typing.Callable[[float], bool]) -> None:
    """Reject non-numbers (bools included), NaN and infinities, and values ``ok`` refuses."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")


def _reject_bool_ints(obj: Any, section: str) -> None:
    """``True`` passes ``isinstance(x, int)``: refuse a bool wherever an int is declared."""
    for f in dataclasses.fields(obj):
        hint = typing.get_type_hints(type(obj))[f.name]
        value = getattr(obj, f.name)
        if isinstance(value, bool) and (hint is int or hint == int | None):
            raise ValueError(f"{section}.{f.name} must be an int, got {value!r}")


@dataclass
class ModelConfig:
    """Which causal LM to wrap."""

    path: str | None = None
    """A local checkpoint directory (or a hub id where the user has access) loaded with
    ``AutoModelForCausalLM.from_pretrained``. None: build a random model from the fields below
    with ``from_config`` (tiny configs; nothing is downloaded)."""
    arch: str = "llama"
    """``model_type`` for a model built from a config."""
    vocab_size: int = 256
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    """None: as many as query heads."""
    max_position_embeddings: int = 8192
    dtype: str = "float32"
    """Weights' dtype when loading a checkpoint: float32, bfloat16 or float16 (training on CUDA
    uses bf16 autocast either way)."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "model")
        _check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class DataConfig:
    """What the model is trained on."""

    task: str = "passkey"
    """``passkey`` (synthetic, see memstack.data.tasks) or ``text`` (a corpus at ``path``)."""
    path: str | None = None
    """Text corpus: a file, a directory or a hub dataset name (``task=text``)."""
    tokenizer: str = "bytes"
    """``bytes`` (built in) or a local tokenizer directory."""
    seq_len: int = 1024
    """Tokens per training sequence (the longest curriculum stage for passkey)."""
    curriculum: list[int] = dataclasses.field(default_factory=list)
    """Passkey: sequence lengths to train on in order, one stage per entry, each for
    ``curriculum_steps`` steps; the last stage (``seq_len``) runs to the end. Empty: no curriculum."""
    curriculum_steps: int = 100
    answer_weight: float = 5.0
    """Passkey: extra weight of the loss on the answer tokens (loss = LM + w * answer)."""
    copy_steps: int = 0
    """Passkey: first train this many steps on repeated random strings only (at the first
    curriculum length), so induction heads, the circuit a pass key is copied with, form before
    the task starts. The passkey curriculum starts after them."""
    repeat_fraction: float = 0.0
    """Passkey: share of each batch made of repeated random strings (pure copy signal that
    helps small models form induction heads; see memstack.train.batches)."""
    length_jitter: int = 0
    """Passkey: shorten each batch's prompts by a random 0..``length_jitter`` tokens (never below
    the shortest prompt the task can build). With ``stack.segment_len - 1`` the answer lands at
    every position of a segment, with the question in local context, instead of always opening
    a fresh segment (the hardest case, where the question too must come back from memory)."""
    instruction: bool = False
    """Passkey: open prompts with the papers' instruction sentence (costs ~170 bytes)."""
    filler: str = "synthetic"
    """Passkey: the text around the needle. ``synthetic`` (the papers' repeated sentences),
    ``text`` (passages of ``filler_path``'s train split, see memstack.data.tasks.filler_text) or
    ``mix`` (each row draws one of the two). A model trained on synthetic filler alone can learn
    the filler instead of retrieval."""
    filler_path: str | None = None
    """Passkey: text file of the ``text`` filler; None for the King James Bible shipped with memstack."""
    doc_separator: str | None = None
    """Text: regex that splits one big text file into documents (None: a file is a document)."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "data")
        _check_choice("data.task", self.task, TASKS)
        _check_int("data.seq_len", self.seq_len, minimum=1)
        _check_choice("data.filler", self.filler, FILLERS)


@dataclass
class OptimConfig:
    """AdamW with the stack's parameter groups."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    gate_lr_mult: float = 100.0
    """Gates learn this many times faster, with no weight decay (see MemoryStack.param_groups)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "optim")
        _check_number("optim.lr", self.lr, "a finite number > 0", lambda x: x > 0)
        _check_int("optim.grad_accum", self.grad_accum, minimum=1)
        betas = self.betas
        if (
            isinstance(betas, (str, bytes))
            or not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), such as 0.9,0.95; got {betas!r}")
        self.betas = tuple(betas)


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""

    max_steps: int = 1000
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        _check_int("schedule.max_steps", self.max_steps, minimum=1)
        _check_int("schedule.warmup_steps", self.warmup_steps, minimum=0)


@dataclass
class RunConfig:
    """Where and how a run happens."""

    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA if available), ``cpu`` or ``cuda``."""
    batch_size: int = 16
    log_every: int = 10
    ckpt_every: int = 200
    """Save a checkpoint every this many steps (0: only at the end)."""
    resume: bool = True
    """Continue from the latest checkpoint in ``out_dir`` if there is one."""

    def __post_init__(self) -> None:
        _reject_bool_ints(self, "run")
        _check_int("run.batch_size", self.batch_size, minimum=1)
        _check_int("run.log_every", self.log_every, minimum=1)
        _check_int("run.ckpt_every", self.ckpt_every, minimum=0)


@dataclass
class EvalConfig:
    """Evaluation after training (and by scripts/eval_*.py)."""

    passkey_lengths: list[int] = dataclasses.field(default_factory=lambda: [1024, 4096])
    passkey_depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_cell: int = 20
    """Pass keys per (length, depth) cell: 20 gives a 95% interval of about +-20 points at 50%."""
    filler: str = "synthetic"
    """Pass-key filler of the evaluation: ``synthetic``, ``text`` (the filler text's test split,
    never trained on) or ``both`` (one table each)."""
    memory_off: bool = True
    """Also evaluate the same weights with compressive memory switched off."""

    def __post_init__(self) -> None:
        _check_int("eval.samples_per_cell", self.samples_per_cell, minimum=1)
        _check_choice("eval.filler", self.filler, ("synthetic", "text", "both"))


@dataclass
class Config:
    """One training run: every section above. Built by a ``configs/*.py`` file."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    stack: StackConfig = dataclasses.field(default_factory=StackConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; unknown keys are errors."""
        return _from_dict(cls, data, prefix="")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys {[prefix + k for k in unknown]}; valid: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        sub = _section_type(cls, name)
        if sub is not None and value is not None:
            kwargs[name] = _from_dict(sub, value, prefix=f"{prefix}{name}.")
        elif isinstance(value, list) and name == "betas":
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass a field holds, for ``X`` and ``X | None`` fields (None for plain values)."""
    t = typing.get_type_hints(cls)[name]
    if dataclasses.is_dataclass(t):
        return t
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return None


def valid_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config dataclass, e.g. ``optim.lr``; an optional section
    (``stack.store``) is a key itself (set it to ``none`` or ``on``) and so are its fields, even
    while it is None."""
    cls = config if isinstance(config, type) else type(config)
    keys = []
    for f in dataclasses.fields(cls):
        sub = _section_type(cls, f.name)
        if sub is None:
            keys.append(prefix + f.name)
            continue
        if sub is not typing.get_type_hints(cls)[f.name]:  # optional section
            keys.append(prefix + f.name)
        keys += valid_keys(sub, prefix + f.name + ".")
    return keys


def unknown_key_message(key: str, keys: list[str]) -> str:
    """Say that ``key`` is unknown and what was probably meant.

    The closest valid keys when some are close (``did you mean stack.segment_len?``); otherwise
    the keys of the same section, or the sections when even the section is unknown.
    """
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        # a near-exact match (a typo) should not come with two far-fetched alternatives
        ratio = [difflib.SequenceMatcher(None, key, k).ratio() for k in close]
        close = [k for k, r in zip(close, ratio, strict=True) if r >= ratio[0] - 0.05]
        return f"unknown config key {key!r}; did you mean {' or '.join(close)}?"
    section = key.split(".", 1)[0] + "."
    same_section = [k for k in keys if k.startswith(section)]
    if same_section:
        return f"unknown config key {key!r}; valid {section[:-1]} keys: {', '.join(same_section)}"
    sections = sorted({k.split(".", 1)[0] for k in keys})
    return f"unknown config key {key!r}; keys start with a section: {', '.join(sections)}"


def _parse_value(raw: str, type_hint: Any, key: str) -> Any:
    """Parse a command-line string into ``type_hint`` (int, float, bool, str, lists, Optional)."""
    origin, args = typing.get_origin(type_hint), typing.get_args(type_hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(raw, inner[0], key)
    if origin in (list, tuple):
        items = [x for x in raw.strip("[]()").split(",") if x.strip()]
        elem = args[0] if args else str
        parsed = [_parse_value(x.strip(), elem, key) for x in items]
        return tuple(parsed) if origin is tuple else parsed
    if type_hint is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}: expected a bool (true/false), got {raw!r}")
    if type_hint in (int, float):
        try:
            return type_hint(raw)
        except ValueError:
            raise ValueError(f"{key}: expected {type_hint.__name__}, got {raw!r}") from None
    return raw


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE ...`` on an evaluation script: overrides for a run's saved config
    (parsed by :func:`apply_overrides`), e.g. ``--set stack.segment_len=2048``."""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's saved config first (e.g. stack.segment_len=2048)",
    )


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=value`` overrides, each parsed to the field's declared type.

    Raises:
        ValueError: for a malformed override, an unknown key (the message names the closest ones)
            or a value that does not parse as the field's type.
    """
    data = config.to_dict()
    keys = valid_keys(config)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key not in keys:
            raise ValueError(unknown_key_message(key, keys))
        *path, leaf = key.split(".")
        owner: type = Config
        node = data
        for part in path:
            section = _section_type(owner, part)
            if node.get(part) is None:  # setting a field of an optional section switches it on
                node[part] = dataclasses.asdict(section())
            owner, node = section, node[part]
        section = _section_type(owner, leaf)
        if section is not None:  # an optional section itself: none/off or on/default
            if raw.lower() in ("none", "null", "off", "false"):
                node[leaf] = None
            elif raw.lower() in ("on", "default", "true"):
                node[leaf] = node.get(leaf) or dataclasses.asdict(section())
            else:
                raise ValueError(f"{key}: expected none/off or on, got {raw!r}")
            continue
        hint = typing.get_type_hints(owner)[leaf]
        node[leaf] = _parse_value(raw, hint, key)
    return Config.from_dict(data)


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Run a ``configs/*.py`` file (plain Python that builds ``config``) and apply overrides."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} not found")
    namespace = runpy.run_path(path)
    config = namespace.get("config")
    if not isinstance(config, Config):
        raise ValueError(f"{path} must define `config = Config(...)`, got {type(config).__name__}")
    return apply_overrides(config, overrides or [])
