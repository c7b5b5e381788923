"""The CUDA path against the CPU path: the same weights give the same outputs on a GPU, bf16
autocast keeps the memories finite and in float32 over thousands of segments, and training and
sleep do on a GPU what they do on the CPU.

These tests need a CUDA GPU, so they are skipped (the reason is printed) on CPU-only machines
such as CI. Run them where a GPU is: ``python -m pytest tests/test_cuda.py``, or
``scripts/check_cuda.sh``, which runs them with the GPU training and benchmark checks.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_model
from test_longterm import greedy_by_forward
from test_train import TEXT, SplitBatches, tiny_config

from memstack import CompressiveConfig, MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.sleep import SleepConfig
from memstack.sleep.consolidate import sleep
from memstack.train.loop import train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU (none here); run tests/test_cuda.py or scripts/check_cuda.sh on one",
)

GPU = torch.device("cuda")
SEG = 16


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would round matmul inputs to 10 mantissa bits on the GPU only; the comparisons with
    the CPU below are about memstack's code, not about that rounding."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def all_layers_stack(seed: int = 0, readout: str = "kv") -> MemoryStack:
    """Working, compressive (delta rule) and store memory on every layer of a tiny Llama."""
    store = StoreConfig(
        layers="all", chunk_len=4, top_k=2, block_len=8, strategy="received_attention", readout=readout
    )
    config = StackConfig(
        segment_len=SEG, compressive=CompressiveConfig(update_rule="delta", gate_init=1.0), store=store
    )
    return MemoryStack(make_model("llama", seed=seed), config)


def store_arrays(state, layer: int) -> dict[str, torch.Tensor]:
    return state.memories["store"][layer].stores[0].arrays()


@pytest.mark.parametrize("readout", ["kv", "tokens"])
def test_the_same_weights_give_the_same_outputs_and_memories_on_gpu_and_cpu(readout):
    cpu = all_layers_stack(readout=readout)
    gpu = copy.deepcopy(cpu).to(GPU)
    ids = torch.randint(0, 256, (1, 6 * SEG), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = cpu(ids, labels=ids)
        b = gpu(ids.to(GPU), labels=ids.to(GPU))
    assert b.logits.device.type == "cuda"
    torch.testing.assert_close(b.logits.cpu(), a.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(b.loss.cpu(), a.loss, atol=1e-5, rtol=1e-5)
    for layer, s in a.state.compressive.items():
        g = b.state.compressive[layer]
        assert g.M.device.type == "cuda" and g.M.dtype == torch.float32
        torch.testing.assert_close(g.M.cpu(), s.M, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g.z.cpu(), s.z, atol=1e-4, rtol=1e-4)
    # the store (FAISS on the host) holds the same records under the same keys
    for layer in cpu.memory_layers:
        want, got = store_arrays(a.state, layer), store_arrays(b.state, layer)
        assert want.keys() == got.keys() and len(want["ids"]) == 6 * SEG // 4  # every segment, chunks of 4
        for name, w in want.items():
            if w.is_floating_point():
                torch.testing.assert_close(got[name].cpu(), w, atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(got[name].cpu(), w), name


def test_generate_on_gpu_is_greedy_decoding_by_full_forwards():
    stack = all_layers_stack(seed=3).to(GPU)
    prompt = torch.randint(0, 256, (1, 2 * SEG + 5), generator=torch.Generator().manual_seed(1)).to(GPU)
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=6)
        assert torch.equal(out, greedy_by_forward(stack, prompt, 6))


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_thousands_of_segments_under_bf16_autocast_on_gpu_stay_finite_and_float32(rule):
    stack = MemoryStack(
        make_model("llama", hidden=32, heads=2),
        StackConfig(segment_len=4, compressive=CompressiveConfig(update_rule=rule, gate_init=1.0)),
    ).to(GPU)
    ids = torch.randint(0, 256, (2, 2000 * 4), generator=torch.Generator().manual_seed(0)).to(GPU)
    with torch.no_grad():
        full = stack(ids[:, :400], labels=ids[:, :400], return_logits=False).loss
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = stack(ids, labels=ids, return_logits=False)
            short = stack(ids[:, :400], labels=ids[:, :400], return_logits=False).loss
    assert out.state.segments == 2000 and torch.isfinite(out.loss)
    for s in out.state.compressive.values():
        assert s.M.dtype == s.z.dtype == torch.float32
        assert torch.isfinite(s.M).all() and torch.isfinite(s.z).all()
    # bf16 rounds the activations, not the result: the loss stays within 1% of float32's
    assert short.item() == pytest.approx(full.item(), rel=1e-2)


def test_training_on_gpu_starts_at_the_cpu_loss_and_learns(tmp_path):
    # the same 4 rows of text every step (no data pipeline, so no `datasets` needed on the GPU box)
    rows = torch.tensor(list(TEXT.encode()[: 4 * 64])).view(4, 64)
    losses = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_config(tmp_path / device, tmp_path / "unread.txt", ckpt_every=0, device=device)
        result = train(cfg, SplitBatches(rows, accum=1), progress=False)
        assert next(result["stack"].parameters()).device.type == device
        losses[device] = [json.loads(x)["loss"] for x in open(f"{cfg.run.out_dir}/metrics.jsonl")]
    # same seed, same batches: the first loss differs only by bf16 autocast (CUDA) against float32
    assert losses["cuda"][0] == pytest.approx(losses["cpu"][0], rel=2e-2)
    assert len(losses["cuda"]) == 20 and losses["cuda"][-1] < 0.6 * losses["cuda"][0]


def test_sleep_on_gpu_trains_the_adapter_as_on_cpu():
    def night(device: torch.device):
        stack = MemoryStack(
            make_model("llama", seed=0),
            StackConfig(segment_len=SEG, store=StoreConfig(layers="1", chunk_len=8)),
        ).to(device)
        ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0)).to(device)
        for a in range(0, 96, SEG):
            stack.step(ids[:, a : a + SEG])
        report = sleep(stack, SleepConfig(steps=30, lr=1e-2, batch_size=4), progress=False)
        assert all(p.device.type == device.type for n, p in stack.named_parameters() if "lora_" in n)
        return report

    cpu_report, gpu_report = night(torch.device("cpu")), night(GPU)
    assert gpu_report.records == cpu_report.records == 12
    assert gpu_report.night_loss_before == pytest.approx(cpu_report.night_loss_before, rel=1e-4)
    assert gpu_report.night_loss_after < gpu_report.night_loss_before - 0.1
    assert gpu_report.night_loss_after == pytest.approx(cpu_report.night_loss_after, rel=5e-2)
