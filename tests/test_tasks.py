"""Synthetic tasks: exact prompt lengths, needle placement, answers, determinism, batches, errors.

Every test runs with the byte tokenizer and with a small byte-level BPE tokenizer trained offline
here, whose tokens cover several characters, so the token-level trimming is exercised with pieces
of uneven length.
"""

from __future__ import annotations

import random
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from memstack.data.tasks import (
    FILLER,
    INSTRUCTION,
    PASSKEY_QUESTION,
    multi_needle_sample,
    passkey_batch,
    passkey_min_length,
    passkey_sample,
)
from memstack.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def needle_text(key: str) -> str:
    # Written out here rather than imported, so a changed template in the code fails the tests.
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style) trained in milliseconds on the task sentences, saved and reloaded."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    corpus = [INSTRUCTION, " ".join([FILLER] * 3), needle_text("12345"), PASSKEY_QUESTION]
    corpus += ["The value of key ABCD is 67890. What is the value of key ABCD?", "0123456789 " * 5]
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(path))
    return load_tokenizer(str(path))


@pytest.fixture(params=["bytes", "bpe"])
def tok(request):
    return ByteTokenizer() if request.param == "bytes" else request.getfixturevalue("bpe")


def min_length(tok, **kw) -> int:
    """The smallest accepted prompt length, read from the error for length 1."""
    with pytest.raises(ValueError, match="too short") as err:
        passkey_sample(tok, 1, 0.5, **kw)
    return int(re.search(r"length >= (\d+)", str(err.value)).group(1))


def test_bpe_tokens_span_several_bytes(bpe):
    ids = bpe.encode(FILLER)
    assert len(ids) < len(FILLER) / 2  # the fixture really is a subword tokenizer
    assert bpe.decode(ids) == FILLER


@pytest.mark.parametrize("extra", [0, 1, 7, 300, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_has_exact_length(tok, extra, depth):
    shortest = min_length(tok, seed=3)
    sample = passkey_sample(tok, shortest + extra, depth, seed=3)
    assert len(sample.prompt_ids) == shortest + extra
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(tok, shortest - 1, depth, seed=3)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.83, 1.0])
def test_passkey_needle_once_at_depth(tok, depth):
    length = 1500
    s = passkey_sample(tok, length, depth, seed=11)
    text = tok.decode(s.prompt_ids)
    needle = needle_text(s.passkey)
    assert text.startswith(INSTRUCTION)
    assert text.endswith(" " + PASSKEY_QUESTION)
    assert text.count(needle) == 1
    assert text.count(s.passkey) == 2  # both inside the needle sentence, nowhere else
    assert text.count("pass key") == 4  # twice in the needle, twice in the question

    needle_ids = tok.encode(" " + needle)
    assert s.prompt_ids[s.needle_start : s.needle_start + len(needle_ids)] == needle_ids
    assert "pass key" not in tok.decode(s.prompt_ids[: s.needle_start])

    head = len(tok.encode(INSTRUCTION))
    n_filler = length - head - len(needle_ids) - len(tok.encode(" " + PASSKEY_QUESTION))
    assert abs((s.needle_start - head) / n_filler - depth) <= 1 / n_filler
    assert abs(s.needle_start / length - depth) < 0.2  # in prompt coordinates, roughly too
    assert s.depth == depth


