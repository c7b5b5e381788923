"""Training LoRA adapters and gates with the base model frozen (``Config.lora``, the recipe
``configs/smollm2_passkey.py`` on the tiny model), the fine-tuned rows of the long-context
evaluation, and its held-out loss helpers, each against an independent reference: a stack
without the adapter, the weights before training, memory switched off on the whole prompt,
and statistics written out here."""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from memstack import MemoryStack, StackConfig
from memstack.config import CompressiveConfig, StoreConfig
from memstack.data.tokenizer import ByteTokenizer
from memstack.evals.longcontext import (
    ANSWER_TOKENS,
    answer,
    chat_prompt,
    heldout_passages,
    mean_interval,
    off_suffix,
    passage_losses,
)
from memstack.memory.carry import CarryConfig
from memstack.train.batches import make_batches
from memstack.train.config import (
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
)
from memstack.train.evaluate import load_run
from memstack.train.loop import FINETUNE, build_model, build_stack, train

SEG = 64


def stack_config() -> StackConfig:
    """The recipe's kinds at tiny scale: compressive memory, the store's tokens readout, carry."""
    return StackConfig(
        segment_len=SEG,
        compressive=CompressiveConfig(layers="all", update_rule="delta", gate_init=-3.0),
        store=StoreConfig(layers="all", chunk_len=4, top_k=2, block_len=4, readout="tokens", skip_recent=8),
        kinds={"carry": CarryConfig(recent=8)},
    )


def tiny_config(tmp_path, **lora) -> Config:
    return Config(
        model=ModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2),
        data=DataConfig(task="passkey", seq_len=2 * SEG, instruction=False, answer_weight=5.0),
        stack=stack_config(),
        lora=LoraConfig(rank=4, alpha=8.0, targets=["v_proj", "o_proj"], **lora),
        optim=OptimConfig(lr=1e-2, weight_decay=0.0, gate_lr_mult=10.0),
        schedule=ScheduleConfig(max_steps=3, warmup_steps=1),
        run=RunConfig(out_dir=str(tmp_path / "run"), device="cpu", batch_size=2, log_every=1, ckpt_every=0),
    )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"rank": 0}, "lora.rank"),
        ({"alpha": -1.0}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"targets": "q_proj"}, "lora.targets"),
        ({"targets": [""]}, "lora.targets"),
        ({"rank": True}, "lora"),
    ],
)
def test_lora_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kw)


def test_lora_section_switches_on_from_the_command_line():
    config = apply_overrides(Config(), ["lora.rank=8"])
    assert config.lora == LoraConfig(rank=8)
    assert apply_overrides(config, ["lora=off"]).lora is None
    with pytest.raises(ValueError, match="lora.rank"):
        apply_overrides(Config(), ["lora.rank=0"])


def test_finetune_adapter_trains_only_itself_and_the_gates_and_starts_as_the_plain_stack(tmp_path):
    config = tiny_config(tmp_path)
    tuned = build_stack(config)
    plain = MemoryStack(build_model(config.model, config.run.seed), config.stack)
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    gates = {id(p) for p in tuned.gate_parameters()}
    expected = {
        n for n, p in tuned.named_parameters() if f"lora_A.{FINETUNE}" in n or f"lora_B.{FINETUNE}" in n
    }
    expected |= {n for n, p in tuned.named_parameters() if id(p) in gates}
    assert trainable == expected and len(gates) == 2
    assert all(".v_proj." in n or ".o_proj." in n for n in trainable if "lora_" in n)
    # B starts at zero: the adapted stack is the stack without the adapter
    ids = torch.randint(0, 256, (2, 3 * SEG + 5), generator=torch.Generator().manual_seed(0))
    tuned.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(ids).logits, plain(ids).logits, rtol=0, atol=1e-6)


