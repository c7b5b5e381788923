"""Invented facts a model cannot know, the day's text that states them, and closed-book recall.

The consolidation experiment on a pretrained model (``scripts/eval_sleep_smollm2.py``) reads
facts once by day and asks them after each night. A fact is an invented person and one of two
relations, each with a value no model has seen:

- ``locker``: "Talvo Quenning's locker number is 4821." (a 4-digit number);
- ``town``: "Talvo Quenning was born in Brimholt." (an invented town).

Each relation has its stored phrasing (what the day's text says), paraphrases for training
(:data:`PARAPHRASES`, what template augmentation adds), two questions with answers for training
through the chat template (:data:`TRAINING_QUESTIONS`, what question augmentation adds) and two
other questions never trained on (:data:`QUESTIONS`), asked through the model's chat template
with the answer's opening words as the start of the assistant's reply. Names, towns and numbers
are drawn from a seeded generator, distinct within a call.

Recall is scored by teacher forcing (:func:`greedy_hits`): a fact counts when the model's argmax
at every position of the value equals the value's token given the correct tokens before it,
which is exactly "greedy decoding after the prompt produces the value" and costs one batched
forward instead of a decoding loop per fact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_ONSETS = "b br c d dr f g gr h j k kl l m n p pr qu r s st t tr v w z".split()
_VOWELS = "a e i o u ai ea io".split()
_CODAS = ["", "", "n", "l", "r", "s", "th", "m", "nd", "rk"]
_TOWN_ENDS = "holt wick mere ford thorpe stead bury vale".split()

STORED = {
    "locker": "{name}'s locker number is {value}.",
    "town": "{name} was born in {value}.",
}
"""The phrasing the day's text states each relation in; recall in it is the completion test."""

PARAPHRASES = {
    "locker": ("{name} has locker number {value}.", "The locker of {name} is number {value}."),
    "town": ("{name} comes from {value}.", "The birthplace of {name} is {value}."),
}
"""Other phrasings of the same fact, for template augmentation in training (never asked)."""

QUESTIONS = {
    "locker": (
        ("What is the locker number of {name}?", "The locker number of {name} is"),
        ("Which locker belongs to {name}?", "The locker that belongs to {name} is number"),
    ),
    "town": (
        ("In which town was {name} born?", "The town where {name} was born is"),
        ("What is {name}'s hometown?", "{name}'s hometown is"),
    ),
}
"""Per relation, two (user question, opening of the assistant's answer) pairs, never trained on."""

TRAINING_QUESTIONS = {
    "locker": (
        ("Tell me {name}'s locker number.", "Sure: {name}'s locker is number {value}."),
        ("Do you know which locker {name} uses?", "Yes, {name} uses locker {value}."),
    ),
    "town": (
        ("Where was {name} born?", "{name}'s birthplace is {value}."),
        ("Tell me where {name} comes from.", "{name} is a native of {value}."),
    ),
}
"""Per relation, two (user question, assistant answer) pairs for question augmentation in
training (:func:`training_chat`): other words than :data:`QUESTIONS`, whose questions and answer
openings stay never trained on (tested), so the unseen-question test still asks what was not
trained. Why chat questions at all: facts trained only as plain text are recalled in that text
far more often than to a question (the knowledge-extraction gap of Allen-Zhu and Li's "Physics of
language models 3.1"), and the unseen questions are asked in chat."""

GENERAL = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many days are in a week?", "seven"),
    ("What color is the sky on a clear day?", "blue"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the opposite of hot?", "cold"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What language is spoken in Spain?", "Spanish"),
    ("What animal says moo?", "cow"),
    ("How many legs does a spider have?", "eight"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
)
"""General questions and a word a right answer contains (case-insensitive): what a base model
answers that consolidation must not break. Use those the base model answers right."""


_NAME = r"([A-Z][a-z]+ [A-Z][a-z]+)"
_PATTERNS = {
    "locker": re.compile(_NAME + r"'s locker number is (\d+)\."),
    "town": re.compile(_NAME + r" was born in ([A-Z][a-z]+)\."),
}


