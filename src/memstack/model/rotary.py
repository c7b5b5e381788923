"""Rotary position embeddings, as any model lays them out, undone and redone in one expression.

Memory reads and writes position-free queries and keys (Infini-attention's memory has no
position encoding; the store rotates its hits to a fixed distance itself), so memstack must undo
each model's own rotation exactly. Models lay the rotated dimensions out differently:

- ``half``: the rotated span is split in halves, ``x * cos + rotate_half(x) * sin`` (Llama and
  most others; GPT-NeoX and Phi rotate only a leading part of each head);
- ``half_halfwidth``: ``half`` with one cos/sin per pair (GPT-OSS);
- ``pairs``: adjacent pairs ``(x0, x1), (x2, x3), ...`` with per-dimension cos/sin (Cohere, GPT-J);
- ``pairs_halfcos``: pairs, with the first half of the model's cos/sin repeated pairwise (GLM);
- ``pairs_halfwidth``: pairs, with one cos/sin per pair (GPT-J; complex ``freqs_cis`` as Llama 4
  and DeepSeek-V2 hand them, whose real and imaginary parts are cos and sin);
- ``deinterleaved``: pairs gathered into halves first, then ``half`` (DeepSeek's
  ``rope_interleave``);

the span sits at the start of each head or at its end (DeepSeek's MLA keeps the rotated part
last); a model may hand ``(sin, cos)`` instead of ``(cos, sin)`` (GPT-J) or rotate the other way
(NanoChat's ``rotate_half`` is ``(x2, -x1)``).

Every layout is a linear map ``y = x[ia] * A + x[ib] * B`` per position, and so is its inverse;
:class:`Rotation` builds both tables once per (source, positions) and applies either with one gather
and one fused multiply-add. The layout is not declared per model: :mod:`memstack.model.discovery` tries
each on a probe input and keeps the one that maps the model's rotated queries and keys back to the
ones it saw before rotation.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

STYLES = ("half", "half_halfwidth", "pairs", "pairs_halfcos", "pairs_halfwidth", "deinterleaved")


@dataclass(frozen=True)
class RotaryLayout:
    """Where a model's rotated dimensions sit inside a head and how they pair up."""

    style: str
    """One of :data:`STYLES`."""
    trailing: bool = False
    """The rotated span is the last ``R`` dimensions of the head (else the first)."""
    sin_first: bool = False
    """The model hands ``(sin, cos)``."""
    negated: bool = False
    """The model rotates by ``-theta`` (its sin enters with the opposite sign)."""

    def __str__(self) -> str:
        notes = [
            n
            for n, on in (
                ("trailing", self.trailing),
                ("sin first", self.sin_first),
                ("negated", self.negated),
            )
            if on
        ]
        return self.style + (f" ({', '.join(notes)})" if notes else "")

    def cos_sin(self, raw) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) from what the model hands its attention: a pair, or complex ``freqs_cis``."""
        if isinstance(raw, torch.Tensor):
            if not raw.is_complex():
                raise ValueError(
                    f"real position embeddings must come as a (cos, sin) pair, got {tuple(raw.shape)}"
                )
            return raw.real, raw.imag
        first, second = raw
        cos, sin = (second, first) if self.sin_first else (first, second)
        return cos, (-sin if self.negated else sin)

    def maps(self, width: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Index maps over the head for a rotated span of ``width`` dimensions.

        Returns ``(perm, partner, sign, dim_of)``, each ``(head_dim,)``: the rotation is
        ``y[i] = c[i] * x[perm[i]] + sign[i] * s[i] * x[perm[partner[i]]]``, and ``dim_of[i]`` is the
        column of the (style-adjusted) cos/sin table at dimension ``i`` (-1 outside the span).
        """
        if width > head_dim or width % 2:
            raise ValueError(f"rotary width {width} must be even and at most the head size {head_dim}")
        offset = head_dim - width if self.trailing else 0
        idx = torch.arange(head_dim, device=device)
        perm, partner, sign = idx.clone(), idx.clone(), torch.zeros(head_dim, device=device)
        dim_of = torch.full((head_dim,), -1, dtype=torch.long, device=device)
        j = torch.arange(width, device=device)
        if self.style in ("half", "half_halfwidth", "deinterleaved"):
            half = width // 2
            other = torch.where(j < half, j + half, j - half)
            signs = torch.where(j < half, -1.0, 1.0)
        elif self.style in ("pairs", "pairs_halfcos", "pairs_halfwidth"):
            other = j ^ 1
            signs = torch.where(j % 2 == 0, -1.0, 1.0)
        else:
            raise ValueError(f"unknown rotary style {self.style!r}; accepted: {', '.join(STYLES)}")
        partner[offset : offset + width] = other + offset
        sign[offset : offset + width] = signs
        dim_of[offset : offset + width] = j
        if self.style == "deinterleaved":  # y = half(P x): P gathers even then odd dimensions
            perm[offset : offset + width] = torch.cat([j[0::2], j[1::2]]) + offset
        return perm, partner, sign, dim_of

    def table(self, cos: torch.Tensor) -> torch.Tensor:
        """The per-dimension angle table this style reads from the model's cos (or sin)."""
        if self.style == "pairs_halfcos":
            return cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
        if self.style == "pairs_halfwidth":
            return cos.repeat_interleave(2, dim=-1)
        if self.style == "half_halfwidth":
            return torch.cat([cos, cos], dim=-1)
        return cos


