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
) -> torch.Tensor:
    """Causal softmax attention inside the segment.

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
    mask = attention_mask
    if mask is None and band is None:
        if q_len == kv_len:
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=q_len > 1, scale=scaling
            )
            return out.transpose(1, 2)
        band = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2  # additive -> boolean
    if band is not None:
        mask = band if mask is None else mask & band
    # A query that may attend to nothing (a padded position) would give NaN, and NaN poisons
    # the weight gradients even where the loss ignores it; let such rows see every key instead.
    mask = mask | ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2)  # (B, Tq, H, D)
