"""MemoryStack: the memory layers composed around an already loaded causal LM.

This is the only module that knows all the layers. It cuts long inputs into segments, runs the
wrapped model on each with a :class:`~memstack.attention.SegmentContext`, carries the memory state
from segment to segment, and computes the loss over all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .attention import ATTENTION_NAME, SegmentContext
from .config import StackConfig, parse_layers
from .families import attention_modules, family_of, rotary_module
from .io import atomic_directory, read_manifest
from .memory.compressive import CompressiveMemory, CompressiveState, init_state

CONFIG_FILE = "memstack_config.json"
WEIGHTS_FILE = "memstack_memory.safetensors"
STATE_FORMAT = "memstack-state"
FORMAT_VERSION = 1


@dataclass
class StackState:
    """The per-stream memory of a whole stack: constant size, however long the stream.

    ``compressive`` maps a layer index to that layer's :class:`CompressiveState`; ``segments``
    counts the segments written so far (it drives the ``bptt_segments`` cut).
    """

    compressive: dict[int, CompressiveState] = field(default_factory=dict)
    segments: int = 0

    def detach(self) -> StackState:
        """Same memory, cut from the autograd graph."""
        return StackState({k: v.detach() for k, v in self.compressive.items()}, self.segments)

    def to(self, device: torch.device | str) -> StackState:
        """Move every tensor to ``device``."""
        return StackState({k: v.to(device) for k, v in self.compressive.items()}, self.segments)

    def num_bytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for s in self.compressive.values() for t in s)

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to one safetensors file (atomically: temp file, then rename)."""
        path = Path(path)
        tensors = {}
        for layer, s in self.compressive.items():
            tensors[f"compressive.{layer}.M"] = s.M.detach().contiguous().cpu()
            tensors[f"compressive.{layer}.z"] = s.z.detach().contiguous().cpu()
        meta = {"format": STATE_FORMAT, "version": str(FORMAT_VERSION), "segments": str(self.segments)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:  # on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> StackState:
        """Read a state written by :meth:`save`, checking its format."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path} is not a memstack state file (format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        layers = sorted({int(k.split(".")[1]) for k in tensors})
        missing = [
            f"compressive.{i}.{n}"
            for i in layers
            for n in ("M", "z")
            if f"compressive.{i}.{n}" not in tensors
        ]
        if missing:
            raise ValueError(f"{path} is an incomplete memstack state: missing {missing}")
        state = {
            layer: CompressiveState(tensors[f"compressive.{layer}.M"], tensors[f"compressive.{layer}.z"])
            for layer in layers
        }
        return cls(state, int(meta.get("segments", 0)))


@dataclass
class StackOutput:
    """What :meth:`MemoryStack.forward` returns."""

    loss: torch.Tensor | None
    """Mean next-token loss over every predicted token of every segment (None without labels)."""
    logits: torch.Tensor | None
    """``(B, L, V)``, or None with ``return_logits=False``."""
    state: StackState
    """Memory after the last segment."""
    num_tokens: int
    """How many tokens the loss averages over."""


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Position t's target is ``labels[t+1]``; -100 where either position is padding or at the end.

    Shifting once over the whole input (not per segment) means the last token of a segment
    predicts the first token of the next one, as in the unwrapped model.
    """
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        pad = attention_mask == 0
        targets[pad] = -100
        targets[:, :-1][pad[:, 1:]] = -100
    return targets


class MemoryStack(nn.Module):
    """Memory layers around a Hugging Face causal LM.

    Args:
        model: an already loaded ``*ForCausalLM`` whose family is in
            :data:`memstack.families.FAMILIES`. It is modified in place: its attention
            implementation becomes memstack's and its attention modules get a
            ``memstack_memory`` submodule (the gates) on the memory layers.
        config: the stack's configuration (defaults: :class:`StackConfig`).

    Raises:
        UnsupportedModelError: if the model's attention does not go through the registry.
    """

    def __init__(self, model: nn.Module, config: StackConfig | None = None):
        super().__init__()
        self.config = config if config is not None else StackConfig()
        self.family = family_of(model)
        self.model = model
        attn = attention_modules(model, self.family)
        if any(hasattr(m, "memstack_memory") for m in attn):
            raise ValueError("this model is already wrapped by a MemoryStack; load a fresh copy")
        self.memory_layers = (
            parse_layers(self.config.memory_layers, len(attn)) if self.config.compressive else []
        )
        num_heads = model.config.num_attention_heads
        device = next(model.parameters()).device
        self._memories: dict[int, CompressiveMemory] = {}
        for layer in self.memory_layers:
            memory = CompressiveMemory(num_heads, self.config.gate_init, self.config.update_rule).to(device)
            attn[layer].memstack_memory = memory  # registered as a submodule of the model
            self._memories[layer] = memory
        self._rotary = rotary_module(model, self.family)
        model.set_attn_implementation(ATTENTION_NAME)
        self.state: StackState | None = None
        """The stream's memory, used by :meth:`step` (and by :meth:`generate` when asked)."""
        self.use_memory = True
        """False: the same weights with compressive memory neither read nor written, i.e. each
        segment alone (see :meth:`memory_off`)."""

    @contextlib.contextmanager
    def memory_enabled(self, enabled: bool = True) -> Iterator[MemoryStack]:
        """Inside a ``with`` block, read and write compressive memory or not (then restore)."""
        previous, self.use_memory = self.use_memory, enabled
        try:
            yield self
        finally:
            self.use_memory = previous

    def memory_off(self) -> contextlib.AbstractContextManager[MemoryStack]:
        """Run the same weights without compressive memory inside a ``with`` block, to measure
        what memory contributes."""
        return self.memory_enabled(False)

    # ------------------------------------------------------------------ segments

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _positions(self, start: int, length: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Position ids ``(1, T)`` and the model's own cos/sin at those positions."""
        pos = torch.arange(start, start + length, device=self.device)[None]
        if self._rotary is None:
            return pos, None
        with torch.autocast(device_type=self.device.type, enabled=False):
            cos, sin = self._rotary(torch.empty(0, dtype=torch.float32, device=self.device), pos)
        return pos, (cos, sin)

    def _segment(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        targets: torch.Tensor | None,
        state: StackState,
        keep_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, StackState]:
        """Run one segment: read memory, attend locally, write memory. Returns (loss sum, logits, state)."""
        layers = sorted(state.compressive)
        flat = [t for layer in layers for t in state.compressive[layer]]
        pos, rotary = self._positions(0, ids.shape[1])
        has_padding = mask is not None and not bool(mask.all())
        out_layers: list[int] = []

        def run(*flat_state: torch.Tensor):
            states = {
                layer: CompressiveState(*flat_state[2 * i : 2 * i + 2]) for i, layer in enumerate(layers)
            }
            ctx = SegmentContext(
                self.config,
                states,
                valid=mask.bool() if has_padding else None,
                rotary=rotary,
                use_memory=self.use_memory,
            )
            logits = self.model(
                input_ids=ids,
                attention_mask=mask if has_padding else None,
                position_ids=pos,
                use_cache=False,
                memstack=ctx,
            ).logits
            loss_sum = logits.new_zeros((), dtype=torch.float32)
            if targets is not None:
                loss_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
                )
            out_layers[:] = sorted(ctx.new_states)
            new_flat = [t for layer in out_layers for t in ctx.new_states[layer]]
            return (loss_sum, logits if keep_logits else None, *new_flat)

        if self.config.checkpoint_segments and torch.is_grad_enabled():
            loss_sum, logits, *new_flat = checkpoint(run, *flat, use_reentrant=False)
        else:
            loss_sum, logits, *new_flat = run(*flat)
        new_states = dict(state.compressive)
        for i, layer in enumerate(out_layers):
            new_states[layer] = CompressiveState(new_flat[2 * i], new_flat[2 * i + 1])
        return loss_sum, logits, StackState(new_states, state.segments + 1)

    def _maybe_cut(self, state: StackState) -> StackState:
        """Truncated BPTT: detach at every multiple of ``bptt_segments``."""
        bptt = self.config.bptt_segments
        if bptt is not None and state.segments > 0 and state.segments % bptt == 0:
            return state.detach()
        return state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        state: StackState | None = None,
        return_logits: bool = True,
    ) -> StackOutput:
        """Run an input of any length segment by segment.

        Starts from ``state`` (default: empty memory, so every call is independent of the last;
        :meth:`step` is the streaming interface) and returns the memory after the input.

        Args:
            input_ids: ``(B, L)`` token ids, any L.
            attention_mask: ``(B, L)`` 1 for tokens, 0 for padding (left or right). Padded positions
                are never written into memory and never counted in the loss.
            labels: ``(B, L)`` usually ``input_ids``; -100 is ignored. Shifted inside.
            state: memory to start from.
            return_logits: False keeps no logits (a million tokens of logits do not fit anywhere).

        Returns:
            :class:`StackOutput`.
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}"
                )
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        targets = next_token_targets(labels.to(device), attention_mask) if labels is not None else None
        state = state if state is not None else StackState()
        if state.compressive and next(iter(state.compressive.values())).M.shape[0] != input_ids.shape[0]:
            raise ValueError(
                "state batch size differs from input_ids'; call reset() or pass a matching state"
            )

        seg = self.config.segment_len
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        all_logits = []
        for start in range(0, input_ids.shape[1], seg):
            end = start + seg
            state = self._maybe_cut(state)
            seg_loss, logits, state = self._segment(
                input_ids[:, start:end],
                attention_mask[:, start:end] if attention_mask is not None else None,
                targets[:, start:end] if targets is not None else None,
                state,
                keep_logits=return_logits,
            )
            loss_sum = loss_sum + seg_loss
            if return_logits:
                all_logits.append(logits)
        loss, count = None, 0
        if targets is not None:
            count = int((targets != -100).sum())
            loss = loss_sum / max(count, 1)
        logits = torch.cat(all_logits, dim=1) if return_logits else None
        return StackOutput(loss, logits, state, count)

    # ------------------------------------------------------------------ streams

    def reset(self) -> None:
        """Forget the stream's memory (start a new stream)."""
        self.state = None

    def step(
        self,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> StackOutput:
        """Process one segment of a stream, reading and then updating :attr:`state`.

        Args:
            segment_ids: ``(B, T)`` with ``T <= segment_len``; each call is one segment.
        """
        if segment_ids.shape[-1] > self.config.segment_len:
            raise ValueError(
                f"step() takes at most segment_len={self.config.segment_len} tokens, got "
                f"{segment_ids.shape[-1]}; use stack(input_ids) for longer inputs"
            )
        out = self.forward(segment_ids, attention_mask, labels, state=self.state)
        self.state = out.state
        return out

    def write_pending(self, state: StackState, pending: dict[int, list]) -> StackState:
        """Close a segment decoded token by token: write its buffered keys/values into memory."""
        new = dict(state.compressive)
        for layer, parts in pending.items():
            key = torch.cat([k for k, _ in parts], dim=2)
            value = torch.cat([v for _, v in parts], dim=2)
            old = new.get(layer)
            if old is None:
                old = init_state(key.shape[0], key.shape[1], key.shape[-1], value.shape[-1], key.device)
            new[layer] = self._memories[layer].write(old, key, value, None)
        return StackState(new, state.segments + 1)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        state: StackState | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt_ids`` (greedy, or sampling with temperature / top-k / top-p).

        The prompt is cut into segments exactly as :meth:`forward` would cut it. Inside a segment
        a KV cache serves local attention while memory is only read; when a segment fills, its
        keys and values go into compressive memory and the cache starts over. So each token is
        what ``forward`` on the whole sequence would predict at that position.

        Args:
            prompt_ids: ``(B, P)`` unpadded prompts (rows of equal length), P >= 1.
            state: memory to start from (e.g. ``stack.state`` after :meth:`step` calls); default
                empty. The stream state :attr:`state` is not changed.
            generator: for reproducible sampling.

        Returns:
            ``(B, P + n)`` prompt and continuation, n <= max_new_tokens (stops early once every
            row has produced ``eos_token_id``).
        """
        if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
            raise ValueError(f"prompt_ids must be (batch, length>=1), got {tuple(prompt_ids.shape)}")
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k is not None:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None:
                warpers.append(TopPLogitsWarper(top_p))
        ids = prompt_ids.to(self.device)
        seg = self.config.segment_len
        state = state if state is not None else StackState()
        n_closed = (ids.shape[1] // seg) * seg
        logits = None
        if n_closed:
            # Only the last closed segment's logits can be needed: a million-token prompt's
            # logits would not fit in memory.
            if n_closed > seg:
                state = self.forward(ids[:, : n_closed - seg], state=state, return_logits=False).state
            out = self.forward(ids[:, n_closed - seg : n_closed], state=state)
            state, logits = out.state, out.logits[:, -1]
        # The open segment: prefill its tokens into a fresh cache, memory read-only.
        cache, pending, fill = DynamicCache(), {}, ids.shape[1] - n_closed
        if fill:
            logits = self._decode(ids[:, n_closed:], 0, cache, state, pending)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            scores = logits.float()
            if do_sample:
                probs = torch.softmax(warpers(ids, scores), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            if eos_token_id is not None:
                token = torch.where(finished[:, None], eos_token_id, token)
                finished |= token[:, 0] == eos_token_id
            ids = torch.cat([ids, token], dim=1)
            if i == max_new_tokens - 1 or bool(finished.all()):
                break
            logits = self._decode(token, fill, cache, state, pending)
            fill += 1
            if fill == seg:
                state = self.write_pending(state, pending)
                cache, pending, fill = DynamicCache(), {}, 0
        return ids

    def _decode(
        self, ids: torch.Tensor, start: int, cache: DynamicCache, state: StackState, pending: dict
    ) -> torch.Tensor:
        """Feed tokens at segment positions ``start..`` through the cache; return the last logits."""
        pos, rotary = self._positions(start, ids.shape[1])
        ctx = SegmentContext(
            self.config,
            state.compressive,
            rotary=rotary,
            write=False,
            pending=pending,
            use_memory=self.use_memory,
        )
        out = self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, memstack=ctx)
        return out.logits[:, -1]

    @torch.no_grad()
    def position_free_qk(self, segment_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Queries and keys as memory sees them (rotary rotation undone), for one segment.

        Args:
            segment_ids: ``(B, T)``, ``T <= segment_len``, read with empty memory.

        Returns:
            ``{layer: (query (B, H, T, D), key (B, H_kv, T, D))}`` for every memory layer, float32.
        """
        pos, rotary = self._positions(0, segment_ids.shape[1])
        capture: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        ctx = SegmentContext(self.config, {}, rotary=rotary, capture=capture)
        self.model(input_ids=segment_ids.to(self.device), position_ids=pos, use_cache=False, memstack=ctx)
        return capture

    # ------------------------------------------------------------------ training helpers

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-head gate logits beta of every memory layer."""
        return [self._memories[layer].gate for layer in self.memory_layers]

    def gate_values(self) -> dict[int, torch.Tensor]:
        """sigmoid(beta) per layer and head: the share of each head's output that comes from memory."""
        return {
            layer: torch.sigmoid(self._memories[layer].gate.detach().float()).cpu()
            for layer in self.memory_layers
        }

    def param_groups(self, lr: float, weight_decay: float = 0.0, gate_lr_mult: float = 100.0) -> list[dict]:
        """Optimizer parameter groups: gates apart, with their own learning rate and no decay.

        With a normal learning rate the gates barely move (about 0.03 over a whole run in public
        reproductions, every head stuck at 0.5), hence the multiplier. Matrices get weight decay;
        biases, norms and gates do not. Frozen parameters (``requires_grad=False``) are left out.

        Returns:
            Groups for ``torch.optim.AdamW``; each has a ``name`` ("decay", "no_decay", "gates").
        """
        gate_ids = {id(p) for p in self.gate_parameters()}
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in gate_ids:
                (decay if p.ndim >= 2 else no_decay).append(p)
        gates = [p for p in self.gate_parameters() if p.requires_grad]
        groups = [
            {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
            {"name": "gates", "params": gates, "lr": lr * gate_lr_mult, "weight_decay": 0.0},
        ]
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the stack's config and memory parameters (not the base model) atomically.

        Writes ``memstack_config.json`` and ``memstack_memory.safetensors`` into ``path``.
        """
        manifest = {
            "format": "memstack",
            "version": FORMAT_VERSION,
            "model_type": self.model.config.model_type,
            "num_heads": self.model.config.num_attention_heads,
            "stack": self.config.to_dict(),
        }
        tensors = {
            f"layers.{layer}.gate": self._memories[layer].gate.detach().cpu().contiguous()
            for layer in self.memory_layers
        }
        with atomic_directory(path) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            save_file(tensors, str(tmp / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model: nn.Module) -> MemoryStack:
        """Wrap ``model`` with the config and memory parameters saved in ``path``.

        Raises:
            ValueError: if the saved stack belongs to another model type or its tensors do not fit.
        """
        path = Path(path)
        manifest = read_manifest(path / CONFIG_FILE, "memstack", FORMAT_VERSION)
        if manifest["model_type"] != model.config.model_type:
            raise ValueError(
                f"{path} was saved for model_type {manifest['model_type']!r}, not {model.config.model_type!r}"
            )
        stack = cls(model, StackConfig.from_dict(manifest["stack"]))
        tensors = load_file(str(path / WEIGHTS_FILE))
        expected = {f"layers.{layer}.gate" for layer in stack.memory_layers}
        if set(tensors) != expected:
            raise ValueError(f"{path}: expected tensors {sorted(expected)}, found {sorted(tensors)}")
        with torch.no_grad():
            for layer in stack.memory_layers:
                gate, saved = stack._memories[layer].gate, tensors[f"layers.{layer}.gate"]
                if saved.shape != gate.shape:
                    raise ValueError(
                        f"{path}: gate of layer {layer} has shape {tuple(saved.shape)}, "
                        f"the model needs {tuple(gate.shape)}"
                    )
                gate.copy_(saved)
        return stack
