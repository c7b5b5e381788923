"""Per-architecture facts, in one table.

Everything memstack needs to know about a model family lives here: which module class is the
attention, where the decoder layers and the rotary embedding sit, and which modules LoRA targets
(for sleep). Adding a family that routes attention through the transformers registry is one row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """Where things are in one model family."""

    attention: str
    """Class name of the attention module (it has ``layer_idx``)."""
    rotary: str | None
    """Dotted path from the ``*ForCausalLM`` model to the shared rotary embedding module, or None
    for models without rotary embeddings (GPT-2). The rotation may be partial (GPT-NeoX, Phi):
    the cos/sin width says how many leading dimensions of each head are rotated."""
    lora_targets: tuple[str, ...]
    """Module names LoRA adapts in sleep (peft ``target_modules``)."""


_ROPE = "model.rotary_emb"
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaAttention", _ROPE, _QKVO),
    "mistral": Family("MistralAttention", _ROPE, _QKVO),
    "qwen2": Family("Qwen2Attention", _ROPE, _QKVO),
    "qwen3": Family("Qwen3Attention", _ROPE, _QKVO),
    "gemma": Family("GemmaAttention", _ROPE, _QKVO),
    "olmo": Family("OlmoAttention", _ROPE, _QKVO),
    "starcoder2": Family("Starcoder2Attention", _ROPE, _QKVO),
    "phi": Family("PhiAttention", _ROPE, ("q_proj", "k_proj", "v_proj", "dense")),
    "gpt2": Family("GPT2Attention", None, ("c_attn", "c_proj")),
    "gpt_neox": Family("GPTNeoXAttention", "gpt_neox.rotary_emb", ("query_key_value", "dense")),
}


class UnsupportedModelError(TypeError):
    """The model's attention does not go through the transformers attention registry, or its
    family has no row in :data:`FAMILIES`."""


def family_of(model: nn.Module) -> Family:
    """Look up the model's family, or raise a clear error naming the class and what is supported.

    Raises:
        UnsupportedModelError: if the model is not a registry-routed family memstack knows.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(FAMILIES))
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not supported by memstack: its "
            f"attention must go through transformers' AttentionInterface registry and its family must "
            f"be listed in memstack.families.FAMILIES. Supported model types: {supported}."
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface "
            f"in this transformers version, so memstack cannot wrap it. Supported model types: {supported}."
        )
    return FAMILIES[model_type]


def attention_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """The model's attention modules, ordered by ``layer_idx``."""
    found = [m for m in model.modules() if type(m).__name__ == family.attention]
    if not found:
        raise UnsupportedModelError(f"no {family.attention} module found in {type(model).__name__}")
    return sorted(found, key=lambda m: m.layer_idx)


def rotary_module(model: nn.Module, family: Family) -> nn.Module | None:
    """The model's rotary embedding module (computes cos/sin from position ids), or None."""
    if family.rotary is None:
        return None
    return model.get_submodule(family.rotary)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension: the half-split rotary layout HF uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo the rotary rotation: the inverse of ``x * cos + rotate_half(x) * sin``.

    A rotation by -theta: ``x_rot * cos - rotate_half(x_rot) * sin`` (rotate_half twice is -1).
    Partial rotary (GPT-NeoX, Phi) rotates only the first ``cos.shape[-1]`` dimensions; the rest
    pass through.

    Args:
        x: ``(B, H, T, D)`` rotated queries or keys.
        cos, sin: ``(B, T, R)`` from the model's own rotary module at the same positions, R <= D.

    Returns:
        ``(B, H, T, D)`` position-free queries or keys, in float32.
    """
    cos = cos[:, None].float()
    sin = sin[:, None].float()
    r = cos.shape[-1]
    x = x.float()
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos - rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotary rotation ``x * cos + rotate_half(x) * sin`` (the inverse of :func:`unrotate`).

    Args:
        x: ``(B, H, T, D)`` position-free queries or keys.
        cos, sin: ``(1 or B, T, R)`` from the model's own rotary module, R <= D (partial rotary:
            the other dimensions pass through).

    Returns:
        ``(B, H, T, D)`` float32.
    """
    cos, sin = cos[:, None].float(), sin[:, None].float()
    r = cos.shape[-1]
    x = x.float()
    x_rot, x_pass = x[..., :r], x[..., r:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot
