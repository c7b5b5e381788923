"""The compatibility matrix: causal-LM types of transformers built tiny, each either passing every
core invariant against the unwrapped model or refused with its reason.

What each type is expected to be was read off its modeling code, independently of discovery: its
rotary layout (how ``apply_rotary_pos_emb`` uses cos and sin), and what it has that memstack must
honour (sliding windows, soft-capping, sinks, hybrid layers).
"""

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, UnsupportedModelError
from memstack.evals.compat import check_model, check_type
from memstack.evals.zoo import build_tiny

SUPPORTED = {
    # model_type: (rotary layouts of its layers, features the summary must name)
    "llama": ("half", ()),
    "mistral": ("half", ("sliding window",)),
    "mixtral": ("half", ()),
    "qwen2": ("half", ()),
    "qwen3": ("half", ()),  # q/k RMSNorm before rotary
    "olmo2": ("half", ()),  # q/k norm over all heads before rotary
    "granite": ("half", ()),
    "phi": ("half", ()),  # partial rotary
    "phi3": ("half", ()),
    "gpt_neox": ("half", ()),  # partial rotary, fused QKV
    "persimmon": ("half", ()),
    "starcoder2": ("half", ()),
    "gemma": ("half", ()),
    "gemma2": ("half", ("sliding window", "soft-capping")),
    "gemma3_text": ("half", ("sliding window",)),  # local and global rotary per layer type
    "smollm3": ("half", ()),
    "gpt2": ("none", ()),  # learned absolute positions
    "opt": ("none", ()),
    "roberta": ("none", ()),  # is_decoder=True: causal; positions after the padding index
    "cohere": ("pairs", ()),  # interleaved pairs, cos/sin repeat_interleave'd by the model
    "cohere2": ("none/pairs", ("sliding window",)),  # NoPE global layers
    "glm": ("pairs_halfcos", ()),  # first half of cos/sin repeated pairwise
    "gptj": ("pairs_halfwidth (sin first)", ()),  # sin, cos = position_embeddings; rotate_every_two
    "codegen": ("pairs_halfwidth (sin first)", ()),
    "llama4_text": ("pairs_halfwidth", ()),  # complex freqs_cis
    "deepseek_v2": ("pairs_halfwidth (trailing)", ()),  # complex, on the rope part after the nope part
    "deepseek_v3": ("half (trailing)", ("K/V sizes differ",)),  # MLA: v_head_dim != qk head dim
    "deepseek_v32": ("half (trailing)", ("K/V sizes differ",)),  # sparse attention: indexer's top-k keys
    "nanochat": ("half (negated)", ()),  # rotate_half is (x2, -x1)
    "gpt_oss": ("half_halfwidth", ("sliding window", "attention sinks")),
    "jamba": ("none", ("hybrid",)),  # Mamba layers between attention layers
    "qwen3_next": ("half", ("hybrid",)),  # linear-attention layers between attention layers
    "falcon_h1": ("half", ()),  # Mamba and attention side by side in every layer
    "zamba2": ("none", ()),  # a shared attention block with layer_idx -1
}
REFUSED = {
    "bloom": "AttentionInterface",  # ALiBi attention written by hand
    "mamba": "AttentionInterface",  # no attention at all
    "stablelm": "keyword arguments",
    "diffllama": "more than once per forward",  # differential attention: two softmaxes per layer
    "recurrent_gemma": "rotary embedding inside attention",
    "bigbird_pegasus": "bidirectional",
}


@pytest.mark.parametrize("model_type", sorted(SUPPORTED))
def test_every_invariant_holds(model_type):
    verdict = check_type(model_type)
    assert verdict.status == "supported", verdict.reason
    rotary, features = SUPPORTED[model_type]
    assert f"rotary {rotary}" in verdict.summary
    for feature in features:
        assert feature in verdict.summary


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_with_the_specific_reason(model_type):
    verdict = check_type(model_type)
    assert verdict.status == "refused" and REFUSED[model_type] in verdict.reason
    with pytest.raises(UnsupportedModelError, match=REFUSED[model_type]):
        MemoryStack(build_tiny(model_type))


def test_the_checker_catches_wrong_un_rotation(monkeypatch):
    # Un-rotate at the wrong positions (one off) inside attention: discovery is unaffected.
    from memstack.model.rotary import RotaryTables

    rotation = RotaryTables.rotation
    monkeypatch.setattr(
        RotaryTables,
        "rotation",
        lambda self, layer, first, *a, **k: rotation(self, layer, first + 1, *a, **k),
    )
    verdict = check_model(build_tiny("llama"))
    assert verdict.status == "fails" and any(f.startswith("un-rotation") for f in verdict.failed)


