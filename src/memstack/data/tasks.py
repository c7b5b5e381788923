"""Synthetic long-context retrieval tasks, built in token space so they fit any tokenizer exactly.

The pass-key task follows the format of Landmark Attention (Mohtashami & Jaggi, 2023,
https://arxiv.org/abs/2305.16300) that Infini-attention (Munkhdalai et al., 2024) evaluates on:
an instruction, repeated filler sentences, one needle sentence holding a random number at a
chosen depth, and a question the model answers by continuing the prompt::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    them. I will quiz you about the important information there. The grass is green. The sky
    is blue. ... The pass key is 68041. Remember it. 68041 is the pass key. The grass is green.
    ... What is the pass key? The pass key is

Each piece (instruction, filler, needle, question, answer) is tokenized on its own, with the
leading space it has in the running text, and the token lists are concatenated; the filler is
then cut at token level, so a prompt is exactly the requested number of tokens for any
tokenizer. (Re-tokenizing ``decode(prompt_ids)`` can give a different split at the seams; the
model sees ``prompt_ids``.)

Two fillers, ``"synthetic"`` (the repeated sentences above, the papers' format) and ``"text"``
(a passage of real English, with a ``"train"`` and a ``"test"`` split): see
:mod:`memstack.data.filler`, which holds them and is re-exported here.

Every function draws from its own ``random.Random(seed)``: the same arguments give the same
sample, and the global RNG is never touched.
"""

from __future__ import annotations

import itertools
import random
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memstack.data.filler import (  # noqa: F401  (the public filler names re-exported: the task API in one place)
    FILLER,
    FILLERS,
    SPLITS,
    TRAIN_FRACTION,
    _check_filler,
    _filler_stretches,
    _piece,
    clean_filler_text,
    default_filler_path,
    filler_text,
)
from memstack.data.tokenizer import Tokenizer

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
KV_NEEDLE = "The value of key {key} is {value}."
KV_QUESTION = "What is the value of key {key}? The value of key {key} is"
KEY_LETTERS = 4
VALUE_DIGITS = 5
IGNORE_INDEX = -100  # the label that torch's cross-entropy (and memstack's loss) skips


@dataclass
class PasskeySample:
    """One pass-key prompt and the continuation a model should produce."""

    prompt_ids: list[int]
    """Exactly ``length`` token ids: instruction, filler, needle, filler, question."""

    answer_ids: list[int]
    """Token ids of ``" " + passkey``, the continuation of the prompt (leading space included)."""

    passkey: str
    """The number hidden in the needle, as digits."""

    needle_start: int
    """Index in ``prompt_ids`` of the needle's first token (that token carries the space before
    "The pass key"; for the byte tokenizer it is the space itself)."""

    depth: float
    """Requested relative position of the needle in the filler: 0 right after the instruction,
    1 right before the question."""


@dataclass
class PasskeyBatch:
    """Pass-key samples as training tensors: prompt followed by answer, one row per sample.

    Answers can differ in token count with a subword tokenizer; shorter rows are right-padded,
    and padded positions have label -100, ``attention_mask`` 0 and ``answer_mask`` False.
    """

    input_ids: torch.Tensor
    """(n, length + longest answer) int64: prompt, answer, then padding if any."""

    labels: torch.Tensor
    """Same shape; equal to ``input_ids`` (the model shifts them) with -100 on padding, and also
    outside the answer when built with ``answer_only=True``."""

    attention_mask: torch.Tensor
    """Same shape, int64: 1 on prompt and answer tokens, 0 on padding."""

    answer_mask: torch.Tensor
    """Same shape, bool: True on the answer tokens (in ``input_ids`` coordinates), so a trainer can
    weight the answer's loss."""

    passkeys: list[str] = field(default_factory=list)
    """The pass key of each row."""

    depths: list[float] = field(default_factory=list)
    """The needle depth of each row."""

    fillers: list[str] = field(default_factory=list)
    """The filler of each row (``"synthetic"`` or ``"text"``)."""

    def to(self, device: torch.device | str) -> PasskeyBatch:
        """The same batch with every tensor on ``device``."""
        return PasskeyBatch(
            self.input_ids.to(device),
            self.labels.to(device),
            self.attention_mask.to(device),
            self.answer_mask.to(device),
            list(self.passkeys),
            list(self.depths),
            list(self.fillers),
        )


