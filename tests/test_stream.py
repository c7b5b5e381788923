"""A stream saved to disk is the stream that was saved: every kind's memory, the store's tail query
and the segment count come back, and continuing in a fresh process is bit-identical to continuing
in memory. Old call forms fail with an error that names the new form."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, StoreConfig
from tests.conftest import make_model

SEG = 8
ROOT = Path(__file__).resolve().parents[1]


def stream_stack(seed: int = 0) -> MemoryStack:
    store = StoreConfig(layers="1", chunk_len=4, top_k=2, block_len=4, kv_dtype="float32")
    config = StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), store=store)
    return MemoryStack(make_model("llama", seed=seed), config)


CONTINUE = """
import sys, torch
from tests.test_stream import stream_stack
stack = stream_stack()
stack.load_stream(sys.argv[1])
ids = torch.load(sys.argv[2])
with torch.no_grad():
    out = [stack.step(ids[:, i : i + 8]).logits for i in range(0, ids.shape[1], 8)]
torch.save(torch.cat(out, 1), sys.argv[3])
"""


def test_a_saved_stream_continues_in_a_fresh_process_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 7 * SEG))
    stack = stream_stack()
    with torch.no_grad():
        for i in range(0, 4 * SEG, SEG):
            stack.step(ids[:, i : i + SEG])
        stack.save_stream(tmp_path / "stream")
        tail = stack.state.memories["store"][1].tail.clone()
        in_memory = torch.cat(
            [stack.step(ids[:, i : i + SEG]).logits for i in range(4 * SEG, 7 * SEG, SEG)], 1
        )
    torch.save(ids[:, 4 * SEG :], tmp_path / "rest.pt")
    subprocess.run(
        [
            sys.executable,
            "-c",
            CONTINUE,
            str(tmp_path / "stream"),
            str(tmp_path / "rest.pt"),
            str(tmp_path / "o.pt"),
        ],
        cwd=ROOT,
        check=True,
    )
    assert torch.equal(torch.load(tmp_path / "o.pt"), in_memory)
    # in this process too: the tail and the segment count are back, and nothing else differs
    fresh = stream_stack()
    state = fresh.load_stream(tmp_path / "stream")
    assert state.segments == 4 and torch.equal(state.memories["store"][1].tail, tail)
    assert state.memories["store"][1].num_records() == [8, 8]


def test_a_stream_without_its_tail_would_differ(tmp_path):
    """What the defect was: the stores alone (no tail query) do not continue the stream."""
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 6 * SEG))
    stack = stream_stack()
    with torch.no_grad():
        for i in range(0, 4 * SEG, SEG):
            stack.step(ids[:, i : i + SEG])
        stack.save_stream(tmp_path / "stream")
        expected = stack.step(ids[:, 4 * SEG : 5 * SEG]).logits
    (tmp_path / "stream" / "store" / "layer-1" / "tail.safetensors").unlink()
    fresh = stream_stack()
    fresh.load_stream(tmp_path / "stream")
    with torch.no_grad():
        without_tail = fresh.step(ids[:, 4 * SEG : 5 * SEG]).logits
    assert not torch.equal(without_tail, expected)


def test_a_stream_is_checked_and_never_half_written(tmp_path):
    stack = stream_stack()
    with pytest.raises(ValueError, match="no stream to save: step\\(\\) has not run"):
        stack.save_stream(tmp_path / "s")
    with torch.no_grad():
        stack.step(torch.randint(0, 256, (1, SEG)))
    stack.save_stream(tmp_path / "s")
    other = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))  # no store
    with pytest.raises(ValueError, match=r"holds \['compressive', 'store'\] memory|holds \['store'\] memory"):
        other.load_stream(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no memstack-stream manifest"):
        stack.load_stream(tmp_path / "nothing")


def test_old_call_forms_name_the_new_ones():
    with pytest.raises(
        TypeError, match=r"StackConfig\(compressive=CompressiveConfig\(update_rule=\.\.\.\)\)"
    ):
        StackConfig(segment_len=64, update_rule="delta")
    with pytest.raises(AttributeError, match=r"from memstack.sleep import sleep; report = sleep\(stack"):
        MemoryStack(make_model("llama"), StackConfig(segment_len=SEG)).sleep()
    with pytest.raises(ImportError, match=r"import it from memstack.train.config"):
        from memstack.config import Config  # noqa: F401
    with pytest.raises(ImportError, match=r"from memstack.sleep import SleepConfig"):
        from memstack import SleepConfig  # noqa: F401
    code = textwrap.dedent(
        """
        import memstack
        try:
            import memstack.memory.longterm
        except ModuleNotFoundError as e:
            print(e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "memstack.memory.longterm moved: use memstack.memory.store.kind"
