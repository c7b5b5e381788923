"""The training loop: it learns, it resumes exactly, DDP keeps ranks identical."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from memstack.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StackConfig,
)
from memstack.train.batches import curriculum_length, make_batches
from memstack.train.loop import lr_lambda, train

TEXT = "The cat sat on the mat. The dog lay on the rug. A bird sang in the tree.\n" * 40


def tiny_config(tmp_path, text_file, **run) -> Config:
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=str(text_file), seq_len=64),
        stack=StackConfig(segment_len=16, gate_init=0.0),
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


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    cfg = Config.from_dict(cfg_dict)
    _, batches = make_batches(cfg)
    result = train(cfg, batches, progress=False)
    torch.save(
        {k: v.detach().clone() for k, v in result["stack"].state_dict().items()}, f"{out}/rank{rank}.pt"
    )
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks_keep_identical_weights(tmp_path, text_file):
    cfg = tiny_config(tmp_path, text_file, ckpt_every=0)
    cfg.schedule.max_steps = 3
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    initial = make_model_state(cfg)
    changed = False
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        changed |= not torch.equal(w0[name], initial[name])
    assert changed  # they trained (on different batches) and still agree


def make_model_state(cfg):
    from memstack import MemoryStack
    from memstack.train.loop import build_model

    return MemoryStack(build_model(cfg.model, cfg.run.seed), cfg.stack).state_dict()
