"""Tiny models of ten families the core tests run on, built offline from configs (nothing is
downloaded); tests/test_compat.py covers the other model types through memstack.evals.zoo."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging

logging.set_verbosity_error()

VOCAB = 256  # the byte vocabulary

# Each family's smallest interesting shape: grouped-query attention where the family has it,
# partial rotary for GPT-NeoX and Phi, an explicit head_dim for Qwen3.
FAMILY_KWARGS: dict[str, dict] = {
    "llama": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=16),
    "gpt2": dict(n_positions=1024),
    "gpt_neox": dict(rotary_pct=0.25),
    "phi": dict(partial_rotary_factor=0.5),
    "gemma": dict(num_key_value_heads=1, head_dim=16),
    "olmo": dict(),
    "starcoder2": dict(num_key_value_heads=2, sliding_window=None),
}
MAIN_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]
ALL_FAMILIES = list(FAMILY_KWARGS)


def make_model(family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 4):
    """A random tiny causal LM of ``family`` in eval mode (no dropout), float32.

    Not memstack.train.loop.build_model: ModelConfig has no room for the family-specific
    arguments (partial rotary, head_dim, sliding_window) this matrix needs.
    """
    cfg = AutoConfig.for_model(
        family,
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **FAMILY_KWARGS[family],
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def model_pair(family: str = "llama", **kw):
    """(model, reference): two identical copies; wrap the first, keep the second unwrapped."""
    model = make_model(family, **kw)
    return model, copy.deepcopy(model)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
