"""Retrieval tasks whose answer chunk is known: facts, pass keys and key-value needles in real text.

Used by ``scripts/bench_retrieval.py`` (through :mod:`memstack.evals.retrieval`). Sentences are
written *over* the text at a word boundary (:func:`plant`), so that a text's length and its grid
of fixed chunks never move: a sample changes only the segments its sentence touches, and a
million-character haystack is read once, not once per sample. The text is the King James Bible's
held-out split (:func:`corpus`), continued by its training split beyond 419K characters. Every
sample has its own key or name; a chunk is relevant when it holds the answer's digits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from memstack.data.filler import filler_text
from memstack.data.tasks import KV_NEEDLE, KV_QUESTION, PASSKEY_NEEDLE, PASSKEY_QUESTION


def plant(text: str, sentence: str, at: int) -> tuple[str, tuple[int, int]]:
    """Write ``sentence`` over ``text`` at the first word boundary at or after ``at``.

    The text keeps its length: ``" " + sentence + " "`` replaces as many characters, so the
    chunk grid and every other segment stay as they were.

    Returns:
        ``(new_text, (start, end))``, the sentence's span in the new text.

    Raises:
        ValueError: no word boundary leaves room for the sentence before the end of the text.
    """
    space = text.find(" ", max(0, at))
    if space < 0 or space + len(sentence) + 2 > len(text):
        raise ValueError(
            f"no room for a {len(sentence)}-character sentence at {at} of a {len(text)}-character text"
        )
    start = space + 1
    new = text[:space] + " " + sentence + " " + text[start + len(sentence) + 1 :]
    return new, (start, start + len(sentence))


def chunks_overlapping(span: tuple[int, int], chunk_len: int) -> set[int]:
    """Indices of the fixed ``chunk_len`` chunks that share a character with ``span = (start, end)``."""
    start, end = span
    return set(range(start // chunk_len, (end - 1) // chunk_len + 1))


def invented_names(n: int, seed: int, avoid: str = "") -> list[str]:
    """``n`` distinct made-up names (two or three syllables) that do not occur in ``avoid``."""
    rng = random.Random(seed)
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "s"]
    names: list[str] = []
    while len(names) < n:
        parts = [
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.choice((2, 3)))
        ]
        name = "".join(parts).capitalize()
        if name not in names and name not in avoid and name.lower() not in avoid:
            names.append(name)
    return names


QUESTIONS = (
    "What is {name}'s code?",
    "Which number is the code of {name}?",
    "Tell me the code {name} has.",
    "{name} was given a code. What was it?",
)


@dataclass
class Sample:
    """One question over one text; ``relevant``: the fixed chunks that hold the answer."""

    text: str
    question: str
    relevant: set[int]


# ---------------------------------------------------------------------------------------------
# Tasks


def corpus(offset: int, length: int) -> str:
    """``length`` characters of the KJV's test split from ``offset``, continued by its train split."""
    text = filler_text("test")
    if offset + length > len(text):
        text = text + " " + filler_text("train")
    return text[offset : offset + length]


def facts_task(n: int, length: int, chunk_len: int, seed: int) -> list[Sample]:
    """``n`` facts written over ``length`` characters at evenly spread places, one question each."""
    text = corpus(300_000, length)
    rng = random.Random(seed)
    names = invented_names(n, seed, avoid=text)
    answers = []
    for i, name in enumerate(names):
        code = f"{rng.randrange(10_000, 100_000)}"
        sentence = f"{name}'s code is {code}."
        at = int((i + rng.random() * 0.5) * (length - 64) / n)
        text, (start, end) = plant(text, sentence, at)
        answers.append((name, (end - 1 - len(code), end - 1)))
    return [
        Sample(text, QUESTIONS[i % len(QUESTIONS)].format(name=name), chunks_overlapping(span, chunk_len))
        for i, (name, span) in enumerate(answers)
    ]


def passkey_task(n: int, length: int, chunk_len: int, seed: int) -> list[Sample]:
    """``n`` haystacks of ``length`` characters, each with its own pass key at depth ``i / (n - 1)``."""
    base, rng, samples = corpus(0, length), random.Random(seed), []
    keys = rng.sample(range(10_000, 100_000), n)
    for i, key in enumerate(keys):
        needle = PASSKEY_NEEDLE.format(key=key)
        at = int(i / max(1, n - 1) * (length - len(needle) - 64))
        text, (start, end) = plant(base, needle, at)
        relevant = {
            c for j in range(2) for c in chunks_overlapping(_find(needle, str(key), j, start), chunk_len)
        }
        samples.append(Sample(text, PASSKEY_QUESTION, relevant))
    return samples


def _find(sentence: str, part: str, occurrence: int, offset: int) -> tuple[int, int]:
    at = -1
    for _ in range(occurrence + 1):
        at = sentence.index(part, at + 1)
    return offset + at, offset + at + len(part)


def kv_task(n: int, length: int, chunk_len: int, seed: int) -> list[Sample]:
    """``n`` key-value needles in one text of ``length`` characters; each key asked once."""
    text, rng = corpus(350_000, length), random.Random(seed)
    answers = []
    keys: list[str] = []
    while len(keys) < n:
        key = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if key not in keys:
            keys.append(key)
    for i, key in enumerate(keys):
        value = f"{rng.randrange(10_000, 100_000)}"
        needle = KV_NEEDLE.format(key=key, value=value)
        text, (start, _) = plant(text, needle, int((i + rng.random() * 0.5) * (length - 64) / n))
        answers.append((key, _find(needle, value, 0, start)))
    return [
        Sample(text, KV_QUESTION.format(key=key), chunks_overlapping(span, chunk_len))
        for key, span in answers
    ]
