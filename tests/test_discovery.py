"""Discovery: memory sees the projections' Q/K with the rotary rotation undone, in every family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from memstack import CompressiveConfig, MemoryStack, StackConfig, UnsupportedModelError
from tests.conftest import ALL_FAMILIES, make_model


def attach_projection_hooks(model, family):
    """Capture each layer's Q/K straight from the projections (before any position encoding),
    laid out (B, H, T, D). Written per family from its modeling code, independently of memstack."""
    captured, handles = {}, []
    heads = model.config.num_attention_heads

    def to_heads(x, n):
        b, t, width = x.shape
        return x.view(b, t, n, width // n).transpose(1, 2)

    if family == "gpt2":
        for i, block in enumerate(model.transformer.h):

            def hook(mod, inp, out, i=i):
                q, k, _ = out.split(model.config.hidden_size, dim=-1)
                captured[i] = (to_heads(q, heads), to_heads(k, heads))

            handles.append(block.attn.c_attn.register_forward_hook(hook))
    elif family == "gpt_neox":
        for i, layer in enumerate(model.gpt_neox.layers):

            def hook(mod, inp, out, i=i):
                b, t, _ = out.shape
                q, k, _ = out.view(b, t, heads, -1).transpose(1, 2).chunk(3, dim=-1)
                captured[i] = (q, k)

            handles.append(layer.attention.query_key_value.register_forward_hook(hook))
    else:
        kv_heads = getattr(model.config, "num_key_value_heads", heads)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            if family == "qwen3":  # per-head RMSNorm after the projection, before rotary
                q_mod, k_mod, shape = attn.q_norm, attn.k_norm, lambda x, n: x.transpose(1, 2)
            else:
                q_mod, k_mod, shape = attn.q_proj, attn.k_proj, to_heads
            captured[i] = [None, None]
            handles.append(
                q_mod.register_forward_hook(
                    lambda m, a, o, i=i, f=shape: captured[i].__setitem__(0, f(o, heads))
                )
            )
            handles.append(
                k_mod.register_forward_hook(
                    lambda m, a, o, i=i, f=shape: captured[i].__setitem__(1, f(o, kv_heads))
                )
            )
    return captured, handles


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_unrotated_qk_equal_projection_outputs(family):
    model = make_model(family)
    stack = MemoryStack(model, StackConfig(segment_len=16))
    captured, handles = attach_projection_hooks(model, family)
    ids = torch.randint(0, 256, (2, 16))
    free = stack.position_free_qk(ids)
    for h in handles:
        h.remove()
    assert sorted(free) == [0, 1]
    for layer, (q, k) in free.items():
        q_ref, k_ref = captured[layer]
        torch.testing.assert_close(q, q_ref.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, k_ref.float(), atol=1e-5, rtol=1e-5)


def test_hand_written_attention_gets_a_clear_error():
    cfg = AutoConfig.for_model("bloom", vocab_size=256, hidden_size=32, n_head=2, n_layer=1)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedModelError, match=r"BloomForCausalLM.*AttentionInterface"):
        MemoryStack(model)


def test_memory_layers_selection_and_double_wrap():
    model = make_model("llama", layers=4)
    stack = MemoryStack(model, StackConfig(segment_len=8, compressive=CompressiveConfig(layers="every:2")))
    assert stack.memory_layers == [0, 2]
    assert sorted(stack.gate_values()) == [0, 2]
    with pytest.raises(ValueError, match="already wrapped"):
        MemoryStack(model)
    with pytest.raises(ValueError, match="do not exist"):
        MemoryStack(make_model("llama", layers=2), StackConfig(compressive=CompressiveConfig(layers="0,5")))
