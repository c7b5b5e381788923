"""What memstack needs to know of a model, found by running it once, not looked up in a table.

:func:`discover` runs the model on a short probe input with a probing attention function
registered in transformers' ``AttentionInterface`` and learns:

- the attention modules: whatever calls the registered attention function, in call order (their
  ``layer_idx`` numbers them when present; hybrid models' other layers never call it and simply
  carry no memory);
- each one's shapes (query heads, key/value heads, key and value head sizes, which may differ);
- each one's rotary embedding: the ``position_embeddings`` (cos, sin) it is handed, the module
  that computes them from position ids (matched by calling every rotary module of the model),
  and the layout (:data:`memstack.model.rotary.LAYOUTS`) that maps its rotated queries and keys back to
  the ones it computes when handed the identity rotation (cos = 1, sin = 0) at the same hidden
  states, i.e. after any q/k norm;
- its LoRA targets: peft's per-architecture default, else the linear layers inside attention.

A model that cannot be wrapped gets :class:`UnsupportedModelError` with the specific reason.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.pytorch_utils import Conv1D

from memstack.model.rotary import LAYOUTS, STYLES, RotarySource, RotaryTables, Rotation, identity_like
from memstack.model.window import local_attention, sparse_mask

PROBE_NAME = "memstack_probe"
PROBE_LEN = 12
PROBE_START = 5  # positions 5..16: a rotation far from the identity in every dimension pair

HANDLED = frozenset({"s_aux", "indices", "position_ids", "cache_position"})
"""Tensors an attention function may be handed that memstack honours (or that carry no attention
semantics); any other tensor (``position_bias``, per-token ``sinks``) changes attention in a way
memstack would silently drop, so the model is refused."""

REFUSED: dict[str, str] = {}
"""The true exceptions: model types refused up front, with the reason (discovery decides the rest)."""


class UnsupportedModelError(TypeError):
    """memstack cannot wrap this model; the message names the specific reason."""


@dataclass
class AttentionSite:
    """One attention layer as memstack sees it."""

    layer: int
    module: nn.Module
    heads: int
    kv_heads: int
    key_dim: int
    value_dim: int
    rotary: RotarySource | None = None
    """None: the layer's queries and keys carry no rotation (absolute positions, NoPE layers)."""
    sliding_window: int | None = None
    softcap: float | None = None
    sinks: bool = False


@dataclass
class Architecture:
    """Every attention layer of a model and what LoRA adapts in it."""

    model_type: str
    sites: dict[int, AttentionSite]
    lora_targets: tuple[str, ...] = field(default=())

    @property
    def layers(self) -> list[int]:
        """The attention layers' numbers, ascending."""
        return sorted(self.sites)

    @property
    def num_layers(self) -> int:
        """Layer numbers run from 0 to ``num_layers - 1`` (hybrids: not all are attention)."""
        return max(self.sites) + 1

    def modules(self) -> list[nn.Module]:
        """The attention modules, by layer."""
        return [self.sites[i].module for i in self.layers]

    def rotary_tables(self) -> RotaryTables:
        return RotaryTables({i: s.rotary for i, s in self.sites.items()})

    def summary(self) -> str:
        """One line: layers, rotary layouts, and the attention features memstack honours."""
        layouts = sorted({str(s.rotary.layout) if s.rotary else "none" for s in self.sites.values()})
        extras = [
            name
            for name, on in (
                ("sliding window", any(s.sliding_window for s in self.sites.values())),
                ("soft-capping", any(s.softcap for s in self.sites.values())),
                ("attention sinks", any(s.sinks for s in self.sites.values())),
                ("hybrid", len(self.sites) < self.num_layers),
                ("K/V sizes differ", any(s.key_dim != s.value_dim for s in self.sites.values())),
            )
            if on
        ]
        return f"{len(self.sites)} attention layers, rotary {'/'.join(layouts)}" + "".join(
            f", {e}" for e in extras
        )


