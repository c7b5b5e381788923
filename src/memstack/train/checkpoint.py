"""Checkpoints that resume exactly: weights (safetensors), optimiser, scheduler and RNG states.

A checkpoint is a directory ``step-000200/`` written atomically (see :mod:`memstack.io`) with
``model.safetensors`` (every parameter of the stack, gates included), ``trainer.pt`` (optimiser,
scheduler and RNG states: tensors and plain containers only, read back with
``torch.load(weights_only=True)``) and ``meta.json`` (step, last loss, config). The data position
is the step itself: batches are a pure function of (seed, step, rank), so nothing else is needed.
A save killed mid-way leaves the previous checkpoints intact and a ``.step-NNNNNN.tmp-*``
temporary, which the next save (or :func:`remove_stale_temporaries` on resume) deletes.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_directory, read_manifest, remove_stale_temporaries

FORMAT = "memstack-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
STEP_PATTERN = r"step-\d{6,}"
"""Regular expression of checkpoint directory names (for :func:`remove_stale_temporaries`)."""


def rng_state() -> dict[str, Any]:
    """Every RNG a run touches, as tensors and plain lists."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: dict[str, Any],
    loss: float | None = None,
) -> Path:
    """Write ``run_dir/step-{step:06d}`` atomically and return its path.

    Temporaries of checkpoints whose save was killed (any step) are removed first; ``loss`` (the
    last training loss) goes into ``meta.json`` so a resumed finished run can report it.
    """
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir, STEP_PATTERN)
    path = run_dir / f"step-{step:06d}"
    weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_directory(path) as tmp:
        save_file(weights, str(tmp / "model.safetensors"))
        adapters = getattr(module, "adapters", None)
        if adapters is not None and adapters.names():  # sleep's LoRA: restored before the weights
            adapters.save(tmp / "adapters")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer.pt",
        )
        (tmp / "meta.json").write_text(
            json.dumps(
                {"format": FORMAT, "version": VERSION, "step": step, "loss": loss, "config": config}, indent=2
            )
        )
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in ``run_dir``, or None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` (format, version, step, loss, config); ``loss`` is None in
    checkpoints written before it was recorded.

    Raises:
        FileNotFoundError: if there is no meta.json.
        ValueError: if it is not a memstack checkpoint manifest.
    """
    meta = read_manifest(Path(path) / "meta.json", FORMAT, VERSION)
    meta.setdefault("loss", None)
    return meta


def load_weights(path: str | Path, module: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint's weights into ``module`` (strictly) and return its metadata.

    Raises:
        ValueError: if the directory is not a memstack checkpoint or the weights do not fit.
    """
    path = Path(path)
    meta = read_manifest(path / "meta.json", FORMAT, VERSION)
    weights = load_file(str(path / "model.safetensors"))
    adapters = getattr(module, "adapters", None)
    if (path / "adapters").is_dir() and adapters is not None and not adapters.names():
        adapters.load(path / "adapters")  # the weights' names include the LoRA layers
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return meta


def load_checkpoint(
    path: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> int:
    """Restore weights, optimiser, scheduler and RNG states; return the step to continue from.

    Raises:
        ValueError: if the directory is not a memstack checkpoint or the weights do not fit.
    """
    path = Path(path)
    meta = load_weights(path, module)
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return int(meta["step"])