def identity_like(raw):
    """Position embeddings of the same form and shapes that rotate by nothing (cos 1, sin 0),
    whichever of the two slots holds cos: ``(1, 0)`` and ``(0, 1)`` for a pair, ``1`` for complex."""
    if isinstance(raw, torch.Tensor):
        return [torch.ones_like(raw)]
    return [
        (torch.ones_like(raw[0]), torch.zeros_like(raw[1])),
        (torch.zeros_like(raw[0]), torch.ones_like(raw[1])),
    ]


LAYOUTS = tuple(
    RotaryLayout(style, trailing, sin_first, negated)
    for sin_first in (False, True)
    for negated in (False, True)
    for trailing in (False, True)
    for style in STYLES
)
"""Every layout discovery tries, most common first."""


class _TwoTerm:
    """``y = x[..., ia] * a + partner(x) * b`` with ``a, b`` of shape ``(1 or B, 1, T, D)``;
    ``partner(x)`` is ``x[..., ib]``, done by flipping views where the layout allows (a gather's
    backward is a scatter, several times slower than the flip's)."""

    __slots__ = ("ia", "a", "partner", "b")

    def __init__(self, ia: torch.Tensor | None, a: torch.Tensor, partner: Callable, b: torch.Tensor):
        self.ia, self.a, self.partner, self.b = ia, a, partner, b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        first = x * self.a if self.ia is None else x[..., self.ia] * self.a
        return torch.addcmul(first, self.partner(x), self.b)


