"""Saving and loading: MemoryStack.save_pretrained/from_pretrained and StackState files."""

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, StackState
from tests.conftest import make_model, model_pair
from tests.test_config import OLD_FLAT_STACK

SEG = 8


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


def test_state_load_rejects_foreign_or_incomplete_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a memstack state file"):
        StackState.load(tmp_path / "other.safetensors")
    meta = {"format": "memstack-state", "version": "1", "segments": "2"}
    save_file({"compressive.0.M": torch.zeros(1, 1, 2, 2)}, str(tmp_path / "half.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"missing \['compressive.0.z'\]"):
        StackState.load(tmp_path / "half.safetensors")


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
    import memstack.saving as stack_module

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

    flat = {**OLD_FLAT_STACK, "segment_len": SEG, "memory_layers": "0"}
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
