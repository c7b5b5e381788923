"""End-to-end runs of the scripts on a tiny config, as a user would type them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "schedule.max_steps=2",
    "schedule.warmup_steps=1",
    "data.curriculum=[120]",
    "data.curriculum_steps=1",
    "data.seq_len=160",
    "run.batch_size=2",
    "run.log_every=1",
    "stack.segment_len=64",
    "eval.passkey_lengths=[160,320]",
    "eval.passkey_depths=[0.0,1.0]",
    "eval.samples_per_cell=1",
]


def run(*args, check=True):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=check, timeout=600
    )


@pytest.mark.slow
def test_train_then_eval_passkey_end_to_end(tmp_path):
    out = tmp_path / "run"
    run("scripts/train.py", "configs/tiny_passkey.py", f"run.out_dir={out}", *TINY)
    saved = json.loads((out / "config.json").read_text())
    assert saved["stack"]["segment_len"] == 64 and saved["eval"]["passkey_lengths"] == [160, 320]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and set(metrics[0]["gates"]) == {"0", "1", "2", "3"}
    assert (out / "step-000002" / "model.safetensors").is_file()
    trained = json.loads((out / "passkey.json").read_text())
    for key in ("memory_on", "memory_off"):
        assert len(trained[key]["accuracy"]) == 2 and len(trained[key]["accuracy"][0]) == 2

    run("scripts/eval_passkey.py", str(out))
    evaluated = json.loads((out / "passkey_eval.json").read_text())
    assert (
        evaluated["memory_on"]["accuracy"] == trained["memory_on"]["accuracy"]
    )  # same weights, same prompts
    assert (out / "passkey_heatmap.png").stat().st_size > 1000
    run("scripts/eval_passkey.py", str(out), "--by-offset", "320", "--offset-stride", "16", "--samples", "2")
    by_offset = json.loads((out / "passkey_offsets.json").read_text())
    assert by_offset["memory_on"]["offsets"] == [0, 16, 32, 48]  # segment 64 of the tiny run
    starts = by_offset["memory_off"]["needle_starts"]
    assert all(s % 64 == o for o, ss in zip([0, 16, 32, 48], starts, strict=True) for s in ss)
    assert (out / "passkey_offsets.png").stat().st_size > 1000
    run("scripts/plot.py", str(out))
    assert (out / "curves.png").stat().st_size > 1000

    corpus = tmp_path / "docs.txt"
    corpus.write_text("In the beginning was the word. " * 20)  # one 620-byte document
    run("scripts/eval_ppl.py", str(out), "--data", str(corpus), "--doc-len", "200", "--docs", "1")
    ppl = json.loads((out / "ppl_by_segment.json").read_text())
    assert len(ppl["memory_on"]) == len(ppl["memory_off"]) == 4  # ceil(199 predictions / 64)
    assert ppl["memory_on"][0] == ppl["memory_off"][0]  # the first segment never reads memory
    assert (out / "ppl_by_segment.png").stat().st_size > 1000

    # --set evaluates the same weights under another stack config: one 256-token segment
    # holds the whole document, so memory is never read and on equals off
    whole = tmp_path / "whole"
    whole.mkdir()
    args = ["--data", str(corpus), "--doc-len", "200", "--docs", "1", "--out", str(whole)]
    run("scripts/eval_ppl.py", str(out), *args, "--set", "stack.segment_len=256")
    one = json.loads((whole / "ppl_by_segment.json").read_text())
    assert one["segment_len"] == 256 and len(one["memory_on"]) == 1
    assert one["memory_on"] == one["memory_off"]
    bad = run("scripts/eval_ppl.py", str(out), *args, "--set", "stack.segment=256", check=False)
    assert bad.returncode != 0 and "unknown config key 'stack.segment'" in bad.stderr


def test_train_rejects_unknown_keys_with_the_valid_ones(tmp_path):
    res = run("scripts/train.py", "configs/tiny_passkey.py", "optim.learning_rate=1", check=False)
    assert res.returncode != 0
    assert "unknown config key 'optim.learning_rate'" in res.stderr and "optim.lr" in res.stderr
