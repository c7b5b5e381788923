"""MemoryStack: the memory layers composed around an already loaded causal LM.

One class. It builds the registered memory kinds its config switches on
(:data:`memstack.memory.base.KINDS`), cuts long inputs into segments, runs the wrapped model on
each with a :class:`~memstack.attention.SegmentContext`, and closes each segment through one path,
:meth:`MemoryStack._close_segment`, shared by ``forward``, ``step`` and ``generate``:
differentiable kinds are committed inside the (possibly checkpointed) segment, the others exactly
once outside it. Files are :mod:`memstack.saving`'s; sleep (layer 4) runs above the stack
(:func:`memstack.sleep.sleep`) and the stack does not import it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Cache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import ModelOutput

from memstack.attention import ATTENTION_NAME, SegmentContext, SegmentInputs
from memstack.config import StackConfig
from memstack.explain import Explanation, explain
from memstack.losses import next_token_targets, token_nll
from memstack.memory.adapters import PREFIX as SLEEP_PREFIX
from memstack.memory.adapters import Adapters
from memstack.memory.base import KINDS, BuildContext, ClosedSegment, LayerRecord, MemoryKind
from memstack.memory.mixer import MemoryMixer
from memstack.memory.store.policy import mean_entropy
from memstack.model.discovery import Architecture, discover
from memstack.saving import gate_name, load_stream, read_stack, save_stream, write_adapters, write_stack
from memstack.state import StackState


def build_kinds(config: StackConfig, arch: Architecture) -> dict[str, MemoryKind]:
    """The memory kinds ``config`` switches on, built for the model ``arch`` describes, by name in
    mixing order (the registration order of :data:`~memstack.memory.base.KINDS`)."""
    ctx = BuildContext(arch.num_layers, tuple(arch.layers), arch.model_type, config.segment_len)
    kinds = {}
    for name, spec in KINDS.items():
        section = config.section(name)
        if section is not None:
            kinds[name] = spec.kind.build(section, ctx)
    return kinds


@dataclass
class StackOutput(ModelOutput):
    """What :meth:`MemoryStack.forward` returns: a transformers ``ModelOutput``, so attribute, key
    and index access all work (``out.loss``, ``out["loss"]``, ``out[0]``; None fields are left
    out of the index and key views, as in transformers) and ``transformers.Trainer`` trains a
    :class:`MemoryStack` as it is."""

    loss: torch.Tensor | None = None
    """Mean next-token loss over every predicted token of every segment (None without labels)."""
    logits: torch.Tensor | None = None
    """``(B, L, V)``, or None with ``return_logits=False``."""
    state: StackState | None = None
    """Memory after the last segment."""
    num_tokens: int | None = None
    """How many tokens the loss averages over (0 without labels)."""
    segment_loss: torch.Tensor | None = None
    """``(S,)`` float32, detached: the mean loss of each segment's predicted tokens, in segment
    order (NaN for a segment with none); how loss falls with the memory behind it. None without
    labels."""


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2-sharded DTensor (the tensor itself otherwise)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class _OpenSegment:
    """A segment being decoded token by token: its KV cache, what its layers recorded, the read
    scratch, and the tokens readout's prefix (``offset`` tokens, ``mask`` over the cache)."""

    cache: Cache | None = None
    """None until the first call: the model builds the cache its layers need (hybrid models'
    recurrent states, sparse attention's indexer keys), as in its own ``generate``."""
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    offset: int = 0
    mask: torch.Tensor | None = None
    unread: frozenset[str] = frozenset()
    """Kinds whose retrieval policy skips this segment."""
    last_logits: torch.Tensor | None = None
    """``(B, V)`` at the prefix's last token (what ``close_prompt`` answers from)."""


