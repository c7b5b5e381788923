"""MemoryStack end to end against the unwrapped model, brute force and the formulas."""

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, StackState
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


def test_save_and_load_round_trip(tmp_path):
    model, fresh = model_pair("qwen3")
    stack = MemoryStack(
        model, StackConfig(segment_len=SEG, compressive=CompressiveConfig(update_rule="delta"))
    )
    with torch.no_grad():
        for gate in stack.gate_parameters():
            gate.normal_()
    stack.save_pretrained(tmp_path / "mem")
    loaded = MemoryStack.from_pretrained(tmp_path / "mem", fresh)
    assert loaded.config == stack.config
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        out, out2 = stack(ids), loaded(ids)
    assert torch.equal(out.logits, out2.logits)
    # state: save, load, continue
    out.state.save(tmp_path / "state.safetensors")
    state = StackState.load(tmp_path / "state.safetensors")
    assert state.segments == 3
    with torch.no_grad():
        a = stack(ids, state=out.state).logits
        b = loaded(ids, state=state).logits
    assert torch.equal(a, b)


def test_from_pretrained_rejects_a_different_model(tmp_path):
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    stack.save_pretrained(tmp_path / "mem")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        MemoryStack.from_pretrained(tmp_path / "mem", make_model("gpt2"))
    with pytest.raises(ValueError, match="gate of layer 0"):
        MemoryStack.from_pretrained(tmp_path / "mem", make_model("llama", heads=8))
    with pytest.raises(FileNotFoundError):
        MemoryStack.from_pretrained(tmp_path / "nothing", make_model("llama"))


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


def test_state_load_rejects_foreign_or_incomplete_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a memstack state file"):
        StackState.load(tmp_path / "other.safetensors")
    meta = {"format": "memstack-state", "version": "1", "segments": "2"}
    save_file({"compressive.0.M": torch.zeros(1, 1, 2, 2)}, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"missing \['compressive.0.z'\]"):
        StackState.load(tmp_path / "half.safetensors")


def test_softcapping_is_rejected_with_a_clear_error():
    from memstack.attention import memstack_attention

    model = make_model("llama")
    MemoryStack(model, StackConfig(segment_len=SEG))
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="LlamaAttention uses attention logit soft-capping"):
        memstack_attention(model.model.layers[0].self_attn, q, q, q, None, softcap=30.0)


# ---------------------------------------------------------------------- data safety and clear errors


def test_stack_save_next_to_a_saved_hf_model_keeps_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model, ref = model_pair("llama")
    model.save_pretrained(tmp_path)  # the model's own files first, as a user would
    before = {p.name for p in tmp_path.iterdir()}
    stack = MemoryStack(model, StackConfig(segment_len=SEG))
    with torch.no_grad():
        for gate in stack.gate_parameters():
            gate.normal_()
    stack.save_pretrained(tmp_path)
    stack.save_pretrained(tmp_path)  # a second save replaces only memstack's own files
    after = {p.name for p in tmp_path.iterdir()}
    assert before <= after and len(after - before) == 2, after - before  # manifest + one weights file
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)
        restored = MemoryStack.from_pretrained(tmp_path, reloaded)
        assert torch.equal(restored(ids).logits, stack(ids).logits)


def test_stack_save_refuses_a_file_path_and_leaves_it(tmp_path):
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ValueError, match="notes.txt exists and is not a directory"):
        stack.save_pretrained(target)
    assert target.read_text() == "mine"


