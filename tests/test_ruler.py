"""RULER's synthetic tasks (memstack.evals.ruler): exact lengths, answers, counts, determinism, errors.

Every property is checked against the prompt's text by brute force, written here independently of
the module: needles and their values are found by regular expressions, assignment chains are
followed statement by statement, words are counted. The templates are written out here rather
than imported, so a changed wording in the code fails the tests. Tokenizers: memstack's byte
tokenizer, and a small byte-level BPE trained offline here (pieces of uneven length), both as
memstack's HFTokenizer and as the raw transformers tokenizer (whose BOS must not be added).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections import Counter

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from memstack.data.filler import filler_text
from memstack.data.tokenizer import HFTokenizer, load_tokenizer
from memstack.evals import ruler
from memstack.evals.ruler import (
    TASK_NAMES,
    TASKS,
    LengthError,
    make_sample,
    max_new_tokens,
    min_length,
    score,
)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH = [t for t in TASK_NAMES if t.startswith("niah")]
TEXT_TASKS = ["niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery"]
SEEDS = range(5)
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
KEY = rf"(?:[a-z]+-[a-z]+|{UUID})"


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer("bytes")


@pytest.fixture(scope="module")
def raw_bpe(tmp_path_factory) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE trained in milliseconds on the templates and some Bible text,
    with a BOS post-processor, so asking it for special tokens would show in the ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<bos>"],
        show_progress=False,
    )
    words = filler_text("test").split()[:3000]
    corpus = [" ".join(words[i : i + 50]) for i in range(0, len(words), 50)]
    corpus += [NOISE * 3, "One of the special magic numbers for brave-otter is: 1234567."]
    corpus += ["What is the special magic number for calm-river mentioned in the provided text?"]
    corpus += ["VAR ABCDE = VAR FGHIJ. 1. apple 2. river", "0123456789 abcdefghijklmnopqrstuvwxyz " * 3]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    path = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>").save_pretrained(str(path))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.fixture(scope="module")
def bpe(raw_bpe) -> HFTokenizer:
    return HFTokenizer(raw_bpe)


@pytest.fixture(params=["bytes", "bpe", "raw_bpe"])
def tok(request, byte_tok):
    return byte_tok if request.param == "bytes" else request.getfixturevalue(request.param)


def parts(sample) -> tuple[str, str, str]:
    """Instruction, context, question with answer prefix: the prompt's three lines."""
    lines = sample.text.split("\n")
    assert len(lines) == 3, lines[:5]
    return lines[0], lines[1], lines[2]


def needles(context: str, kinds: str) -> list[tuple[str, str]]:
    """(key, value) of every whole needle in the context, in order."""
    value = r"\d{7}" if kinds == "numbers" else UUID
    return re.findall(rf"One of the special magic {kinds} for ({KEY}) is: ({value})\.", context)


def queried_keys(question: str) -> list[str]:
    m = re.fullmatch(
        r"What (?:is|are all) the special magic (?:number|uuid)s? for (.+) mentioned in the provided text\? "
        r"The special magic (?:number|uuid)s? for \1 mentioned in the provided text (?:is|are)",
        question,
    )
    assert m, question
    return re.findall(KEY, m.group(1))


def test_bpe_fixture_is_a_subword_tokenizer(bpe, raw_bpe):
    ids = bpe.encode(NOISE)
    assert len(ids) < len(NOISE) / 2 and bpe.decode(ids) == NOISE
    assert raw_bpe.encode(NOISE)[0] == raw_bpe.bos_token_id  # the raw tokenizer adds BOS when asked


# Exact lengths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_exact_length_and_text_decodes_from_ids(task, tok):
    shortest = min_length(task, tok, seed=0)
    for length in (shortest, shortest + 1, shortest + 37, 1000, 4096):
        s = make_sample(task, tok, length, 0)
        assert len(s.ids) == length and s.length == length
        assert s.text == tok.decode(s.ids)
        assert (s.task, s.seed) == (task, 0)
        assert s.text.endswith(s.answer_prefix) and s.answers
        if hasattr(tok, "bos_token_id"):
            assert tok.bos_token_id not in s.ids  # pieces encoded without special tokens


