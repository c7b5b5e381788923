"""Can memstack wrap a model? The core invariants, checked against the unwrapped model.

:func:`check_model` wraps a copy of a model with compressive memory and the long-term store on
every attention layer and checks, each against the
unwrapped model or against the stack itself run another way:

- ``first segment``: the first segment's logits equal the unwrapped model's (empty memory);
- ``memory off``: with memory off, every segment equals the unwrapped model run on it alone;
- ``causality``: changing the last token changes no earlier logit, and changing a token of the
  first segment does change the second one's (memory carries it across);
- ``right padding``: a right-padded row equals the row run alone;
- ``un-rotation``: the queries and keys memory sees equal the ones the layer computes when handed
  the identity rotation (cos = 1, sin = 0) at the same hidden states;
- ``generate``: greedy ``generate`` across a segment boundary equals argmax of ``forward``.

:func:`check_type` builds a model type tiny (:mod:`memstack.evals.zoo`) and checks it; the command
``python -m memstack.evals.compat`` prints the table for every causal-LM type of the installed
transformers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from memstack.config import CompressiveConfig, StackConfig, StoreConfig
from memstack.evals.zoo import DoesNotBuildTiny, build_tiny
from memstack.model.discovery import AttentionSite, UnsupportedModelError
from memstack.model.rotary import identity_like

SEG = 8
STACK = StackConfig(
    segment_len=SEG,
    compressive=CompressiveConfig(),
    store=StoreConfig(chunk_len=4, top_k=2, block_len=4, strategy="received_attention"),
)
"""Compressive memory and the long-term store on every attention layer."""
INVARIANTS = ("first segment", "memory off", "causality", "right padding", "un-rotation", "generate")


@dataclass
class Verdict:
    """What happened to one model type."""

    model_type: str
    status: str
    """``supported``, ``refused`` (UnsupportedModelError), ``no tiny build`` or ``fails``."""
    reason: str = ""
    """Why it was refused or did not build, or which invariants failed and by how much."""
    summary: str = ""
    """The discovered attention layout (supported types)."""
    failed: list[str] = field(default_factory=list)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> float | None:
    """None when close; else the largest difference relative to ``b``'s scale."""
    err = float((a.float() - b.float()).abs().max() / (1 + b.float().abs().max()))
    return None if err <= tol else err


def _identity_qk(model: nn.Module, sites: dict[int, AttentionSite], ids: torch.Tensor) -> dict:
    """Each layer's Q/K when handed the identity rotation, at the hidden states of a normal run."""
    from memstack.model.discovery import PROBE_NAME, _Probe, neutral_forward

    probe, seen, handles = _Probe(), {}, []
    previous = model.config._attn_implementation
    modules = {layer: site.module for layer, site in sites.items()}
    for layer, module in modules.items():

        def hook(mod, args, kwargs, layer=layer):
            pe, rotary = kwargs.get("position_embeddings"), sites[layer].rotary
            if probe.in_neutral is None and pe is not None and rotary is not None:
                identity = identity_like(pe)[int(rotary.layout.sin_first) if isinstance(pe, tuple) else 0]
                neutral_forward(probe, layer, mod, args, kwargs, identity)
            return None

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    model.set_attn_implementation(PROBE_NAME)
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False, memstack=probe)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    layer_of = {id(m): layer for layer, m in modules.items()}
    for module, _, extras in probe.calls:
        layer = layer_of.get(id(module))
        if layer is not None:  # a layer without rotary is never neutralised: its Q/K as they are
            seen[layer] = probe.neutral.get(layer, extras["qk"])
    return seen