def test_stack_save_crashing_before_its_commit_leaves_the_previous_save(tmp_path, monkeypatch):
    import memstack.persistence as stack_module

    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    stack.save_pretrained(tmp_path)
    old_gates = [g.detach().clone() for g in stack.gate_parameters()]
    with torch.no_grad():
        for gate in stack.gate_parameters():
            gate.fill_(3.0)
    real = stack_module.atomic_file

    def crash_at_manifest(path):
        if path.name == stack_module.CONFIG_FILE:
            raise KeyboardInterrupt("killed")
        return real(path)

    monkeypatch.setattr(stack_module, "atomic_file", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        stack.save_pretrained(tmp_path)
    monkeypatch.undo()
    restored = MemoryStack.from_pretrained(tmp_path, make_model("llama"))
    for a, b in zip(restored.gate_parameters(), old_gates, strict=True):
        assert torch.equal(a, b)
    stack.save_pretrained(tmp_path)  # the next save commits and removes the orphaned weights
    assert len(list(tmp_path.glob("memstack_memory*"))) == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_failed_from_pretrained_leaves_the_model_unwrapped(tmp_path):
    model, ref = model_pair("llama")
    MemoryStack(make_model("llama"), StackConfig(segment_len=SEG)).save_pretrained(tmp_path)
    for weights in tmp_path.glob("memstack_memory*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match="which is missing"):
        MemoryStack.from_pretrained(tmp_path, model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "memstack_memory") for m in model.modules())
    stack = MemoryStack(model, StackConfig(segment_len=SEG))  # a retry with the same model works
    ids = torch.randint(0, 256, (1, SEG))
    with torch.no_grad():
        torch.testing.assert_close(stack(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
        back = stack.unwrap()  # and unwrap gives the model back as it was
        assert back.config._attn_implementation == "sdpa"
        assert not [n for n, _ in back.named_parameters() if "memstack" in n]
        assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize(
    "manifest, message",
    [
        ([1, 2], "expected a JSON object, got list"),
        ({"format": "memstack", "version": 2, "model_type": "llama"}, "field 'stack' missing"),
        ({"format": "memstack", "version": 0, "model_type": "llama", "stack": {}}, "version 0"),
        ({"format": "memstack", "version": -1, "model_type": "llama", "stack": {}}, "version -1"),
        ({"format": "memstack", "version": 99, "model_type": "llama", "stack": {}}, "version 99"),
    ],
)
def test_from_pretrained_rejects_malformed_manifests(tmp_path, manifest, message):
    import json

    (tmp_path / "memstack_config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=message) as err:
        MemoryStack.from_pretrained(tmp_path, make_model("llama"))
    assert "memstack_config.json" in str(err.value)


@pytest.mark.parametrize("version", [1, 2])
def test_a_stack_saved_in_the_old_flat_config_format_loads(tmp_path, version):
    """Before layer 2 became a section, ``memstack_config.json`` held ``compressive: true`` and
    ``memory_layers``, ``update_rule``, ``gate_init`` flat in its stack section."""
    import json

    from safetensors.torch import save_file

    flat = {
        "segment_len": SEG,
        "compressive": True,
        "memory_layers": "0",
        "update_rule": "delta",
        "gate_init": -3.0,
        "bptt_segments": None,
        "checkpoint_segments": False,
        "window": None,
        "sink_tokens": 0,
        "store": None,
    }
    gate = torch.linspace(-1.0, 1.0, 4)  # the test model has 4 heads
    name = "layers.0.gate" if version == 1 else "layers.0.compressive.gate"
    weights = (
        "memstack_memory.safetensors" if version == 1 else "memstack_memory-0123456789abcdef.safetensors"
    )
    save_file({name: gate}, str(tmp_path / weights))
    manifest = {
        "format": "memstack",
        "version": version,
        "model_type": "llama",
        "num_heads": 4,
        "stack": flat,
    }
    if version == 2:
        manifest["weights"] = weights
    (tmp_path / "memstack_config.json").write_text(json.dumps(manifest))

    stack = MemoryStack.from_pretrained(tmp_path, make_model("llama"))
    assert stack.config.compressive == CompressiveConfig(layers="0", update_rule="delta", gate_init=-3.0)
    assert stack.memory_layers == [0] and stack.kinds["compressive"].update_rule == "delta"
    assert torch.equal(stack.named_gates()[(0, "compressive")].detach(), gate)
    stack.save_pretrained(tmp_path)  # saved again: the current format, read back the same
    saved = json.loads((tmp_path / "memstack_config.json").read_text())["stack"]
    assert saved["compressive"] == {"layers": "0", "update_rule": "delta", "gate_init": -3.0}
    assert "memory_layers" not in saved
    assert MemoryStack.from_pretrained(tmp_path, make_model("llama")).config == stack.config

    # compressive: false was layer 2 off: no gates, and the flat fields are ignored
    off = {**manifest, "stack": {**flat, "compressive": False}}
    save_file({}, str(tmp_path / weights))
    if version == 2:
        off["weights"] = weights
    (tmp_path / "memstack_config.json").write_text(json.dumps(off))
    stack = MemoryStack.from_pretrained(tmp_path, make_model("llama"))
    assert stack.config.compressive is None and not stack.kinds and not stack.named_gates()


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


def test_state_load_errors_name_the_path_and_the_problem(tmp_path):
    from safetensors.torch import save_file

    meta = {"format": "memstack-state", "version": "1", "segments": "2"}
    good = {"compressive.0.M": torch.zeros(1, 2, 4, 4), "compressive.0.z": torch.zeros(1, 2, 4)}
    cases = {
        "foreign.st": (
            {**good, "compressive.x.M": torch.zeros(1)},
            meta,
            "unexpected tensor 'compressive.x.M'",
        ),
        "future.st": (
            good,
            {**meta, "version": "7"},
            "state version '7'; this memstack reads versions 1 to 1",
        ),
        "shape.st": (
            {**good, "compressive.0.z": torch.zeros(1, 2, 5)},
            meta,
            r"layer 0 has M \(1, 2, 4, 4\)",
        ),
        "dtype.st": ({**good, "compressive.0.z": torch.zeros(1, 2, 4, dtype=torch.float16)}, meta, "float32"),
    }
    for name, (tensors, m, message) in cases.items():
        save_file(tensors, str(tmp_path / name), metadata=m)
        with pytest.raises(ValueError, match=message) as err:
            StackState.load(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(ValueError, match="is a directory; expected a state file"):
        StackState.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no memstack state file at"):
        StackState.load(tmp_path / "missing.st")
    (tmp_path / "torn.st").write_bytes((tmp_path / "foreign.st").read_bytes()[:50])
    with pytest.raises(ValueError, match="torn.st is not a readable safetensors file"):
        StackState.load(tmp_path / "torn.st")


def test_killed_state_saves_leave_a_loadable_file_and_no_temporaries(tmp_path):
    """SIGKILL a process in the middle of StackState.save, several times: the file on disk is always
    a complete old or new state, and the next save removes what the killed one left behind."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "state.safetensors"
    script = f"""
import sys, torch
from memstack import StackState, CompressiveState
i = 0
while True:
    i += 1
    full = lambda *shape: torch.full(shape, float(i))
    s = {{layer: CompressiveState(full(4, 8, 64, 64), full(4, 8, 64)) for layer in range(8)}}
    StackState({{"compressive": s}}, i).save({str(path)!r})
    if i == 1:
        print("ready", flush=True)
"""
    for trial in range(4):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * trial)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = StackState.load(path)  # complete: every tensor holds the same save's value
        values = {float(t.flatten()[0]) for s in state.compressive.values() for t in s}
        assert values == {float(state.segments)} and len(state.compressive) == 8
    state.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_stack_config_rejects_bools_for_ints_and_non_finite_gates():
    with pytest.raises(ValueError, match="segment_len must be an int >= 1, got True"):
        StackConfig(segment_len=True)
    with pytest.raises(ValueError, match="gate_init must be a finite number"):
        StackConfig(compressive=CompressiveConfig(gate_init=float("nan")))
    with pytest.raises(ValueError, match="window must be an int >= 1 or None, got 0"):
        StackConfig(window=0)
