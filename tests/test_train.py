"""The training loop: it learns, it resumes exactly, DDP keeps ranks identical."""

import json
import os
import socket
import stat
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from memstack.config import CompressiveConfig, StackConfig
from memstack.train.batches import curriculum_length, make_batches
from memstack.train.checkpoint import checkpoint_meta, latest_checkpoint, load_checkpoint, save_checkpoint
from memstack.train.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    load_config,
)
from memstack.train.loop import build_model, build_stack, fit, lr_lambda, train

TEXT = "The cat sat on the mat. The dog lay on the rug. A bird sang in the tree.\n" * 40


def tiny_config(tmp_path, text_file, **run) -> Config:
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=str(text_file), seq_len=64),
        stack=StackConfig(segment_len=16, compressive=CompressiveConfig(gate_init=0.0)),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(max_steps=20, warmup_steps=2),
        run=RunConfig(out_dir=str(tmp_path / "run"), batch_size=4, log_every=1, **run),
    )


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def read_metrics(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_twenty_steps_lower_the_loss(tmp_path, text_file):
    cfg = tiny_config(tmp_path, text_file, ckpt_every=0)
    _, batches = make_batches(cfg)
    train(cfg, batches, progress=False)
    losses = [m["loss"] for m in read_metrics(cfg.run.out_dir)]
    assert len(losses) == 20
    assert losses[-1] < 0.6 * losses[0]  # starts near ln 256 = 5.5 on a highly repetitive text


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, text_file):
    full = tiny_config(tmp_path / "a", text_file, ckpt_every=3)
    full.schedule.max_steps = 7
    _, batches = make_batches(full)
    a = train(full, batches, progress=False)

    cut = tiny_config(tmp_path / "b", text_file, ckpt_every=3)
    cut.schedule.max_steps = 7
    first = train(cut, make_batches(cut)[1], progress=False, stop_after=4)  # dies after step 4
    assert first["step"] == 4
    torch.manual_seed(999)  # a resumed process starts with other RNG state; the checkpoint restores it
    b = train(cut, make_batches(cut)[1], progress=False)  # resumes from step-000003
    ma, mb = read_metrics(full.run.out_dir), read_metrics(cut.run.out_dir)
    assert [m["step"] for m in mb] == list(range(1, 8))  # steps 4 (logged, then re-run) appear once
    by_step_b = {m["step"]: m["loss"] for m in mb}
    for m in ma:
        assert by_step_b[m["step"]] == m["loss"], m["step"]
    for (na, pa), (nb, pb) in zip(
        a["stack"].state_dict().items(), b["stack"].state_dict().items(), strict=True
    ):
        assert na == nb and torch.equal(pa, pb), na


def test_schedule_and_curriculum():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    lengths = [curriculum_length(s, [128, 256], 10, 1024) for s in (0, 9, 10, 19, 20, 500)]
    assert lengths == [128, 128, 256, 256, 1024, 1024]


def test_passkey_batches_follow_the_curriculum_and_are_deterministic(tmp_path):
    data = DataConfig(
        task="passkey",
        seq_len=512,
        curriculum=[160, 256],
        curriculum_steps=5,
        repeat_fraction=0.5,
        copy_steps=2,
    )
    _, batches = make_batches(Config(data=data, run=RunConfig(batch_size=4)))
    copy = batches.batch(1, 0, 0, 1)  # copy warm-up: repeated strings only, no answer
    assert copy["input_ids"].shape == (4, 160) and not copy["answer_mask"].any()
    assert torch.equal(copy["labels"], copy["input_ids"])
    b2, b2_again, b9, b12 = (batches.batch(s, 0, 0, 1) for s in (2, 2, 9, 12))
    assert torch.equal(b2["input_ids"], b2_again["input_ids"])
    assert b2["input_ids"].shape[1] == 160 + 6 and b9["input_ids"].shape[1] == 256 + 6
    assert b12["input_ids"].shape[1] == 512 + 6
    assert b2["answer_mask"][:2].sum() == 2 * 6 and b2["answer_mask"][2:].sum() == 0  # 2 repeat rows
    assert not torch.equal(batches.batch(2, 0, 1, 2)["input_ids"], b2["input_ids"])  # ranks differ