@pytest.mark.parametrize("task", TASK_NAMES)
def test_too_short_raises_with_the_minimum(task, byte_tok, bpe):
    for tok in (byte_tok, bpe):
        with pytest.raises(ValueError, match="needs at least") as err:
            make_sample(task, tok, 40, 3)
        minimum = int(re.search(r"at least (\d+) tokens", str(err.value)).group(1))
        assert isinstance(err.value, LengthError) and err.value.minimum == minimum == min_length(task, tok, 3)
        assert len(make_sample(task, tok, minimum, 3).ids) == minimum
        with pytest.raises(ValueError, match=f"at least {minimum} tokens"):
            make_sample(task, tok, minimum - 1, 3)
    with pytest.raises(ValueError, match="at least"):
        make_sample(task, byte_tok, 256, 0)  # the templates alone are longer than 256 bytes


def test_unknown_task_and_bad_length(byte_tok):
    with pytest.raises(ValueError) as err:
        make_sample("niah_single_4", byte_tok, 1000, 0)
    assert "niah_single_4" in str(err.value) and all(t in str(err.value) for t in TASK_NAMES)
    with pytest.raises(ValueError, match="common_words"):
        max_new_tokens("qa_1")
    for bad in (0, -5, 10.0, True):
        with pytest.raises(ValueError, match="positive int"):
            make_sample("niah_single_1", byte_tok, bad, 0)


def test_registry_and_generation_budgets(byte_tok):
    assert tuple(TASKS) == TASK_NAMES and len(TASK_NAMES) == 11
    assert TASKS["niah_multiquery"](byte_tok, 900, 4) == make_sample("niah_multiquery", byte_tok, 900, 4)
    budgets = {t: max_new_tokens(t) for t in TASK_NAMES}
    assert budgets["niah_single_1"] == 32 and budgets["common_words"] == 128
    # room for every answer of a byte-token sample, with a separator after each
    for task in TASK_NAMES:
        s = make_sample(task, byte_tok, 2000, 0)
        assert sum(len(a) + 2 for a in s.answers) <= budgets[task], task


# Determinism and seeds ------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_same_seed_same_sample_distinct_seeds_distinct_answers(task, byte_tok):
    samples = [make_sample(task, byte_tok, 1500, seed) for seed in SEEDS]
    assert make_sample(task, byte_tok, 1500, 2) == samples[2]
    assert len({s.answers for s in samples}) == len(samples)
    assert len({s.text for s in samples}) == len(samples)
    assert all(len(set(s.answers)) == len(s.answers) for s in samples)


