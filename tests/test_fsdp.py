"""FSDP2 (``run.fsdp=true``) on CPU with 2 gloo ranks: the same losses and weights as one process
on the same global batches, exact stop-and-resume, checkpoints in the usual (unsharded) format."""

import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from memstack.config import CompressiveConfig, StackConfig
from memstack.sleep import SleepConfig
from memstack.train.batches import make_batches
from memstack.train.checkpoint import load_checkpoint
from memstack.train.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
)
from memstack.train.loop import build_stack, train

TEXT = "The cat sat on the mat. The dog lay on the rug. A bird sang in the tree.\n" * 40
STEPS = 4
# one global batch of 8 rows per step: 2 ranks x 2 micro-batches of 2 rows, or 1 x 1 of 8
ROWS = torch.randint(0, 256, (STEPS, 8, 48), generator=torch.Generator().manual_seed(7))
SHORT_STEPS = 2
"""The first steps' rows fit in one segment: memory is never read and the gates get no gradient
(nor optimiser state: the step-2 checkpoint has none for them, as after a copy warm-up)."""


class StepBatches:
    """Step ``s``'s 8 rows cut into ``grad_accum * world`` equal micro-batches."""

    def __init__(self, accum: int):
        self.accum = accum

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        ids = ROWS[step].chunk(self.accum * world)[micro * world + rank]
        if step < SHORT_STEPS:
            ids = ids[:, :16]
        return {"input_ids": ids, "labels": ids.clone()}


