"""Synthetic tasks: exact prompt lengths, needle placement, answers, determinism, batches, errors.

Every test runs with the byte tokenizer and with a small byte-level BPE tokenizer trained offline
here, whose tokens cover several characters, so the token-level trimming is exercised with pieces
of uneven length. The real-text filler is checked against the text of its split: the needle sits
between two words, and the filler is a passage of the asked split.
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
    clean_filler_text,
    default_filler_path,
    filler_text,
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


# Real-text filler ------------------------------------------------------------------------------


def pieces(tok, s, instruction=True):
    """(filler before the needle, filler after it) of a pass-key sample, decoded."""
    head = len(tok.encode(INSTRUCTION)) if instruction else 0
    needle = tok.encode(" " + needle_text(s.passkey))
    end = s.needle_start + len(needle)
    assert s.prompt_ids[s.needle_start : end] == needle
    question = len(tok.encode(" " + PASSKEY_QUESTION))
    return tok.decode(s.prompt_ids[head : s.needle_start]), tok.decode(s.prompt_ids[end:-question])


def in_split(piece: str, text: str) -> bool:
    """Whether ``piece`` is a run of ``text``'s words (which wrap around after its last word)."""
    return piece in " " + text + " " + text


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("extra", [0, 1, 7, 300, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_text_prompt_has_exact_length(tok, split, extra, depth):
    shortest = passkey_min_length(tok)
    s = passkey_sample(tok, shortest + extra, depth, seed=3, filler="text", split=split)
    assert len(s.prompt_ids) == shortest + extra
    assert min_length(tok, seed=3, filler="text") == shortest  # no filler needed: the same minimum
    if tok.name == "bytes":
        assert shortest == passkey_min_length(tok, instruction=True)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.83, 1.0])
@pytest.mark.parametrize("split", ["train", "test"])
def test_text_needle_once_at_depth_between_words(tok, depth, split):
    length = 1500
    s = passkey_sample(tok, length, depth, seed=11, filler="text", split=split)
    text = tok.decode(s.prompt_ids)
    needle = needle_text(s.passkey)
    assert text.startswith(INSTRUCTION) and text.endswith(" " + PASSKEY_QUESTION)
    assert text.count(needle) == 1
    assert text.count(s.passkey) == 2  # the filler holds no digits
    assert FILLER not in text

    # the needle sits exactly where the synthetic filler would put it
    head = len(tok.encode(INSTRUCTION))
    needle_ids = tok.encode(" " + needle)
    n_filler = length - head - len(needle_ids) - len(tok.encode(" " + PASSKEY_QUESTION))
    assert s.needle_start - head == round(depth * n_filler)

    # between two words: the stretch before ends where a word of the split ends (a space follows
    # it there), the stretch after starts with a space and a whole word
    source = filler_text(split)
    before, after = pieces(tok, s)
    assert before == "" or (before.startswith(" ") and in_split(before + " ", source))
    assert after == "" or (after.startswith(" ") and in_split(after, source))
    assert (before, after) != ("", "")


@pytest.mark.parametrize("depth", [0.0, 0.5, 0.77, 1.0])
def test_text_needle_word_boundary_bytes(depth):
    # in byte coordinates: no letter glued to either side of the needle
    tok = ByteTokenizer()
    for seed in range(20):
        s = passkey_sample(tok, 700, depth, seed=seed, filler="text", split="test")
        raw = bytes(s.prompt_ids)
        end = s.needle_start + len(" " + needle_text(s.passkey))
        assert raw[s.needle_start : s.needle_start + 5] == b" The "
        assert raw[s.needle_start - 1 : s.needle_start] not in (b" ", b"")  # a word (or the instruction) ends
        if depth < 1.0:
            assert raw[end : end + 1] == b" " and raw[end + 1 : end + 2] not in (b" ", b"")
        source = " " + filler_text("test") + " "
        word_before = raw[: s.needle_start].decode().split(" ")[-1]
        if depth > 0.0:
            assert f" {word_before} " in source  # a whole word of the split, not the end of one


def test_text_filler_comes_from_the_asked_split():
    tok = ByteTokenizer()
    train, test = filler_text("train"), filler_text("test")
    for seed in range(5):
        for split, own, other in [("train", train, test), ("test", test, train)]:
            s = passkey_sample(tok, 3000, 0.5, seed=seed, filler="text", split=split)
            before, after = pieces(tok, s)
            assert in_split(before, own) and in_split(after, own)
            assert before not in other and after not in other  # 1,400-byte passages are not shared


def test_text_filler_determinism_and_passages_by_seed(tok):
    state = random.getstate()
    a = passkey_sample(tok, 900, 0.4, seed=42, filler="text", split="test")
    assert random.getstate() == state
    assert passkey_sample(tok, 900, 0.4, seed=42, filler="text", split="test") == a
    passages = {pieces(tok, passkey_sample(tok, 900, 0.4, seed=s, filler="text"))[1] for s in range(10)}
    assert len(passages) == 10  # each seed its own passage
    # the synthetic filler of a seed is what it always was, whatever the new arguments say
    assert passkey_sample(tok, 900, 0.4, seed=42, split="test", filler_path="nowhere") == passkey_sample(
        tok, 900, 0.4, seed=42
    )
    assert a.passkey == passkey_sample(tok, 900, 0.4, seed=42).passkey


