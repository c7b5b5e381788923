"""MemoryStack: the memory layers composed around an already loaded causal LM.

This is the only module that knows every memory kind (:data:`KINDS` is where a kind joins the
composition). It cuts long inputs into segments, runs the wrapped model on each with a
:class:`~memstack.attention.SegmentContext`, and closes each segment through one path,
:meth:`MemoryStack._close_segment`, shared by ``forward``, ``step`` and ``generate``:
differentiable kinds are committed inside the (possibly checkpointed) segment, the others exactly
once outside it. The rest of the class lives in mixins: ``generation.py`` (streams and decoding),
``persistence.py`` (save / load), ``checks.py`` (input and state checks), ``switches.py`` (kinds
on and off) and ``parameters.py`` (gates and optimiser groups).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from memstack.attention import ATTENTION_NAME, SegmentContext, SegmentInputs
from memstack.checks import StackChecks
from memstack.config import SleepConfig, StackConfig, parse_layers
from memstack.generation import StackGeneration, token_nll  # noqa: F401  (token_nll re-exported)
from memstack.memory.adapters import Adapters
from memstack.memory.base import ClosedSegment, LayerRecord, MemoryKind
from memstack.memory.compressive import Compressive
from memstack.memory.mixer import MemoryMixer
from memstack.memory.store.kind import LongTermMemory
from memstack.model.discovery import Architecture, discover
from memstack.parameters import StackParameters
from memstack.persistence import CONFIG_FILE, FORMAT_VERSION, StackPersistence  # noqa: F401  (re-exported)
from memstack.sleep.consolidate import SleepReport, sleep
from memstack.state import StackState
from memstack.switches import StackSwitches


class ModelInfo(NamedTuple):
    """What a memory kind's builder may need to know about the wrapped model."""

    num_layers: int
    """Layer numbers run from 0 to ``num_layers - 1``."""
    attention_layers: tuple[int, ...]
    """The layers with attention (all of them but in hybrid models)."""
    model_type: str

    def layers(self, spec: str, name: str) -> list[int]:
        """The attention layers a selection names: ``all`` skips a hybrid's other layers; naming
        one of them explicitly is an error."""
        chosen = parse_layers(spec, self.num_layers, name=name)
        if spec.strip() in ("all", "none") or spec.strip().startswith("every:"):
            return [i for i in chosen if i in self.attention_layers]
        other = [i for i in chosen if i not in self.attention_layers]
        if other:
            raise ValueError(
                f"{name} {spec!r}: layers {other} have no attention "
                f"(attention layers: {list(self.attention_layers)})"
            )
        return chosen


def _compressive(config: StackConfig, model: ModelInfo) -> tuple[MemoryKind, float] | None:
    c = config.compressive
    if c is None:
        return None
    return Compressive(model.layers(c.layers, "stack.compressive.layers"), c.update_rule), c.gate_init


def _store(config: StackConfig, model: ModelInfo) -> tuple[MemoryKind, float | None] | None:
    if config.store is None:
        return None
    layers = model.layers(config.store.layers, "stack.store.layers")
    kind = LongTermMemory(layers, config.store, config.segment_len, metadata={"model_type": model.model_type})
    return kind, (config.store.gate_init if config.store.readout == "kv_gated" else None)


KINDS: dict[str, Callable[[StackConfig, ModelInfo], tuple[MemoryKind, float | None] | None]] = {
    "compressive": _compressive,
    "store": _store,
}
"""The composition: each memory kind's builder, from the stack config and the model, to
``(kind, gate_init)`` (gate_init None: the kind has no gate) or None when switched off. The order
is the mixing order."""


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


class MemoryStack(StackGeneration, StackPersistence, StackChecks, StackSwitches, StackParameters, nn.Module):
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
        sites = self.arch.sites
        if any(hasattr(s.module, "memstack_memory") for s in sites.values()):
            raise ValueError("this model is already wrapped by a MemoryStack; load a fresh copy")
        self.kinds: dict[str, MemoryKind] = {}
        """The memory kinds in use, by name, in mixing order."""
        gates: dict[int, dict[str, float]] = {}
        info = self._model_info(self.arch)
        for name, build in KINDS.items():
            built = build(self.config, info)
            if built is None:
                continue
            kind, gate_init = built
            self.kinds[name] = kind
            for layer in sorted(kind.layers):
                entry = gates.setdefault(layer, {})
                if gate_init is not None:
                    entry[name] = gate_init
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

    def sleep(self, config: SleepConfig | None = None, **kwargs: Any) -> SleepReport:
        """Consolidate the long-term store's new records into a LoRA adapter (layer 4); see
        :func:`memstack.sleep.consolidate.sleep` for the objective and the keyword arguments."""
        return sleep(self, config, **kwargs)

    def describe(self) -> str:
        """One line per memory layer: what this stack holds around which model."""
        cfg = self.config
        lines = [f"{type(self.model).__name__} ({self.arch.summary()}), segments of {cfg.segment_len} tokens"]
        window = f"window {cfg.window}" if cfg.window else "the whole segment"
        lines.append(f"  1. working memory: causal attention over {window}")
        kind = self.kinds.get("compressive")
        if kind is not None:
            lines.append(f"  2. compressive memory: {kind.update_rule} rule, layers {sorted(kind.layers)}")
        store = self.kinds.get("store")
        if store is not None:
            c = store.config
            lines.append(
                f"  3. long-term store: layers {sorted(store.layers)}, {c.chunk_len}-token chunks keyed by "
                f"{c.strategy}, top {c.top_k} per {c.block_len}-query block, {c.readout} readout"
            )
        names = self.adapters.names()
        slept = (
            f"adapters {', '.join(names)} (active: {', '.join(self.adapters.active())})"
            if names
            else "none yet"
        )
        lines.append(f"  4. sleep (LoRA adapters from the store, stack.sleep()): {slept}")
        return "\n".join(lines)

    @staticmethod
    def _model_info(arch: Architecture) -> ModelInfo:
        return ModelInfo(arch.num_layers, tuple(arch.layers), arch.model_type)

    @property
    def memory_layers(self) -> list[int]:
        """Layers with compressive memory."""
        kind = self.kinds.get("compressive")
        return sorted(kind.layers) if kind is not None else []

    def _needs_surprise(self) -> bool:
        return any(getattr(k, "needs_surprise", False) for k in self._active_kinds().values())

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
            trace=getattr(self, "_trace", None),
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
        """Token ids (left-padded) and validity ``(B, P)`` a kind puts before the next segment, or None."""
        for name, kind in self._active_kinds().items():
            prefix = getattr(kind, "prefix", None) if name not in unread else None
            layers = state.memories.get(name)
            if prefix is not None and layers:
                found = prefix(layers[min(layers)])
                if found is not None:
                    return found[0].to(self.device), found[1].to(self.device)
        return None

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
