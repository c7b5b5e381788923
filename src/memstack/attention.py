"""The attention function memstack registers with transformers.

transformers routes every supported model's attention through ``AttentionInterface``: the
attention module projects Q/K/V, applies its position encoding and calls the registered function
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``. Keyword
arguments given to ``model(...)`` arrive in ``**kwargs``; memstack passes one,
``memstack=SegmentContext(...)``: what each layer reads (:class:`SegmentInputs`) and where it
records what it saw (``records``). A layer only reads memory and records; the stack writes memory
when the segment closes (:meth:`memstack.MemoryStack._close_segment`), the same way for
``forward``, ``step`` and ``generate``.

A newly registered name has no mask function, and transformers would then silently pass
``attention_mask=None`` even for padded batches, so the same name is registered with
``sdpa_mask`` in ``AttentionMaskInterface``.

Called without a context (``model(...)`` directly), the function is plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memstack.config import StackConfig
from memstack.memory.base import LayerRecord, MemoryKind, MemoryKV, ReadContext
from memstack.model.rotary import RotaryTables
from memstack.model.window import local_attention, sparse_mask

ATTENTION_NAME = "memstack"


@dataclass
class SegmentInputs:
    """What every layer reads for one segment (or one decoding step)."""

    config: StackConfig
    kinds: dict[str, MemoryKind]
    """The memory kinds in use (empty: memory off, local attention only)."""
    states: dict[str, dict[int, Any]]
    """``{kind: {layer: state}}`` before this segment; a missing layer has nothing stored yet."""
    rotary: RotaryTables | None = None
    """Each layer's rotary rotation (cached per positions); None: no layer has one."""
    first: int = 0
    """Position id of this call's first token (after any prefix; decoding: > 0)."""
    start: int = 0
    """Segment position of this call's first token (decoding: > 0)."""
    valid: torch.Tensor | None = None
    """``(B, T)`` bool of the segment, False at padding; None: all valid."""
    unread: frozenset[str] = frozenset()
    """Kinds not read by this call (their retrieval policy skips the segment); still recorded."""
    trace: dict | None = None
    """When explaining (memstack/explain.py): ``{(kind, layer, segment): [event, ...]}``."""
    segment: int = 0
    """Stream segment of this call (for the trace)."""
    scratch: dict = field(default_factory=dict)
    """Per (kind, layer) scratch that lives as long as the segment: created outside activation
    checkpointing, so a re-run reads what the forward pass read."""


class SegmentContext:
    """Handed to the model as ``model(..., memstack=ctx)``; each attention layer reads ``inputs``
    and appends to ``records``.

    A plain class on purpose, not a dataclass: FSDP2's pre-forward hook rebuilds every dataclass,
    dict and list among a layer's keyword arguments that holds a tensor needing a gradient
    (``torch.distributed.fsdp._common_utils``), so from the second layer on (when ``records``
    holds earlier layers' keys) a layer would append to a copy and the memory write would never
    see it. FSDP2 does not look into a plain object.
    """

    __slots__ = ("inputs", "records", "capture")

    def __init__(
        self,
        inputs: SegmentInputs,
        records: dict[int, list[LayerRecord]] | None = None,
        capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.inputs = inputs
        self.records = {} if records is None else records
        """Per layer, what it saw, position-free (one entry per model call; decoding appends)."""
        self.capture = capture
        """When a dict: each memory layer stores its position-free (query, key) here (tests, analysis)."""


def memstack_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    memstack: SegmentContext | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Working memory, then (on memory layers) each memory kind's read, mixed by the layer's gates.

    Shapes: query ``(B, H, Tq, D)``, key/value ``(B, H_kv, Tkv, D)`` (Tkv >= Tq with a KV cache,
    whose last Tq entries are this call's tokens). Returns ``((B, Tq, H, D), None)``.

    The model's own attention features arrive in ``kwargs`` and are honoured as its eager
    attention does: ``sliding_window`` (the layer's window, also where transformers passes no
    mask), ``softcap`` (Gemma 2's logit soft-capping) and ``s_aux`` (GPT-OSS's learned sinks).
    """
    cfg = memstack.inputs.config if memstack is not None else None
    mixer = getattr(module, "memstack_memory", None)
    if kwargs.get("indices") is not None:
        attention_mask = sparse_mask(attention_mask, kwargs["indices"], key.shape[2])

    def local(memory: MemoryKV | None = None, values: torch.Tensor | None = None) -> torch.Tensor:
        return local_attention(
            query,
            key,
            value if values is None else values,
            attention_mask,
            scaling=scaling,
            window=cfg.window if cfg else None,
            sink_tokens=cfg.sink_tokens if cfg else 0,
            dropout=dropout,
            memory=memory,
            model_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
        )

    if memstack is None or mixer is None or not (memstack.inputs.kinds or memstack.capture is not None):
        return local().contiguous(), None  # contiguous as HF's own: some models .view() it

    inputs, layer, q_len = memstack.inputs, module.memstack_layer, query.shape[2]
    q_free, k_free = query, key[:, :, -q_len:]  # this call's tokens only
    new_value = value[:, :, -q_len:]
    rotation = (
        inputs.rotary.rotation(layer, inputs.first, q_len, query.shape[-1], query.device)
        if inputs.rotary is not None
        else None
    )
    if rotation is not None:
        # The paper's memory has no position encoding: read and write with un-rotated Q/K.
        q_free, k_free = rotation.unrotate(query), rotation.unrotate(k_free)
    if memstack.capture is not None:
        memstack.capture[layer] = (q_free, k_free)

    kinds = {name: kind for name, kind in inputs.kinds.items() if layer in kind.layers}
    readouts = {}
    for name, kind in kinds.items():
        state = inputs.states.get(name, {}).get(layer)
        if state is not None and name not in inputs.unread:
            scratch = inputs.scratch.setdefault((name, layer), {})
            rotate = inputs.rotary.rotate_fn(layer) if inputs.rotary is not None else None
            trace = (
                None if inputs.trace is None else inputs.trace.setdefault((name, layer, inputs.segment), [])
            )
            ctx = ReadContext(inputs.start, inputs.valid, rotate, scaling, scratch, trace, layer)
            readouts[name] = kind.read(state, q_free, ctx)
    keep_query = any(kind.needs_query for kind in kinds.values())
    memstack.records.setdefault(layer, []).append(
        LayerRecord(k_free, new_value, q_free if keep_query else None, layer)
    )
    joint = [r.memory for r in readouts.values() if r.memory is not None]
    if len(joint) > 1:
        raise ValueError(f"layer {layer}: more than one memory kind joins the local softmax")
    if inputs.trace is not None:  # explaining: each head's attention mass on the retrieved keys
        mass = None
        if joint:  # the same attention with ones for their values and zeros for the local ones
            ones = joint[0]._replace(value=torch.ones_like(joint[0].value[..., :1]))
            with torch.no_grad():  # a diagnostic: a traced training step backpropagates as usual
                mass = local(ones, torch.zeros_like(value[..., :1]))[..., 0].float()  # (B, Tq, H)
        read = {k: r.empty for k, r in readouts.items() if r.output is not None}
        event = (query.shape[0], q_len, mass, read)
        inputs.trace.setdefault(("shares", layer, inputs.segment), []).append(event)
    return mixer.mix(local(joint[0] if joint else None), readouts).contiguous(), None


def register() -> None:
    """Register memstack's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, memstack_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
