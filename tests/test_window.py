"""Working memory against a naive per-query softmax written here from the definition."""

import math

import pytest
import torch

from memstack.model.window import local_attention


def naive_attention(q, k, v, scale, allowed, softcap=None, sinks=None, bias=None):
    """Loop over batch, head and query; ``allowed(b, i, j)`` says whether query i sees key j.

    Query heads are grouped onto KV heads in blocks (head h reads KV head h // group). Gemma 2's
    soft-capping maps each score s to ``softcap * tanh(s / softcap)``; GPT-OSS's sink adds
    ``exp(sinks[h])`` to the softmax's denominator."""
    B, H, Tq, D = q.shape
    Hkv, Tkv = k.shape[1], k.shape[2]
    group = H // Hkv
    out = torch.zeros(B, Tq, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // group
            for i in range(Tq):
                js = [j for j in range(Tkv) if allowed(b, i, j)]
                if not js:  # a query that sees nothing (padding): no reference value
                    continue
                scores = torch.stack([(q[b, h, i].double() @ k[b, kh, j].double()) * scale for j in js])
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                if bias is not None:  # an additive mask's finite values (b, h, i, j)
                    scores = scores + torch.stack([bias[b, h, i, j].double() for j in js])
                w = torch.exp(scores - scores.max())
                sink = math.exp(float(sinks[h]) - float(scores.max())) if sinks is not None else 0.0
                w = w / (w.sum() + sink)
                out[b, i, h] = sum(w[n] * v[b, kh, j].double() for n, j in enumerate(js))
    return out


def causal(tq, tkv):
    return lambda b, i, j: j <= tkv - tq + i


@pytest.mark.parametrize("softcap, with_sinks", [(None, True), (2.0, False), (2.0, True)])
def test_the_models_own_window_softcap_sinks_and_value_size(softcap, with_sinks):
    # Gemma 2 (soft-capping, its own sliding window), GPT-OSS (sinks), MLA (value size != key size).
    q, k, v = torch.randn(2, 4, 9, 8) * 3, torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 5)
    sinks = torch.randn(4) if with_sinks else None
    out = local_attention(q, k, v, None, scaling=0.5, model_window=4, softcap=softcap, sinks=sinks)
    allowed = lambda b, i, j: i - 4 < j <= i  # noqa: E731  (transformers: kv_idx > q_idx - window)
    expected = naive_attention(q, k, v, 0.5, allowed, softcap=softcap, sinks=sinks)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_an_additive_per_head_mask_is_a_bias_not_only_a_mask():
    # Doge hands a float (B, H, Tq, Tkv) mask whose finite entries vary: they must bias the logits.
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    bias = torch.randn(2, 4, 6, 6)
    causal_ok = torch.ones(6, 6, dtype=torch.bool).tril()
    mask = bias.masked_fill(~causal_ok, torch.finfo(torch.float32).min)
    out = local_attention(q, k, v, mask)
    expected = naive_attention(q, k, v, 8**-0.5, causal(6, 6), bias=bias)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("scaling", [None, 0.3])
def test_causal_gqa_and_scaling(heads, kv_heads, scaling):
    q, k, v = torch.randn(2, heads, 7, 8), torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    out = local_attention(q, k, v, None, scaling=scaling)
    ref = naive_attention(q, k, v, scaling if scaling is not None else 1 / math.sqrt(8), causal(7, 7))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cache_offset_is_bottom_right_causal():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    out = local_attention(q, k, v, None)
    ref = naive_attention(q, k, v, 1 / math.sqrt(8), causal(3, 9))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window, sinks", [(3, 0), (3, 2), (1, 0), (20, 1)])
def test_sliding_window_and_sinks(window, sinks):
    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    out = local_attention(q, k, v, None, window=window, sink_tokens=sinks)

    def allowed(b, i, j):
        return j <= i and (j > i - window or j < sinks)

    ref = naive_attention(q, k, v, 1 / math.sqrt(8), allowed)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_padding_mask_is_respected_and_fully_masked_rows_stay_finite():
    B, T = 2, 6
    q, k, v = torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8), torch.randn(B, 2, T, 8)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, :2] = False  # left padding in row 1
    causal_mask = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal_mask[None] & keep[:, None, :])[:, None]  # (B, 1, T, T) as sdpa_mask builds it
    out = local_attention(q, k, v, mask)
    assert torch.isfinite(out).all()  # padded queries of row 1 see nothing: no NaN
    ref = naive_attention(q, k, v, 1 / math.sqrt(8), lambda b, i, j: j <= i and bool(keep[b, j]))
    torch.testing.assert_close(out[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 2:].double(), ref[1, 2:], atol=1e-5, rtol=1e-5)