def check_model(model: nn.Module, seed: int = 0) -> Verdict:
    """Wrap a copy of ``model`` (eval mode, float32) and check every invariant; the model is untouched."""
    from memstack.stack import MemoryStack  # the stack imports this package's modules; avoid a cycle

    model_type = model.config.model_type
    ref = copy.deepcopy(model).eval()
    wrapped = copy.deepcopy(model).eval()
    try:
        stack = MemoryStack(wrapped, STACK)
    except UnsupportedModelError as err:
        return Verdict(model_type, "refused", str(err))
    verdict = Verdict(model_type, "supported", summary=stack.arch.summary())
    vocab = min(int(model.config.get_text_config().vocab_size), 256)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 2 * SEG + 3), generator=g)

    def fail(name: str, err: float | None) -> None:
        if err is not None:
            verdict.failed.append(f"{name} ({err:.1e})")

    with torch.no_grad():
        out = stack(ids).logits
        fail("first segment", _close(out[:, :SEG], ref(ids[:, :SEG]).logits))
        with stack.memory_off():
            off = stack(ids).logits
        alone = torch.cat([ref(ids[:, s : s + SEG]).logits for s in range(0, ids.shape[1], SEG)], dim=1)
        fail("memory off", _close(off, alone))
        later = ids.clone()
        later[:, -1] = (later[:, -1] + 1) % vocab
        fail("causality", _close(stack(later).logits[:, :-1], out[:, :-1]))
        earlier = ids.clone()
        earlier[:, 1] = (earlier[:, 1] + 1) % vocab
        if _close(stack(earlier).logits[:, SEG : 2 * SEG], out[:, SEG : 2 * SEG], tol=1e-6) is None:
            verdict.failed.append("causality (memory carries nothing to the next segment)")
        mask = torch.ones_like(ids)
        mask[1, SEG + 2 :] = 0
        padded = stack(ids, attention_mask=mask).logits[1, : SEG + 2]
        fail("right padding", _close(padded, stack(ids[1:, : SEG + 2]).logits[0]))
        free = stack.position_free_qk(ids[:, :SEG])
        expected = _identity_qk(stack.model, {i: stack.arch.sites[i] for i in free}, ids[:, :SEG])
        errs = [e for layer in free for e in map(_close, free[layer], expected[layer]) if e is not None]
        fail("un-rotation", max(errs) if errs else None)
        prompt = ids[:1, : SEG - 2]
        generated = stack.generate(prompt, max_new_tokens=5)
        greedy = prompt
        for _ in range(5):
            greedy = torch.cat([greedy, stack(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if not torch.equal(generated, greedy):
            verdict.failed.append("generate (differs from greedy forward)")
    if verdict.failed:
        verdict.status, verdict.reason = "fails", "; ".join(verdict.failed)
    return verdict


def check_type(model_type: str, seed: int = 0) -> Verdict:
    """Build ``model_type`` tiny and :func:`check_model` it; errors become a verdict, never a crash."""
    try:
        model = build_tiny(model_type, seed=seed)
    except DoesNotBuildTiny as err:
        return Verdict(model_type, "no tiny build", str(err))
    try:
        return check_model(model, seed=seed)
    except Exception as err:  # an invariant run crashed: report it as a failure with the error
        first = str(err).splitlines()[0] if str(err) else ""
        return Verdict(model_type, "fails", f"{type(err).__name__}: {first}"[:300])


def survey(types: list[str] | None = None, progress: bool = False) -> list[Verdict]:
    """:func:`check_type` for each type (default: every causal-LM type of the installed transformers)."""
    from memstack.evals.zoo import causal_lm_types

    verdicts = []
    for model_type in types or causal_lm_types():
        verdicts.append(check_type(model_type))
        if progress:
            print(f"  {model_type:28s} {verdicts[-1].status}", flush=True)
    return verdicts


def table(verdicts: list[Verdict]) -> str:
    """The verdicts as a text table, supported first, with the counts."""
    order = {"supported": 0, "refused": 1, "fails": 2, "no tiny build": 3}
    rows = sorted(verdicts, key=lambda v: (order.get(v.status, 9), v.model_type))
    width = max((len(v.model_type) for v in rows), default=10)
    lines = [f"{'model type':{width}s}  {'verdict':13s}  attention layout / reason", "-" * (width + 60)]
    for v in rows:
        text = v.summary if v.status == "supported" else v.reason
        text = text if len(text) <= 160 else text[:157] + "..."  # the JSON keeps it whole
        lines.append(f"{v.model_type:{width}s}  {v.status:13s}  {text}")
    lines.append("")
    lines.append(counts(verdicts))
    return "\n".join(lines)


def counts(verdicts: list[Verdict]) -> str:
    """One line: how many types were supported, refused, failed or did not build tiny."""
    tally = {
        s: sum(v.status == s for v in verdicts) for s in ("supported", "refused", "fails", "no tiny build")
    }
    return f"{len(verdicts)} causal-LM types: " + ", ".join(f"{n} {s}" for s, n in tally.items())