@dataclass
class MultiNeedleSample:
    """Several key-value facts in filler, one of them asked for."""

    prompt_ids: list[int]
    """Exactly ``length`` token ids: instruction, filler and needles alternating, question."""

    answer_ids: list[int]
    """Token ids of ``" " + answer``, the continuation of the prompt (leading space included)."""

    answer: str
    """The value of the asked key, as digits."""

    asked_key: str
    """The key the question asks for; one of ``keys``."""

    needle_starts: list[int]
    """Index in ``prompt_ids`` of each needle's first token (its leading space), in prompt order."""

    keys: list[str] = field(default_factory=list)
    """Every key, in prompt order (all distinct)."""

    values: list[str] = field(default_factory=list)
    """The value of each key, in the same order."""


def _head(tokenizer: Tokenizer, instruction: bool) -> list[int]:
    # The instruction opens the text, so it is encoded without a leading space. Without it the
    # prompt opens with the filler's leading space, as if it continued earlier text.
    return list(tokenizer.encode(INSTRUCTION)) if instruction else []


def _pieces(instruction: bool, needles: str) -> str:
    return f"instruction, {needles}" if instruction else needles


def _check_length(length: int, fixed: int, what: str) -> int:
    """Filler tokens left once the fixed pieces are placed; raises if there is no room for them."""
    if not isinstance(length, int) or isinstance(length, bool):
        raise ValueError(f"length must be an int, got {length!r}")
    if length < fixed:
        raise ValueError(
            f"length {length} is too short: the {what} and question alone take {fixed} "
            f"tokens with this tokenizer; use length >= {fixed}"
        )
    return length - fixed


def _random_number(rng: random.Random, digits: int) -> str:
    # No leading zero: the number has exactly ``digits`` digits however it is read.
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def passkey_min_length(tokenizer: Tokenizer, digits: int = 5, *, instruction: bool = True) -> int:
    """Shortest prompt :func:`passkey_sample` can build: head, needle and question with no filler.

    Measured with a key of ``digits`` nines; a subword tokenizer may split other keys into more
    tokens, so leave a few tokens of margin there.
    """
    needle = _piece(tokenizer, PASSKEY_NEEDLE.format(key="9" * digits))
    return len(_head(tokenizer, instruction)) + len(needle) + len(_piece(tokenizer, PASSKEY_QUESTION))