def tiny_config(out_dir: Path, text_file: Path | None = None, accum: int = 1, batch_size: int = 4) -> Config:
    """A 2-layer model whose sequences span 3-4 segments (memory is read and written)."""
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=None if text_file is None else str(text_file), seq_len=64),
        stack=StackConfig(segment_len=16, compressive=CompressiveConfig(gate_init=0.0)),
        optim=OptimConfig(lr=1e-2, grad_accum=accum, grad_clip=1.0),
        schedule=ScheduleConfig(max_steps=STEPS, warmup_steps=2),
        run=RunConfig(out_dir=str(out_dir), batch_size=batch_size, log_every=1, ckpt_every=2, device="cpu"),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def _fsdp_worker(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a rank stuck in a collective fails after a minute instead of hanging the test session
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    from torch.distributed.fsdp import FSDPModule

    original, syncs = FSDPModule.set_requires_gradient_sync, []

    def recording(self, requires_gradient_sync, *args, **kwargs):
        syncs.append(bool(requires_gradient_sync))
        return original(self, requires_gradient_sync, *args, **kwargs)

    FSDPModule.set_requires_gradient_sync = recording
    for name, cfg_dict, stop_after in jobs:
        cfg = Config.from_dict(cfg_dict)
        batches = StepBatches(cfg.optim.grad_accum) if cfg.data.path is None else make_batches(cfg)[1]
        syncs.clear()
        if stop_after == "error":
            try:
                train(cfg, batches, progress=False)
                message = None
            except ValueError as e:
                message = str(e)
            torch.save({"error": message}, f"{out}/{name}-{rank}.pt")
            continue
        if stop_after == "resume":
            torch.manual_seed(999)  # a resumed process starts with other RNG state
        stop = stop_after if isinstance(stop_after, int) else None
        result = train(cfg, batches, progress=False, stop_after=stop)
        stack = result["stack"]
        sharded = [type(m).__name__ for m in stack.modules() if isinstance(m, FSDPModule)]
        local = {
            k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in stack.state_dict().items()
        }
        torch.save(
            {
                "step": result["step"],
                "loss": result["loss"],
                "syncs": list(syncs),
                "sharded": sharded,
                "local": local,
            },
            f"{out}/{name}-{rank}.pt",
        )
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One 2-rank gloo session runs every FSDP2 job (process start-up is the expensive part)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    text = tmp / "corpus.txt"
    text.write_text(TEXT)
    jobs = []
    for name in ("equal", "equal-cut"):
        cfg = tiny_config(tmp / name, accum=2, batch_size=2)
        cfg.run.fsdp = True
        cfg.stack.checkpoint_segments = True  # recomputed in backward: the same numbers
        jobs.append((name, cfg.to_dict(), 3 if name == "equal-cut" else None))
    jobs.append(("equal-resumed", jobs[-1][1], "resume"))  # resumes step-000002, where gates have no state
    for name in ("full", "cut"):
        cfg = tiny_config(tmp / name, text)
        cfg.schedule.max_steps = 6
        cfg.run.fsdp = True
        jobs.append((name, cfg.to_dict(), 3 if name == "cut" else None))  # "cut" dies after step 3
    jobs.append(("resumed", jobs[-1][1], "resume"))  # resumes step-000002
    sleepy = tiny_config(tmp / "sleepy", text)
    sleepy.run.fsdp = True
    sleepy.stack.store = apply_overrides(Config(), ["stack.store=on"]).stack.store
    sleepy.sleep = SleepConfig(every_steps=2)
    jobs.append(("sleepy", sleepy.to_dict(), "error"))
    mp.spawn(_fsdp_worker, args=(2, _free_port(), jobs, str(tmp)), nprocs=2, join=True)
    return tmp, {name: Config.from_dict(cfg) for name, cfg, _ in jobs}


def test_fsdp_shards_each_decoder_layer_and_the_stack(fsdp_runs):
    tmp, configs = fsdp_runs
    r0, r1 = (torch.load(tmp / f"equal-{rank}.pt") for rank in (0, 1))
    assert sorted(r0["sharded"]) == ["FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer", "FSDPMemoryStack"]
    # every rank holds half of every matrix (gates: one of the two heads' logits each)
    fresh = build_stack(configs["equal"], "cpu").state_dict()
    for name, full in fresh.items():
        assert r0["local"][name].shape[0] + r1["local"][name].shape[0] == full.shape[0], name
    gates = [k for k in fresh if "memstack_memory" in k]
    assert gates and all(r0["local"][k].shape == (1,) for k in gates)
    # accumulation: gradients reduce-scattered only on each step's last micro-batch
    assert r0["syncs"] == [False, True] * STEPS


def test_fsdp_two_ranks_equal_one_process_on_the_same_global_batches(fsdp_runs, tmp_path):
    """2 ranks x 2 micro-batches of 2 rows (FSDP2) == one process, one batch of 8 rows: the same
    losses at every step (averaged over ranks), the same weights and optimiser state."""
    tmp, configs = fsdp_runs
    reference = tiny_config(tmp_path / "single", accum=1, batch_size=8)
    single = train(reference, StepBatches(accum=1), progress=False)
    sharded, plain = read_metrics(configs["equal"].run.out_dir), read_metrics(reference.run.out_dir)
    assert [m["step"] for m in sharded] == list(range(1, STEPS + 1))
    for a, b in zip(sharded, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        for kind, layers in b["gates"].items():  # logged from the gathered shards
            for layer, values in layers.items():
                assert a["gates"][kind][layer] == pytest.approx(values, abs=1e-4)
    # the checkpoint is the usual unsharded format: weights and optimiser state of one process
    initial = build_stack(reference, "cpu").state_dict()
    weights = load_file(str(Path(configs["equal"].run.out_dir) / f"step-{STEPS:06d}" / "model.safetensors"))
    moved = 0
    for name, p in single["stack"].state_dict().items():
        # Adam moves an element by about lr * sign(g) whatever |g|: where a gradient element is
        # ~0, summation-order noise can flip it, so allow a handful of such elements
        off = (weights[name] - p).abs()
        assert int((off > 2e-5).sum()) <= max(2, p.numel() // 1000) and off.max() <= 2e-2, name
        moved += int(not torch.equal(p, initial[name]))
    assert moved > 10
    ta, tb = (
        torch.load(Path(d) / "step-000002" / "trainer.pt")
        for d in (configs["equal"].run.out_dir, tmp_path / "single")
    )
    assert ta["optimizer"]["param_groups"] == tb["optimizer"]["param_groups"]
    assert ta["optimizer"]["state"].keys() == tb["optimizer"]["state"].keys()
    for i, state in tb["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ta["optimizer"]["state"][i][key], value, atol=1e-6, rtol=1e-4)
    # and a single process resumes from it (optimiser indices and names line up)
    stack = build_stack(reference, "cpu")
    optimizer = torch.optim.AdamW(stack.param_groups(1e-2, 0.1, 100.0))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert (
        load_checkpoint(Path(configs["equal"].run.out_dir) / "step-000002", stack, optimizer, scheduler) == 2
    )


@pytest.mark.parametrize("full,cut", [("full", "cut"), ("equal", "equal-cut")])
def test_fsdp_stop_and_resume_equals_an_uninterrupted_run(fsdp_runs, full, cut):
    """Killed after step 3, resumed from step 2: the same metrics and weights, bit for bit (on the
    text task; and on batches whose first steps leave the gates without optimiser state)."""
    tmp, configs = fsdp_runs
    resumed_name = "resumed" if full == "full" else "equal-resumed"
    steps = configs[full].schedule.max_steps
    assert torch.load(tmp / f"{cut}-0.pt")["step"] == 3
    a, b = torch.load(tmp / f"{full}-0.pt"), torch.load(tmp / f"{resumed_name}-0.pt")
    assert b["step"] == a["step"] == steps and b["loss"] == a["loss"]
    ma, mb = read_metrics(configs[full].run.out_dir), read_metrics(configs[cut].run.out_dir)
    assert [m["step"] for m in mb] == list(range(1, steps + 1))  # step 3 (logged, re-run) appears once
    assert mb == [{**m, "tokens_per_s": n["tokens_per_s"]} for m, n in zip(ma, mb, strict=True)]
    for rank in (0, 1):
        wa, wb = (torch.load(tmp / f"{n}-{rank}.pt")["local"] for n in (full, resumed_name))
        for name in wa:
            assert torch.equal(wa[name], wb[name]), (rank, name)
    last = f"step-{steps:06d}"
    wa, wb = (load_file(str(Path(configs[n].run.out_dir) / last / "model.safetensors")) for n in (full, cut))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_refuses_a_sleep_schedule(fsdp_runs):
    tmp, _ = fsdp_runs
    for rank in (0, 1):
        assert (
            "run.fsdp=true does not support a sleep schedule"
            in torch.load(tmp / f"sleepy-{rank}.pt")["error"]
        )


def test_fsdp_in_one_process_is_plain_training(tmp_path):
    """Without torchrun there is nothing to shard over: run.fsdp=true trains exactly as without it."""
    a, b = tiny_config(tmp_path / "a"), tiny_config(tmp_path / "b")
    a.schedule.max_steps = b.schedule.max_steps = 2
    b.run.fsdp = True
    sa = train(a, StepBatches(accum=1), progress=False)["stack"].state_dict()
    sb = train(b, StepBatches(accum=1), progress=False)["stack"].state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert read_metrics(a.run.out_dir) == [
        {**m, "tokens_per_s": n["tokens_per_s"]}
        for m, n in zip(read_metrics(b.run.out_dir), read_metrics(a.run.out_dir), strict=True)
    ]


def test_run_fsdp_is_a_validated_bool():
    assert apply_overrides(Config(), ["run.fsdp=true"]).run.fsdp is True
    with pytest.raises(ValueError, match="run.fsdp must be true or false"):
        RunConfig(fsdp=1)
    with pytest.raises(ValueError, match="run.fsdp"):
        apply_overrides(Config(), ["run.fsdp=maybe"])
