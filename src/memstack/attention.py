"""The attention function memstack registers with transformers.

transformers routes every supported model's attention through ``AttentionInterface``: the
attention module projects Q/K/V, applies its position encoding and calls the registered function
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)``. Keyword
arguments given to ``model(...)`` arrive in ``**kwargs``; memstack passes one,
``memstack=SegmentContext(...)``, that says what memory to read and where to write.

A newly registered name has no mask function, and transformers would then silently pass
``attention_mask=None`` even for padded batches, so the same name is registered with
``sdpa_mask`` in ``AttentionMaskInterface``.

Called without a context (``model(...)`` directly), the function is plain causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import StackConfig
from .families import unrotate
from .memory.compressive import CompressiveState, init_state
from .memory.window import local_attention

ATTENTION_NAME = "memstack"


@dataclass
class SegmentContext:
    """Everything one model call needs to know about memory.

    Created by :class:`memstack.MemoryStack` for each segment (or decoding step) and handed to the
    model as ``model(..., memstack=ctx)``; each attention layer reads it and writes its result.
    """

    config: StackConfig
    states: dict[int, CompressiveState]
    """Compressive memory per layer index before this segment (missing layer = empty)."""
    valid: torch.Tensor | None = None
    """``(B, T)`` bool, False at padded positions (never written into memory)."""
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    """cos, sin ``(1 or B, T, R)`` of this call's positions from the model's rotary module."""
    write: bool = True
    """True: each layer writes the segment into ``new_states``. False (decoding inside a segment):
    each layer appends its new position-free keys and values to ``pending`` instead; the stack
    writes them when the segment is full."""
    new_states: dict[int, CompressiveState] = field(default_factory=dict)
    pending: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    use_memory: bool = True
    """False: local attention only, nothing read or written (the same weights without memory)."""
    capture: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """When a dict: each memory layer stores its position-free (query, key) here (for tests and
    analysis)."""


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
    """Working memory, then (on memory layers) compressive memory: read, mix, write.

    Shapes: query ``(B, H, Tq, D)``, key/value ``(B, H_kv, Tkv, D)`` (Tkv >= Tq with a KV cache,
    whose last Tq entries are this call's tokens). Returns ``((B, Tq, H, D), None)``.
    """
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__} uses attention logit soft-capping, which memstack does not support"
        )
    cfg = memstack.config if memstack is not None else None
    local = local_attention(
        query,
        key,
        value,
        attention_mask,
        scaling=scaling,
        window=cfg.window if cfg else None,
        sink_tokens=cfg.sink_tokens if cfg else 0,
        dropout=dropout,
    )
    memory = getattr(module, "memstack_memory", None)
    if memstack is None or memory is None or not memstack.use_memory:
        return local, None

    layer = module.layer_idx
    q_len = query.shape[2]
    new_key, new_value = key[:, :, -q_len:], value[:, :, -q_len:]  # this call's tokens only
    if memstack.rotary is not None:
        # The paper's memory has no position encoding: read and write with un-rotated Q/K.
        cos, sin = memstack.rotary
        query, new_key = unrotate(query, cos, sin), unrotate(new_key, cos, sin)
    if memstack.capture is not None:
        memstack.capture[layer] = (query, new_key)

    state = memstack.states.get(layer)
    out = local if state is None else memory.read(state, query, local)
    if memstack.write:
        if state is None:
            b, h_kv, _, d_k = new_key.shape
            state = init_state(b, h_kv, d_k, new_value.shape[-1], new_key.device)
        memstack.new_states[layer] = memory.write(state, new_key, new_value, memstack.valid)
    else:
        memstack.pending.setdefault(layer, []).append((new_key, new_value))
    return out, None


def register() -> None:
    """Register memstack's attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, memstack_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()
