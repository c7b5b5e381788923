"""MemoryStack end to end against the unwrapped model, brute force and the formulas."""

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig
from tests.conftest import MAIN_FAMILIES, make_model, model_pair

SEG = 8


def segments_alone(model, ids, seg):
    """Reference: the unwrapped model run on each segment by itself."""
    return torch.cat([model(ids[:, s : s + seg]).logits for s in range(0, ids.shape[1], seg)], dim=1)


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_memory_off_equals_unwrapped_model_per_segment(family):
    model, ref = model_pair(family)
    stack = MemoryStack(model, StackConfig(segment_len=SEG, compressive=None))
    ids = torch.randint(0, 256, (2, 3 * SEG + 3))
    with torch.no_grad():
        out = stack(ids)
        expected = segments_alone(ref, ids, SEG)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MAIN_FAMILIES)
def test_one_segment_with_memory_equals_unwrapped_and_later_segments_differ(family):
    model, ref = model_pair(family)
    stack = MemoryStack(model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=2.0)))
    ids = torch.randint(0, 256, (2, 2 * SEG))
    with torch.no_grad():
        out = stack(ids)
        expected = segments_alone(ref, ids, SEG)
    # first segment: memory is empty, so exactly the unwrapped model
    torch.testing.assert_close(out.logits[:, :SEG], expected[:, :SEG], atol=1e-5, rtol=1e-5)
    # second segment: memory is read, so it must differ from the segment alone
    assert (out.logits[:, SEG:] - expected[:, SEG:]).abs().max() > 1e-3


def test_gates_forced_to_local_equal_unwrapped_model():
    model, ref = model_pair("llama")
    stack = MemoryStack(
        model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=-1e4))
    )  # sigmoid -> 0
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        torch.testing.assert_close(stack(ids).logits, segments_alone(ref, ids, SEG), atol=1e-5, rtol=1e-5)


def test_loss_is_the_mean_over_all_predicted_tokens():
    model = make_model("llama")
    stack = MemoryStack(model, StackConfig(segment_len=SEG))
    ids = torch.randint(0, 256, (2, 2 * SEG + 5))
    with torch.no_grad():
        out = stack(ids, labels=ids)
    logp = torch.log_softmax(out.logits[:, :-1].double(), dim=-1)
    expected = -logp.gather(-1, ids[:, 1:, None]).mean()
    assert out.num_tokens == 2 * (ids.shape[1] - 1)
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert stack(ids, labels=ids, return_logits=False).logits is None


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_causality_across_segments(rule):
    model = make_model("qwen2")
    stack = MemoryStack(
        model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(update_rule=rule, gate_init=1.0))
    )
    ids = torch.randint(0, 256, (1, 4 * SEG))
    t = 2 * SEG + 3
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 256
    with torch.no_grad():
        a, b = stack(ids).logits, stack(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # and the change is seen afterwards, across segments
    assert (a[:, 3 * SEG :] - b[:, 3 * SEG :]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_right_padding_changes_nothing(family):
    model = make_model(family)
    stack = MemoryStack(
        model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(update_rule="delta", gate_init=1.0))
    )
    L, real = 3 * SEG, 2 * SEG + 3
    ids = torch.randint(0, 256, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, real:] = 0
    with torch.no_grad():
        batch = stack(ids, attention_mask=mask, labels=ids)
        alone = stack(ids[1:, :real], labels=ids[1:, :real])
        full_row = stack(ids[:1], labels=ids[:1])
    torch.testing.assert_close(batch.logits[1, :real], alone.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.logits[0], full_row.logits[0], atol=1e-5, rtol=1e-5)
    for layer, s in batch.state.compressive.items():  # padding never entered memory
        torch.testing.assert_close(s.M[1], alone.state.compressive[layer].M[0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(s.z[1], alone.state.compressive[layer].z[0], atol=1e-4, rtol=1e-5)
    expected_loss = (full_row.loss * full_row.num_tokens + alone.loss * alone.num_tokens) / (
        full_row.num_tokens + alone.num_tokens
    )
    torch.testing.assert_close(batch.loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_left_padding_filling_whole_segments_changes_nothing():
    model = make_model("mistral")
    stack = MemoryStack(model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0)))
    L = 4 * SEG
    ids = torch.randint(0, 256, (2, L))
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, : 2 * SEG] = 0  # row 1 is padded for two whole segments
    with torch.no_grad():
        batch = stack(ids, attention_mask=mask)
        alone = stack(ids[1:, 2 * SEG :])
    assert torch.isfinite(batch.logits).all()
    torch.testing.assert_close(batch.logits[1, 2 * SEG :], alone.logits[0], atol=1e-5, rtol=1e-5)
    for layer, s in batch.state.compressive.items():
        torch.testing.assert_close(s.z[1], alone.state.compressive[layer].z[0], atol=1e-4, rtol=1e-5)


def test_padded_positions_never_enter_memory():
    model = make_model("llama")
    stack = MemoryStack(model, StackConfig(segment_len=SEG))
    ids = torch.randint(0, 256, (1, SEG))
    mask = torch.zeros(1, SEG, dtype=torch.long)
    with torch.no_grad():
        out = stack(ids, attention_mask=mask)
    for s in out.state.compressive.values():
        assert s.M.abs().max() == 0 and s.z.abs().max() == 0


def _grad_of_earlier_tokens(bptt):
    """Loss on segment 3 only; embedding-gradient rows of tokens that appear only in segment 1."""
    model = make_model("llama")
    model.train()
    stack = MemoryStack(
        model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), bptt_segments=bptt)
    )
    first = torch.randint(0, 100, (1, SEG))
    rest = torch.randint(100, 256, (1, 2 * SEG))
    ids = torch.cat([first, rest], dim=1)
    labels = ids.clone()
    labels[:, : 2 * SEG + 1] = -100  # only predictions made inside segment 3 count
    out = stack(ids, labels=labels)
    out.loss.backward()
    emb = model.get_input_embeddings().weight.grad
    only_first = sorted(set(first[0].tolist()))
    return emb[only_first].abs().sum(), stack


