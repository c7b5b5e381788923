"""Throughput and peak memory of MemoryStack against the bare model, for long inputs.

Three systems, all built from the same seeded tiny Llama (no download):

- ``bare``: the unwrapped model, full causal attention (SDPA) over the whole input;
- ``memstack``: the model wrapped in ``MemoryStack(StackConfig(segment_len=512))``;
- ``bare_segments``: the unwrapped model run on each 512-token segment alone (one forward per
  segment, no memory), the baseline for what memstack's segmenting should cost;
- ``infini_pytorch``: lucidrains' ``infini-transformer-pytorch`` (a peer implementation of the
  same compressive memory, ``pip install -e ".[bench]"``; skipped when not installed) at the same
  sizes: width 128, 4 layers, 4 heads of 32, feed-forward 512, vocabulary 256, segments of 512
  with its memories passed on (and, in training, backpropagated through) as memstack does. Its
  blocks are its own (GELU feed-forward, not Llama's SwiGLU), so compare it by its ratio to the
  bare model, not token for token.

Two modes: ``inference`` (``torch.no_grad()``, no logits kept) and ``train`` (forward and backward
with ``labels=input_ids``). Every (mode, length, system) is measured in a fresh subprocess (this
script with the hidden ``--one`` flag), so the peak memory of one measurement cannot hide behind
another's. Peak memory is the increase over a baseline taken after the model is built and a tiny
warm-up forward has run: on CPU, the process's peak RSS (``ru_maxrss``); on CUDA,
``torch.cuda.max_memory_allocated``. Time: one warm-up run, then the median of ``--repeats`` runs.

Usage::

    python scripts/bench_memory.py --quick        # smoke run, about 1.5 minutes on 2 idle cores
    python scripts/bench_memory.py                # full run (2 idle CPU cores: about 8 minutes)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_quiet import measure
from torch import nn

SYSTEMS = ("bare", "memstack", "bare_segments", "infini_pytorch")
SEGMENT_LEN = 512
VOCAB = 256
SEED = 0


# ---------------------------------------------------------------------------- one measurement


def build_model(device: str, attn_implementation: str = "sdpa") -> nn.Module:
    """The tiny seeded float32 Llama, built offline from a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=65536,
    )
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn_implementation, dtype=torch.float32
    )
    return model.to(device)


def segmented(
    forward: Callable[[torch.Tensor, bool], torch.Tensor], train: bool
) -> Callable[[torch.Tensor], None]:
    """A run over ``SEGMENT_LEN`` segments: ``forward(segment_ids, first)`` gives each one's logits.

    Targets are shifted over the whole input, as memstack does (the last token of a segment
    predicts the first of the next). Per-segment loss sums are added up and backward is called
    ONCE at the end, so all segments' activations are alive together, as in memstack's full
    backpropagation through time (bptt_segments=None).
    """
    from memstack.stack import next_token_targets

    def run(ids: torch.Tensor) -> None:
        targets = next_token_targets(ids, None) if train else None
        loss_sum = torch.zeros((), device=ids.device)
        for start in range(0, ids.shape[1], SEGMENT_LEN):
            logits = forward(ids[:, start : start + SEGMENT_LEN], start == 0)
            if train:
                seg_targets = targets[:, start : start + SEGMENT_LEN]
                loss_sum = loss_sum + F.cross_entropy(
                    logits.flatten(0, 1).float(), seg_targets.flatten(), ignore_index=-100, reduction="sum"
                )
            del logits
        if train:
            (loss_sum / int((targets != -100).sum())).backward()

    return run


