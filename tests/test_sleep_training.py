"""Sleep inside training runs (the sleep.every_steps schedule), in checkpoints, and scripts/sleep.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from memstack.config import CompressiveConfig, StackConfig, StoreConfig
from memstack.memory.store.kind import load_stores, save_stores
from memstack.sleep import SleepConfig
from memstack.state import StackState
from memstack.train.batches import make_batches
from memstack.train.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig
from memstack.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sleep as sleep_script  # noqa: E402

TEXT = "In the beginning the cat sat on the mat, and the dog lay on the rug by the fire.\n" * 40


def config(tmp_path: Path, text_file: Path, **sleep) -> Config:
    return Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=str(text_file), seq_len=64),
        stack=StackConfig(
            segment_len=16,
            compressive=CompressiveConfig(gate_init=0.0),
            store=StoreConfig(layers="1", chunk_len=8),
        ),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(max_steps=10, warmup_steps=2),
        run=RunConfig(out_dir=str(tmp_path / "run"), batch_size=2, log_every=1, ckpt_every=5),
        sleep=SleepConfig(steps=3, rank=2, **sleep),
    )


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def weights(stack) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in stack.named_parameters()}


def test_a_run_sleeps_on_schedule_and_a_resumed_run_ends_the_same(tmp_path, text_file):
    cfg = config(tmp_path, text_file, every_steps=5)
    _, batches = make_batches(cfg)
    whole = train(cfg, batches, progress=False)["stack"]
    assert whole.adapters.names() == ["sleep-0001", "sleep-0002"]
    sleeps = [json.loads(x) for x in (tmp_path / "run" / "sleeps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in sleeps] == [5, 10]
    # a day is 5 steps x 2 rows, each row a fresh 64-token stream cut into 8-token chunks
    assert [s["records"] for s in sleeps] == [5 * 2 * 8, 5 * 2 * 8]
    assert all(s["night_loss_after"] < s["night_loss_before"] for s in sleeps)

    cfg2 = config(tmp_path / "b", text_file, every_steps=5)
    _, batches = make_batches(cfg2)
    train(cfg2, batches, progress=False, stop_after=7)  # checkpoint at 5 holds sleep-0001
    cfg2.run.resume = True
    _, batches = make_batches(cfg2)
    resumed = train(cfg2, batches, progress=False)["stack"]
    assert resumed.adapters.names() == ["sleep-0001", "sleep-0002"]
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), [
        n for n in a if not torch.allclose(a[n], b[n])
    ]


def test_a_schedule_without_a_store_is_refused(tmp_path, text_file):
    cfg = config(tmp_path, text_file, every_steps=5)
    cfg.stack.store = None
    _, batches = make_batches(cfg)
    with pytest.raises(ValueError, match="needs the long-term store"):
        train(cfg, batches, progress=False)


def test_sleep_script_reads_sleeps_saves_and_a_second_night_finds_nothing_new(tmp_path, text_file, capsys):
    cfg = config(tmp_path, text_file)
    cfg.schedule.max_steps = 2
    _, batches = make_batches(cfg)
    train(cfg, batches, progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("Ada's code is 48213. Ben's code is 11111. " * 3)
    out = tmp_path / "night1"
    report = sleep_script.main([str(tmp_path / "run"), "--read", str(notes), "--out", str(out)])
    assert report["adapter"] == "sleep-0001" and report["tokens"] == len(notes.read_bytes())
    assert (out / "sleep_reports" / "sleep-0001.json").is_file()
    state = StackState(memories={"store": load_stores(out / "stores")})
    store = state.memories["store"][1].stores[0]
    assert len(store) == len(store.ids(consolidated=True)) > 0  # saved with the marks
    capsys.readouterr()
    again = sleep_script.main(
        [
            str(tmp_path / "run"),
            "--store",
            str(out / "stores"),
            "--from",
            str(out),
            "--out",
            str(tmp_path / "n2"),
        ]
    )
    assert again["adapter"] is None and "nothing to consolidate" in capsys.readouterr().out


def test_stores_save_and_load_row_by_row(tmp_path):
    from conftest import make_model

    from memstack import MemoryStack

    stack = MemoryStack(
        make_model("llama"), StackConfig(segment_len=16, store=StoreConfig(layers="0,1", chunk_len=8))
    )
    out = stack(torch.randint(0, 256, (2, 40)))
    save_stores(out.state.memories["store"], tmp_path / "s")
    back = StackState(memories={"store": load_stores(tmp_path / "s")})
    for layer in (0, 1):
        for row in (0, 1):
            a, b = out.state.memories["store"][layer].stores[row], back.memories["store"][layer].stores[row]
            assert torch.equal(a.ids(), b.ids()) and all(
                torch.equal(x, y) for x, y in zip(a.tokens(a.ids()), b.tokens(b.ids()), strict=True)
            )
    with pytest.raises(FileNotFoundError, match="no saved stores"):
        load_stores(tmp_path / "nothing")


@pytest.mark.slow
def test_eval_sleep_runs_nights_on_distinct_facts_and_writes_the_table(tmp_path, text_file):
    import eval_sleep

    cfg = config(tmp_path, text_file)
    cfg.schedule.max_steps = 1
    _, batches = make_batches(cfg)
    train(cfg, batches, progress=False)
    out = tmp_path / "eval"
    args = ["--nights", "2", "--facts", "3", "--stream-bytes", "300", "--held-out", "2"]
    args += ["--variants", "no sleep", "lm", "--augment", "both", "--out", str(out), "--set", "sleep.steps=2"]
    results = eval_sleep.main([str(tmp_path / "run"), *args])
    facts = results["meta"]["facts"]
    assert len({name for night in facts for name, _ in night}) == 6  # a new name per fact
    assert list(results["variants"]) == ["no sleep", "lm", "lm + templates"]
    for rows in results["variants"].values():
        assert [r["completion"]["n"] for r in rows] == [3, 6]  # every night's facts so far
        assert [r["unseen_templates"]["n"] for r in rows] == [6, 12]  # two unseen templates each
    assert all(r["held_out_change"] == 0 and r["report"] is None for r in results["variants"]["no sleep"])
    lm, aug = results["variants"]["lm"], results["variants"]["lm + templates"]
    assert all(r["report"]["records"] > 0 and r["report"]["augmented_texts"] == 0 for r in lm)
    assert all(r["report"]["augmented_texts"] == 3 * 3 for r in aug)  # 3 facts x 3 training templates
    assert (out / "sleep_eval.json").is_file() and (out / "sleep_eval.png").stat().st_size > 1000


def test_augment_finds_each_stored_fact_and_writes_it_in_the_training_templates():
    from eval_sleep import STORED, TEST_TEMPLATES, TRAIN_TEMPLATES, augment_with

    from memstack.data.tokenizer import load_tokenizer

    tok = load_tokenizer("bytes")
    text = "and it came to pass " + STORED.format(name="Ada", code="48213") + " that he went out"
    texts = [tok.decode(t.tolist()) for t in augment_with(tok)(torch.tensor(tok.encode(text)))]
    assert texts == [t.format(name="Ada", code="48213") + " " for t in TRAIN_TEMPLATES]
    assert not set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