class _Probe:
    """Passed as ``memstack=`` during discovery; the probing attention function records into it."""

    def __init__(self):
        self.calls: list[tuple[nn.Module, tuple, dict]] = []
        self.neutral: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        """(call index, which identity) -> the layer's Q/K rotated by nothing."""
        self.in_neutral: tuple[int, int] | None = None


def _probe_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, memstack=None, **kw
):
    """Plain causal attention that records who called it with what."""
    if isinstance(memstack, _Probe):
        if memstack.in_neutral is not None:
            memstack.neutral[memstack.in_neutral] = (query.detach(), key.detach())
        else:
            shapes = (tuple(query.shape), tuple(key.shape), tuple(value.shape))
            extras = {k: kw.get(k) for k in ("sliding_window", "softcap", "s_aux")}
            extras["unknown"] = sorted(
                k for k, v in kw.items() if isinstance(v, torch.Tensor) and k not in HANDLED
            )
            memstack.calls.append((module, shapes, {**extras, "qk": (query.detach(), key.detach())}))
    else:
        raise UnsupportedModelError(
            "the model does not pass keyword arguments of model(...) to its attention"
        )
    if kw.get("indices") is not None:
        attention_mask = sparse_mask(attention_mask, kw["indices"], key.shape[2])
    return local_attention(
        query,
        key,
        value,
        attention_mask,
        scaling=scaling,
        model_window=kw.get("sliding_window"),
        softcap=kw.get("softcap"),
        sinks=kw.get("s_aux"),
    ), None


AttentionInterface.register(PROBE_NAME, _probe_attention)
AttentionMaskInterface.register(PROBE_NAME, sdpa_mask)


def _rotary_form(value):
    """``value`` if it is position embeddings memstack can invert: a pair of real tensors or one
    complex tensor; None if absent; raises for any other form."""
    if value is None:
        return None
    if (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, torch.Tensor) for v in value)
    ):
        return tuple(value)
    if isinstance(value, torch.Tensor) and value.is_complex():
        return value
    raise UnsupportedModelError(
        f"its attention is handed position embeddings of a form memstack cannot invert "
        f"({type(value).__name__}{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}, "
        "neither a (cos, sin) pair nor complex freqs_cis)"
    )


@contextlib.contextmanager
def _probing(model: nn.Module):
    """The model with the probing attention, in eval mode; restored afterwards."""
    previous = model.config._attn_implementation
    training = [(m, m.training) for m in model.modules()]
    try:
        model.set_attn_implementation(PROBE_NAME)
    except Exception as err:  # transformers refuses custom attention for hand-written attention
        raise UnsupportedModelError(
            f"{type(model).__name__} does not route attention through transformers' AttentionInterface "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    model.eval()
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for m, mode in training:
            m.training = mode


def _run(model: nn.Module, probe: _Probe) -> None:
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 256) or 256)
    ids = torch.arange(PROBE_LEN, device=device)[None] * 7 % vocab
    pos = torch.arange(PROBE_START, PROBE_START + PROBE_LEN, device=device)[None]
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False, memstack=probe)