class MemoryStack(nn.Module):
    """Memory layers around a Hugging Face causal LM.

    Args:
        model: an already loaded ``*ForCausalLM`` whose attention goes through transformers'
            ``AttentionInterface`` (:func:`memstack.model.discovery.discover` finds its attention
            layers, shapes and rotary layout by probing it). It is modified in place: its attention
            implementation becomes memstack's and its attention modules get a
            ``memstack_memory`` submodule (the gates) on the memory layers.
        config: the stack's configuration (defaults: :class:`StackConfig`).

    Raises:
        UnsupportedModelError: with the reason, if the model cannot be wrapped.
    """

    def __init__(self, model: nn.Module, config: StackConfig | None = None):
        super().__init__()
        self.config = config if config is not None else StackConfig()
        self.arch: Architecture = discover(model)
        """The model's attention layers, shapes and rotary layout, found by probing it."""
        self.model = model
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        )
        """transformers renamed the KV cache's argument and output field ``past_key_values`` to
        ``cache`` after 5.17: decoding passes and reads whichever this model's forward takes."""
        sites = self.arch.sites
        if any(hasattr(s.module, "memstack_memory") for s in sites.values()):
            raise ValueError("this model is already wrapped by a MemoryStack; load a fresh copy")
        self.kinds: dict[str, MemoryKind] = build_kinds(self.config, self.arch)
        """The memory kinds in use, by name, in mixing order."""
        gates: dict[int, dict[str, float]] = {}
        for name, kind in self.kinds.items():
            for layer in sorted(kind.layers):
                entry = gates.setdefault(layer, {})
                if kind.gate_init is not None:
                    entry[name] = kind.gate_init
        device = next(model.parameters()).device
        self._mixers: dict[int, MemoryMixer] = {}
        for layer, kinds in sorted(gates.items()):
            mixer = MemoryMixer(sites[layer].heads, kinds).to(device)
            sites[layer].module.memstack_memory = mixer  # registered as a submodule of the model
            self._mixers[layer] = mixer
        for layer, site in sites.items():
            site.module.memstack_layer = layer  # the number memory keys its state by
        self._rotary = self.arch.rotary_tables()
        self._previous_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        self.state: StackState | None = None
        """The stream's memory, used by :meth:`step` (and by :meth:`generate` when asked)."""
        self.disabled: frozenset[str] = frozenset()
        """Kinds switched off for now (see :meth:`memory_off`): neither read nor written."""
        self.consulted: list[int] = []
        """Stream segments (0-based) that read the store, since the stream began (memstack/policy.py)."""
        self.adapters = Adapters(model)
        """Layer 4: the LoRA adapters sleep trained (``sleep-0001``, ...), on ``model`` in place."""
        self._trace: dict | None = None
        """While :meth:`explain` runs: where reads record what they found (memstack/explain.py)."""

    def sleep(self, *args: Any, **kwargs: Any) -> Any:
        """Moved: sleep runs above the stack, ``memstack.sleep.sleep(stack, config, ...)``."""
        raise AttributeError(
            "stack.sleep(...) is now a function above the stack: "
            "from memstack.sleep import sleep; report = sleep(stack, config, ...)"
        )

    def describe(self) -> str:
        """One line per memory layer: what this stack holds around which model."""
        cfg = self.config
        lines = [f"{type(self.model).__name__} ({self.arch.summary()}), segments of {cfg.segment_len} tokens"]
        window = f"window {cfg.window}" if cfg.window else "the whole segment"
        lines.append(f"  1. working memory: causal attention over {window}")
        lines += [f"  {kind.describe()}" for kind in self.kinds.values()]
        names = [n for n in self.adapters.names() if n.startswith(SLEEP_PREFIX)]
        active = [n for n in self.adapters.active() if n.startswith(SLEEP_PREFIX)]
        slept = (
            f"adapters {', '.join(names)} (active: {', '.join(active) or 'none'})" if names else "none yet"
        )
        lines.append(f"  4. sleep (LoRA adapters from the store, memstack.sleep.sleep(stack)): {slept}")
        others = [n for n in self.adapters.names() if not n.startswith(SLEEP_PREFIX)]
        if others:  # Config.lora's fine-tuning adapter, or a user's own
            lines.append(f"  +  other LoRA adapters on the model: {', '.join(others)}")
        return "\n".join(lines)

    @property
    def memory_layers(self) -> list[int]:
        """Layers with compressive memory."""
        kind = self.kinds.get("compressive")
        return sorted(kind.layers) if kind is not None else []

    def _needs_surprise(self) -> bool:
        return any(k.needs_surprise for k in self._active_kinds().values())

    def unwrap(self) -> nn.Module:
        """Give the model back as it was before wrapping: memory modules removed, its previous
        attention implementation restored. The stack is unusable afterwards."""
        for layer in self._mixers:
            del self.arch.sites[layer].module.memstack_memory
        for site in self.arch.sites.values():
            del site.module.memstack_layer
        self._mixers, self.kinds = {}, {}
        self.model.set_attn_implementation(self._previous_attn)
        return self.model

    # ------------------------------------------------------------------ segments

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _positions(self, first: int, length: int) -> torch.Tensor | None:
        """Position ids ``(1, T)`` from ``first``, for rotary models; None otherwise, so that a model
        with learned positions numbers them its own way (RoBERTa starts after its padding index)."""
        if not self._rotary.sources or all(s is None for s in self._rotary.sources.values()):
            return None
        return torch.arange(first, first + length, device=self.device)[None]

    def _inputs(
        self,
        state: StackState,
        first: int = 0,
        start: int = 0,
        valid: torch.Tensor | None = None,
        scratch: dict | None = None,
        unread: frozenset[str] = frozenset(),
    ) -> SegmentInputs:
        return SegmentInputs(
            self.config,
            self._active_kinds(),
            state.memories,
            self._rotary,
            first=first,
            start=start,
            valid=valid,
            unread=unread,
            trace=self._trace,
            segment=state.segments,
            scratch=scratch if scratch is not None else {},
        )

    def _close_segment(
        self,
        state: StackState,
        records: dict[int, list[LayerRecord]],
        ids: torch.Tensor,
        valid: torch.Tensor | None,
        differentiable: bool,
        nll: torch.Tensor | None = None,
    ) -> StackState:
        """Write one closed segment into every active kind of the given differentiability.

        The one write path: ``forward`` calls it inside the (possibly checkpointed) segment for
        differentiable kinds and outside it, exactly once, for the others; ``generate`` calls it
        when a decoded segment fills.
        """
        segment = ClosedSegment(ids, valid, state.segments, self.config.segment_len, None, nll)
        memories = dict(state.memories)
        for name, kind in self._active_kinds().items():
            if kind.differentiable != differentiable:
                continue
            layers = dict(memories.get(name, {}))
            for layer in sorted(kind.layers & set(records)):
                record = LayerRecord.cat(records[layer])
                old = layers.get(layer)
                at_layer = segment._replace(rotate=self._rotary.rotate_fn(layer))
                layers[layer] = kind.write(kind.empty(record) if old is None else old, record, at_layer)
            memories[name] = layers
        return StackState(memories, state.segments)

    def _segment(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        targets: torch.Tensor | None,
        state: StackState,
        keep_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, StackState]:
        """Run one segment: read memory, attend locally, write memory. Returns (loss sum, logits, state)."""
        names, flat = state.flatten()
        seg_ids, seg_mask = ids, mask
        unread = self._unread(state, ids, mask)
        prefix_len, prefix = 0, self._prefix(state, ids.shape[0], unread)
        if prefix is not None:  # the tokens readout: retrieved chunks' token ids before the segment
            prefix_ids, prefix_valid = prefix
            prefix_len = prefix_ids.shape[1]
            ids = torch.cat([prefix_ids, seg_ids], dim=1)
            ones = torch.ones_like(seg_ids, dtype=torch.long)
            mask = torch.cat([prefix_valid.long(), seg_mask if seg_mask is not None else ones], dim=1)
        pos = self._positions(0, ids.shape[1])
        has_padding = mask is not None and not bool(mask.all())
        seg_valid = seg_mask.bool() if seg_mask is not None and not bool(seg_mask.all()) else None
        out_names: list = []
        first_records: dict[int, list[LayerRecord]] = {}
        scratch: dict = {}  # outside run(): a checkpoint re-run reads what the forward read
        surprise: list[torch.Tensor] = []

        def run(*flat_state: torch.Tensor):
            before = StackState({**state.others(), **StackState.unflatten(names, flat_state)}, state.segments)
            valid = mask.bool() if has_padding else None
            ctx = SegmentContext(self._inputs(before, 0, 0, valid, scratch, unread))
            logits = self.model(
                input_ids=ids,
                attention_mask=mask if has_padding else None,
                position_ids=pos,
                use_cache=False,
                memstack=ctx,
            ).logits[:, prefix_len:]
            records = {
                layer: [LayerRecord.cat(parts).sliced(prefix_len)] for layer, parts in ctx.records.items()
            }
            loss_sum = logits.new_zeros((), dtype=torch.float32)
            if targets is not None:
                loss_sum = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
                )
            if not first_records:  # activation checkpointing re-runs this function in backward
                first_records.update(records)
                if self._needs_surprise():
                    surprise.append(token_nll(logits.detach(), seg_ids))
            after = self._close_segment(before, records, seg_ids, seg_valid, differentiable=True)
            new_names, new_flat = after.flatten()
            out_names[:] = new_names
            return (loss_sum, logits if keep_logits else None, *new_flat)

        if self.config.checkpoint_segments and torch.is_grad_enabled():
            loss_sum, logits, *new_flat = checkpoint(run, *flat, use_reentrant=False)
        else:
            loss_sum, logits, *new_flat = run(*flat)
        after = StackState({**state.others(), **StackState.unflatten(out_names, new_flat)}, state.segments)
        nll = surprise[0] if surprise else None
        after = self._close_segment(after, first_records, seg_ids, seg_valid, differentiable=False, nll=nll)
        return loss_sum, logits, StackState(after.memories, state.segments + 1)

    def _prefix(self, state: StackState, batch: int, unread: frozenset = frozenset()) -> tuple | None:
        """Token ids (left-padded) and validity ``(B, P)`` the kinds put before the next segment,
        or None: every kind's :meth:`~MemoryKind.opening`, then every kind's
        :meth:`~MemoryKind.prefix` (kinds with ``prefix_last`` last), side by side."""
        parts = []
        kinds = sorted(self._active_kinds().items(), key=lambda item: item[1].prefix_last)  # stable
        for hook in ("opening", "prefix"):
            for name, kind in kinds:
                layers = state.memories.get(name)
                if name not in unread and layers:
                    found = getattr(kind, hook)(layers)
                    if found is not None:
                        parts.append(found)
        if not parts:
            return None
        ids = torch.cat([p[0].cpu() for p in parts], dim=1)
        valid = torch.cat([p[1].cpu().bool() for p in parts], dim=1)
        if len(parts) > 1 and not bool(valid.all()):  # each row's tokens together, left-padded
            width = int(valid.sum(1).max())
            rows = [ids[r][valid[r]] for r in range(ids.shape[0])]
            ids = torch.stack([torch.cat([row.new_zeros(width - len(row)), row]) for row in rows])
            valid = torch.arange(width)[None, :] >= (width - torch.tensor([len(r) for r in rows]))[:, None]
        return ids.to(self.device), valid.to(self.device)

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
        self._check_inputs(input_ids, attention_mask, labels)
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        targets = next_token_targets(labels.to(device), attention_mask) if labels is not None else None
        state = state if state is not None else StackState()
        self.consulted = [] if state.segments == 0 else self.consulted
        self._check_state(state, input_ids.shape[0])

        seg = self.config.segment_len
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        all_logits, seg_sums = [], []
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
            seg_sums.append(seg_loss.detach())
            if return_logits:
                all_logits.append(logits)
        loss, count, by_segment = None, 0, None
        if targets is not None:
            count = int((targets != -100).sum())
            loss = loss_sum / max(count, 1)
            counted = targets != -100
            counts = torch.stack([counted[:, a : a + seg].sum() for a in range(0, targets.shape[1], seg)])
            by_segment = torch.stack(seg_sums).float() / counts  # 0/0 is NaN: a segment with no target
        logits = torch.cat(all_logits, dim=1) if return_logits else None
        return StackOutput(loss=loss, logits=logits, state=state, num_tokens=count, segment_loss=by_segment)

    @torch.no_grad()
    def position_free_qk(self, segment_ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Queries and keys as memory sees them (rotary rotation undone), for one segment.

        Args:
            segment_ids: ``(B, T)``, ``T <= segment_len``, read with empty memory.

        Returns:
            ``{layer: (query (B, H, T, D), key (B, H_kv, T, D))}`` for every memory layer, float32.
        """
        pos = self._positions(0, segment_ids.shape[1])
        capture: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        inputs = SegmentInputs(self.config, {}, {}, self._rotary)  # no kinds: capture only
        ctx = SegmentContext(inputs, capture=capture)
        self.model(input_ids=segment_ids.to(self.device), position_ids=pos, use_cache=False, memstack=ctx)
        return capture

    # ------------------------------------------------------------------ streams and decoding

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
        close_prompt: bool = False,
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
            close_prompt: close the prompt's last segment where the prompt ends (written to
                memory like any closed segment) and answer in a fresh one, whose prefix predicts
                the first new token: the store's ``tokens`` readout searched with the prompt's
                last queries (so a question at the end of the prompt drives retrieval) and the
                carried tokens (:mod:`memstack.memory.carry`, which must carry ``recent >= 1``
                so that the prompt's end is in sight). Each token is then what ``forward`` would
                predict on a stream cut there. False: the prompt's segments are cut as
                ``forward`` would cut the whole sequence.

        Returns:
            ``(B, P + n)`` prompt and continuation, n <= max_new_tokens (stops early once every
            row has produced ``eos_token_id``).
        """
        self._check_ids("prompt_ids", prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if eos_token_id is not None and (
            isinstance(eos_token_id, bool)
            or not isinstance(eos_token_id, int)
            or not 0 <= eos_token_id < self.vocab_size
        ):
            raise ValueError(
                f"eos_token_id must be None or a token id in [0, {self.vocab_size - 1}], got {eos_token_id!r}"
            )
        if state is not None:
            self._check_state(state, prompt_ids.shape[0])
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
        surprise = self._needs_surprise()
        if close_prompt:
            carry = self._active_kinds().get("carry")
            if carry is None or carry.config.recent < 1:
                raise ValueError(
                    "close_prompt=True needs the carry kind with recent >= 1 (StackConfig(kinds="
                    '{"carry": CarryConfig(recent=256)})): the fresh segment must see the prompt\'s end'
                )
            state = self.forward(ids, state=state, return_logits=False).state
            seg_open = self._open_segment(state, ids.shape[0], ids[:, -seg:])
            if seg_open.last_logits is None:  # nothing carried: the state had no segment yet
                raise ValueError("close_prompt=True: the carry kind carried nothing (memory switched off?)")
            logits, fill, nll = seg_open.last_logits, 0, []
        else:
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
            fill = ids.shape[1] - n_closed
            # An uncertainty policy decides from the tokens known when the segment opens: the
            # prompt's part of it, else the segment before (memstack/policy.py).
            known = ids[:, n_closed:] if fill else (ids[:, n_closed - seg : n_closed] if n_closed else None)
            seg_open = self._open_segment(state, ids.shape[0], known)
            nll: list[torch.Tensor] = []  # per position of the open segment, when a kind needs it
            if fill:
                all_logits = self._decode(ids[:, n_closed:], 0, seg_open, state)
                logits = all_logits[:, -1]
                if surprise:
                    nll = list(token_nll(all_logits, ids[:, n_closed:]).unbind(1))
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
            if surprise:  # the token sits at segment position `fill`; position 0 has no prediction
                picked = -torch.log_softmax(scores, dim=-1).gather(-1, token)[:, 0]
                nll.append(torch.full_like(picked, float("nan")) if fill == 0 else picked)
            logits = self._decode(token, fill, seg_open, state)[:, -1]
            fill += 1
            if fill == seg:
                seg_nll = torch.stack(nll, dim=1) if surprise else None
                for differentiable in (True, False):
                    state = self._close_segment(
                        state, seg_open.records, ids[:, -seg:], None, differentiable, seg_nll
                    )
                nll = []
                state = StackState(state.memories, state.segments + 1)
                seg_open, fill = self._open_segment(state, ids.shape[0], ids[:, -seg:]), 0
        return ids

    def _open_segment(self, state: StackState, batch: int, known: torch.Tensor | None = None) -> _OpenSegment:
        """A fresh KV cache for the next segment, with the tokens readout's prefix prefilled."""
        open_ = _OpenSegment(unread=self._unread(state, known))
        prefix = self._prefix(state, batch, open_.unread)
        if prefix is not None:
            prefix_ids, prefix_valid = prefix
            open_.offset, open_.mask = prefix_ids.shape[1], prefix_valid.long()
            pos = self._positions(0, open_.offset)
            ctx = SegmentContext(self._inputs(state, 0, 0, None, {}, open_.unread))  # not the segment's
            out, open_.cache = self._cached_forward(
                None,
                input_ids=prefix_ids,
                attention_mask=open_.mask,
                position_ids=pos,
                memstack=ctx,
                logits_to_keep=1,
            )
            open_.last_logits = out.logits[:, -1]
        return open_

    def _decode(
        self, ids: torch.Tensor, start: int, seg_open: _OpenSegment, state: StackState
    ) -> torch.Tensor:
        """Feed tokens at segment positions ``start..`` through the open segment's cache, memory
        read-only, and record what each layer saw; return the logits ``(B, T, V)``."""
        first = seg_open.offset + start
        pos = self._positions(first, ids.shape[1])
        inputs = self._inputs(state, first, start, None, seg_open.scratch, seg_open.unread)
        ctx = SegmentContext(inputs, records=seg_open.records)
        mask = None
        if seg_open.mask is not None:
            seg_open.mask = torch.cat([seg_open.mask, torch.ones_like(ids, dtype=torch.long)], dim=1)
            mask = seg_open.mask
        out, seg_open.cache = self._cached_forward(
            seg_open.cache, input_ids=ids, attention_mask=mask, position_ids=pos, memstack=ctx
        )
        return out.logits

    def _cached_forward(self, cache: Cache | None, **kwargs: Any) -> tuple[Any, Cache]:
        """The model's forward through a KV cache: ``(output, the updated cache)``."""
        out = self.model(**{self._cache_arg: cache}, use_cache=True, **kwargs)
        return out, getattr(out, self._cache_arg)

    # ------------------------------------------------------------------ switches

    @property
    def use_memory(self) -> bool:
        """False while every memory kind is switched off."""
        return not set(self.kinds) <= self.disabled

    def _active_kinds(self) -> dict[str, MemoryKind]:
        return {name: kind for name, kind in self.kinds.items() if name not in self.disabled}

    def _unread(
        self, state, ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> frozenset[str]:
        """The kinds whose retrieval policy (memstack/memory/store/policy.py) skips reading this
        stream segment.

        ``ids``/``mask``: the segment, for ``uncertainty`` policies, which run it once without
        those kinds (no gradient, nothing recorded) and measure its mean next-token entropy.
        """
        skip, test = set(), []
        for name, kind in self._active_kinds().items():
            policy = kind.policy
            if policy is None or not state.memories.get(name):
                continue
            if not policy.scheduled(state.segments) or policy.threshold == float("inf"):
                skip.add(name)
            elif policy.threshold is not None:
                test.append((name, policy.threshold))
        if test:
            if ids is None:
                raise ValueError("an uncertainty retrieval policy needs the segment's tokens to decide")
            entropy = self._entropy_without(state, frozenset(skip | {n for n, _ in test}), ids, mask)
            skip |= {name for name, threshold in test if not entropy > threshold}
        if state.memories.get("store") and "store" in self._active_kinds() and "store" not in skip:
            self.consulted.append(state.segments)
        return frozenset(skip)

    @torch.no_grad()
    def _entropy_without(self, state, unread: frozenset[str], ids: torch.Tensor, mask) -> float:
        """Mean next-token entropy of a segment read without the ``unread`` kinds (a dry run)."""
        padded = mask is not None and not bool(mask.all())
        inputs = self._inputs(state, 0, 0, mask.bool() if padded else None, {})
        inputs.unread = unread
        logits = self.model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=self._positions(0, ids.shape[1]),
            use_cache=False,
            memstack=SegmentContext(inputs),
        ).logits
        return mean_entropy(logits, mask.bool() if padded else None)

    @contextlib.contextmanager
    def memory_enabled(
        self, enabled: bool = True, kinds: tuple[str, ...] | None = None
    ) -> Iterator[MemoryStack]:
        """Inside a ``with`` block, switch memory kinds on or off (then restore).

        Args:
            enabled: on or off.
            kinds: the kinds to switch (default: all), e.g. ``("compressive",)``.

        Raises:
            ValueError: for a kind name this stack does not have.
        """
        names = set(self.kinds) if kinds is None else set(kinds)
        unknown = sorted(names - set(self.kinds))
        if unknown:
            raise ValueError(f"unknown memory kinds {unknown}; this stack has {sorted(self.kinds)}")
        previous = self.disabled
        self.disabled = previous - names if enabled else previous | names
        try:
            yield self
        finally:
            self.disabled = previous

    def explain(self, input_ids: torch.Tensor, tokenizer: Any = None, max_new_tokens: int = 0) -> Explanation:
        """Which chunks each block retrieved and each head's shares of local attention and of every
        memory kind (:func:`memstack.explain.explain`)."""
        return explain(self, input_ids, tokenizer, max_new_tokens)

    def memory_off(self, *kinds: str) -> contextlib.AbstractContextManager[MemoryStack]:
        """Run the same weights without memory (all kinds, or the kinds named) inside a ``with``
        block, to measure what each memory layer contributes."""
        return self.memory_enabled(False, kinds or None)

    # ------------------------------------------------------------------ checks

    @property
    def vocab_size(self) -> int:
        """Rows of the model's input embedding: token ids must lie in ``[0, vocab_size)`` (the
        text config's vocabulary where the input embedding is not one table, as MusicGen's)."""
        embedding = self.model.get_input_embeddings()
        if isinstance(embedding, torch.nn.Embedding):
            return embedding.num_embeddings
        return int(self.model.config.get_text_config().vocab_size)

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        """Shape, dtype and vocabulary range of token ids, before any work is done."""
        if not isinstance(ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must be (batch, length), got shape {tuple(ids.shape)}")
        if ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one row and one token, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer token ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} holds token id {bad}, outside the model's vocabulary [0, {self.vocab_size - 1}]"
            )

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None
    ) -> None:
        """``forward``'s inputs: token ids, and a mask and labels of the same shape."""
        self._check_ids("input_ids", input_ids)
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}"
                )

    def _check_state(self, state: StackState, batch: int) -> None:
        """A state must come from this model and stack (its kinds, layers and shapes) and this batch."""
        if not isinstance(state, StackState):
            raise ValueError(f"state must be a StackState, got {type(state).__name__}")
        for name, layers in state.memories.items():
            own = sorted(self.kinds[name].layers) if name in self.kinds else []
            foreign = sorted(set(layers) - set(own))
            if foreign:
                raise ValueError(
                    f"state holds {name} memory for layers {foreign}, but this stack's {name} layers are "
                    f"{own}: it was made by another model or stack config"
                )
        handles = state.others()

        def check_kinds(names: list[str]) -> None:
            for name in names:
                for layer, s in state.memories[name].items():
                    site = self.arch.sites[layer]
                    heads = (site.kv_heads, site.key_dim, site.value_dim)
                    self.kinds[name].check_state(layer, s, batch, heads)

        check_kinds(list(handles))
        if state.batch_size is not None and state.batch_size != batch:
            raise ValueError(
                f"state batch size {state.batch_size} differs from the input's {batch} rows; call reset() "
                "or pass a state made for the same batch"
            )
        check_kinds([name for name in state.memories if name not in handles])

    # ------------------------------------------------------------------ parameters

    def named_gates(self) -> dict[tuple[int, str], nn.Parameter]:
        """``{(layer, kind): beta}``: the per-head gate logits of every memory layer and gated kind."""
        return {(layer, kind): g for layer, mixer in self._mixers.items() for kind, g in mixer.gates.items()}

    def gate_parameters(self) -> list[nn.Parameter]:
        """The per-head gate logits beta of every memory layer and gated kind."""
        return list(self.named_gates().values())

    def gate_values(self, kind: str = "compressive") -> dict[int, torch.Tensor]:
        """sigmoid(beta) per layer and head for one kind: the share of each head's output that comes
        from that memory. Under FSDP2 the gates are gathered from their shards: a collective that
        every rank must call."""
        return {
            layer: torch.sigmoid(_full(g.detach()).float()).cpu()
            for (layer, k), g in self.named_gates().items()
            if k == kind
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

    # ------------------------------------------------------------------ files

    def tied_names(self) -> dict[str, str]:
        """``{name: first name}`` for every parameter that is the same tensor as an earlier one
        (tied weights: SmolLM2's output head is its input embedding)."""
        first: dict[int, str] = {}
        tied = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in first:
                tied[name] = first[id(p)]
            else:
                first[id(p)] = name
        return tied

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``nn.Module.state_dict`` with each tied tensor once, under its first name.

        Why: ``transformers.Trainer`` saves a model that is not a ``PreTrainedModel`` as its
        ``state_dict`` through safetensors, which refuses two names for one tensor; the model's own
        ``save_pretrained`` drops tied names the same way. :meth:`load_state_dict` fills them back
        in, so ``stack.load_state_dict(stack.state_dict())`` holds, strict.
        """
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in self.tied_names():
            state.pop(prefix + name, None)
        return state

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, a missing tied name taken from its twin (see
        :meth:`state_dict`); a tied name that is given is loaded as given."""
        state = dict(state_dict)
        for name, twin in self.tied_names().items():
            if name not in state and twin in state:
                state[name] = state[twin]
        return super().load_state_dict(state, strict=strict, assign=assign)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save the stack's config, gates and sleep adapters (not the base model) into directory
        ``path``, crash-safe (:func:`memstack.saving.write_stack`): a crash at any moment leaves the
        previous save or the new one loadable, never a mix. Only memstack's own files are written
        or removed, so the stack can live next to the model's own ``save_pretrained`` files.

        Raises:
            ValueError: if ``path`` exists and is not a directory.
        """
        gates = {gate_name(layer, kind): g for (layer, kind), g in self.named_gates().items()}
        write_stack(
            path,
            self.config,
            self.model.config.model_type,
            self.model.config.num_attention_heads,
            gates,
            lambda directory: write_adapters(self.adapters, self.model, directory),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model: nn.Module) -> MemoryStack:
        """Wrap ``model`` with the config, gates and adapters saved in ``path``.

        Everything is read and checked before the model is touched; if wrapping still fails, the
        model is unwrapped again, so a failed call leaves it exactly as it was.

        Raises:
            FileNotFoundError: if the manifest, the weights file or the adapters are missing.
            ValueError: if the manifest is malformed, or the saved stack belongs to another model
                type or its tensors do not fit the model.
        """
        saved = read_stack(path, model.config.model_type)
        # A dry run of the composition says which gates the stack will have, so that nothing
        # touches the model before every tensor is known to fit.
        arch = discover(model)
        expected = {
            gate_name(layer, name): layer
            for name, kind in build_kinds(saved.config, arch).items()
            if kind.gate_init is not None
            for layer in kind.layers
        }
        if set(saved.gates) != set(expected):
            raise ValueError(f"{path}: expected tensors {sorted(expected)}, found {sorted(saved.gates)}")
        for name, tensor in saved.gates.items():
            layer = expected[name]
            heads = arch.sites[layer].heads
            if tuple(tensor.shape) != (heads,):
                raise ValueError(
                    f"{path}: gate of layer {layer} ({name}) has shape {tuple(tensor.shape)}, "
                    f"the model needs ({heads},)"
                )
        stack = cls(model, saved.config)
        try:
            with torch.no_grad():
                for (layer, kind), gate in stack.named_gates().items():
                    gate.copy_(saved.gates[gate_name(layer, kind)])
            if saved.adapters is not None:
                stack.adapters.load(saved.adapters)
        except BaseException:
            stack.unwrap()
            raise
        return stack

    def save_stream(self, path: str | os.PathLike, state: StackState | None = None) -> None:
        """Save a whole stream's memory (default: :attr:`state`, the one :meth:`step` continues):
        every kind, the store's tail queries, the segment count (:func:`memstack.saving.save_stream`).
        Continuing after :meth:`load_stream`, in this process or another, is bit-identical to
        continuing in memory.

        Raises:
            ValueError: no stream to save.
        """
        state = self.state if state is None else state
        if state is None:
            raise ValueError("no stream to save: step() has not run since reset(); pass state=")
        save_stream(state, self.kinds, path)

    def load_stream(self, path: str | os.PathLike) -> StackState:
        """Read a stream :meth:`save_stream` wrote, make it the stream :meth:`step` continues, and
        return it.

        Raises:
            FileNotFoundError, ValueError: nothing saved there, or not this stack's memory.
        """
        state = load_stream(path, self.kinds, device=self.device)
        batch = state.batch_size
        if batch is None:  # only handle states: their rows say the batch
            rows = [s.batch_size for layers in state.others().values() for s in layers.values()]
            batch = rows[0] if rows else 1
        self._check_state(state, batch)
        self.state = state
        return state
