"""Tokenizers: byte round trips, a locally saved Hugging Face tokenizer through load_tokenizer, errors."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from memstack.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from memstack.data.tokenizer import Tokenizer as TokenizerProtocol

WORDS = ["[UNK]", "<pad>", "</s>", "hello", "world", "memory", "stack"]


def save_word_tokenizer(path, pad: bool = True, eos_template: bool = True) -> None:
    """A tiny word-level tokenizer (built offline) saved with save_pretrained into ``path``."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_template:
        # A post-processor that appends </s>, so "no special tokens by default" can be observed.
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
        )
    kwargs = dict(unk_token="[UNK]", eos_token="</s>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(str(path))


@pytest.mark.parametrize(
    "text", ["", "hello world", "naïve café, 東京, emoji 🙂 and NUL-free text\n\ttabs", "a" * 1000]
)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text  # tensors decode too
    assert tok(text) == ids
    assert tok.batch_encode([text, "x"]) == [ids, [120]]


def test_byte_tokenizer_attributes_and_errors():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert isinstance(tok, TokenizerProtocol)
    assert (tok.name, tok.vocab_size, tok.eos_token_id, tok.pad_token_id) == ("bytes", 256, None, 0)
    assert len("é".encode()) == 2 and len(tok.encode("é")) == 2  # one id per byte, not per character
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character is replaced, not an error
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        tok.decode([65, 256])


def test_hf_tokenizer_from_local_directory(tmp_path):
    save_word_tokenizer(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert isinstance(tok, TokenizerProtocol)
    assert tok.vocab_size == len(WORDS)
    assert tok.eos_token_id == WORDS.index("</s>")
    assert tok.pad_token_id == WORDS.index("<pad>")
    assert tok.name == str(tmp_path)

    ids = tok.encode("hello memory stack")
    assert ids == [3, 5, 6]  # no </s>: encode adds no special tokens by default
    assert tok.batch_encode(["hello world", "stack"]) == [[3, 4], [6]]
    assert tok.batch_encode([]) == []
    assert tok.decode(ids) == "hello memory stack"
    assert tok.decode(torch.tensor([4, 3])) == "world hello"
    assert tok.encode("hello unknownword") == [3, 0]

    with_special = HFTokenizer(tmp_path, add_special_tokens=True)
    assert with_special.encode("hello world") == [3, 4, 2]


def test_hf_tokenizer_pad_falls_back_to_eos(tmp_path):
    save_word_tokenizer(tmp_path, pad=False)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token_id == 2
    assert tok.pad_token_id == 2


def test_hf_tokenizer_wraps_loaded_tokenizer(tmp_path):
    save_word_tokenizer(tmp_path)
    tok = HFTokenizer(PreTrainedTokenizerFast.from_pretrained(str(tmp_path)))
    assert tok.encode("world hello") == [4, 3]
    with pytest.raises(ValueError, match="directory path or a transformers tokenizer"):
        HFTokenizer(42)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "no-such-tokenizer"))
    a_file = tmp_path / "tokenizer.json"
    a_file.write_text("{}")
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(str(a_file))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        load_tokenizer(str(empty))
