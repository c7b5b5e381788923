"""The training loop: AdamW with the stack's parameter groups, warmup + cosine, clipping,
accumulation, bf16 autocast on CUDA, BPTT through MemoryStack, JSON-lines metrics, checkpoints
with exact resume, and DDP under ``torchrun``.

Batches are a pure function of (seed, step, micro-batch, rank): resuming at step N draws exactly
the batches an uninterrupted run would have drawn, so the data position needs no saving.
"""

from __future__ import annotations

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

from ..config import Config, ModelConfig
from ..io import write_json
from ..stack import MemoryStack
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

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
    from the config fields (nothing downloaded)."""
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
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


def train(
    config: Config, batches: Any, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Train a MemoryStack as ``config`` says.

    Args:
        config: the run's configuration.
        batches: an object with ``batch(step, micro, rank, world) -> dict`` returning
            ``input_ids``, ``labels`` and optionally ``answer_mask`` (see memstack.data).
        progress: show a tqdm bar (rank 0 only).
        stop_after: leave the loop after this many steps as if the process died (tests of
            resume); the schedule still runs to ``schedule.max_steps``.

    Returns:
        Summary: final step, last loss, wall seconds, path of the last checkpoint.
    """
    rank, world = _distributed()
    device = resolve_device(config.run.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out_dir = Path(config.run.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", config.to_dict())

    model = build_model(config.model, config.run.seed).to(device)
    stack = MemoryStack(model, config.stack)
    opt_cfg = config.optim
    optimizer = torch.optim.AdamW(
        stack.param_groups(opt_cfg.lr, opt_cfg.weight_decay, opt_cfg.gate_lr_mult), betas=opt_cfg.betas
    )
    sched = config.schedule
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, sched.warmup_steps, sched.max_steps, sched.min_lr_ratio)
    )
    start = 0
    ckpt = latest_checkpoint(out_dir) if config.run.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, stack, optimizer, scheduler)
    engine: torch.nn.Module = stack
    if world > 1:
        engine = torch.nn.parallel.DistributedDataParallel(
            stack, device_ids=[device] if device.type == "cuda" else None
        )

    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    metrics_path = out_dir / "metrics.jsonl"
    bar = tqdm(
        range(start, sched.max_steps),
        disable=not progress or rank != 0,
        desc="train",
        initial=start,
        total=sched.max_steps,
    )
    loss_value, t_last, tokens, done = float("nan"), time.perf_counter(), 0, start
    t_start = time.perf_counter()
    stack.train()
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        lm_total, answer_total = 0.0, 0.0
        for micro in range(opt_cfg.grad_accum):
            batch = batches.batch(step, micro, rank, world)
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            with autocast:
                out = engine(ids, labels=labels, return_logits="answer_mask" in batch)
                loss, answer = (
                    weighted_loss(out.logits, batch, out.loss, config.data.answer_weight)
                    if out.logits is not None
                    else (out.loss, None)
                )
            (loss / opt_cfg.grad_accum).backward()
            lm_total += out.loss.item() / opt_cfg.grad_accum
            answer_total += (answer.item() if answer is not None else 0.0) / opt_cfg.grad_accum
            tokens += ids.numel() * world
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(stack.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_value = lm_total
        done = step + 1
        if rank == 0 and (done % config.run.log_every == 0 or done == sched.max_steps):
            now = time.perf_counter()
            record = {
                "step": done,
                "loss": lm_total,
                "answer_loss": answer_total,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": tokens / max(now - t_last, 1e-9),
                "gates": {str(k): [round(x, 4) for x in v.tolist()] for k, v in stack.gate_values().items()},
            }
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{lm_total:.3f}", ans=f"{answer_total:.3f}")
            t_last, tokens = now, 0
        every = config.run.ckpt_every
        if rank == 0 and ((every and done % every == 0) or done == sched.max_steps):
            ckpt = save_checkpoint(out_dir, done, stack, optimizer, scheduler, config.to_dict())
        if stop_after is not None and done >= stop_after:
            break
    if world > 1:
        dist.barrier()
    return {
        "step": done,
        "loss": loss_value,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "stack": stack,
    }
