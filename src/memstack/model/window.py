"""Layer 1, working memory: causal local attention over the current segment.

One function, :func:`local_attention`, with the calling convention of the transformers attention
registry: query ``(B, H, Tq, D)``, key/value ``(B, H_kv, Tkv, D)`` with position encoding already
applied, output ``(B, Tq, H, D)``. With a KV cache the last ``Tq`` keys are the queries' own
tokens (``Tkv >= Tq``), so causality is aligned bottom-right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat

from memstack.memory.base import MemoryKV


def band_mask(
    q_len: int, kv_len: int, window: int | None, sink_tokens: int, device: torch.device
) -> torch.Tensor | None:
    """Causal (sliding-window + sinks) pattern as a boolean ``(Tq, Tkv)`` mask, True = attend.

    Query i sits at position ``kv_len - q_len + i``. Returns None for plain causal attention
    over the whole segment, so the caller can use SDPA's ``is_causal`` fast path.
    """
    if window is None:
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, Tkv)
    allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)
    if sink_tokens:
        allowed |= (k_pos < sink_tokens) & (k_pos <= q_pos)
    return allowed


def local_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    window: int | None = None,
    sink_tokens: int = 0,
    dropout: float = 0.0,
    memory: MemoryKV | None = None,
    model_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention inside the segment, optionally over retrieved memory too.

    Args:
        query: ``(B, H, Tq, D)``.
        key, value: ``(B, H_kv, Tkv, D)``; ``H`` must be a multiple of ``H_kv`` (grouped-query
            attention: query head ``h`` reads KV head ``h // (H // H_kv)``, as HF's ``repeat_kv``).
        attention_mask: boolean ``(B, 1, Tq, Tkv)`` (True = attend, causality already in it, as
            built by transformers' ``sdpa_mask``), an additive float mask of that shape, or None
            for plain causal attention.
        scaling: softmax scale; None means ``1/sqrt(D)`` (GPT-2 may pass None).
        window: optional sliding window (tokens, query included).
        sink_tokens: first tokens that stay visible to every query when a window is set.
        dropout: attention dropout probability.
        memory: retrieved keys/values that join the same softmax (long-term memory's ``kv``
            readout), each scored with ``memory.query`` (its own rotation) where ``memory.visible``
            allows. One SDPA call: the query is ``[q, memory.query]`` and the keys
            ``[0, memory.key]`` (memory) then ``[k, 0]`` (local), so the two inner products add
            up to exactly ``q . k`` for local keys and ``memory.query . memory.key`` for memory.
        model_window: the model's own sliding window for this layer (transformers' semantics, the
            same as ``window``), applied on top of ``window`` and without sinks.
        softcap: the model's logit soft-capping, ``softcap * tanh(logits / softcap)`` (Gemma 2).
        sinks: ``(H,)`` learned sink logits that join every softmax and are dropped (GPT-OSS).

    Returns:
        ``(B, Tq, H, D)``, the layout the transformers attention modules reshape from.
    """
    b, h, q_len, _ = query.shape
    h_kv, kv_len = key.shape[1], key.shape[2]
    if h % h_kv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({h_kv})")
    if h != h_kv:
        key = repeat(key, "b hkv t d -> b (hkv g) t d", g=h // h_kv)
        value = repeat(value, "b hkv t d -> b (hkv g) t d", g=h // h_kv)

    band = band_mask(q_len, kv_len, window, sink_tokens, query.device)
    if model_window is not None and model_window < kv_len:
        own = band_mask(q_len, kv_len, model_window, 0, query.device)
        band = own if band is None else band & own
    mask, bias = attention_mask, None
    if mask is not None and mask.dtype != torch.bool:
        # An additive mask may carry more than allow/deny (Doge's per-head dynamic mask): keep
        # its values as a bias on the logits and its -inf entries as the boolean mask.
        allowed = mask > torch.finfo(mask.dtype).min / 2
        mask, bias = allowed, mask.masked_fill(~allowed, 0)
    extras = (softcap, sinks, dropout, bias)
    if memory is not None:
        return _with_memory(query, key, value, mask, band, memory, scaling, extras)
    if mask is None and band is None:
        if q_len == kv_len and softcap is None and sinks is None:
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=q_len > 1, scale=scaling
            )
            return out.transpose(1, 2)
        band = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if band is not None:
        mask = band if mask is None else mask & band
    # A query that may attend to nothing (a padded position) would give NaN, and NaN poisons
    # the weight gradients even where the loss ignores it; let such rows see every key instead.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    return attend(query, key, value, mask, scaling, *extras).transpose(1, 2)  # (B, Tq, H, D)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    dropout: float = 0.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked softmax attention ``(B, H, Tq, Dv)``: SDPA, or the model's eager formula when it
    soft-caps its logits or has learned sinks (SDPA can do neither). ``bias`` (broadcast like
    ``mask``) is added to the logits after soft-capping, where the model's additive mask goes."""
    if softcap is None and sinks is None:
        if bias is not None:
            mask = bias.to(query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale
        )
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    logits = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    if sinks is not None:
        b, h, q_len, _ = logits.shape
        column = sinks.to(logits.dtype).reshape(1, h, 1, 1).expand(b, h, q_len, 1)
        logits = torch.cat([logits, column], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(value.dtype), value)


def _with_memory(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    band: torch.Tensor | None,
    memory: MemoryKV,
    scaling: float | None,
    extras: tuple,
) -> torch.Tensor:
    """Local attention and retrieved memory in one softmax (keys already repeated for GQA)."""
    b, h, q_len, d = query.shape
    kv_len, n = key.shape[2], memory.key.shape[2]
    scale = scaling if scaling is not None else d**-0.5  # the local head size, not the doubled one
    dtype = query.dtype
    mem_key = repeat(memory.key.to(dtype), "b hkv n d -> b (hkv g) n d", g=h // memory.key.shape[1])
    mem_value = repeat(memory.value.to(dtype), "b hkv n d -> b (hkv g) n d", g=h // memory.value.shape[1])
    q = torch.cat([query, memory.query.to(dtype)], dim=-1)  # (B, H, Tq, 2D)
    k = torch.cat(
        [torch.cat([torch.zeros_like(mem_key), mem_key], -1), torch.cat([key, torch.zeros_like(key)], -1)],
        dim=2,
    )  # (B, H, N + Tkv, 2D): memory first, then the segment
    v = torch.cat([mem_value, value], dim=2)
    if mask is None:
        mask = (
            band
            if band is not None
            else torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        )
    if mask.ndim == 2:
        mask = mask[None, None]
    elif band is not None:
        mask = mask & band
    # Query rows [a, e) see memory tokens [c, f) (their block's hits) and the local keys up to
    # their causal limit: one SDPA call per block, not one over every block's memory.
    mem_k, loc_k = k[:, :, :n], k[:, :, n:]
    mem_v, loc_v = v[:, :, :n], v[:, :, n:]
    *extras, bias = extras
    heads = mask.shape[1]  # 1, or per head (Doge)
    outs = []
    for a, e, c, f in memory.spans or ((0, q_len, 0, n),):
        end = kv_len - q_len + e
        keys = torch.cat([mem_k[:, :, c:f], loc_k[:, :, :end]], dim=2)
        values = torch.cat([mem_v[:, :, c:f], loc_v[:, :, :end]], dim=2)
        visible = memory.visible[:, None, a:e, c:f].expand(b, heads, e - a, f - c)
        seen = torch.cat([visible, mask[..., a:e, :end].expand(b, heads, e - a, end)], dim=-1)
        seen = seen | ~seen.any(dim=-1, keepdim=True)  # as above: no NaN for rows that see nothing
        part_bias = None
        if bias is not None:  # memory columns carry no bias of the model's
            local_bias = bias[..., a:e, :end].expand(b, heads, e - a, end)
            part_bias = torch.cat([torch.zeros_like(visible, dtype=bias.dtype), local_bias], dim=-1)
        outs.append(attend(q[:, :, a:e], keys, values, seen, scale, *extras, bias=part_bias))
    return torch.cat(outs, dim=2).transpose(1, 2)


def sparse_mask(attention_mask: torch.Tensor | None, indices: torch.Tensor, kv_len: int) -> torch.Tensor:
    """DeepSeek-V3.2's sparse attention: each query sees only the keys its indexer picked
    (``indices (B, Tq, topk)``), within the causal mask, as the model's own eager path does."""
    b, q_len, _ = indices.shape
    picked = torch.zeros(b, 1, q_len, kv_len, dtype=torch.bool, device=indices.device)
    picked.scatter_(-1, indices.long()[:, None], True)
    if attention_mask is None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=indices.device).tril(kv_len - q_len)
        return picked & causal
    if attention_mask.dtype != torch.bool:
        attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return attention_mask & picked