def test_gradients_reach_gates_and_earlier_segments():
    g, stack = _grad_of_earlier_tokens(bptt=None)
    assert g > 0
    for gate in stack.gate_parameters():
        assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_bptt_cut_stops_gradients_to_earlier_segments():
    g, _ = _grad_of_earlier_tokens(bptt=1)
    assert g == 0
    g2, _ = _grad_of_earlier_tokens(bptt=2)  # segment 1 -> 2 -> cut before 3
    assert g2 == 0
    g3, _ = _grad_of_earlier_tokens(bptt=3)
    assert g3 > 0


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = make_model("llama")
        stack = MemoryStack(
            model,
            StackConfig(
                segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), checkpoint_segments=ckpt
            ),
        )
        ids = torch.randint(0, 256, (2, 3 * SEG), generator=torch.Generator().manual_seed(0))
        stack(ids, labels=ids, return_logits=False).loss.backward()
        grads.append([p.grad.clone() for p in stack.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_thousands_of_segments_under_bf16_autocast_stay_finite(rule):
    model = make_model("llama", hidden=32, heads=2)
    stack = MemoryStack(
        model, StackConfig(segment_len=4, compressive=CompressiveConfig(update_rule=rule, gate_init=1.0))
    )
    torch.manual_seed(0)
    stack.reset()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ids = torch.randint(0, 256, (2, 2000 * 4))
        out = stack(ids, labels=ids, return_logits=False)
        last = stack(ids[:, :4], state=out.state).logits
    assert out.state.segments == 2000
    assert torch.isfinite(out.loss)
    assert torch.isfinite(last).all()
    for s in out.state.compressive.values():
        assert s.M.dtype == torch.float32 and torch.isfinite(s.M).all() and torch.isfinite(s.z).all()


def test_state_size_is_constant():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=4))
    with torch.no_grad():
        s2 = stack(torch.randint(0, 256, (1, 2 * 4))).state
        s200 = stack(torch.randint(0, 256, (1, 200 * 4))).state
    assert s2.num_bytes() == s200.num_bytes() > 0
    assert (s2.segments, s200.segments) == (2, 200)


