"""Layer 2, short-term memory: Infini-attention's compressive memory.

Munkhdalai, Faruqui, Gopal (2024), "Leave No Context Behind: Efficient Infinite Context
Transformers with Infini-attention", https://arxiv.org/abs/2404.07143, section 2.1.2.
Equation numbers below are the paper's (3: retrieval, 4: linear update and z, 5: delta rule,
6: gate).

Per layer and KV head the memory is a matrix ``M`` (d_k x d_v) and a normaliser ``z`` (d_k),
both float32 whatever the autocast dtype, so its size does not depend on how much was written.
The memory is read with the segment's queries *before* it is updated with the segment's keys and
values. Q and K here are position-free (the rotary rotation undone), as in the paper.

The state is explicit: :class:`CompressiveState` goes in, a new one comes out; nothing is hidden
in module buffers, so the same kind serves any number of streams. :class:`Compressive` is the
kind in the shape every memory layer shares (:mod:`memstack.memory.base`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum

from memstack.fields import check_choice, check_number, parse_layers
from memstack.memory.base import (
    BuildContext,
    ClosedSegment,
    LayerRecord,
    MemoryKind,
    ReadContext,
    Readout,
    register_kind,
)

UPDATE_RULES = ("linear", "delta")


@dataclass
class CompressiveConfig:
    """Layer 2, Infini-attention compressive memory: a matrix ``M`` and normaliser ``z`` per layer
    and KV head, written once per segment, read by every query. See this module.
    """

    layers: str = "all"
    """Decoder layers that get compressive memory: ``"all"``, ``"none"``, ``"every:K"`` (layers
    0, K, 2K, ...), or a comma-separated list of layer indices such as ``"0,3"``. A string, so it
    can be overridden from the command line like every other field."""
    update_rule: str = "linear"
    """``"linear"`` (M += sigma(K)^T V) or ``"delta"`` (subtract what memory already returns for
    each key before writing, eq. (5) of the paper)."""
    gate_init: float = 0.0
    """Initial value of the per-head gate logit beta. sigmoid(0) = 0.5 mixes memory and local
    attention equally, as in the paper; a negative value (say -3) starts a pretrained model close
    to its original behaviour."""

    def __post_init__(self) -> None:
        parse_layers(self.layers, num_layers=None, name="stack.compressive.layers")
        check_choice("stack.compressive.update_rule", self.update_rule, UPDATE_RULES)
        check_number("stack.compressive.gate_init", self.gate_init, "a finite number", math.isfinite)


# sigma(Q) z is a sum of strictly positive terms once anything is written; the guard only
# matters for float32 underflow with huge negative logits.
_DENOMINATOR_EPS = 1e-6


class CompressiveState(NamedTuple):
    """Memory of one layer for a batch of streams."""

    M: torch.Tensor  # (B, H_kv, d_k, d_v) float32
    z: torch.Tensor  # (B, H_kv, d_k) float32

    def detach(self) -> CompressiveState:
        """Same values, cut from the autograd graph (truncated BPTT)."""
        return CompressiveState(self.M.detach(), self.z.detach())

    def to(self, device: torch.device | str) -> CompressiveState:
        """Move to ``device`` (stays float32)."""
        return CompressiveState(self.M.to(device), self.z.to(device))

    def is_empty(self) -> torch.Tensor:
        """``(B, H_kv)`` bool: nothing has been written to this row and head yet (z = 0)."""
        return self.z.sum(dim=-1) == 0


def init_state(batch: int, kv_heads: int, d_k: int, d_v: int, device: torch.device | str) -> CompressiveState:
    """Empty memory, M_0 = 0 and z_0 = 0 (float32)."""
    return CompressiveState(
        torch.zeros(batch, kv_heads, d_k, d_v, dtype=torch.float32, device=device),
        torch.zeros(batch, kv_heads, d_k, dtype=torch.float32, device=device),
    )


class _Feature(torch.autograd.Function):
    """sigma(x) = ELU(x) + 1 whose backward reads its own output: sigma'(x) = min(sigma(x), 1)
    (1 where x > 0, exp(x) = sigma(x) elsewhere). One clamp and one multiply instead of
    ``elu_backward``, and ``x`` is not kept for backward (sigma(x) is, and the einsums that
    consume it keep it anyway)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = F.elu(x) + 1.0
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad * out.clamp(max=1.0)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = ELU(x) + 1, the paper's non-linearity (from Katharopoulos et al. 2020)."""
    return _Feature.apply(x)