def test_length_jitter_moves_the_answer_through_the_segment():
    """Prompt lengths spread over [L - jitter, L], clamped at the shortest pass-key prompt; the
    answer follows the prompt of each batch; draws are reproducible."""
    data = DataConfig(task="passkey", seq_len=256, curriculum=[112], curriculum_steps=50, length_jitter=63)
    _, batches = make_batches(Config(data=data, run=RunConfig(batch_size=2)))
    shortest = batches.min_length
    seen = {0: set(), 1: set()}
    for step in range(120):
        b = batches.batch(step, 0, 0, 1)
        prompt = b["input_ids"].shape[1] - 6
        stage = 0 if step < 50 else 1
        assert (max(112 - 63, shortest) if stage == 0 else 256 - 63) <= prompt <= (112, 256)[stage]
        assert b["answer_mask"][0].nonzero()[0].item() == prompt
        seen[stage].add(prompt)
    assert shortest in seen[0] and len(seen[1]) > 30  # the clamp is hit; the lengths really vary
    assert torch.equal(batches.batch(77, 0, 0, 1)["input_ids"], batches.batch(77, 0, 0, 1)["input_ids"])
    with pytest.raises(ValueError, match="length_jitter"):
        make_batches(Config(data=DataConfig(task="passkey", length_jitter=-1)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model_state(cfg):
    from memstack import MemoryStack
    from memstack.train.loop import build_model

    return MemoryStack(build_model(cfg.model, cfg.run.seed), cfg.stack).state_dict()


def test_build_stack_then_fit_equals_train(tmp_path, text_file):
    """fit() trains a stack built elsewhere exactly as train() trains the one it builds."""
    a = tiny_config(tmp_path / "a", text_file, ckpt_every=0)
    b = tiny_config(tmp_path / "b", text_file, ckpt_every=0)
    a.schedule.max_steps = b.schedule.max_steps = 2
    trained = train(a, make_batches(a)[1], progress=False)["stack"]
    stack = build_stack(b, "cpu")
    summary = fit(stack, b, make_batches(b)[1], progress=False)
    assert summary["stack"] is stack and summary["step"] == 2
    assert Config.from_dict(json.loads((tmp_path / "b" / "run" / "config.json").read_text())) == b
    for (name, pa), pb in zip(trained.state_dict().items(), stack.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_resuming_a_finished_run_reports_its_real_loss(tmp_path, text_file, capsys):
    cfg = tiny_config(tmp_path, text_file, ckpt_every=0)
    cfg.schedule.max_steps = 3
    first = train(cfg, make_batches(cfg)[1], progress=False)
    again = train(cfg, make_batches(cfg)[1], progress=False)
    assert again["step"] == 3 and again["loss"] == first["loss"] == read_metrics(cfg.run.out_dir)[-1]["loss"]
    assert again["checkpoint"] == first["checkpoint"]
    assert f"already finished at step 3 (loss {first['loss']:.4f})" in capsys.readouterr().out
    assert [m["step"] for m in read_metrics(cfg.run.out_dir)] == [1, 2, 3]
    # a checkpoint from before meta.json recorded the loss: the metrics still know it
    meta_path = tmp_path / "run" / "step-000003" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["loss"]
    meta_path.write_text(json.dumps(meta))
    assert train(cfg, make_batches(cfg)[1], progress=False)["loss"] == first["loss"]


def test_resume_removes_what_a_killed_save_left(tmp_path, text_file):
    cfg = tiny_config(tmp_path, text_file, ckpt_every=2)
    cfg.schedule.max_steps = 4
    train(cfg, make_batches(cfg)[1], progress=False, stop_after=3)
    run_dir = tmp_path / "run"
    # what SIGKILL during the step-4 save and during a metrics rewrite leave behind
    (run_dir / ".step-000004.tmp-k1ll3d_x").mkdir()
    (run_dir / ".step-000004.tmp-k1ll3d_x" / "model.safetensors").write_bytes(b"half")
    (run_dir / ".metrics.jsonl.tmp-abcd1234").write_text("half")
    (run_dir / ".notes.tmp-mine").write_text("not ours: other naming")
    summary = train(cfg, make_batches(cfg)[1], progress=False)
    assert summary["step"] == 4
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".notes.tmp-mine"]
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------- DDP on every shipped config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
SHRINK = [
    "schedule.max_steps=2",
    "schedule.warmup_steps=1",
    "run.batch_size=2",
    "run.log_every=1",
    "run.ckpt_every=0",
    "run.device=cpu",
    "optim.grad_accum=2",
]
TINY_MODEL = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=2",
]


def _shipped_overrides(name: str, tmp_path: Path, text_file: Path, llama_dir: Path) -> list[str]:
    """Each shipped config made tiny: a couple of steps of a 2-layer model on short sequences."""
    over = [*SHRINK, f"run.out_dir={tmp_path / name}"]
    if name.startswith("llama_"):  # GPU recipes: a tiny random Llama saved where model.path points
        over += [f"model.path={llama_dir}", "data.tokenizer=bytes"]
    else:
        over += TINY_MODEL
    if name in ("tiny_passkey.py", "tiny_passkey_store.py"):
        # two copy warm-up steps that fit in one segment (memory never read: the gates get no
        # gradient), then a pass key in one segment, then one spread over two segments
        over += [
            "schedule.max_steps=4",
            "data.copy_steps=2",
            "data.curriculum=[120]",
            "data.curriculum_steps=1",
            "data.seq_len=200",
            "data.length_jitter=0",
            "stack.segment_len=128",
        ]
        if name == "tiny_passkey_store.py":  # the tiny model has 2 layers; each rank keeps its own stores
            over += ["stack.store.layers=1"]
    elif name == "llama_passkey_finetune.py":
        over += ["data.seq_len=256", "stack.segment_len=128"]  # the instruction alone is 245 bytes
    elif name == "demo.py":
        over += ["data.copy_steps=1", "data.curriculum=[120]", "data.seq_len=160", "stack.segment_len=64"]
    else:  # text recipes
        over += [
            f"data.path={text_file}",
            "data.doc_separator=none",
            "data.seq_len=64",
            "stack.segment_len=32",
        ]
    return over


class SplitBatches:
    """Fixed rows cut into ``accum * world`` equal micro-batches: piece ``micro * world + rank``.

    With ``accum = world = 1`` it is one batch of every row: the reference for DDP + accumulation.
    """

    def __init__(self, rows: torch.Tensor, accum: int):
        self.rows, self.accum = rows, accum

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        ids = self.rows.chunk(self.accum * world)[micro * world + rank]
        return {"input_ids": ids, "labels": ids.clone()}


def _accumulation_config(out_dir: Path, accum: int, batch_size: int) -> Config:
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", seq_len=48),
        stack=StackConfig(
            segment_len=16, compressive=CompressiveConfig(gate_init=0.0)
        ),  # 3 segments: memory is read and written
        optim=OptimConfig(lr=1e-3, grad_accum=accum),
        schedule=ScheduleConfig(max_steps=1, warmup_steps=1),
        run=RunConfig(out_dir=str(out_dir), batch_size=batch_size, log_every=1, ckpt_every=0, device="cpu"),
    )