def passkey_sample(
    tokenizer: Tokenizer,
    length: int,
    depth: float,
    seed: int,
    digits: int = 5,
    *,
    instruction: bool = True,
    filler: str = "synthetic",
    filler_path: str | Path | None = None,
    split: str = "train",
) -> PasskeySample:
    """One pass-key retrieval prompt of exactly ``length`` tokens.

    The needle goes after ``round(depth * F)`` of the ``F`` filler tokens, so ``needle_start`` is
    ``len(instruction tokens) + round(depth * F)``, with either filler. Synthetic: the filler
    after the needle starts again from the first sentence. Text: one passage runs through the
    needle, which sits between two words; only the filler's last word, before the question,
    may be cut (and, where no run of whole words fits, its first).

    Args:
        tokenizer: anything with ``encode`` and ``decode`` (see :class:`~memstack.data.tokenizer.Tokenizer`).
        length: number of prompt tokens.
        depth: relative position of the needle in the filler, in [0, 1].
        seed: seed of the pass key.
        digits: number of digits of the pass key (first digit never 0).
        instruction: start with the papers' instruction sentence (about 30 words). False leaves
            more of a short prompt to the filler, for small models trained on short contexts.
        filler: ``"synthetic"`` (repeated sentences) or ``"text"`` (a passage of ``filler_path``).
        filler_path: text file of the text filler; None for the King James Bible (default_filler_path).
        split: ``"train"`` or ``"test"`` part of the text (see :func:`filler_text`); evaluate on
            ``"test"``. Both ignored by the synthetic filler.

    Returns:
        The sample; ``answer_ids`` is what the model should generate after ``prompt_ids``.

    Raises:
        ValueError: if ``depth`` is outside [0, 1], ``digits < 1``, ``length`` cannot hold the
            instruction, needle and question, or ``filler``/``split`` is unknown.
        FileNotFoundError: if ``filler_path`` is not a readable file.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be an int >= 1, got {digits!r}")
    _check_filler(filler, split)
    rng = random.Random(seed)
    passkey = _random_number(rng, digits)  # drawn first: the synthetic prompts of a seed never change

    head = _head(tokenizer, instruction)
    needle = _piece(tokenizer, PASSKEY_NEEDLE.format(key=passkey))
    question = _piece(tokenizer, PASSKEY_QUESTION)
    n_filler = _check_length(length, len(head) + len(needle) + len(question), _pieces(instruction, "needle"))
    before = round(depth * n_filler)
    first, second = _filler_stretches(tokenizer, [before, n_filler - before], filler, rng, split, filler_path)
    prompt = head + first + needle + second + question
    assert len(prompt) == length  # by construction; a failure here is a bug, not bad input
    return PasskeySample(
        prompt_ids=prompt,
        answer_ids=_piece(tokenizer, passkey),
        passkey=passkey,
        needle_start=len(head) + before,
        depth=float(depth),
    )


def passkey_batch(
    tokenizer: Tokenizer,
    n: int,
    length: int,
    seed: int,
    depth: float | None = None,
    digits: int = 5,
    answer_only: bool = False,
    *,
    instruction: bool = True,
    filler: str = "synthetic",
    filler_path: str | Path | None = None,
    split: str = "train",
) -> PasskeyBatch:
    """``n`` pass-key samples as training tensors (prompt followed by its answer).

    Args:
        tokenizer: anything with ``encode``, ``decode`` and ``pad_token_id``.
        n: number of samples (rows).
        length: prompt tokens per sample (every row's prompt has exactly this length).
        seed: seed of the whole batch; each sample gets its own seed and depth drawn from it.
        depth: needle depth for every sample, or None for a uniform random depth per sample.
        digits: number of digits of the pass keys.
        answer_only: put the loss on the answer only (labels -100 everywhere else), instead of on
            every token.
        instruction: start each prompt with the instruction sentence (see :func:`passkey_sample`).
        filler: ``"synthetic"``, ``"text"``, or ``"mix"``: each row draws one of the two from the
            seed (independently, so a batch mostly holds both and a model cannot learn either).
        filler_path: text file of the text filler (None: the King James Bible, see default_filler_path).
        split: part of the text the text filler reads (``"train"`` for training).

    Returns:
        A :class:`PasskeyBatch` of ``n`` rows.

    Raises:
        ValueError: for ``n < 1`` or any argument :func:`passkey_sample` rejects.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    _check_filler(filler, split, (*FILLERS, "mix"))
    rng = random.Random(seed)
    samples, fillers = [], []
    for _ in range(n):
        sample_seed = rng.getrandbits(63)
        sample_depth = rng.random() if depth is None else depth
        # "mix" draws from a stream of its own, so every filler gives a seed the same keys and depths
        row_filler = (
            FILLERS[random.Random(f"filler {sample_seed}").randrange(2)] if filler == "mix" else filler
        )
        sample = passkey_sample(
            tokenizer,
            length,
            sample_depth,
            sample_seed,
            digits,
            instruction=instruction,
            filler=row_filler,
            filler_path=filler_path,
            split=split,
        )
        samples.append(sample)
        fillers.append(row_filler)

    width = length + max(len(s.answer_ids) for s in samples)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    answer_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, s in enumerate(samples):
        end = length + len(s.answer_ids)
        input_ids[i, :end] = torch.tensor(s.prompt_ids + s.answer_ids, dtype=torch.long)
        attention_mask[i, :end] = 1
        answer_mask[i, length:end] = True
    keep = answer_mask if answer_only else attention_mask.bool()
    labels = input_ids.masked_fill(~keep, IGNORE_INDEX)
    return PasskeyBatch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        answer_mask=answer_mask,
        passkeys=[s.passkey for s in samples],
        depths=[s.depth for s in samples],
        fillers=fillers,
    )