def test_passkey_depth_orders_needles(tok):
    starts = [passkey_sample(tok, 800, d, seed=0).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5


@pytest.mark.parametrize("digits", [1, 5, 9])
def test_passkey_answer(tok, digits):
    s = passkey_sample(tok, 600, 0.4, seed=5, digits=digits)
    assert len(s.passkey) == digits and s.passkey.isdigit() and s.passkey[0] != "0"
    assert tok.decode(s.answer_ids) == " " + s.passkey
    assert s.answer_ids == tok.encode(" " + s.passkey)


def test_passkey_determinism(tok):
    state = random.getstate()
    a = passkey_sample(tok, 500, 0.3, seed=42)
    assert random.getstate() == state  # the global RNG is never used
    assert passkey_sample(tok, 500, 0.3, seed=42) == a
    keys = {passkey_sample(tok, 500, 0.3, seed=s).passkey for s in range(20)}
    assert len(keys) >= 18  # 90,000 possible keys: different seeds give different keys


def test_passkey_without_instruction(tok):
    s = passkey_sample(tok, 200, 0.0, seed=1, instruction=False)
    assert len(s.prompt_ids) == 200
    assert s.needle_start == 0
    assert tok.decode(s.prompt_ids).startswith(" " + needle_text(s.passkey))
    assert min_length(tok, seed=1, instruction=False) < min_length(tok, seed=1)


@pytest.mark.parametrize("instruction", [False, True])
def test_passkey_min_length_is_the_shortest_accepted_prompt(instruction):
    tok = ByteTokenizer()
    shortest = passkey_min_length(tok, instruction=instruction)
    for seed in range(5):
        assert min_length(tok, seed=seed, instruction=instruction) == shortest
    s = passkey_sample(tok, shortest, 0.5, seed=0, instruction=instruction)
    assert tok.decode(s.prompt_ids).endswith(needle_text(s.passkey) + " " + PASSKEY_QUESTION)


def test_passkey_errors(tok):
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tok, 500, 1.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey_sample(tok, 500, -0.1, seed=0)
    with pytest.raises(ValueError, match="digits"):
        passkey_sample(tok, 500, 0.5, seed=0, digits=0)
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(tok, 10, 0.5, seed=0)


@pytest.mark.parametrize("answer_only", [False, True])
def test_passkey_batch(tok, answer_only):
    n, length = 6, 400
    b = passkey_batch(tok, n, length, seed=7, answer_only=answer_only)
    longest = max(len(tok.encode(" " + k)) for k in b.passkeys)
    assert b.input_ids.shape == b.labels.shape == b.answer_mask.shape == b.attention_mask.shape
    assert b.input_ids.shape == (n, length + longest)
    assert b.input_ids.dtype == torch.long and b.answer_mask.dtype == torch.bool
    assert len(set(b.passkeys)) == n
    assert len(set(b.depths)) == n and all(0.0 <= d <= 1.0 for d in b.depths)

    for i, key in enumerate(b.passkeys):
        answer = tok.encode(" " + key)
        row = b.input_ids[i].tolist()
        assert row[length : length + len(answer)] == answer
        assert b.answer_mask[i].nonzero().flatten().tolist() == list(range(length, length + len(answer)))
        prompt = tok.decode(row[:length])
        assert prompt.count(needle_text(key)) == 1 and prompt.endswith(PASSKEY_QUESTION)
        assert b.attention_mask[i].tolist() == [1] * (length + len(answer)) + [0] * (longest - len(answer))

    padding = b.attention_mask == 0
    assert (b.input_ids[padding] == tok.pad_token_id).all()
    keep = b.answer_mask if answer_only else ~padding
    assert torch.equal(b.labels[keep], b.input_ids[keep])
    assert (b.labels[~keep] == -100).all()

    again = passkey_batch(tok, n, length, seed=7, answer_only=answer_only)
    assert torch.equal(again.input_ids, b.input_ids) and again.passkeys == b.passkeys
    other = passkey_batch(tok, n, length, seed=8, answer_only=answer_only)
    assert other.passkeys != b.passkeys


def test_passkey_batch_fixed_depth_and_errors(tok):
    b = passkey_batch(tok, 3, 300, seed=0, depth=0.5)
    assert b.depths == [0.5, 0.5, 0.5]
    assert b.to("cpu").input_ids.equal(b.input_ids)
    with pytest.raises(ValueError, match="n must be"):
        passkey_batch(tok, 0, 300, seed=0)
    with pytest.raises(ValueError, match="too short"):
        passkey_batch(tok, 2, 20, seed=0)


@pytest.mark.parametrize("n_needles", [1, 3, 8])
@pytest.mark.parametrize("length", [700, 2000])
def test_multi_needle(tok, n_needles, length):
    s = multi_needle_sample(tok, length, n_needles, seed=n_needles)
    assert len(s.prompt_ids) == length
    text = tok.decode(s.prompt_ids)
    assert len(s.keys) == len(s.values) == len(s.needle_starts) == n_needles
    assert len(set(s.keys)) == n_needles
    assert all(re.fullmatch(r"[A-Z]{4}", k) for k in s.keys)
    assert all(re.fullmatch(r"[1-9]\d{4}", v) for v in s.values)
    for key, value, start in zip(s.keys, s.values, s.needle_starts, strict=True):
        fact = f"The value of key {key} is {value}."
        assert text.count(fact) == 1
        ids = tok.encode(" " + fact)
        assert s.prompt_ids[start : start + len(ids)] == ids

    assert s.asked_key in s.keys
    assert s.answer == s.values[s.keys.index(s.asked_key)]
    asked = f"What is the value of key {s.asked_key}? The value of key {s.asked_key} is"
    assert text.endswith(" " + asked)
    assert text.count(s.asked_key) == 3  # the needle and twice in the question
    assert tok.decode(s.answer_ids) == " " + s.answer

    # Needles spread evenly: equal filler stretches (within a token) between consecutive needles.
    assert s.needle_starts == sorted(s.needle_starts)
    facts = [f" The value of key {k} is {v}." for k, v in zip(s.keys, s.values, strict=True)]
    ends = [len(tok.encode(INSTRUCTION))]  # where each stretch of filler may begin
    ends += [x + len(tok.encode(f)) for x, f in zip(s.needle_starts, facts, strict=True)]
    stretches = [start - end for start, end in zip(s.needle_starts, ends[:-1], strict=True)]
    stretches.append(length - len(tok.encode(" " + asked)) - ends[-1])
    assert max(stretches) - min(stretches) <= 1 and min(stretches) > 0


def test_multi_needle_determinism_and_errors(tok):
    a = multi_needle_sample(tok, 900, 4, seed=1)
    assert multi_needle_sample(tok, 900, 4, seed=1) == a
    assert multi_needle_sample(tok, 900, 4, seed=2).keys != a.keys
    asked = [multi_needle_sample(tok, 900, 4, seed=s) for s in range(20)]
    assert {x.keys.index(x.asked_key) for x in asked} == {0, 1, 2, 3}  # any needle can be asked
    with pytest.raises(ValueError, match="n_needles"):
        multi_needle_sample(tok, 900, 0, seed=1)
    with pytest.raises(ValueError, match="too short"):
        multi_needle_sample(tok, 40, 4, seed=1)