ACCUM_ROWS = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(5))


def _ddp_jobs_worker(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # a rank stuck in a collective fails after a minute instead of hanging the test session
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync, skipped = ddp.no_sync, []

    def counting_no_sync(self):
        skipped.append(1)  # a micro-batch whose gradients are not all-reduced
        return no_sync(self)

    ddp.no_sync = counting_no_sync
    for name, cfg_dict in jobs:
        cfg = Config.from_dict(cfg_dict)
        batches = SplitBatches(ACCUM_ROWS, accum=2) if name == "accumulation" else make_batches(cfg)[1]
        skipped.clear()
        result = train(cfg, batches, progress=False)
        state = {k: v.detach().clone() for k, v in result["stack"].state_dict().items()}
        summary = {"state": state, "step": result["step"], "loss": result["loss"], "no_sync": len(skipped)}
        torch.save(summary, f"{out}/{name}-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One 2-rank gloo session runs every DDP job (process start-up is the expensive part)."""
    tmp = tmp_path_factory.mktemp("ddp")
    text = tmp / "corpus.txt"
    text.write_text(TEXT)
    llama_dir = tmp / "tiny-llama"
    build_model(
        ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1), 0
    ).save_pretrained(llama_dir)
    jobs = []
    for name in SHIPPED:
        cfg = load_config(str(ROOT / "configs" / name), _shipped_overrides(name, tmp, text, llama_dir))
        jobs.append((name, cfg.to_dict()))
    accum = _accumulation_config(tmp / "accumulation", accum=2, batch_size=2)
    jobs.append(("accumulation", accum.to_dict()))
    identical = tiny_config(tmp / "identical", text, ckpt_every=0)
    identical.schedule.max_steps = 3
    jobs.append(("identical", identical.to_dict()))
    mp.spawn(_ddp_jobs_worker, args=(2, _free_port(), jobs, str(tmp)), nprocs=2, join=True)
    return tmp, dict(jobs)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_trains_under_two_ddp_ranks(ddp_runs, name):
    tmp, configs = ddp_runs
    cfg = Config.from_dict(configs[name])
    r0, r1 = torch.load(tmp / f"{name}-0.pt"), torch.load(tmp / f"{name}-1.pt")
    assert r0["step"] == r1["step"] == cfg.schedule.max_steps
    # gradients all-reduced once per optimiser step: every micro-batch but the last skips it
    assert r0["no_sync"] == cfg.schedule.max_steps * (cfg.optim.grad_accum - 1) > 0
    fresh = build_stack(cfg, "cpu")
    gates = {name for name, p in fresh.named_parameters() if any(p is g for g in fresh.gate_parameters())}
    initial = fresh.state_dict()
    changed = [k for k in r0["state"] if not torch.equal(r0["state"][k], initial[k].to(r0["state"][k].dtype))]
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert changed, "nothing trained"
    assert [m["step"] for m in read_metrics(cfg.run.out_dir)] == list(range(1, cfg.schedule.max_steps + 1))
    if name.startswith("tiny_passkey"):  # the gates idle through the copy warm-up, then learn
        assert gates and gates <= set(changed), sorted(gates - set(changed))


@pytest.mark.slow
def test_ddp_accumulation_equals_one_large_batch(ddp_runs, tmp_path):
    """2 ranks x 2 micro-batches of 2 rows == one process, one batch of the 8 rows."""
    tmp, _ = ddp_runs
    reference = _accumulation_config(tmp_path / "single", accum=1, batch_size=8)
    single = train(reference, SplitBatches(ACCUM_ROWS, accum=1), progress=False)
    ddp = torch.load(tmp / "accumulation-0.pt")
    assert ddp["loss"] == pytest.approx(single["loss"], abs=1e-6)  # logged: mean over micro-batches and ranks
    initial = build_stack(reference, "cpu").state_dict()
    moved = 0
    for name, p in single["stack"].state_dict().items():
        torch.testing.assert_close(ddp["state"][name], p, atol=1e-6, rtol=0, msg=name)
        moved += int(not torch.equal(p, initial[name]))
    assert moved > 10  # one AdamW step moved the weights by ~lr, far above the tolerance


@pytest.mark.slow
def test_ddp_two_gloo_ranks_keep_identical_weights(ddp_runs):
    tmp, configs = ddp_runs
    cfg = Config.from_dict(configs["identical"])
    w0, w1 = (torch.load(tmp / f"identical-{rank}.pt")["state"] for rank in (0, 1))
    initial = make_model_state(cfg)
    changed = False
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        changed |= not torch.equal(w0[name], initial[name])
    assert changed  # they trained (on different batches) and still agree


def test_a_killed_checkpoint_save_leaves_the_previous_one_and_the_next_save_tidies(tmp_path, text_file):
    cfg = tiny_config(tmp_path, text_file)
    stack = build_stack(cfg, "cpu")
    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    old_umask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, 2, stack, optimizer, scheduler, cfg.to_dict(), loss=1.5)
        killed = tmp_path / ".step-000004.tmp-a1b2c3d4"  # the step-4 save died here
        killed.mkdir()
        (killed / "model.safetensors").write_bytes(b"half")
        assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"
        assert load_checkpoint(tmp_path / "step-000002", stack, optimizer, scheduler) == 2
        assert checkpoint_meta(tmp_path / "step-000002")["loss"] == 1.5
        save_checkpoint(tmp_path, 6, stack, optimizer, scheduler, cfg.to_dict())
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", "."))) == [
        "step-000002",
        "step-000006",
    ]
    assert stat.S_IMODE((tmp_path / "step-000006").stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert stat.S_IMODE((tmp_path / "step-000006" / "meta.json").stat().st_mode) == 0o644


def test_checkpoint_of_a_model_with_tied_embeddings_reloads_exactly(tmp_path):
    """SmolLM2 ties its output head to the input embedding: safetensors refuses shared memory, so
    the checkpoint keeps one copy and names the alias; loading fills it back in."""
    from safetensors.torch import load_file

    from memstack.train.checkpoint import load_weights, tied_aliases

    cfg = Config(model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2))
    stack = build_stack(cfg)
    stack.model.config.tie_word_embeddings = True
    stack.model.tie_weights()
    head, embed = stack.model.lm_head.weight, stack.model.model.embed_tokens.weight
    assert head is embed
    with torch.no_grad():
        embed.normal_(generator=torch.Generator().manual_seed(3))
    tied = {"model.lm_head.weight": "model.model.embed_tokens.weight"}
    assert stack.tied_names() == tied
    assert "model.lm_head.weight" not in stack.state_dict()  # each tensor once (Trainer saves it)
    assert tied_aliases(stack.model.state_dict(prefix="model.")) == tied
    optimizer = torch.optim.AdamW(stack.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = save_checkpoint(tmp_path, 1, stack, optimizer, scheduler, cfg.to_dict())
    assert "model.lm_head.weight" not in load_file(str(path / "model.safetensors"))
    fresh = build_stack(cfg)
    load_weights(path, fresh)
    torch.testing.assert_close(fresh.model.lm_head.weight, embed.detach(), rtol=0, atol=0)
    torch.testing.assert_close(fresh.model.model.embed_tokens.weight, embed.detach(), rtol=0, atol=0)