def test_the_checker_catches_an_ignored_softcap(monkeypatch):
    import memstack.attention as attention

    local = attention.local_attention
    monkeypatch.setattr(attention, "local_attention", lambda *a, softcap=None, **k: local(*a, **k))
    verdict = check_model(build_tiny("gemma2"))
    assert verdict.status == "fails" and any(f.startswith("first segment") for f in verdict.failed)


def test_the_checker_catches_a_dropped_sparse_index(monkeypatch):
    import memstack.attention as attention

    monkeypatch.setattr(attention, "sparse_mask", lambda mask, indices, kv_len: mask)
    verdict = check_model(build_tiny("deepseek_v32"))
    assert verdict.status == "fails" and any(f.startswith("first segment") for f in verdict.failed)


def test_the_checker_catches_memory_leaking_backwards(monkeypatch):
    # A memory read that sees the whole segment's keys (future included) breaks causality.
    from memstack.memory.compressive import Compressive

    read = Compressive.read

    def leaky(self, state, query, ctx):
        out = read(self, state, query, ctx)
        if out.output is not None:
            out = out._replace(output=out.output + out.output.mean(dim=1, keepdim=True))
        return out

    monkeypatch.setattr(Compressive, "read", leaky)
    verdict = check_model(build_tiny("llama"))
    assert any(f.startswith("causality") for f in verdict.failed)


def test_a_wrapped_hybrid_keeps_memory_only_on_attention_layers():
    model = build_tiny("jamba")
    stack = MemoryStack(model, StackConfig(segment_len=8))
    assert stack.memory_layers == stack.arch.layers and len(stack.arch.layers) < stack.arch.num_layers
    other = next(i for i in range(stack.arch.num_layers) if i not in stack.arch.layers)
    with pytest.raises(ValueError, match="have no attention"):
        MemoryStack(
            build_tiny("jamba"), StackConfig(segment_len=8, compressive=CompressiveConfig(layers=str(other)))
        )
    out = stack(torch.randint(0, 256, (1, 20)))
    assert sorted(out.state.memories["compressive"]) == stack.arch.layers


def can_i_wrap_main():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "can_i_wrap.py"))["main"]


def test_can_i_wrap_checks_a_saved_checkpoint(tmp_path):
    import json

    main = can_i_wrap_main()
    build_tiny("qwen3").save_pretrained(tmp_path / "ckpt")
    assert main(["--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "v.json")]) == 0
    saved = json.loads((tmp_path / "v.json").read_text())
    assert [v["status"] for v in saved["verdicts"]] == ["supported"]
    assert saved["verdicts"][0]["model_type"] == "qwen3"


def test_can_i_wrap_on_part_of_the_survey_leaves_the_shipped_table_alone(tmp_path, monkeypatch, capsys):
    """--model (and --types) print their verdicts and write no JSON unless given --out; the full
    survey still writes the default table. The default is pointed at a copy of the shipped one."""
    import json
    import re
    import shutil
    from pathlib import Path

    main = can_i_wrap_main()
    shipped = Path(__file__).parents[1] / "results" / "compat.json"
    shipped_bytes = shipped.read_bytes()
    default = tmp_path / "results" / "compat.json"
    default.parent.mkdir()
    shutil.copy(shipped, default)
    stamp = default.stat().st_mtime_ns
    monkeypatch.setitem(main.__globals__, "DEFAULT_OUT", default)
    work = tmp_path / "cwd"  # a default relative to the working directory would land in here
    (work / "results").mkdir(parents=True)
    monkeypatch.chdir(work)
    build_tiny("qwen3").save_pretrained(tmp_path / "ckpt")

    assert main(["--model", str(tmp_path / "ckpt")]) == 0
    assert re.search(r"^qwen3\s+supported\s", capsys.readouterr().out, re.M)  # the table is printed
    assert default.read_bytes() == shipped_bytes and default.stat().st_mtime_ns == stamp
    assert list((work / "results").iterdir()) == [] and shipped.read_bytes() == shipped_bytes

    # the full survey (every type: stood in for by one, to stay fast) writes the default table
    verdict = check_type("llama")
    monkeypatch.setitem(main.__globals__, "survey", lambda types, progress=False: [verdict])
    assert main(["--types", "llama"]) == 0  # a part: printed, not written
    assert default.stat().st_mtime_ns == stamp
    assert main([]) == 0
    written = json.loads(default.read_text())
    assert [(v["model_type"], v["status"]) for v in written["verdicts"]] == [("llama", "supported")]
    assert list((work / "results").iterdir()) == [] and shipped.read_bytes() == shipped_bytes