class _Retrieve(torch.autograd.Function):
    """``sigma(q) M / max(sigma(q) z, eps)`` from ``q (..., n, d_k)`` and ``Mz = [M | z]``
    ``(..., d_k, d_v + 1)``, keeping only ``q``, ``Mz`` and the denominator for backward: sigma(q)
    and the numerator are recomputed there (one small product) instead of being kept, float32,
    for every layer and segment until the backward pass reaches them."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, mz: torch.Tensor) -> torch.Tensor:
        both = torch.matmul(F.elu(q) + 1.0, mz)
        den = both[..., -1:].contiguous()  # a copy: a view would keep all of `both` alive
        ctx.save_for_backward(q, mz, den)
        return both[..., :-1] / den.clamp_min(_DENOMINATOR_EPS)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, mz, den = ctx.saved_tensors
        s = F.elu(q) + 1.0
        num = torch.matmul(s, mz[..., :-1])
        clamped = den.clamp_min(_DENOMINATOR_EPS)
        grad_num = grad / clamped
        # d(num / den)/d den = -num / den^2, and nothing where the clamp held the denominator.
        grad_den = -(grad * num).sum(-1, keepdim=True) / clamped.square() * (den > _DENOMINATOR_EPS)
        grad_both = torch.cat([grad_num, grad_den], dim=-1)
        grad_mz = torch.matmul(s.transpose(-1, -2), grad_both)
        grad_q = torch.matmul(grad_both, mz.transpose(-1, -2)) * s.clamp(max=1.0)
        return grad_q, grad_mz


def retrieve(state: CompressiveState, query: torch.Tensor) -> torch.Tensor:
    """Eq. (3): A_mem = sigma(Q) M / (sigma(Q) z).

    Args:
        state: memory with ``H_kv`` heads.
        query: ``(B, H, T, d_k)`` position-free queries; query head ``h`` reads KV head
            ``h // (H // H_kv)`` (grouped-query attention, the order of HF's ``repeat_kv``).

    Returns:
        ``(B, H, T, d_v)`` float32. Rows whose memory is empty return 0 (callers use
        :meth:`CompressiveState.is_empty` to fall back to local attention).
    """
    b, h, t, _ = query.shape
    h_kv, d_v = state.M.shape[1], state.M.shape[-1]
    q = query.float().reshape(b, h_kv, (h // h_kv) * t, -1)  # query groups stacked on T
    # Numerator and denominator in one product: [M | z] is (d_k, d_v + 1).
    out = _Retrieve.apply(q, torch.cat([state.M, state.z[..., None]], dim=-1))
    return out.view(b, h, t, d_v)


def update(
    state: CompressiveState,
    key: torch.Tensor,
    value: torch.Tensor,
    valid: torch.Tensor | None = None,
    rule: str = "linear",
) -> CompressiveState:
    """Write one segment into memory.

    - linear, eq. (4): M_s = M_{s-1} + sigma(K)^T V
    - delta,  eq. (5): M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
    - z_s = z_{s-1} + sum_t sigma(K_t), eq. (4)

    Args:
        state: memory before the segment.
        key: ``(B, H_kv, T, d_k)`` position-free keys.
        value: ``(B, H_kv, T, d_v)``.
        valid: ``(B, T)`` bool, False at padded positions, which are never written.
        rule: ``"linear"`` or ``"delta"``.

    Returns:
        The memory after the segment (float32).
    """
    sk = feature_map(key.float())  # (B, H_kv, T, d_k)
    v = value.float()
    if valid is not None:
        keep = valid[:, None, :, None]
        # where(), not a product: a padded position may hold anything, even inf.
        sk = torch.where(keep, sk, 0.0)
        v = torch.where(keep, v, 0.0)
    if rule == "delta":
        num = einsum(sk, state.M, "b h t k, b h k v -> b h t v")
        den = einsum(sk, state.z, "b h t k, b h k -> b h t")[..., None]
        # While memory is empty (z = 0) there is nothing to subtract.
        v = v - num / den.clamp_min(_DENOMINATOR_EPS)
    elif rule != "linear":
        raise ValueError(f"update rule must be 'linear' or 'delta', got {rule!r}")
    M = state.M + einsum(sk, v, "b h t k, b h t v -> b h k v")
    z = state.z + sk.sum(dim=2)
    return CompressiveState(M, z)


class Compressive(MemoryKind):
    """The compressive memory kind (see :mod:`memstack.memory.base` for the shape all kinds share).

    Holds configuration only; per-stream state is a :class:`CompressiveState` per layer, and the
    learned gate of eq. (6) lives in each layer's :class:`~memstack.memory.mixer.MemoryMixer`.
    """

    name = "compressive"
    differentiable = True  # gradients flow through M and z across segments (BPTT, as in the paper)
    needs_query = False
    state_type = CompressiveState
    colour = "tab:orange"

    def __init__(self, layers: Iterable[int], update_rule: str = "linear", gate_init: float = 0.0):
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {', '.join(UPDATE_RULES)}; got {update_rule!r}")
        self.layers = frozenset(layers)
        self.update_rule = update_rule
        self.gate_init = gate_init

    @classmethod
    def build(cls, config: CompressiveConfig, ctx: BuildContext) -> Compressive:
        """The kind on the layers ``config.layers`` names."""
        return cls(
            ctx.layers(config.layers, "stack.compressive.layers"), config.update_rule, config.gate_init
        )

    def describe(self) -> str:
        return f"2. compressive memory: {self.update_rule} rule, layers {sorted(self.layers)}"

    def check_state(self, layer: int, state: Any, batch: int, heads: tuple[int, int, int]) -> None:
        """M ``(batch, kv_heads, d_k, d_v)`` and z ``(batch, kv_heads, d_k)`` of this model."""
        expected = (batch, *heads)
        if tuple(state.M.shape) != expected or tuple(state.z.shape) != expected[:3]:
            raise ValueError(
                f"state of layer {layer} has M {tuple(state.M.shape)} and z {tuple(state.z.shape)}, but this "
                f"model's memory is M {expected} (batch, kv_heads, d_k, d_v) and z {expected[:3]}: "
                "the state was made by another model"
            )

    @classmethod
    def check_loaded(cls, layer: int, state: Any, source: str) -> None:
        """M and z of consistent shapes."""
        if state.M.ndim != 4 or state.z.ndim != 3 or state.M.shape[:3] != state.z.shape:
            raise ValueError(
                f"{source}: layer {layer} has M {tuple(state.M.shape)} and z {tuple(state.z.shape)}; "
                "expected M (batch, kv_heads, d_k, d_v) and z (batch, kv_heads, d_k)"
            )

    def empty(self, record: LayerRecord) -> CompressiveState:
        """M_0 = 0, z_0 = 0 for ``record``'s batch and KV heads."""
        b, h_kv, _, d_k = record.key.shape
        return init_state(b, h_kv, d_k, record.value.shape[-1], record.key.device)

    def read(self, state: CompressiveState, query: torch.Tensor, ctx: ReadContext | None = None) -> Readout:
        """Eq. (3) with position-free queries ``(B, H, T, d_k)``; rows with empty memory are marked
        so that the mixer keeps their local attention exactly."""
        with torch.autocast(device_type=query.device.type, enabled=False):
            out = retrieve(state, query).transpose(1, 2)  # (B, T, H, d_v)
        empty = state.is_empty()  # (B, H_kv)
        empty = (
            empty.repeat_interleave(query.shape[1] // state.M.shape[1], dim=1) if bool(empty.any()) else None
        )
        return Readout(out, empty)

    def write(self, state: CompressiveState, record: LayerRecord, segment: ClosedSegment) -> CompressiveState:
        """Eqs. (4)/(5): one closed segment's position-free keys and values (never its padding), float32."""
        with torch.autocast(device_type=record.key.device.type, enabled=False):
            return update(state, record.key, record.value, segment.valid, self.update_rule)

    def __repr__(self) -> str:
        return f"Compressive(layers={sorted(self.layers)}, update_rule={self.update_rule!r})"


register_kind(Compressive, CompressiveConfig)
