"""The training loop: AdamW with the stack's parameter groups, warmup + cosine, clipping,
accumulation, bf16 autocast on CUDA, BPTT through MemoryStack, JSON-lines metrics, checkpoints
with exact resume, and DDP (or FSDP2 with ``run.fsdp``) under ``torchrun``.

Building and fitting are apart: :func:`build_stack` makes a MemoryStack from a config,
:func:`fit` trains any existing stack (a later phase can fit a stack it already holds), and
:func:`train` is the two in a row.

Batches are a pure function of (seed, step, micro-batch, rank): resuming at step N draws exactly
the batches an uninterrupted run would have drawn, so the data position needs no saving.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from memstack.explain import read_shares, tracing
from memstack.io import remove_stale_temporaries, write_json, write_text
from memstack.memory.adapters import default_targets, lora_config
from memstack.pretrained import SMOLLM2, smollm2
from memstack.sleep import Day, sleep
from memstack.stack import MemoryStack
from memstack.train.checkpoint import (
    checkpoint_meta,
    gather_full_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from memstack.train.config import Config, LoraConfig, ModelConfig
from memstack.train.dashboards import Dashboards

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={spec!r} but CUDA is not available; use cpu or auto")
    return torch.device(spec)


def build_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """Load ``cfg.path`` (local directory, or a hub id the user can reach) or build a random model
    from the config fields (nothing downloaded).

    Args:
        cfg: which model; ``path`` None builds a random ``arch`` model of the given shape.
        seed: seeds the random initialisation (unused when loading ``path``).

    Returns:
        The causal LM, on the CPU, in training mode.
    """
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    if cfg.path == SMOLLM2:
        model, _ = smollm2(dtype=DTYPES[cfg.dtype])
        return model.train()
    if cfg.path is not None:
        return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=DTYPES[cfg.dtype])
    hf = AutoConfig.for_model(
        cfg.arch,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf)


def lr_lambda(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def weighted_loss(out_logits: torch.Tensor, batch: dict[str, torch.Tensor], lm_loss: torch.Tensor, w: float):
    """LM loss plus ``w`` times the mean loss on the answer tokens (when the batch marks them)."""
    mask = batch.get("answer_mask")
    if mask is None or w == 0 or not bool(mask.any()):
        return lm_loss, None
    # position t predicts token t+1: the answer token at t+1 is scored by logits[t]
    pred = out_logits[:, :-1][mask[:, 1:].to(out_logits.device)]
    target = batch["input_ids"][:, 1:][mask[:, 1:]].to(out_logits.device)
    answer = F.cross_entropy(pred.float(), target)
    return lm_loss + w * answer, answer


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _run_device(spec: str, world: int) -> torch.device:
    device = resolve_device(spec)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def build_stack(config: Config, device: torch.device | str = "cpu") -> MemoryStack:
    """The model of ``config.model`` (see :func:`build_model`), on ``device``, wrapped as
    ``config.stack`` says.

    Args:
        config: the run's configuration (``model``, ``stack`` and ``run.seed`` are used).
        device: where the weights go.

    Returns:
        A fresh MemoryStack (its base model in training mode).
    """
    model = build_model(config.model, config.run.seed).to(device)
    stack = MemoryStack(model, config.stack)
    if config.lora is not None:
        add_finetune_adapter(stack, config.lora)
    return stack


FINETUNE = "finetune"
"""The name of the adapter ``Config.lora`` trains (sleep's adapters are ``sleep-NNNN``)."""


def add_finetune_adapter(stack: MemoryStack, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the base model and add the trainable LoRA adapter :data:`FINETUNE` (peft, on
    ``cfg.targets`` or the architecture's default); the memory gates stay trainable. Its B
    matrices start at zero, so the stack's outputs do not change until it trains.

    Returns:
        The adapter's parameters.
    """
    gates = {id(p) for p in stack.gate_parameters()}
    for p in stack.model.parameters():
        p.requires_grad_(id(p) in gates)
    targets = cfg.targets or default_targets(stack.model, stack.arch.lora_targets)
    params = stack.adapters.add(FINETUNE, lora_config(targets, cfg.rank, cfg.alpha, cfg.dropout))
    for p in params:
        p.requires_grad_(True)
    return params


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the records after ``step`` (those a resumed run is about to log again) and return the
    rest; rewritten atomically so a crash here loses nothing."""
    records = _read_metrics(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) < len(records):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _mean_over_ranks(values: list[float], world: int, device: torch.device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def decoder_layers(stack: MemoryStack) -> list[torch.nn.Module]:
    """The base model's decoder layers: the modules holding an attention module (and with it the
    layer's ``memstack_memory`` gates)."""
    attn = {id(m) for m in stack.arch.modules()}
    return [m for m in stack.model.modules() if any(id(c) in attn for c in m.children())]


def _shard(stack: MemoryStack, config: Config, world: int, device: torch.device) -> None:
    """FSDP2 in place: each decoder layer (its memory gates with it) is a unit of its own, then the
    stack (embeddings, final norm, head) the root; refuses what sharding cannot do yet.

    The ``memstack=`` :class:`~memstack.attention.SegmentContext` each layer receives is a plain
    object, so FSDP2's pre-forward hook leaves it (and the records layers append to it) alone; its
    tensors need no hook of FSDP2's: every gradient into a layer's parameters passes through the
    layer's hidden-state input or output.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    sleep = config.sleep
    if sleep is not None and (sleep.every_steps or sleep.every_records):
        raise ValueError(
            "run.fsdp=true does not support a sleep schedule (sleep.every_steps / every_records)"
        )
    if stack.adapters.names():
        raise ValueError(
            "run.fsdp=true cannot train a stack that carries sleep adapters; train without run.fsdp"
        )
    if isinstance(stack, FSDPModule):  # sharded by an earlier fit()
        return
    mesh = init_device_mesh(device.type, (world,))
    for layer in decoder_layers(stack):
        fully_shard(layer, mesh=mesh)
    fully_shard(stack, mesh=mesh)


def _segment_losses(total: torch.Tensor | None) -> list[float | None]:
    """A step's loss by segment index for the metrics (rank 0's micro-batches; None where a
    segment had no predicted token)."""
    if total is None:
        return []
    return [None if math.isnan(x) else round(x, 5) for x in total.tolist()]


def _day(config: Config, stack: MemoryStack, world: int) -> Day | None:
    """The day a sleep schedule needs (None without one); refuses what it cannot do."""
    cfg = config.sleep
    if cfg is None or not (cfg.every_steps or cfg.every_records):
        return None
    if world > 1:
        raise ValueError(
            "sleep.every_steps / sleep.every_records are not supported under torchrun yet (each rank "
            "would train its own adapter); train without them and run scripts/sleep.py on the run"
        )
    if "store" not in stack.kinds:
        raise ValueError("a sleep schedule needs the long-term store (stack.store=on): sleep consolidates it")
    return Day(cfg)


def _sleep(stack: MemoryStack, config: Config, day: Day, step: int, metrics_path: Path) -> None:
    """Sleep on the day's stores and log the report to ``sleeps.jsonl`` next to the metrics (the
    adapters and each report also go under the run directory)."""
    report = sleep(stack, config.sleep, state=day.state(), directory=metrics_path.parent, progress=False)
    day.clear()
    stack.train()
    with open(metrics_path.parent / "sleeps.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **report.to_dict()}) + "\n")


def fit(
    stack: MemoryStack, config: Config, batches: Any, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train an existing ``stack`` as ``config`` says (optimiser, schedule, checkpoints, metrics,
    DDP under ``torchrun``), resuming from the latest checkpoint in ``run.out_dir`` if asked.

    The objective of a step is the mean, over micro-batches and ranks, of each micro-batch's loss
    (itself a mean over its tokens): each micro-batch's loss is divided by ``grad_accum`` and DDP
    averages over ranks, once per optimiser step. With micro-batches of equal token counts this
    is exactly the loss of one batch holding all of them. Logged losses are averaged over ranks.

    With ``run.fsdp`` and 2+ ranks the stack is sharded with FSDP2 in place (see
    :func:`_shard`) instead of wrapped in DDP, with the same objective; checkpoints are gathered
    to rank 0 in the usual format. The returned stack is then still sharded: its forward is a
    collective that every rank must call.

    Args:
        stack: the stack to train, already on its device.
        config: the run's configuration.
        batches: an object with ``batch(step, micro, rank, world) -> dict`` returning
            ``input_ids``, ``labels`` and optionally ``answer_mask`` (see memstack.data).
        progress: show a tqdm bar (rank 0 only).
        stop_after: leave the loop after this many steps as if the process died (tests of
            resume); the schedule still runs to ``schedule.max_steps``.

    Returns:
        Summary: final step, last loss, wall seconds, path of the last checkpoint, the stack.
    """
    rank, world = _distributed()
    device = stack.device
    out_dir = Path(config.run.out_dir)
    metrics_path = out_dir / "metrics.jsonl"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if config.run.resume:
            # a save killed mid-way; also moves back a checkpoint a kill left only as ".old-"
            remove_stale_temporaries(out_dir)
        write_json(out_dir / "config.json", config.to_dict())
    if world > 1:
        dist.barrier()  # the other ranks look for checkpoints only once rank 0 has tidied up

    fsdp = config.run.fsdp and world > 1
    if fsdp:  # before the optimiser: sharding replaces the parameters
        _shard(stack, config, world, device)

    opt_cfg, sched = config.optim, config.schedule
    optimizer = torch.optim.AdamW(
        stack.param_groups(opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.gate_lr_mult), betas=opt_cfg.betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, sched.warmup_steps, sched.max_steps, sched.min_lr_ratio)
    )
    start, loss_value = 0, float("nan")
    ckpt = latest_checkpoint(out_dir) if config.run.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, stack, optimizer, scheduler, sharded=fsdp)
        saved_loss = checkpoint_meta(ckpt)["loss"]
        if saved_loss is not None:
            loss_value = float(saved_loss)
    if rank == 0:
        # records after the checkpoint are logged again by this run: keep each step once
        # (without resume: start is 0 and an old run's records go)
        kept = _truncate_metrics(metrics_path, start)
        if math.isnan(loss_value) and kept:
            loss_value = float(kept[-1]["loss"])
    t_start = time.perf_counter()
    if start >= sched.max_steps:
        if rank == 0:
            print(f"already finished at step {start} (loss {loss_value:.4f}); nothing to train in {out_dir}")
        return {
            "step": start,
            "loss": loss_value,
            "seconds": 0.0,
            "checkpoint": str(ckpt) if ckpt is not None else None,
            "stack": stack,
        }

    engine: torch.nn.Module = stack
    if world > 1 and not fsdp:
        # The gates take part in a forward only when memory is read: a batch that fits in one
        # segment (copy warm-up rows, short curriculum stages, stack.compressive=none) leaves them
        # without a gradient, which plain DDP treats as an error at the next step. Finding the
        # unused parameters costs one graph traversal per forward; only stacks with gates pay it.
        engine = torch.nn.parallel.DistributedDataParallel(
            stack,
            device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=bool(stack.gate_parameters()),
        )

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    day = _day(config, stack, world)
    bar = tqdm(
        range(start, sched.max_steps),
        disable=not progress or rank != 0,
        desc="train",
        initial=start,
        total=sched.max_steps,
    )
    t_last, tokens, done = time.perf_counter(), 0, start
    stack.train()
    dashboards = Dashboards(config.run, out_dir, config.to_dict(), start) if rank == 0 else None
    # the read shares come from tracing one micro-batch per logged step; under FSDP2 the gates
    # they weigh are shards, so it is left out there
    trace_reads = rank == 0 and not fsdp and bool(stack.kinds)
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        lm_total, answer_total, segment_total = 0.0, 0.0, None
        log = (step + 1) % config.run.log_every == 0 or step + 1 == sched.max_steps
        shares = {}
        for micro in range(opt_cfg.grad_accum):
            # gradients are averaged over ranks once per optimiser step, on the last micro-batch
            last = micro == opt_cfg.grad_accum - 1
            sync = contextlib.nullcontext() if world == 1 or fsdp or last else engine.no_sync()
            if fsdp:  # FSDP2's no_sync: gradients stay unsharded and accumulate locally
                stack.set_requires_gradient_sync(last)
            batch = batches.batch(step, micro, rank, world)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            traced = tracing(stack) if trace_reads and log and last else contextlib.nullcontext()
            with sync:
                with autocast, traced as trace:
                    out = engine(ids, labels=labels, return_logits="answer_mask" in batch)
                    loss, answer = (
                        weighted_loss(out.logits, batch, out.loss, config.data.answer_weight)
                        if out.logits is not None
                        else (out.loss, None)
                    )
                (loss / opt_cfg.grad_accum).backward()
            if trace is not None:
                shares = read_shares(stack, trace)
            if out.segment_loss is not None:
                part = out.segment_loss / opt_cfg.grad_accum
                segment_total = part if segment_total is None else segment_total + part
            if day is not None:
                day.add(out.state)
            lm_total += out.loss.item() / opt_cfg.grad_accum
            answer_total += (answer.item() if answer is not None else 0.0) / opt_cfg.grad_accum
            tokens += ids.numel() * world
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stack.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        lm_total, answer_total = _mean_over_ranks([lm_total, answer_total], world, device)
        loss_value = lm_total
        done = step + 1
        if log and (fsdp or rank == 0):  # under FSDP2 gathering the gates is a collective
            gates = {
                kind: {str(k): [round(x, 4) for x in v.tolist()] for k, v in stack.gate_values(kind).items()}
                for kind in sorted({kind for _, kind in stack.named_gates()})
            }
        if rank == 0 and log:
            now = time.perf_counter()
            record = {
                "step": done,
                "loss": lm_total,
                "answer_loss": answer_total,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / max(now - t_last, 1e-9),
                "gates": gates,
                "segment_loss": _segment_losses(segment_total),
                "read_share": shares,
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if dashboards is not None:
                dashboards.log(record)
            bar.set_postfix(loss=f"{lm_total:.3f}", ans=f"{answer_total:.3f}")
            t_last, tokens = now, 0
        if day is not None and day.due(done):
            _sleep(stack, config, day, done, metrics_path)
        every = config.run.ckpt_every
        if (every and done % every == 0) or done == sched.max_steps:
            state = gather_full_state(stack, optimizer) if fsdp else None  # every rank takes part
            if rank == 0:
                ckpt = save_checkpoint(
                    out_dir, done, stack, optimizer, scheduler, config.to_dict(), loss=lm_total, state=state
                )
        if stop_after is not None and done >= stop_after:
            break
    if dashboards is not None:
        dashboards.close()
    if world > 1:
        dist.barrier()
    return {
        "step": done,
        "loss": loss_value,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "stack": stack,
    }


def train(
    config: Config, batches: Any, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Build a MemoryStack as ``config`` says and fit it: :func:`build_stack`, then :func:`fit`.

    Args:
        config: the run's configuration.
        batches: an object with ``batch(step, micro, rank, world) -> dict`` (see :func:`fit`).
        progress: show a tqdm bar (rank 0 only).
        stop_after: leave the loop after this many steps as if the process died (tests of resume).

    Returns:
        Summary: final step, last loss, wall seconds, path of the last checkpoint, the stack.
    """
    _, world = _distributed()
    device = _run_device(config.run.device, world)
    return fit(build_stack(config, device), config, batches, progress=progress, stop_after=stop_after)
