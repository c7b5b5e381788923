"""scripts/train.py's dashboards: TensorBoard's event files and W&B's offline run hold exactly
what metrics.jsonl holds, the gates move, and a missing extra is a one-line error."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memstack.config import CompressiveConfig, StackConfig, StoreConfig
from memstack.train.batches import make_batches
from memstack.train.config import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, ScheduleConfig
from memstack.train.dashboards import check_dashboards
from memstack.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The cat sat on the mat. The dog lay on the rug. A bird sang in the tree.\n" * 40


def expected_scalars(record: dict) -> dict[str, float]:
    """What a dashboard should hold for one metrics.jsonl record, written from the record's
    layout (not from memstack.train.dashboards)."""
    out = {name: record[name] for name in ("loss", "answer_loss", "lr", "tokens_per_s")}
    for kind, layers in record["gates"].items():
        for layer, heads in layers.items():
            out.update({f"gate/{kind}/layer_{layer}/head_{h}": v for h, v in enumerate(heads)})
    out.update({f"segment_loss/{i}": v for i, v in enumerate(record["segment_loss"]) if v is not None})
    out.update({f"read_share/{kind}": v for kind, v in record["read_share"].items()})
    return out


def wandb_history(run_file: Path) -> dict[int, dict[str, float]]:
    """``{step: {key: value}}`` from a W&B offline run file: a ":W&B" header (7 bytes), then
    LevelDB log records (crc32c, length, type; 32 KiB blocks; types 1 full, 2 first, 3 middle,
    4 last) each holding a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, history = 7, 32768, b"", {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                items = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item
                }
                history[int(items["_step"])] = items
    return history


def test_tensorboard_and_wandb_hold_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    config = Config(
        model=ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        data=DataConfig(task="text", path=str(corpus), seq_len=64),
        stack=StackConfig(
            segment_len=16,
            compressive=CompressiveConfig(gate_init=0.0),
            store=StoreConfig(layers="1", chunk_len=8, block_len=8, top_k=2, readout="kv"),
        ),
        optim=OptimConfig(lr=1e-2),
        schedule=ScheduleConfig(max_steps=4, warmup_steps=1),
        run=RunConfig(
            out_dir=str(tmp_path / "run"),
            batch_size=2,
            log_every=1,
            ckpt_every=0,
            tensorboard=True,
            wandb="offline",
        ),
    )
    _, batches = make_batches(config)
    torch.manual_seed(0)
    train(config, batches, progress=False)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first, last = expected_scalars(records[0]), expected_scalars(records[-1])
    gates = [k for k in first if k.startswith("gate/compressive/")]
    assert len(gates) == 4 and any(first[k] != last[k] for k in gates)  # 2 layers x 2 heads, moving
    assert [k for k in first if k.startswith("segment_loss/")] == [f"segment_loss/{i}" for i in range(4)]
    assert 0 < first["read_share/store"] < 1 and 0 < first["read_share/compressive"] < 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for record in records:
        for name, value in expected_scalars(record).items():
            logged = {e.step: e.value for e in events.Scalars(name)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-7), name  # float32

    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert sorted(history) == [1, 2, 3, 4]
    for record in records:
        for name, value in expected_scalars(record).items():
            assert history[record["step"]][name] == pytest.approx(value, rel=1e-12), name


def test_a_missing_extra_is_a_one_line_error_naming_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    hidden = lambda name, *a: None if name == "wandb" else real(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ValueError) as e:
        check_dashboards(RunConfig(wandb="offline"))
    assert "\n" not in str(e.value) and "pip install 'memstack[wandb]'" in str(e.value)
    check_dashboards(RunConfig(tensorboard=True))  # installed: no error
    with pytest.raises(ValueError, match="run.wandb must be one of"):
        RunConfig(wandb="yes")


def test_train_script_stops_before_training_when_a_dashboard_is_missing(tmp_path):
    """The script's own process, tensorboard hidden from it: one line on stderr, exit status 1,
    nothing trained."""
    hide = "import sys; sys.modules['tensorboard'] = None; sys.modules['torch.utils.tensorboard'] = None; "
    code = hide + "import runpy; runpy.run_path('scripts/train.py', run_name='__main__')"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", code, "configs/tiny_text.py", f"run.out_dir={out}", "run.tensorboard=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: run.tensorboard=true needs the tensorboard package, which is not installed: "
        "pip install 'memstack[tensorboard]'"
    ]
    assert not out.exists()