def test_splits_are_disjoint_and_cover_the_text():
    raw = default_filler_path().read_text()
    train, test = filler_text("train"), filler_text("test")
    assert train + " " + test == clean_filler_text(raw)
    n_train, n_test = len(train.split(" ")), len(test.split(" "))
    assert abs(n_train / (n_train + n_test) - 0.9) < 1e-4
    assert train.startswith("In the beginning God created the heaven and the earth.")
    assert test.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert not any(c.isdigit() for c in train + test)  # verse numbers and headings are gone
    assert "Genesis" not in train[:100] and "  " not in train
    rng = random.Random(0)
    for _ in range(50):
        i = rng.randrange(len(test) - 150)
        assert test[i : i + 150] not in train


def test_text_filler_wraps_around_a_short_text(tmp_path):
    tok = ByteTokenizer()
    words = [f"w{chr(97 + i)}x" for i in range(20)]  # 18 train words, 2 test words
    path = tmp_path / "tiny.txt"
    path.write_text(" ".join(words) + "\n")
    assert filler_text("test", path) == "wsx wtx"
    looped = " ".join(["wsx wtx"] * 200)
    for depth in (0.0, 0.3, 0.5, 1.0):
        s = passkey_sample(tok, 600, depth, seed=1, filler="text", filler_path=path, split="test")
        assert len(s.prompt_ids) == 600
        before, after = pieces(tok, s)
        assert set(before.split()[1:] + after.split()[:-1]) <= {"wsx", "wtx"}  # test words, over and over
        # every word is 4 bytes, so a stretch of another size cannot be whole words: it is cut at
        # its start (the start of the filler), and the needle still follows a whole word
        assert before == "" or in_split(before + " ", looped)
        assert after == "" or (after.startswith(" w") and in_split(after, looped))


def test_text_filler_errors(tmp_path, tok):
    with pytest.raises(ValueError, match="filler must be"):
        passkey_sample(tok, 500, 0.5, seed=0, filler="lorem")
    with pytest.raises(ValueError, match="split must be"):
        passkey_sample(tok, 500, 0.5, seed=0, filler="text", split="valid")
    with pytest.raises(FileNotFoundError, match="filler text"):
        passkey_sample(tok, 500, 0.5, seed=0, filler="text", filler_path=tmp_path / "none.txt")
    (tmp_path / "short.txt").write_text("too few words here")
    with pytest.raises(ValueError, match="words"):
        passkey_sample(tok, 500, 0.5, seed=0, filler="text", filler_path=tmp_path / "short.txt")
    with pytest.raises(ValueError, match="filler must be"):
        multi_needle_sample(tok, 500, 2, seed=0, filler="mix")  # mix is for batches only


@pytest.mark.parametrize("filler", ["text", "mix"])
def test_passkey_batch_text_and_mix(tok, filler):
    b = passkey_batch(tok, 16, 400, seed=7, filler=filler)
    assert b.input_ids.shape[1] >= 400 and len(b.fillers) == 16
    for i, key in enumerate(b.passkeys):
        prompt = tok.decode(b.input_ids[i, :400].tolist())
        assert prompt.count(needle_text(key)) == 1 and prompt.endswith(PASSKEY_QUESTION)
        assert (FILLER[:30] in prompt) == (b.fillers[i] == "synthetic")
    if filler == "mix":
        assert set(b.fillers) == {"synthetic", "text"}  # both in one batch of 16 (by seed)
    else:
        assert set(b.fillers) == {"text"}
    again = passkey_batch(tok, 16, 400, seed=7, filler=filler)
    assert torch.equal(again.input_ids, b.input_ids) and again.fillers == b.fillers
    # the keys and depths of a seed do not depend on the filler
    synthetic = passkey_batch(tok, 16, 400, seed=7)
    assert synthetic.passkeys == b.passkeys and synthetic.depths == b.depths
    assert synthetic.fillers == ["synthetic"] * 16
    with pytest.raises(ValueError, match="filler must be"):
        passkey_batch(tok, 2, 400, seed=0, filler="both")


@pytest.mark.parametrize("n_needles", [1, 3, 8])
@pytest.mark.parametrize("length", [700, 2000])
def test_multi_needle_text(tok, n_needles, length):
    s = multi_needle_sample(tok, length, n_needles, seed=n_needles, filler="text", split="test")
    assert len(s.prompt_ids) == length
    text = tok.decode(s.prompt_ids)
    source = filler_text("test")
    assert not any(c.isdigit() for c in text.replace(s.answer, "").split("is", 1)[0][: len(INSTRUCTION)])
    facts = [f" The value of key {k} is {v}." for k, v in zip(s.keys, s.values, strict=True)]
    ends = [len(tok.encode(INSTRUCTION))]
    for fact, start in zip(facts, s.needle_starts, strict=True):
        assert text.count(fact) == 1
        ids = tok.encode(fact)
        assert s.prompt_ids[start : start + len(ids)] == ids
        ends.append(start + len(ids))
    asked = f" What is the value of key {s.asked_key}? The value of key {s.asked_key} is"
    assert text.endswith(asked) and tok.decode(s.answer_ids) == " " + s.answer
    # stretches between needles are runs of whole words of the test split, of nearly equal size
    bounds = list(zip(ends, [*s.needle_starts, length - len(tok.encode(asked))], strict=True))
    stretches = [tok.decode(s.prompt_ids[a:b]) for a, b in bounds]
    for piece in stretches[:-1]:
        assert piece == "" or (piece.startswith(" ") and in_split(piece + " ", source))
    assert stretches[-1] == "" or (stretches[-1].startswith(" ") and in_split(stretches[-1], source))
    sizes = [b - a for a, b in bounds]
    longest_word = 20 if tok.name == "bytes" else 10  # tokens of the longest words near the needles
    assert max(sizes) - min(sizes) <= 2 * longest_word
    assert multi_needle_sample(tok, length, n_needles, seed=n_needles, filler="text", split="test") == s
