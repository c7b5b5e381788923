"""What memory did for a stretch of input: ``stack.explain(ids)``.

One traced run of the stack (``forward``, or ``generate`` with ``max_new_tokens``) reports:

- **retrievals**: for every store layer, segment and query block, the chunks the block's search
  found, ranked, with their score (the search's inner product or cosine), the stream position and
  length of the chunk, and its text when a tokenizer is given;
- **shares**: for every memory layer and query head, how much of its output came from local
  attention, from compressive memory and from the store, averaged over the queries. A gated kind
  (compressive, a ``kv_gated`` store) takes its gate's share of whatever came before it in the
  mix; a store whose hits join the local softmax (``kv``) takes the attention mass the head put
  on the retrieved keys, measured by running the same attention with ones for their values.

Block ``j`` of a segment serves the queries at segment positions ``[j * block_len, (j + 1) *
block_len)`` and searched with the queries of the block before it (memory/store/kind.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Retrieval:
    """One chunk a query block found."""

    layer: int
    segment: int
    block: int
    queries: tuple[int, int]
    """Stream positions ``[a, b)`` of the queries the block serves."""
    rank: int
    score: float
    record: int
    start: int
    """Stream position of the chunk's first token."""
    length: int
    text: str | None = None


@dataclass
class Explanation:
    """What :func:`explain` found; ``retrievals`` best first within each block."""

    retrievals: list[Retrieval] = field(default_factory=list)
    shares: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    """``{layer: {"local" | kind: [share per query head]}}``, each head's shares summing to 1."""
    output: Any = None
    """What the traced call returned (a StackOutput, or generate's token ids)."""

    def for_block(self, layer: int, position: int) -> list[Retrieval]:
        """The chunks retrieved at ``layer`` for the query at stream ``position``, best first."""
        found = [r for r in self.retrievals if r.layer == layer and r.queries[0] <= position < r.queries[1]]
        return sorted(found, key=lambda r: r.rank)

    def to_dict(self) -> dict[str, Any]:
        return {"retrievals": [asdict(r) for r in self.retrievals], "shares": self.shares}

    def plot(self, path: str | Path, layer: int | None = None) -> Path:
        """Chunks (by stream position) against query blocks, coloured by score, at one store
        layer (default: the first; scores of different layers are on different scales); and each
        layer's per-head shares as stacked bars. Written as PNG."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError('plotting needs matplotlib: pip install "memstack[plots]"') from e

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        layers = sorted({r.layer for r in self.retrievals})
        layer = layers[0] if layer is None and layers else layer
        shown = [r for r in self.retrievals if r.layer == layer]
        if shown:
            dots = left.scatter(
                [r.queries[0] for r in shown], [r.start for r in shown], c=[r.score for r in shown], s=12
            )
            fig.colorbar(dots, ax=left, label="score")
        left.set(xlabel="query block (stream position)", ylabel="retrieved chunk (stream position)")
        left.set_title(f"long-term store, layer {layer}: what each block retrieved")
        x, ticks, colours = 0, [], {"local": "C0", "compressive": "C1", "store": "C2"}
        for number, shares in sorted(self.shares.items()):
            bottom, heads = None, len(next(iter(shares.values())))
            for kind, values in shares.items():
                colour = colours.setdefault(kind, f"C{len(colours)}")
                right.bar([x + h for h in range(heads)], values, bottom=bottom, color=colour)
                bottom = values if bottom is None else [a + b for a, b in zip(bottom, values, strict=True)]
            ticks.append((x + (heads - 1) / 2, f"layer {number}"))
            x += heads + 1
        for kind, colour in colours.items():
            if any(kind in shares for shares in self.shares.values()):
                right.bar([0], [0], color=colour, label=kind)  # one legend entry per kind
        right.set_xticks([t for t, _ in ticks], [n for _, n in ticks])
        right.set(ylabel="share of the head's output", ylim=(0, 1))
        right.set_title("per head: local / compressive / store")
        right.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


@torch.no_grad()
def explain(stack, input_ids: torch.Tensor, tokenizer: Any = None, max_new_tokens: int = 0) -> Explanation:
    """Run ``stack`` on one stream with tracing and report what memory contributed.

    Args:
        stack: a :class:`~memstack.stack.MemoryStack`.
        input_ids: ``(T,)`` or ``(1, T)``: one stream (explanations are per stream).
        tokenizer: anything with ``decode(list[int]) -> str``, for the chunks' text.
        max_new_tokens: > 0 to explain ``generate`` (each generated token's block) instead of
            ``forward``.

    Raises:
        ValueError: for a batch of several streams.
    """
    ids = input_ids[None] if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"explain takes one stream, (T,) or (1, T); got shape {tuple(input_ids.shape)}")
    with tracing(stack) as trace:
        output = stack.generate(ids, max_new_tokens=max_new_tokens) if max_new_tokens else stack(ids)
    return _report(stack, trace, tokenizer, output)


@contextlib.contextmanager
def tracing(stack) -> Iterator[dict]:
    """Record what the stack's memory layers read while the block runs, into the dict it yields
    (for :func:`read_shares`, or :func:`explain`'s report). The trace adds no gradient path: a
    forward traced inside training backpropagates exactly as an untraced one."""
    stack._trace = trace = {}
    try:
        yield trace
    finally:
        stack._trace = None


def read_shares(stack, trace: dict) -> dict[str, float]:
    """``{kind: share}``: the share of the memory layers' attention output that came from each
    memory kind (not ``local``), averaged over memory layers, query heads and queries of a traced
    run (see the module docstring for how a share is measured)."""
    shares = _shares(stack, trace)
    kinds = {kind for layer in shares.values() for kind in layer if kind != "local"}
    per_layer = [{kind: sum(h) / len(h) for kind, h in layer.items()} for layer in shares.values()]
    return {kind: sum(layer.get(kind, 0.0) for layer in per_layer) / len(per_layer) for kind in sorted(kinds)}


def _report(stack, trace: dict, tokenizer, output) -> Explanation:
    seg = stack.config.segment_len
    found = Explanation(output=output)
    store = stack.kinds.get("store")
    for (kind, layer, segment), events in sorted(trace.items(), key=lambda kv: (str(kv[0][0]), kv[0][1:])):
        if kind != "store" or store is None:
            continue
        bl = store.config.block_len
        for block, _row, record_ids, scores, chunk_store in events:
            if not record_ids:
                continue
            info = chunk_store.records(record_ids)
            texts = chunk_store.tokens(record_ids) if tokenizer is not None else None
            a = segment * seg + block * bl
            for rank, (rid, score) in enumerate(zip(record_ids, scores, strict=True)):
                found.retrievals.append(
                    Retrieval(
                        layer,
                        segment,
                        block,
                        (a, min(a + bl, (segment + 1) * seg)),
                        rank,
                        float(score),
                        int(rid),
                        int(info["start"][rank]),
                        int(info["length"][rank]),
                        tokenizer.decode(texts[rank].tolist()) if texts is not None else None,
                    )
                )
    found.shares = _shares(stack, trace)
    return found


def _shares(stack, trace: dict) -> dict[int, dict[str, list[float]]]:
    """Each memory layer's per-head shares of local attention and each kind, over all queries."""
    totals: dict[int, dict[str, torch.Tensor]] = {}
    counts: dict[int, int] = {}
    for (tag, layer, _segment), events in trace.items():
        if tag != "shares":
            continue
        gates = stack._mixers[layer].gates  # empty where no kind is gated (a store-only kv stack)
        h = stack.arch.sites[layer].heads
        for b, t, mass, read in events:
            share = {"local": torch.ones(b, t, h)}
            if mass is not None:  # a kv store joins the local softmax: its mass comes out of local's
                share["store"] = mass.cpu()
                share["local"] = 1 - share["store"]
            for kind, gate in gates.items():  # gated kinds, in mixing order
                if kind not in read:
                    continue
                g = torch.sigmoid(gate.detach().float().cpu()).expand(b, t, h).clone()
                empty = read[kind]
                if empty is not None:  # a row or query with nothing stored keeps what it had
                    empty = empty.cpu()
                    g[(empty[:, None] if empty.ndim == 2 else empty).expand(b, t, h)] = 0.0
                for name in share:
                    share[name] = share[name] * (1 - g)
                share[kind] = share.get(kind, torch.zeros(b, t, h)) + g
            acc = totals.setdefault(layer, {})
            for name, value in share.items():
                acc[name] = acc.get(name, torch.zeros(h)) + value.sum(dim=(0, 1))
            counts[layer] = counts.get(layer, 0) + b * t
    return {
        layer: {name: (value / counts[layer]).tolist() for name, value in acc.items()}
        for layer, acc in sorted(totals.items())
    }