def make_step(system: str, mode: str, model: nn.Module) -> Callable[[torch.Tensor], None]:
    """A function running one full inference or training step of ``system`` on ``input_ids``."""
    from memstack import MemoryStack, StackConfig

    train = mode == "train"

    if system == "bare":

        def run(ids: torch.Tensor) -> None:
            out = model(input_ids=ids, labels=ids if train else None, use_cache=False)
            if train:
                out.loss.backward()
            del out  # logits are not kept beyond the call

    elif system == "memstack":
        stack = MemoryStack(model, StackConfig(segment_len=SEGMENT_LEN))

        def run(ids: torch.Tensor) -> None:
            out = stack(ids, labels=ids if train else None, return_logits=False)
            if train:
                out.loss.backward()
            del out

    elif system == "bare_segments":
        run = segmented(lambda seg, _first: model(input_ids=seg, use_cache=False).logits, train)

    elif system == "infini_pytorch":
        from infini_transformer_pytorch import InfiniTransformer

        torch.manual_seed(SEED)
        device = next(model.parameters()).device
        peer = InfiniTransformer(num_tokens=VOCAB, dim=128, depth=4, dim_head=32, heads=4, ff_mult=4).to(
            device
        )
        peer.train(train)
        model = peer  # zero_grad below clears the peer's gradients

        memories: list = [None]  # the peer's memories, passed from segment to segment

        def forward(seg: torch.Tensor, first: bool) -> torch.Tensor:
            out = peer(seg, past_memories=None if first else memories[0], return_new_memories=True)
            memories[0] = out.past_memories
            return out.logits

        run = segmented(forward, train)

    else:
        raise ValueError(f"unknown system {system!r}")

    def step(ids: torch.Tensor) -> None:
        if train:
            run(ids)
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                run(ids)

    return step


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(mode: str, system: str, length: int, repeats: int, device: str) -> dict[str, Any]:
    """Build, warm up, then time and measure one (mode, system, length). Run in a fresh process."""
    cuda = device.startswith("cuda")
    model = build_model(device)
    model.train(mode == "train")
    step = make_step(system, mode, model)
    gen = torch.Generator().manual_seed(SEED + length)
    ids = torch.randint(0, VOCAB, (1, length), generator=gen).to(device)

    step(ids[:, :64])  # tiny warm-up: code paths, lazy inits, grad buffers' allocator
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = peak_rss_mib()

    def timed() -> float:
        t0 = time.perf_counter()
        step(ids)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    warmup_s = timed()
    times = []
    for _ in range(repeats):
        gc.collect()
        times.append(timed())
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib()) - base
    median = statistics.median(times)
    return {
        "mode": mode,
        "system": system,
        "length": length,
        "repeats": repeats,
        "warmup_s": warmup_s,
        "times_s": times,
        "median_s": median,
        "tokens_per_s": length / median,
        "peak_mib": peak,
        "baseline_mib": base,
        "threads": torch.get_num_threads(),
        # Another busy process on a 2-core machine slows multi-threaded torch several-fold:
        # keep the load average so such a measurement can be recognised.
        "loadavg_1min_after": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------- driver


def default_repeats(length: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    return 1 if length >= 32768 else 3


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def render(results: list[dict[str, Any]]) -> tuple[str, list[str], dict[str, Any]]:
    """The markdown table, the ratio lines below it, and the ratios as a dict."""
    lines = ["| mode | length | system | tokens/s | peak MiB |", "|---|---:|---|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['length']} | {r['system']} | error | error |")
        else:
            mark = " (contended)" if r.get("contended") else ""
            lines.append(
                f"| {r['mode']} | {r['length']} | {r['system']} | "
                f"{r['tokens_per_s']:,.0f}{mark} | {r['peak_mib']:,.1f} |"
            )

    def get(mode: str, system: str, length: int, key: str) -> float | None:
        for r in results:
            if (r["mode"], r["system"], r["length"]) == (mode, system, length) and "error" not in r:
                return r[key]
        return None

    notes: list[str] = []
    ratios: dict[str, Any] = {"inference_peak": {}, "train_time": {}}
    inf_lengths = sorted({r["length"] for r in results if r["mode"] == "inference"})
    if len(inf_lengths) >= 2:
        # Reference: the smallest length >= 4096 (8192 by default), else the smallest; top: the largest.
        ref = next((n for n in inf_lengths if n >= 4096), inf_lengths[0])
        top = inf_lengths[-1]
        if top != ref:
            for system in ("memstack", "bare"):
                a, b = get("inference", system, top, "peak_mib"), get("inference", system, ref, "peak_mib")
                ratio = a / b if a is not None and b else None
                ratios["inference_peak"][f"{system}_peak({top})/peak({ref})"] = ratio
                notes.append(f"- inference {system}: peak({top}) / peak({ref}) = {fmt(ratio, '.2f')}")

    def ratio_of(mode: str, a: str, b: str, length: int, key: str) -> float | None:
        x, y = get(mode, a, length, key), get(mode, b, length, key)
        return x / y if x is not None and y else None

    ratios["train_peak"], ratios["inference_speed"] = {}, {}
    for length in sorted({r["length"] for r in results if r["mode"] == "train"}):
        for system in ("memstack", "infini_pytorch"):
            for other in ("bare_segments", "bare"):
                ratio = ratio_of("train", system, other, length, "median_s")
                if ratio is None:
                    continue
                ratios["train_time"][f"{system}/{other}@{length}"] = ratio
                notes.append(f"- train {length}: {system} time / {other} time = {fmt(ratio, '.2f')}")
            ratio = ratio_of("train", system, "bare_segments", length, "peak_mib")
            if ratio is not None:
                ratios["train_peak"][f"{system}/bare_segments@{length}"] = ratio
                notes.append(f"- train {length}: {system} peak / bare_segments peak = {fmt(ratio, '.2f')}")
    for length in sorted({r["length"] for r in results if r["mode"] == "inference"}):
        for system in ("memstack", "infini_pytorch"):
            ratio = ratio_of("inference", system, "bare_segments", length, "tokens_per_s")
            if ratio is not None:
                ratios["inference_speed"][f"{system}/bare_segments@{length}"] = ratio
                notes.append(
                    f"- inference {length}: {system} tokens/s / bare_segments tokens/s = {fmt(ratio, '.2f')}"
                )
    return "\n".join(lines), notes, ratios


def _has_peer() -> bool:
    import importlib.util

    return importlib.util.find_spec("infini_transformer_pytorch") is not None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[2048, 8192, 32768, 65536],
        help="inference sequence lengths (batch 1)",
    )
    p.add_argument(
        "--train-lengths",
        type=int,
        nargs="+",
        default=[2048, 8192],
        help="training (forward+backward) sequence lengths",
    )
    p.add_argument(
        "--systems",
        nargs="+",
        default=[s for s in SYSTEMS if s != "infini_pytorch" or _has_peer()],
        choices=SYSTEMS,
        help="default: all (infini_pytorch only when installed)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs after one warm-up (default: 1 for lengths >= 32768, else 3)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default="results/bench/memory.json", help="where to write the JSON results")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: lengths 1024 2048, train length 1024, repeats 1"
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="re-measure this many times when other processes kept the CPU busy",
    )
    p.add_argument(
        "--max-other-cores",
        type=float,
        default=0.15,
        help="CPU use by other processes (cores) above which a measurement is contended",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.train_lengths, args.repeats = [1024, 2048], [1024], 1
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one is not None:
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(measure_one(**spec)), flush=True)
        return

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    plan = [("inference", n) for n in args.lengths] + [("train", n) for n in args.train_lengths]
    results = []
    for mode, length in plan:
        for system in args.systems:
            spec = {
                "mode": mode,
                "system": system,
                "length": length,
                "repeats": default_repeats(length, args.repeats),
                "device": args.device,
            }
            r = measure(__file__, spec, args.retries, args.max_other_cores)
            results.append(r)
            status = r.get("error") or f"{r['tokens_per_s']:,.0f} tok/s, peak {r['peak_mib']:,.1f} MiB"
            status += f" (others used {r['other_cores']:.2f} cores)"
            print(
                f"[{time.perf_counter() - t_start:7.1f}s] {mode:9s} {length:6d} {system:13s} {status}",
                file=sys.stderr,
                flush=True,
            )

    table, notes, ratios = render(results)
    wall = time.perf_counter() - t_start
    print(table)
    print()
    print("\n".join(notes))
    print(
        f"\nwall time: {wall:.1f} s; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {args.device}"
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "args": {k: v for k, v in vars(args).items() if k != "one"},
        "segment_len": SEGMENT_LEN,
        "peak_memory": "cuda max_memory_allocated"
        if args.device.startswith("cuda")
        else "ru_maxrss increase over post-warm-up baseline, fresh process per measurement",
        "wall_s": wall,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    out.write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios, "table": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