def test_step_streams_equal_one_long_forward():
    stack = MemoryStack(
        make_model("llama"), StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0))
    )
    ids = torch.randint(0, 256, (2, 3 * SEG))
    with torch.no_grad():
        whole = stack(ids).logits
        stack.reset()
        parts = [stack.step(ids[:, s : s + SEG]).logits for s in range(0, 3 * SEG, SEG)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)
    assert stack.state.segments == 3
    with pytest.raises(ValueError, match="at most segment_len"):
        stack.step(torch.randint(0, 256, (2, SEG + 1)))


@pytest.mark.parametrize("family, rule", [("llama", "linear"), ("gpt_neox", "delta"), ("gpt2", "linear")])
@pytest.mark.parametrize("prompt_len", [5, 2 * SEG])
def test_generate_equals_greedy_decoding_with_forward(family, rule, prompt_len):
    stack = MemoryStack(
        make_model(family),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(update_rule=rule, gate_init=1.0)),
    )
    prompt = torch.randint(0, 256, (2, prompt_len))
    new = 2 * SEG + 3  # crosses at least two segment boundaries
    out = stack.generate(prompt, max_new_tokens=new)
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            nxt = stack(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(out, ids)


def test_generate_reads_the_kv_cache_under_either_name_transformers_gives_it():
    """transformers up to 5.17 calls the KV cache ``past_key_values``, later ones ``cache`` (in the
    forward's arguments and in its output): a model with the other name generates the same."""
    model = make_model("llama", seed=2)
    current = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    other = {"cache": "past_key_values", "past_key_values": "cache"}[current]
    base = type(model)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kw):
        kw[current] = kw.pop(other, None)
        out = base.forward(self, input_ids, attention_mask, position_ids, use_cache=use_cache, **kw)
        return SimpleNamespace(logits=out.logits, loss=out.loss, **{other: getattr(out, current)})

    # the forward's signature is what the stack reads; a SimpleNamespace has no field under the
    # current name, so reading it there would fail
    params = [*inspect.signature(base.forward).parameters.values()]
    params = [p.replace(name=other) if p.name == current else p for p in params]
    forward.__signature__ = inspect.Signature(params)
    renamed = copy.deepcopy(model)
    renamed.__class__ = type("Renamed", (base,), {"forward": forward})
    config = StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0))
    prompt = torch.randint(0, 256, (1, SEG + 3))
    want = MemoryStack(model, config).generate(prompt, max_new_tokens=2 * SEG)
    got_stack = MemoryStack(renamed, config)
    assert got_stack._cache_arg == other
    assert torch.equal(got_stack.generate(prompt, max_new_tokens=2 * SEG), want)