def _flip_partner(layout: RotaryLayout, width: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x[..., partner]`` for a layout without permutation, by flipping halves (or pairs) of the
    rotated span; dimensions outside the span are kept (their coefficient is 0)."""
    pairs = layout.style.startswith("pairs")
    shape = (width // 2, 2) if pairs else (2, width // 2)
    flip_dim = -1 if pairs else -2
    lo = head_dim - width if layout.trailing else 0

    def partner(x: torch.Tensor) -> torch.Tensor:
        span = x[..., lo : lo + width].unflatten(-1, shape).flip(flip_dim).flatten(-2)
        if width == head_dim:
            return span
        rest = x[..., :lo] if layout.trailing else x[..., width:]
        return torch.cat([rest, span] if layout.trailing else [span, rest], dim=-1)

    return partner


def _gather(index: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x[..., index]


class Rotation:
    """One layout's rotation at fixed positions, forward and inverse, for heads of ``head_dim``.

    The inverse divides by ``cos^2 + sin^2`` so that it is exact also when the model folds an
    attention scale into cos/sin (YaRN, LongRoPE).

    Args:
        cos, sin: ``(1 or B, T, R)``, from :meth:`RotaryLayout.cos_sin` of what the model hands
            its attention.
        layout: how the model applies them.
        head_dim: the query/key head size ``D >= R``.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, layout: RotaryLayout, head_dim: int):
        cos, sin = layout.table(cos.float()), layout.table(sin.float())
        perm, partner, sign, dim_of = layout.maps(cos.shape[-1], head_dim, cos.device)
        inside = dim_of >= 0
        col = dim_of.clamp(min=0)
        c = torch.where(inside, cos[..., col], torch.ones_like(cos[..., col]))  # (B, T, D)
        s = torch.where(inside, sin[..., col], torch.zeros_like(sin[..., col])) * sign
        identity = layout.style != "deinterleaved"
        flip = _flip_partner(layout, cos.shape[-1], head_dim) if identity else None
        forward_partner = flip or _gather(perm[partner])
        self._forward = _TwoTerm(None if identity else perm, c[:, None], forward_partner, s[:, None])
        # Inverse of y = c * z + s * z[partner] (z = x[perm]), pair by pair: z = (c y - s y[partner]) / n.
        norm = c * c + s * s
        inv = torch.argsort(perm)
        c_inv, s_inv = (c / norm)[..., inv], (-s / norm)[..., inv]
        inverse_partner = flip or _gather(partner[inv])
        self._inverse = _TwoTerm(None if identity else inv, c_inv[:, None], inverse_partner, s_inv[:, None])

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Position-free ``(B, H, T, D)`` -> rotated, float32."""
        return self._forward(x)

    def unrotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotated ``(B, H, T, D)`` -> position-free, float32."""
        return self._inverse(x)


@dataclass(frozen=True)
class RotarySource:
    """The module that computes one layer's cos/sin from position ids, and how it is applied."""

    module: nn.Module
    args: tuple = ()
    """Extra positional arguments after ``(x, position_ids)`` (Gemma 3: the layer type)."""
    layout: RotaryLayout = RotaryLayout("half")

    def raw(self, positions: torch.Tensor):
        """What the module returns at ``positions (1, T)`` (float32 input, outside autocast)."""
        with torch.autocast(device_type=positions.device.type, enabled=False):
            x = torch.empty(0, dtype=torch.float32, device=positions.device)
            return self.module(x, positions, *self.args)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(1, T, R)`` at ``positions (1, T)``, float32."""
        cos, sin = self.layout.cos_sin(self.raw(positions))
        return cos.float(), sin.float()


RotateFn = Callable[..., torch.Tensor]
"""``rotate(x (B, H, T, D), first, step=1)``: the model's rotation at positions ``first + step * t``."""


class RotaryTables:
    """Each attention layer's rotary source, with its rotations cached per positions.

    The stack asks for the same positions every segment (``0..T-1``, the store's fixed distance,
    ``0``), so each :class:`Rotation` is built once and reused; the cache keeps the most recent
    ``capacity`` of them (a stream of decoding steps asks for new positions each step).
    """

    def __init__(self, sources: dict[int, RotarySource | None], capacity: int = 64):
        self.sources = sources
        self.capacity = capacity
        self._cache: OrderedDict[tuple, Rotation] = OrderedDict()

    def rotation(
        self, layer: int, first: int, length: int, head_dim: int, device: torch.device, step: int = 1
    ) -> Rotation | None:
        """The layer's rotation at positions ``first + step * t`` for ``t < length`` (None: no rotary)."""
        source = self.sources.get(layer)
        if source is None:
            return None
        key = (id(source.module), source.args, source.layout, first, step, length, head_dim, str(device))
        rot = self._cache.get(key)
        if rot is None:
            positions = (first + step * torch.arange(length, device=device))[None]
            rot = Rotation(*source(positions), source.layout, head_dim)
            self._cache[key] = rot
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return rot

    def rotate_fn(self, layer: int) -> RotateFn | None:
        """``rotate(x, first, step=1)`` for this layer (None when the layer has no rotary)."""
        if self.sources.get(layer) is None:
            return None

        def rotate(x: torch.Tensor, first: int, step: int = 1) -> torch.Tensor:
            return self.rotation(layer, first, x.shape[2], x.shape[-1], x.device, step).rotate(x)

        return rotate

    def clear(self) -> None:
        """Forget every cached rotation (after moving the model to another device or dtype)."""
        self._cache.clear()