def discover(model: nn.Module) -> Architecture:
    """Find the model's attention layers, their shapes and rotary layout by probing it.

    Raises:
        UnsupportedModelError: with the specific reason the model cannot be wrapped.
    """
    name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise UnsupportedModelError(f"{name} has no transformers config with a model_type")
    if model_type in REFUSED:
        raise UnsupportedModelError(f"{name} (model_type={model_type!r}): {REFUSED[model_type]}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model; memstack wraps decoder-only LMs")
    probe = _Probe()
    with _probing(model):
        try:
            _run(model, probe)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{name}: {err}") from None
        except Exception as err:
            raise UnsupportedModelError(
                f"{name} fails a forward pass with position_ids and a custom attention function "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from None
        if not probe.calls:
            raise UnsupportedModelError(
                f"{name}: no module calls the attention function registered in transformers' "
                "AttentionInterface (its attention is written by hand, or it has none)"
            )
        modules = [m for m, _, _ in probe.calls]
        if len({id(m) for m in modules}) != len(modules):
            raise UnsupportedModelError(
                f"{name}: an attention module calls the attention function more than once per forward "
                "(shared attention blocks or differential attention); memstack keeps one memory per call"
            )
        unknown = sorted({k for _, _, extras in probe.calls for k in extras["unknown"]})
        if unknown:
            raise UnsupportedModelError(
                f"{name}: its attention function is handed {', '.join(unknown)}, which memstack's attention "
                "does not apply (it honours sliding windows, soft-capping, sinks and sparse indices)"
            )
        bidirectional = [m for m in modules if getattr(m, "is_causal", True) is False]
        if bidirectional:
            raise UnsupportedModelError(
                f"{name}: its attention is bidirectional ({type(bidirectional[0]).__name__}.is_causal is "
                "False; set is_decoder=True in the config for a causal LM); memstack wraps causal attention"
            )
        try:
            rotaries = _position_embeddings(model, probe, modules)
        except UnsupportedModelError as err:
            raise UnsupportedModelError(f"{name}: {err}") from None
    numbers = [getattr(m, "layer_idx", None) for m in modules]
    if any(not isinstance(n, int) or n < 0 for n in numbers) or len(set(numbers)) != len(numbers):
        numbers = list(range(len(modules)))  # no usable layer_idx: number them in call order
    sites = {}
    for number, (module, (q, k, v), extras) in zip(numbers, probe.calls, strict=True):
        site = AttentionSite(
            number,
            module,
            heads=q[1],
            kv_heads=k[1],
            key_dim=q[-1],
            value_dim=v[-1],
            sliding_window=extras["sliding_window"],
            softcap=extras["softcap"],
            sinks=extras["s_aux"] is not None,
        )
        if q[1] % k[1]:
            raise UnsupportedModelError(
                f"{name} layer {number}: {q[1]} query heads for {k[1]} key/value heads"
            )
        if id(module) in rotaries:
            site.rotary = _rotary_source(model, number, extras["qk"], probe, rotaries[id(module)])
        sites[number] = site
    return Architecture(model_type, sites, _lora_targets(model, modules))


def neutral_forward(probe: _Probe, key, module: nn.Module, args: tuple, kwargs: dict, identity) -> None:
    """Run ``module`` again at the same hidden states with ``identity`` as its position embeddings
    (rotated by nothing); the probing attention records its Q/K in ``probe.neutral[key]``."""
    probe.in_neutral = key
    try:
        module.forward(*args, **{**kwargs, "position_embeddings": identity})
    finally:
        probe.in_neutral = None


def _position_embeddings(model, probe: _Probe, modules: list[nn.Module]) -> dict[int, tuple]:
    """Run the probe again, capturing each layer's position embeddings and its Q/K under each
    identity rotation (:func:`~memstack.model.rotary.identity_like`)."""
    captured: dict[int, tuple] = {}
    handles = []
    for index, module in enumerate(modules):

        def hook(mod, args, kwargs, index=index):
            if probe.in_neutral is not None:
                return None
            pe = _rotary_form(kwargs.get("position_embeddings"))
            if pe is None:
                return None
            captured[id(mod)] = (pe, index)
            for n, identity in enumerate(identity_like(pe)):
                neutral_forward(probe, (index, n), mod, args, kwargs, identity)
            return None

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    probe.calls.clear()
    try:
        _run(model, probe)
    finally:
        for h in handles:
            h.remove()
    if not captured and any("rotary" in type(m).__name__.lower() for m in model.modules()):
        raise UnsupportedModelError(
            "it applies its rotary embedding inside attention without handing (cos, sin) to it as "
            "position_embeddings, so memstack cannot undo it"
        )
    return captured


def _rotary_source(model, number, qk, probe: _Probe, captured) -> RotarySource | None:
    """The module computing the layer's position embeddings, and the layout that maps its rotated
    Q/K back to the ones it computes when rotated by nothing."""
    raw, index = captured
    q_rot, k_rot = qk
    d = q_rot.shape[-1]
    tol = max(1e-4, 8 * torch.finfo(q_rot.dtype).eps)

    def close(a, b):
        return bool((a.float() - b.float()).abs().max() <= tol * (1 + b.float().abs().max()))

    neutral = {n: qk for (i, n), qk in probe.neutral.items() if i == index}
    if all(close(q_rot, q) and close(k_rot, k) for q, k in neutral.values()):
        return None  # the layer ignores its position embeddings (NoPE layers)
    module, args = _rotary_module(model, raw, q_rot.device, close, number)
    at_zero = RotarySource(module, args).raw(torch.zeros(1, 1, dtype=torch.long, device=q_rot.device))
    for layout in LAYOUTS:
        # Position 0 rotates by nothing (sin 0, cos > 0): this tells (sin, cos) order and
        # direction apart, which a probe at other positions cannot (they differ by a fixed turn).
        cos0, sin0 = layout.cos_sin(at_zero)
        if not (close(sin0, torch.zeros_like(sin0)) and bool((cos0 > 0).all())):
            continue
        cos, sin = layout.cos_sin(raw)
        q_pre, k_pre = neutral[int(layout.sin_first) if isinstance(raw, tuple) else 0]
        width = layout.table(cos).shape[-1]
        if width > d or width % 2:
            continue
        rot = Rotation(cos, sin, layout, d)
        if close(rot.unrotate(q_rot), q_pre) and close(rot.unrotate(k_rot), k_pre):
            return RotarySource(module, args, layout)
    raise UnsupportedModelError(
        f"{type(model).__name__} layer {number}: no known rotary layout ({', '.join(STYLES)}; "
        "leading or trailing; (cos, sin) or (sin, cos); either direction) maps its rotated "
        "queries and keys back to the ones it computes with the identity rotation"
    )


def _rotary_module(model, raw, device, close, number) -> tuple[nn.Module, tuple]:
    """The rotary module (and extra arguments, e.g. Gemma 3's layer type) whose output at the
    probe's positions is what the layer was handed."""
    pos = torch.arange(PROBE_START, PROBE_START + PROBE_LEN, device=device)[None]
    expected = [t[:1].float() for t in (raw if isinstance(raw, tuple) else (raw.real, raw.imag))]
    for candidate in (m for m in model.modules() if "rotary" in type(m).__name__.lower()):
        layer_types = (
            getattr(candidate, "layer_types", None) or getattr(model.config, "layer_types", None) or []
        )
        for args in [(), *((t,) for t in sorted(set(layer_types)))]:
            try:
                out = RotarySource(candidate, args).raw(pos)
                got = [t.float() for t in (out if isinstance(out, (tuple, list)) else (out.real, out.imag))]
            except Exception:  # a module of another signature: not this layer's source
                continue
            if len(got) == 2 and all(
                g.shape == e.shape and close(g, e) for g, e in zip(got, expected, strict=True)
            ):
                return candidate, args
    raise UnsupportedModelError(
        f"{type(model).__name__} layer {number}: no rotary module of the model computes the position "
        "embeddings its attention is handed from position ids"
    )


def _lora_targets(model: nn.Module, modules: list[nn.Module]) -> tuple[str, ...]:
    """The linear layers inside attention, by name (peft's mapping is preferred when it has the type)."""
    names = {
        child_name.rsplit(".", 1)[-1]
        for module in modules
        for child_name, child in module.named_modules()
        if isinstance(child, (nn.Linear, Conv1D)) and child_name
    }
    return tuple(sorted(names))