def test_generate_sampling_is_reproducible_and_respects_top_k():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    prompt = torch.randint(0, 256, (1, 6))
    a = stack.generate(prompt, 20, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = stack.generate(prompt, 20)
    assert torch.equal(a, greedy)  # top_k=1 sampling is greedy
    b = stack.generate(
        prompt, 20, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(3)
    )
    c = stack.generate(
        prompt, 20, do_sample=True, temperature=2.0, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(b, c) and not torch.equal(b, greedy)


def test_param_groups_separate_gates():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    groups = {g["name"]: g for g in stack.param_groups(lr=1e-3, weight_decay=0.1, gate_lr_mult=50)}
    assert groups["gates"]["lr"] == pytest.approx(5e-2) and groups["gates"]["weight_decay"] == 0
    assert {id(p) for p in groups["gates"]["params"]} == {id(p) for p in stack.gate_parameters()}
    assert all(p.ndim >= 2 for p in groups["decay"]["params"]) and groups["decay"]["weight_decay"] == 0.1
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(stack.parameters()))  # every parameter exactly once


def test_gates_move_with_their_learning_rate():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    opt = torch.optim.AdamW(stack.param_groups(lr=1e-3, gate_lr_mult=100))
    ids = torch.randint(0, 256, (2, 3 * SEG))
    for _ in range(5):
        opt.zero_grad()
        stack(ids, labels=ids).loss.backward()
        opt.step()
    moved = max((v - 0.5).abs().max().item() for v in stack.gate_values().values())
    assert moved > 0.05  # lr 1e-3 alone would move beta by at most 5e-3


def test_bad_inputs_get_clear_errors():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    ids = torch.randint(0, 256, (2, 10))
    with pytest.raises(ValueError, match="attention_mask must have"):
        stack(ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        stack(ids[0])
    state = stack(ids).state
    with pytest.raises(ValueError, match="state batch size"):
        stack(ids[:1], state=state)


def test_model_called_directly_after_wrapping_is_plain_causal_attention():
    model, ref = model_pair("llama")
    MemoryStack(model, StackConfig(segment_len=SEG))
    ids = torch.randint(0, 256, (1, 3 * SEG))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
        a, b = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[:, 3:], b[:, 3:], atol=1e-5, rtol=1e-5)


def test_memory_off_context_runs_the_same_weights_without_memory():
    model, ref = model_pair("llama")
    stack = MemoryStack(model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=2.0)))
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        with stack.memory_off():
            off = stack(ids).logits
            gen_off = stack.generate(ids[:, : SEG + 2], max_new_tokens=SEG)
        on = stack(ids).logits
        torch.testing.assert_close(off, segments_alone(ref, ids, SEG), atol=1e-5, rtol=1e-5)
        assert (on - off).abs().max() > 1e-3 and stack.use_memory
        expected = ids[:, : SEG + 2]
        for _ in range(SEG):  # greedy with the reference model on the open segment only
            start = ((expected.shape[1] - 1) // SEG) * SEG  # segment of the last token
            nxt = ref(expected[:, start:]).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(gen_off, expected)


# ---------------------------------------------------------------------- data safety and clear errors


def test_forward_step_generate_reject_bad_input_before_any_work():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    with pytest.raises(ValueError, match=r"at least one row and one token, got shape \(2, 0\)"):
        stack(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token id 256, outside the model's vocabulary \[0, 255\]"):
        stack(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"token id -1, outside"):
        stack.step(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        stack(torch.zeros(1, 4))
    ids = torch.randint(0, 256, (2, 2 * SEG))
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0, got -1"):
        stack.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match=r"eos_token_id must be None or a token id in \[0, 255\], got 300"):
        stack.generate(ids, eos_token_id=300)
    assert torch.equal(stack.generate(ids, max_new_tokens=0), ids)


def test_a_state_from_another_model_or_batch_is_rejected():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    ids = torch.randint(0, 256, (2, 2 * SEG))
    other = MemoryStack(make_model("llama", heads=8), StackConfig(segment_len=SEG))
    foreign = other(ids).state
    for call in (lambda: stack(ids, state=foreign), lambda: stack.generate(ids, state=foreign)):
        with pytest.raises(ValueError, match="the state was made by another model"):
            call()
    stack.state = foreign
    with pytest.raises(ValueError, match="made by another model"):
        stack.step(ids[:, :SEG])
    own = stack(ids).state
    with pytest.raises(ValueError, match="state batch size 2 differs from the input's 1 rows"):
        stack.generate(ids[:1], state=own)
    fewer = MemoryStack(make_model("llama", layers=3), StackConfig(segment_len=SEG))(
        torch.randint(0, 256, (2, 2 * SEG))
    ).state
    with pytest.raises(
        ValueError,
        match=r"compressive memory for layers \[2\], but this stack's compressive layers are \[0, 1\]",
    ):
        stack(ids, state=fewer)


def test_stack_config_rejects_bools_for_ints_and_non_finite_gates():
    with pytest.raises(ValueError, match="segment_len must be an int >= 1, got True"):
        StackConfig(segment_len=True)
    with pytest.raises(ValueError, match="gate_init must be a finite number"):
        StackConfig(compressive=CompressiveConfig(gate_init=float("nan")))
    with pytest.raises(ValueError, match="window must be an int >= 1 or None, got 0"):
        StackConfig(window=0)
