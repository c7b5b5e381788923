"""Checkpoints that resume exactly: weights (safetensors), optimiser, scheduler and RNG states.

A checkpoint is a directory ``step-000200/`` written atomically (see :mod:`memstack.io`) with
``model.safetensors`` (every parameter of the stack, gates included), ``trainer.pt`` (optimiser,
scheduler and RNG states: tensors and plain containers only, read back with
``torch.load(weights_only=True)``) and ``meta.json`` (step, last loss, config). The data position
is the step itself: batches are a pure function of (seed, step, rank), so nothing else is needed.
A save killed mid-way leaves the previous checkpoints intact and a ``.step-NNNNNN.tmp-*``
temporary, which the next save (or :func:`remove_stale_temporaries` on resume) deletes.

Under FSDP2 (``run.fsdp``) the format is the same: :func:`gather_full_state` gathers the sharded
weights and optimiser state to rank 0 (optimiser state keyed by parameter index, as
``Optimizer.state_dict`` keys it), and ``load_checkpoint(..., sharded=True)`` has rank 0 read the
files and broadcast each rank its shards. A checkpoint therefore resumes with or without FSDP2.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from memstack.io import atomic_directory, read_manifest, remove_stale_temporaries

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
    state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``run_dir/step-{step:06d}`` atomically and return its path.

    Temporaries of checkpoints whose save was killed (any step) are removed first; ``loss`` (the
    last training loss) goes into ``meta.json`` so a resumed finished run can report it.
    ``state``: (weights, optimiser state) already gathered by :func:`gather_full_state` (a
    sharded module); None reads ``module.state_dict()`` and ``optimizer.state_dict()``.
    """
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir, STEP_PATTERN)
    path = run_dir / f"step-{step:06d}"
    if state is None:
        state = module.state_dict(), optimizer.state_dict()
    # from the module too: MemoryStack.state_dict already leaves tied names out, and a load that
    # is not MemoryStack's own (FSDP2's) needs them written down
    tied = module.tied_names() if hasattr(module, "tied_names") else {}
    aliases = {**tied_aliases(state[0]), **tied}
    weights = {k: v.detach().contiguous().cpu() for k, v in state[0].items() if k not in aliases}
    with atomic_directory(path) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
        adapters = getattr(module, "adapters", None)
        if adapters is not None and adapters.names():  # sleep's LoRA: restored before the weights
            adapters.save(tmp / "adapters")
        torch.save(
            {"optimizer": state[1], "scheduler": scheduler.state_dict(), "rng": rng_state()},
            tmp / "trainer.pt",
        )
        (tmp / "meta.json").write_text(
            json.dumps(
                {"format": FORMAT, "version": VERSION, "step": step, "loss": loss, "config": config}, indent=2
            )
        )
    return path


def tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: first name}`` for every entry of ``state`` that is the same tensor as an earlier
    one (tied weights, such as an output head sharing the input embedding): safetensors refuses
    to write shared memory twice, so a checkpoint keeps the first name and records the others."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's ``model.safetensors``, tied names (:func:`tied_aliases`) filled back in."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    weights = load_file(str(file))
    for alias, name in aliases.items():
        if name not in weights:
            raise ValueError(f"{file}: tied weight {alias!r} names {name!r}, which the file lacks")
        weights[alias] = weights[name]
    return weights


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
    weights = read_weights(path)
    adapters = getattr(module, "adapters", None)
    if (path / "adapters").is_dir() and adapters is not None and not adapters.names():
        adapters.load(path / "adapters")  # the weights' names include the LoRA layers
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return meta


def _parameter_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimiser's parameters in ``Optimizer.state_dict`` order (index i is the
    i-th parameter over the groups)."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def gather_full_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimiser state) of an FSDP2-sharded ``module``, unsharded on rank 0's CPU, in
    the format of ``module.state_dict()`` and ``optimizer.state_dict()``: what
    :func:`save_checkpoint` writes. A collective: every rank calls it; ranks other than 0 get
    empty dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    by_name = get_optimizer_state_dict(module, optimizer, options=options)
    if dist.get_rank() != 0:
        return {}, {}
    index = {name: i for i, name in enumerate(_parameter_names(module, optimizer))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]]
    return weights, {"state": {index[k]: v for k, v in by_name["state"].items()}, "param_groups": groups}


def load_checkpoint(
    path: str | Path,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sharded: bool = False,
) -> int:
    """Restore weights, optimiser, scheduler and RNG states; return the step to continue from.

    ``sharded``: ``module`` is sharded with FSDP2 (``optimizer`` built on its sharded parameters);
    a collective where rank 0 reads the weights and optimiser state and sends each rank its shards.

    Raises:
        ValueError: if the directory is not a memstack checkpoint or the weights do not fit (or,
            sharded, if it holds sleep adapters).
    """
    path = Path(path)
    if not sharded:
        meta = load_weights(path, module)
        trainer = torch.load(path / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(trainer["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        meta = read_manifest(path / "meta.json", FORMAT, VERSION)
        if (path / "adapters").is_dir():
            raise ValueError(f"{path} holds sleep adapters: it cannot be resumed with run.fsdp=true")
        # mmap: the ranks that only need the scheduler and RNG states do not read the optimiser's
        trainer = torch.load(path / "trainer.pt", weights_only=True, mmap=True)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        weights, optim, error = {}, {}, [None]
        if dist.get_rank() == 0:
            weights = read_weights(path)
            expected = set(module.state_dict())  # local shards: no communication
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            if missing or unexpected:
                error[0] = f"{path}: weights do not fit the model (missing {missing[:5]}, "
                error[0] += f"unexpected {unexpected[:5]})"
        dist.broadcast_object_list(error, src=0)  # every rank raises, none waits in a broadcast
        if error[0] is not None:
            raise ValueError(error[0])
        if dist.get_rank() == 0:
            names = _parameter_names(module, optimizer)
            saved = trainer["optimizer"]
            optim = {
                "state": {names[i]: v for i, v in saved["state"].items()},
                "param_groups": [
                    {**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]
                ],
            }
        set_model_state_dict(module, weights, options=options)
        # not strict: a parameter that never had a gradient (gates while memory is not read yet)
        # has no saved state; the loader gives every parameter some, so those lose theirs again
        loose = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_optimizer_state_dict(module, optimizer, optim, options=loose)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            if i not in trainer["optimizer"]["state"]:
                optimizer.state.pop(p, None)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return int(meta["step"])