def _random_keys(rng: random.Random, n: int) -> list[str]:
    # Upper-case keys cannot be confused with the lower-case words of the filler.
    keys: list[str] = []
    while len(keys) < n:
        key = "".join(rng.choice(string.ascii_uppercase) for _ in range(KEY_LETTERS))
        if key not in keys:
            keys.append(key)
    return keys


def _even_cuts(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` nearly equal pieces of ``total`` (they sum to ``total``)."""
    bounds = [round(total * i / parts) for i in range(parts + 1)]
    return [b - a for a, b in itertools.pairwise(bounds)]


def multi_needle_sample(
    tokenizer: Tokenizer,
    length: int,
    n_needles: int,
    seed: int,
    *,
    instruction: bool = True,
    filler: str = "synthetic",
    filler_path: str | Path | None = None,
    split: str = "train",
) -> MultiNeedleSample:
    """A prompt of exactly ``length`` tokens with ``n_needles`` key-value facts, one asked for.

    Each needle reads "The value of key KKKK is VVVVV." with a random upper-case 4-letter key (all
    distinct) and a random 5-digit value. The needles split the filler into ``n_needles + 1``
    nearly equal stretches, so they sit at depths 1/(n+1), 2/(n+1), ...; with the synthetic filler
    each stretch starts from the first filler sentence. With the text filler one passage runs
    through all needles, each between two words: the first sits exactly at its place, each later
    one at the word boundary nearest its place. The question asks for one key chosen at random.

    Args:
        tokenizer: anything with ``encode`` and ``decode``.
        length: number of prompt tokens.
        n_needles: number of key-value facts (>= 1).
        seed: seed of the keys, values and asked key.
        instruction: start with the instruction sentence (see :func:`passkey_sample`).
        filler: ``"synthetic"`` or ``"text"`` (see :func:`passkey_sample`).
        filler_path: text file of the text filler (None: the King James Bible, see default_filler_path).
        split: part of the text the text filler reads (``"test"`` for evaluation).

    Returns:
        The sample; ``answer_ids`` is what the model should generate after ``prompt_ids``.

    Raises:
        ValueError: if ``n_needles < 1``, ``length`` cannot hold the instruction, needles and
            question, or ``filler``/``split`` is unknown.
        FileNotFoundError: if ``filler_path`` is not a readable file.
    """
    if not isinstance(n_needles, int) or n_needles < 1:
        raise ValueError(f"n_needles must be an int >= 1, got {n_needles!r}")
    _check_filler(filler, split)
    rng = random.Random(seed)
    keys = _random_keys(rng, n_needles)
    values = [_random_number(rng, VALUE_DIGITS) for _ in keys]
    asked = rng.randrange(n_needles)

    head = _head(tokenizer, instruction)
    needles = [_piece(tokenizer, KV_NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values, strict=True)]
    question = _piece(tokenizer, KV_QUESTION.format(key=keys[asked]))
    fixed = len(head) + sum(len(x) for x in needles) + len(question)
    n_filler = _check_length(length, fixed, _pieces(instruction, f"{n_needles} needles"))

    prompt = list(head)
    starts = []
    stretches = _filler_stretches(
        tokenizer, _even_cuts(n_filler, n_needles + 1), filler, rng, split, filler_path
    )
    for stretch, needle in zip(stretches[:-1], needles, strict=True):
        prompt += stretch
        starts.append(len(prompt))
        prompt += needle
    prompt += stretches[-1] + question
    assert len(prompt) == length  # by construction
    return MultiNeedleSample(
        prompt_ids=prompt,
        answer_ids=_piece(tokenizer, values[asked]),
        answer=values[asked],
        asked_key=keys[asked],
        needle_starts=starts,
        keys=keys,
        values=values,
    )