def test_fit_moves_only_the_adapter_and_gates_and_the_run_reloads_exactly(tmp_path):
    config = tiny_config(tmp_path)
    _, batches = make_batches(config)
    before = build_model(config.model, config.run.seed).state_dict()
    stack = train(config, batches, progress=False)["stack"]
    moved = {n for n, p in stack.named_parameters() if p.requires_grad}
    for name, p in stack.model.named_parameters():
        base = name.replace("base_model.model.", "").replace(".base_layer", "")
        if "lora_" in name or "memstack_memory" in name:
            continue
        assert name not in moved
        torch.testing.assert_close(p.detach(), before[base], rtol=0, atol=0)  # frozen
    lora_b = [p for n, p in stack.named_parameters() if f"lora_B.{FINETUNE}" in n]
    assert lora_b and any(float(p.detach().abs().max()) > 0 for p in lora_b)  # it trained
    assert any(float((g.detach() + 3.0).abs().max()) > 0 for g in stack.gate_parameters())
    _, loaded, _ = load_run(config.run.out_dir)
    ids = torch.randint(0, 256, (1, 3 * SEG + 7), generator=torch.Generator().manual_seed(1))
    stack.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, stack(ids).logits, rtol=0, atol=0)


def test_tuned_off_answers_as_every_memory_off_over_the_whole_prompt():
    """The ``tuned_off`` row reads only the last two segments (off_suffix); with compressive
    memory and the store off that is exact, which the whole prompt read with both off shows."""
    from tests.conftest import make_model

    stack = MemoryStack(make_model("llama", seed=4), dataclasses.replace(stack_config(), segment_len=16))
    torch.manual_seed(2)
    for length in (40, 64, 77):
        ids = torch.randint(0, 256, (1, length))
        assert len(off_suffix(ids[0].tolist(), 16)) < length
        with torch.no_grad(), stack.memory_off("compressive", "store"):
            whole = stack.generate(ids, max_new_tokens=ANSWER_TOKENS, close_prompt=True)[0, length:]
        assert answer("tuned_off", None, stack, ids[0].tolist()) == whole.tolist()
        with torch.no_grad():
            on = stack.generate(ids, max_new_tokens=ANSWER_TOKENS, close_prompt=True)[0, length:]
        assert answer("tuned", None, stack, ids[0].tolist()) == on.tolist()


def test_heldout_passages_are_consecutive_slices_of_the_encoded_text():
    tok = ByteTokenizer()
    text = " ".join(f"word{i}" for i in range(3000))
    passages = heldout_passages(tok, text, 3, 100)
    flat = tok.encode(" " + text)
    assert passages == [flat[0:100], flat[100:200], flat[200:300]]
    with pytest.raises(ValueError, match="fewer than 1000 passages"):
        heldout_passages(tok, text, 1000, 100)


def test_passage_losses_are_each_passages_own_mean_token_loss():
    from tests.conftest import make_model

    model = make_model("llama", seed=6)
    stack = MemoryStack(model, StackConfig(segment_len=64, compressive=None))
    passages = [list(range(10, 60)), list(range(100, 150))]
    got = passage_losses(stack, passages)
    plain = stack.unwrap()
    for ids, loss in zip(passages, got, strict=True):
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = plain(x).logits
        want = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:]).item()
        assert math.isclose(loss, want, rel_tol=1e-5)


def test_mean_interval_is_the_normal_interval_of_the_mean():
    values = [0.5, 1.5, 2.0, 4.0, 3.0]
    got = mean_interval(values)
    half = 1.96 * statistics.stdev(values) / math.sqrt(len(values))
    assert got["n"] == 5 and math.isclose(got["mean"], statistics.mean(values))
    assert all(math.isclose(a, b) for a, b in zip(got["ci95"], [2.2 - half, 2.2 + half], strict=True))


def test_chat_prompt_needs_a_chat_template():
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(ByteTokenizer(), [1, 2, 3])


def test_describe_lists_the_finetune_adapter_apart_from_sleep(tmp_path):
    text = build_stack(tiny_config(tmp_path)).describe()
    assert "4. sleep (LoRA adapters from the store, memstack.sleep.sleep(stack)): none yet" in text
    assert f"other LoRA adapters on the model: {FINETUNE}" in text