@dataclass(frozen=True)
class Fact:
    """One invented fact: ``name``'s ``relation`` (a key of :data:`STORED`) is ``value``."""

    name: str
    relation: str
    value: str

    def sentence(self, template: str | None = None) -> str:
        """The fact in ``template`` (default: its stored phrasing)."""
        return (template or STORED[self.relation]).format(name=self.name, value=self.value)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def invent_facts(n: int, seed: int) -> list[Fact]:
    """``n`` facts about ``n`` distinct invented people, relations alternating, every value
    distinct (numbers in 1000-9999, towns a made-up word and an English ending)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    names: set[str] = set()
    towns: set[str] = set()
    numbers: set[str] = set()
    facts = []
    while len(facts) < n:
        name = f"{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}"
        if name in names:
            continue
        relation = ("locker", "town")[len(facts) % 2]
        pool = numbers if relation == "locker" else towns
        while True:
            value = (
                str(rng.randrange(1000, 10_000))
                if relation == "locker"
                else _word(rng, 1).capitalize() + rng.choice(_TOWN_ENDS)
            )
            if value not in pool:
                break
        names.add(name)
        pool.add(value)
        facts.append(Fact(name, relation, value))
    return facts


def day_text(facts: Sequence[Fact], filler_words: Sequence[str], rng: random.Random, gap: int = 20) -> str:
    """The day's reading: each fact in its stored phrasing, each after ``gap`` consecutive words
    of filler taken from a random place of ``filler_words``."""
    if len(filler_words) <= gap:
        raise ValueError(f"the filler holds {len(filler_words)} words, need more than gap={gap}")
    parts = []
    for fact in facts:
        start = rng.randrange(len(filler_words) - gap)
        parts.append(" ".join(filler_words[start : start + gap]))
        parts.append(fact.sentence())
    return " ".join(parts)


def find_facts(text: str) -> list[Fact]:
    """Every fact stated in ``text`` in its stored phrasing, in the order they appear (what
    template augmentation restates from a night's records)."""
    found = [
        (m.start(), Fact(m.group(1), r, m.group(2))) for r, p in _PATTERNS.items() for m in p.finditer(text)
    ]
    return [f for _, f in sorted(found, key=lambda x: x[0])]


def training_chat(tokenizer: Any, fact: Fact) -> str:
    """The two :data:`TRAINING_QUESTIONS` about ``fact`` and their answers as one two-turn
    conversation through the model's chat template (system prompt included where the template
    adds one, as it is when the unseen questions are asked)."""
    messages = []
    for question, answer in TRAINING_QUESTIONS[fact.relation]:
        messages.append({"role": "user", "content": question.format(name=fact.name)})
        messages.append({"role": "assistant", "content": fact.sentence(answer)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def split_answer(tokenizer: Any, prompt: str, value: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, value ids)`` such that their concatenation is the tokenization of
    ``prompt + " " + value`` (the value's tokens as they follow the prompt in running text).

    Raises:
        ValueError: if the tokenizer merges the prompt's end with the value (no clean split).
    """
    head = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt + " " + value, add_special_tokens=False)
    if full[: len(head)] != head or len(full) == len(head):
        raise ValueError(f"cannot split {prompt!r} + {value!r} into prompt and value tokens")
    return head, full[len(head) :]


def stored_prompt(tokenizer: Any, fact: Fact) -> tuple[list[int], list[int]]:
    """The completion test: the stored phrasing up to the value, plain text."""
    prompt = STORED[fact.relation].split("{value}")[0].format(name=fact.name).rstrip()
    return split_answer(tokenizer, prompt, fact.value)


def question_prompt(tokenizer: Any, fact: Fact, which: int) -> tuple[list[int], list[int]]:
    """Question ``which`` (0 or 1) of :data:`QUESTIONS` through the chat template, the
    assistant's reply opened with the answer's first words."""
    question, opening = QUESTIONS[fact.relation][which]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.format(name=fact.name)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return split_answer(tokenizer, chat + opening.format(name=fact.name), fact.value)


@torch.no_grad()
def greedy_hits(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 32,
    pad_id: int = 0,
) -> list[bool]:
    """Whether greedy decoding after each prompt produces its answer tokens first.

    Teacher forcing: ``prompt + answer`` is read once and the answer counts when the argmax at
    every answer position is the answer's token. Equal to greedy generation because each greedy
    step, given a correct prefix, sees exactly the teacher-forced context.

    Args:
        logits_of: ``(ids (B, L), attention_mask (B, L)) -> logits (B, L, V)`` on right-padded
            batches (a model or a stack with its memory off).
        pairs: ``(prompt ids, answer ids)``, both non-empty.
    """
    hits: list[bool] = []
    for a in range(0, len(pairs), batch_size):
        chunk = pairs[a : a + batch_size]
        seqs = [torch.tensor(p + q) for p, q in chunk]
        length = max(len(s) for s in seqs)
        ids = torch.stack([F.pad(s, (0, length - len(s)), value=pad_id) for s in seqs])
        mask = torch.stack([torch.arange(length) < len(s) for s in seqs])
        pred = logits_of(ids, mask).argmax(-1).cpu()
        for row, (p, q) in enumerate(chunk):
            at = pred[row, len(p) - 1 : len(p) + len(q) - 1]
            hits.append(at.tolist() == q)
    return hits