def test_samples_do_not_depend_on_the_hash_seed(byte_tok):
    """The seeds are derived without Python's salted ``hash``: another process, another salt, the
    same samples."""
    code = (
        "import json, sys; from memstack.data.tokenizer import load_tokenizer; "
        "from memstack.evals.ruler import TASK_NAMES, make_sample; tok = load_tokenizer('bytes'); "
        "json.dump([make_sample(t, tok, 1200, 7).text for t in TASK_NAMES], sys.stdout)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == [make_sample(t, byte_tok, 1200, 7).text for t in TASK_NAMES]


# Needle in a haystack ---------------------------------------------------------------------------------


@pytest.mark.parametrize("task", NIAH)
@pytest.mark.parametrize("length", [1000, 4096])
def test_niah_values_follow_their_keys(task, length, byte_tok, bpe):
    kinds = "uuids" if task in ("niah_single_3", "niah_multikey_3") else "numbers"
    for tok, seed in [(byte_tok, s) for s in SEEDS] + [(bpe, 0)]:
        s = make_sample(task, tok, length, seed)
        instruction, context, question = parts(s)
        assert instruction == (
            f"Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
            f"I will quiz you about the {kinds} afterwards."
        )
        keys = queried_keys(question)
        found = needles(context, kinds)
        by_key = {}
        for k, v in found:
            by_key.setdefault(k, []).append(v)
        # every answer exactly once in the whole prompt, right after its key's needle wording
        for a in s.answers:
            assert s.text.count(a) == 1, (task, a)
        if task == "niah_multiquery":
            assert len(keys) == 4 and [by_key[k] for k in keys] == [[a] for a in s.answers]
        else:
            assert len(keys) == 1 and sorted(by_key[keys[0]]) == sorted(s.answers)
        for k in keys:  # the needle(s), the question and the answer prefix: nowhere else
            assert s.text.count(k) == len(by_key[k]) + 2
        expected_values = {"niah_multivalue": 4, "niah_multiquery": 1}.get(task, 1)
        assert all(len(by_key[k]) == expected_values for k in keys)
        others = [(k, v) for k, v in found if k not in keys]
        if task == "niah_multikey_1":
            assert len(others) == 3
        elif task in ("niah_multikey_2", "niah_multikey_3"):
            assert len(others) >= 3 and len({k for k, _ in found}) == len(found)
        else:
            assert others == []
        assert len({v for _, v in found}) == len(found)  # distinct values
        if kinds == "uuids":
            assert all(str(uuid.UUID(a)) == a for a in s.answers)
            assert all(re.fullmatch(UUID, k) for k in keys) == (task == "niah_multikey_3")
        else:
            assert all(re.fullmatch(r"[1-9]\d{6}", a) for a in s.answers)


def _without_needles(context: str) -> str:
    rest = re.sub(
        rf"One of the special magic (?:numbers|uuids) for {KEY} is: (?:\d{{7}}|{UUID})\.", " ", context
    )
    return " ".join(rest.split())


@pytest.mark.parametrize("length", [1000, 4096])
def test_haystacks_are_what_the_task_says(length, byte_tok, bpe):
    corpus = filler_text("test")
    twice = corpus + " " + corpus  # a passage may wrap around the end of the text
    for tok in (byte_tok, bpe):
        for seed in SEEDS:
            noise = _without_needles(parts(make_sample("niah_single_1", tok, length, seed))[1])
            assert ((NOISE + " ") * length).startswith(noise)
            assert noise.startswith("The grass is green.")
            for task in TEXT_TASKS:
                context = parts(make_sample(task, tok, length, seed))[1]
                ends = re.compile(r"[.!?;:][\"')\]]* $")
                if any(ends.search(w + " ") for w in _without_needles(context).split()[:-1]):
                    for m in re.finditer("One of the special magic", context):  # after a sentence's end
                        assert ends.search(context[: m.start()]), context[m.start() - 80 : m.end()]
                words = _without_needles(context).split()
                assert len(words) > 20 and " ".join(words[:-1]) in twice  # the last word may be cut
            for task, kinds in [("niah_multikey_2", "numbers"), ("niah_multikey_3", "uuids")]:
                context = parts(make_sample(task, tok, length, seed))[1]
                rest = _without_needles(context)  # a needle cut by the exact length, or nothing
                full = f"One of the special magic {kinds} for "
                assert rest == "" or full.startswith(rest) or rest.startswith(full), rest
                assert len(rest) < len(full) + 80  # shorter than a whole needle


def test_real_text_starts_at_a_seeded_offset_and_a_custom_haystack_is_used(byte_tok):
    starts = {
        tuple(parts(make_sample("niah_single_2", byte_tok, 800, seed))[1].split()[:8]) for seed in SEEDS
    }
    assert len(starts) == len(SEEDS)
    own = ["Alpha", "beta.", "Gamma", "delta", "epsilon."]
    s = make_sample("niah_multivalue", byte_tok, 1200, 0, haystack=" ".join(own))
    words = _without_needles(parts(s)[1]).split()
    assert set(words[:-1]) == set(own) and any(w.startswith(words[-1]) for w in own)


def test_needle_depths_spread_over_the_haystack(byte_tok):
    """Depths are uniform draws: over 60 seeds the needle's place covers the haystack."""
    places = []
    for seed in range(60):
        context = parts(make_sample("niah_single_1", byte_tok, 4096, seed))[1]
        at = context.index("One of the special magic")
        places.append(at / len(context))
        # between two noise sentences, never inside one
        assert context[at - 2 : at] == ". "
    assert min(places) < 0.1 and max(places) > 0.85
    assert 0.35 < sum(places) / len(places) < 0.65
    assert sum(p < 0.5 for p in places) > 15 and sum(p > 0.5 for p in places) > 15


def test_keys_never_occur_inside_one_another():
    noise_words = {w.strip(".").lower() for w in NOISE.split()}
    for words, clash in [(ruler.NOUNS, str.startswith), (ruler.ADJECTIVES, str.endswith)]:
        assert len(set(words)) == len(words) >= 150
        assert not noise_words & set(words)
        assert all(re.fullmatch(r"[a-z]+", w) for w in words)
        assert not [(a, b) for a in words for b in words if a != b and clash(a, b)]


# Variable tracking ------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [600, 1000, 4096])
def test_variable_tracking_by_following_the_assignments(length, byte_tok, bpe):
    for tok, seed in [(byte_tok, s) for s in SEEDS] + [(bpe, 1)]:
        s = make_sample("variable_tracking", tok, length, seed)
        instruction, context, question = parts(s)
        assert (
            instruction
            == "Memorize and track the chain(s) of variable assignment hidden in the following text."
        )
        value = re.fullmatch(
            r"Question: Find all variables that are assigned the value (\d{5}) in the text above\. Answer: "
            r"According to the chain\(s\) of variable assignment in the text above, 5 variables are assigned "
            r"the value \1, they are:",
            question,
        ).group(1)
        held: dict[str, str] = {}
        statements = re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.", context)
        for name, source, number in statements:
            assert name not in held  # each variable assigned once
            held[name] = number or held[source]  # KeyError: a variable used before its assignment
        assert len(statements) == 10 and len(set(held.values())) == 2
        assert sorted(n for n, v in held.items() if v == value) == sorted(s.answers)
        assert [n for n, _, _ in statements if held[n] == value] == list(s.answers)  # in chain order
        # the noise is all there is around the statements
        rest = " ".join(re.sub(r"VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d{5})\.", " ", context).split())
        assert ((NOISE + " ") * length).startswith(rest)
        for i, name in enumerate(s.answers):  # assigned once, read by the next in the chain
            assert len(re.findall(rf"\b{name}\b", s.text)) == (1 if i == len(s.answers) - 1 else 2)
        assert s.text.count(value) == 3  # its assignment, the question, the answer prefix


# Common and frequent words ------------------------------------------------------------------------------


def test_frequent_words_top_three_never_tie(byte_tok):
    """Short sequences often tie 3rd and 4th; those are drawn again, so the question has one answer."""
    shortest = min_length("frequent_words", byte_tok)
    for seed in range(40):
        words = [
            w
            for w in parts(make_sample("frequent_words", byte_tok, shortest, seed))[1].split()
            if w.strip(".")
        ]
        counts = sorted(Counter(words).values(), reverse=True)
        assert len(counts) == 3 or counts[2] > counts[3]


def _cwe_items(s) -> list[str]:
    instruction, context, question = parts(s)
    assert instruction == (
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often."
    )
    assert question == (
        "Question: What are the 10 most common words in the above list? "
        "Answer: The top 10 words that appear most often in the list are:"
    )
    items = re.findall(r"(\d+)\. ([a-z]+)\b", context)
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    tail = context[context.rindex(f"{len(items)}. {items[-1][1]}") + len(f"{len(items)}. {items[-1][1]}") :]
    assert set(tail) <= {" ", "."}  # only the dots that make the length exact
    return [w for _, w in items]


@pytest.mark.parametrize("length", [1000, 4096, 8192])
def test_common_words_by_counting(length, byte_tok, bpe):
    for tok, seed in [(byte_tok, s) for s in SEEDS] + [(bpe, 2)]:
        s = make_sample("common_words", tok, length, seed)
        counts = Counter(_cwe_items(s))
        assert len(s.answers) == 10 and set(s.answers) <= set(counts)
        common = {counts[w] for w in s.answers}
        others = [c for w, c in counts.items() if w not in s.answers]
        assert len(common) == 1 and others and min(common) > max(others)
        assert sorted(w for w, _ in counts.most_common(10)) == sorted(s.answers)
        c = common.pop()
        assert 2 <= c <= 30 and max(others) <= min(3, max(1, c // 10))
        if 2 < c < 30:  # c = n // 20 for n items of distinct words: the common ones fill about half
            assert 0.4 * sum(counts.values()) <= 10 * c <= 0.6 * sum(counts.values())
        for w in s.answers:  # the list's copies are its only occurrences in the prompt
            assert len(re.findall(rf"\b{w}\b", s.text)) == c
    # a long list has the paper's counts: common words 30 times, the others 3
    counts = Counter(_cwe_items(make_sample("common_words", byte_tok, 8192, 0)))
    assert counts.most_common(10)[-1][1] == 30 and counts.most_common(11)[-1][1] == 3


def test_common_words_at_the_minimum_length(byte_tok):
    s = make_sample("common_words", byte_tok, min_length("common_words", byte_tok, 0), 0)
    counts = Counter(_cwe_items(s))
    assert {counts[w] for w in s.answers} == {2}
    assert all(c == 1 for w, c in counts.items() if w not in s.answers)


@pytest.mark.parametrize("length", [700, 1000, 4096, 8192])
def test_frequent_words_by_counting(length, byte_tok, bpe):
    for tok, seed in [(byte_tok, s) for s in SEEDS] + [(bpe, 3)]:
        s = make_sample("frequent_words", tok, length, seed)
        instruction, context, question = parts(s)
        assert question.startswith("Question: Do not provide any explanation. Please ignore the dots '....'.")
        tokens = context.split()
        words = [w for w in tokens if w.strip(".")]
        dots = tokens[len(words) :]
        assert tokens[: len(words)] == words and all(set(d) == {"."} for d in dots)  # dots only at the end
        assert all(re.fullmatch(r"[a-z]{4,7}", w) for w in words)
        counts = Counter(words).most_common()
        assert len(s.answers) == 3 and set(s.answers) == {w for w, _ in counts[:3]}
        assert counts[2][1] > counts[3][1]  # a top 3 without ties
        for w in s.answers:
            assert len(re.findall(rf"\b{w}\b", s.text)) == Counter(words)[w]
        if length == 8192 and tok is byte_tok:
            # Zipf with alpha 2: the most frequent word is about 1 / zeta(2) = 61% of the text
            assert 0.5 < counts[0][1] / len(words) < 0.72


# Score -------------------------------------------------------------------------------------------------


def test_score_is_the_share_of_answers_found():
    def expected(output, answers):  # RULER's string_match_all, written out
        hits = 0
        for a in answers:
            hits += 1 if output.find(a) >= 0 else 0
        return hits / len(answers)

    cases = [
        (" 1234567 and 7654321.", ["1234567", "7654321"], 1.0),
        (" 1234567.", ["1234567", "7654321"], 0.5),
        ("nothing here", ["1234567", "7654321"], 0.0),
        ("ABCDE, FGHIJ, KLMNO", ["ABCDE", "FGHIJ", "KLMNO", "PQRST"], 0.75),
        ("abcde", ["ABCDE"], 0.0),  # case-sensitive
        ("tall, wolf", ["wolf"], 1.0),
    ]
    for output, answers, value in cases:
        assert score(output, answers) == pytest.approx(value) == pytest.approx(expected(output, answers))
    with pytest.raises(ValueError):
        score("x", [])
