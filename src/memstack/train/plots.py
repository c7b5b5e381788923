"""Figures (matplotlib, headless): passkey heatmaps like the papers', loss by segment index,
training curves with gate values. matplotlib is the optional ``plots`` extra, imported when a
figure is drawn."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any


def _pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend, imported on first use."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError('plotting needs matplotlib: pip install "memstack[plots]"') from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def passkey_heatmap(result: dict[str, Any], path: str | Path) -> Path:
    """One heatmap per system (memory on / off): accuracy by length (x) and depth (y)."""
    plt = _pyplot()
    tables = [(k, v) for k, v in result.items() if isinstance(v, dict) and "accuracy" in v]
    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.6), squeeze=False)
    for ax, (name, t) in zip(axes[0], tables, strict=True):
        grid = list(map(list, zip(*t["accuracy"], strict=True)))  # depth rows, length columns
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(
            range(len(t["lengths"])), [f"{n // 1024}K" if n >= 1024 else str(n) for n in t["lengths"]]
        )
        ax.set_yticks(range(len(t["depths"])), [f"{d:.0%}" for d in t["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(name.replace("_", " "))
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def passkey_offset_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against the needle's offset inside its segment, one line per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, t in result.items():
        if isinstance(t, dict) and "offsets" in t:
            ax.plot(t["offsets"], t["accuracy"], marker=".", label=name.replace("_", " "))
            seg, length = t["segment_len"], t["length"]
    ax.set_xlim(0, seg)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(f"needle start inside its segment (segment = {seg} tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"pass key at {length} tokens")
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_by_segment_plot(result: dict[str, Any], path: str | Path) -> Path:
    """Loss per segment index, memory on vs off."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in ("memory_on", "memory_off"):
        if key in result:
            ax.plot(result[key], marker=".", label=key.replace("_", " "))
    ax.set_xlabel(f"segment index ({result.get('segment_len', '?')} tokens each)")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def training_curves(metrics_path: str | Path, path: str | Path) -> Path:
    """Loss (and answer loss) by step, and the mean gate value of every memory layer."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"{metrics_path} holds no metrics")
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["loss"] for r in records], label="LM loss")
    if any(r.get("answer_loss") for r in records):
        a.plot(steps, [r["answer_loss"] for r in records], label="answer loss")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.legend()
    by_kind = [_gates_by_kind(r.get("gates", {})) for r in records]
    gates = by_kind[-1]
    for kind, layers in gates.items():
        for layer in layers:
            mean = [sum(g[kind][layer]) / len(g[kind][layer]) for g in by_kind]
            b.plot(steps, mean, label=f"{kind}, layer {layer}")
    b.set_xlabel("step")
    b.set_ylabel("mean sigmoid(beta)")
    b.set_ylim(0, 1)
    if gates:
        b.legend()
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _gates_by_kind(gates: dict) -> dict[str, dict[str, list[float]]]:
    """A record's gates as ``{kind: {layer: [per head]}}``; runs before gates of every kind were
    logged hold only compressive memory's, as ``{layer: [per head]}``."""
    if gates and all(isinstance(v, list) for v in gates.values()):
        return {"compressive": gates}
    return gates
