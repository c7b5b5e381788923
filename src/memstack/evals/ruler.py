"""RULER's synthetic long-context tasks, generated here, at an exact length in a model's tokens.

RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?", https://arxiv.org/abs/2404.06654) measures how much of its context a model can use with
synthetic tasks whose difficulty and length are set freely. This module writes its own generators
from the paper's task definitions (no RULER code is used) for the eleven of its thirteen tasks that
are not question answering, in the order of :data:`TASK_NAMES`:

Retrieval, needle in a haystack (NIAH): needles read "One of the special magic numbers for {key}
is: {value}." (``uuids`` for UUID values); the question asks for the value(s) of a key.

- ``niah_single_1``: one needle in the noise haystack (the repeated sentences "The grass is
  green. The sky is blue. ..."); key a word pair, value a 7-digit number. Tests plain retrieval.
- ``niah_single_2``: the same in real text (the King James Bible's test split,
  :func:`memstack.data.filler.filler_text`), so the needle no longer stands out from the haystack.
- ``niah_single_3``: real text, the value a UUID: the model must copy a long, unfamiliar string.
- ``niah_multikey_1``: real text, the needle and 3 distractor needles with other keys: retrieval
  must use the key, not just find "the" needle.
- ``niah_multikey_2``: the haystack is nothing but distractor needles, one of which is queried.
- ``niah_multikey_3``: the same with UUIDs as keys and values: hardest retrieval.
- ``niah_multivalue``: 4 needles with one key and 4 values; all 4 are expected (no value missed).
- ``niah_multiquery``: 4 needles with 4 keys; one question asks for all 4 values.

Multi-hop tracing: ``variable_tracking`` (VT): a chain of assignments "VAR ABCDE = 12345.",
"VAR FGHIJ = VAR ABCDE.", ... in the noise haystack; the question asks for every variable that
holds the value 12345. Tests coreference across the context.

Aggregation: ``common_words`` (CWE): a numbered list in which 10 words appear many times and the
rest few times; the question asks for the 10 most common. ``frequent_words`` (FWE): words drawn
from a Zipf distribution (alpha 2.0); the question asks for the 3 most frequent. Both test
whether a model summarises the whole context rather than retrieving one place.

A prompt is: the task's instruction, a newline, the context (haystack with needles, or the list),
a newline, the question and an answer prefix ("The special magic number for {key} mentioned in the
provided text is"), so base and instruct models alike continue with the answer. The templates are
RULER's. :func:`score` is RULER's metric: the share of expected strings found in the output.

Exact length. Each piece is tokenized on its own (instruction, each haystack unit, each needle,
question with answer prefix) and the token lists are concatenated, as everywhere in memstack
(:mod:`memstack.data.tasks`): a piece that follows other text is encoded with its leading space
(" The sky is blue."), so subword tokenizers fold the space into its first word as they do in
running text; the first piece of the context follows the instruction's newline and has none. The
haystack is filled with whole units (noise sentences, words of the text, distractor needles, list
items) and the last one is cut at token level to make the total exact: the instruction, needles,
question and answer prefix are never cut. For byte-level tokenizers (the byte tokenizer, GPT-2,
Llama 3, Qwen, SmolLM2) decoding concatenated ids gives the concatenated pieces, so ``text`` holds
every needle and answer verbatim; that is checked for each sample (``RuntimeError`` otherwise).
Re-tokenizing ``text`` may split differently at the seams; the model is meant to see ``ids``.

Choices where the paper leaves room (or where an exact length needs one):

- Needles go at depths drawn uniformly from the seed, each at the haystack boundary nearest its
  depth among those that end a sentence or clause (every boundary of the noise and needle
  haystacks; in real text those after a word ending in ``.``, ``?``, ``!``, ``;`` or ``:``, the
  KJV's clause marks, or any word boundary if the haystack holds none), and never before the first
  unit (a prompt too short for one whole unit gets its needles first). Keys are adjective-noun
  pairs ("brave-otter") from lists in this module that share no word with the noise, with no noun
  a prefix of another and no adjective a suffix of another, so no key occurs inside another.
  7-digit values (1000000 to 9999999) and UUIDs (``uuid.UUID(int=rng.getrandbits(128))``) are
  distinct within a sample; the multivalue task's answers are in the order they were drawn (not
  their order in the text), the multiquery task's in the order of the keys in its question.
- Real text starts at a word drawn from the seed and wraps around the end of the text.
- VT: 1 chain of 4 hops (5 variables, names of 5 capital letters, values of 5 digits), plus 1
  distractor chain of 4 hops with another value; each chain's assignments at sorted random depths.
- CWE: the counts scale with the list's size ``n`` (the items of distinct words that fit): each
  common word appears ``c = min(30, max(2, n // 20))`` times and each other word ``u = min(3,
  max(1, c // 10))`` times (the last one possibly fewer), so from about 600 items (a 4K-token
  context for a BPE tokenizer) it is the paper's 30 and 3 while short prompts keep common words
  strictly more frequent. Words are common English nouns and adjectives from this module's lists
  (not those of the instruction or question), then made-up pronounceable words when a long list
  needs more.
- FWE: a vocabulary of 10,000 made-up words of 4 to 7 random lowercase letters, ranked at random;
  rank ``r`` drawn with probability proportional to ``r ** -2``. A sequence whose 3rd and 4th most
  frequent words tie is drawn again (up to 50 times; then ties go to the word seen first).
- CWE and FWE end their list with dots (" .... ....", cut at token level) to fill the tokens left
  after the last whole item; FWE's question (RULER's) says to ignore them.

Every sample draws from its own ``random.Random``, seeded by the SHA-256 of the task name and seed
(never the salted ``hash``), so the same task, length, seed and tokenizer give the same sample.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import inspect
import itertools
import random
import re
import string
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from memstack.data.filler import FILLER, filler_text

TASK_NAMES = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
)

NOISE = FILLER
"""The noise haystack: these five sentences repeated."""
NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
NIAH_INSTRUCTION = (
    "Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kinds} afterwards."
)
NIAH_QUESTION_ONE = "What is the special magic {kind} for {key} mentioned in the provided text?"
NIAH_ANSWER_ONE = "The special magic {kind} for {key} mentioned in the provided text is"
NIAH_QUESTION_ALL = "What are all the special magic {kinds} for {key} mentioned in the provided text?"
NIAH_ANSWER_ALL = "The special magic {kinds} for {key} mentioned in the provided text are"

VT_NEEDLE = "VAR {name} = {source}."
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{n} variables are assigned the value {value}, they are:"
)
VT_HOPS = 4
VT_CHAINS = 2
"""Chains of assignments in a prompt: the queried one and one distractor."""

CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the 10 most common words in the above list?"
CWE_ANSWER = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10
CWE_MAX_COMMON_COUNT = 30
CWE_MAX_RARE_COUNT = 3
CWE_MIN_ITEMS = 2 * CWE_COMMON
"""Smallest list: each common word twice, no other word."""

FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER = "Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_TOP = 3
FWE_ALPHA = 2.0
FWE_VOCAB = 10_000
FWE_LETTERS = (4, 7)
FWE_MIN_WORDS = 32
FWE_MAX_WORD_TOKENS = FWE_LETTERS[1] + 1
"""Tokens a word may take at most: one per letter plus its space (byte-level worst case)."""
FWE_REDRAWS = 50

DOTS = "...."

MAX_NEW_TOKENS = {
    "niah_single_1": 32,
    "niah_single_2": 32,
    "niah_single_3": 64,
    "niah_multikey_1": 32,
    "niah_multikey_2": 32,
    "niah_multikey_3": 64,
    "niah_multivalue": 128,
    "niah_multiquery": 128,
    "variable_tracking": 64,
    "common_words": 128,
    "frequent_words": 64,
}
"""Tokens to generate per task: room for the answers with separators for a BPE tokenizer, and for
the byte tokenizer too (a UUID is 36 bytes, ten words about 100)."""

# Keys: an adjective and a noun. None is a word of the noise sentences; no noun is a prefix of
# another and no adjective a suffix of another, so "a-b" never occurs inside another key "c-d".
ADJECTIVES = tuple(
    """
absent active adorable alert amber ancient angry anxious arctic awkward bashful bitter
brave breezy bright brisk broad bumpy busy calm careful cheerful chilly clever cloudy clumsy coastal
cosmic crisp crooked cuddly curious curly dainty damp dapper daring dazzling decent deep delicate
dense dizzy drowsy dusty eager early earnest elastic elegant empty endless epic exotic faint fancy
fearless feeble fierce fluffy foggy fragile frank fresh friendly frosty frugal funny fuzzy gentle
giant giddy glad gleaming glossy golden graceful grand grateful greasy grumpy handsome happy hasty
hearty heavy helpful hidden hollow homely honest humble hungry idle jagged jolly jovial juicy
keen kind lanky lazy leafy lively lonely loud lucky lumpy majestic mellow merry mighty misty modern
modest moody muddy narrow nervous nimble noble noisy odd orange polite proud puzzled quaint quick
quiet rapid rare ready rich rigid ripe rocky rosy rough round royal rural rusty salty sandy scary
secret shaggy shiny short shy silent silky silly simple sleepy slim slow smooth snowy soft solid
sour sparkling spicy spotty steady sticky stormy strange strict strong sturdy sunny sweet swift tall
tame tender thick thirsty tidy tiny tough tricky twisted urban vast velvet vivid wacky warm wary
wavy weary wicked wide wild windy wise witty wooden woolly young zany zealous zesty
""".split()
)
NOUNS = tuple(
    """
acorn anchor apple arrow badger balloon banjo barrel basket beacon beaver bicycle blanket blossom
bottle boulder bracelet bridge bucket buffalo butter button cactus camel candle canyon carrot castle
cedar cello chair cherry chimney cloud clover cobra comet compass cookie coral cottage cricket
crystal curtain daisy dolphin donkey dragon drum eagle easel falcon feather ferret fiddle flute
forest fountain garden garlic geyser giraffe glacier goose grape guitar hammock harbor harp hedgehog
helmet heron honey igloo island ivory jacket jaguar jelly kettle kitten ladder lagoon lantern lemon
leopard lily lizard lobster locket magnet mango maple marble meadow melon mirror mitten monkey moose
muffin mustard napkin nectar needle noodle oasis ocean olive onion orchid otter owl oyster paddle
palace panther parrot peanut pebble pelican pencil pepper piano pickle pigeon pillow pirate planet
plum pocket pony potato prism puddle pumpkin puppy quilt rabbit raccoon radish raven ribbon river
robin rocket saddle salmon sandal scarf seal shadow shell sparrow spider spoon squirrel statue stone
storm sugar swan sweater table teacup thimble thunder tiger timber tomato tortoise tractor trumpet
tulip turnip turtle umbrella unicorn valley vase violin volcano wagon walnut walrus whale whistle
willow window wizard wolf yacht zebra
""".split()
)

_ONSETS = "b bl br ch d dr f fl g gl gr h j k l m n p pl pr r s sh sk sl st t th tr v w z".split()
_VOWELS = "a e i o u ai ea oo ou".split()
_CODAS = ["", "", "", "n", "l", "r", "s", "m", "nd", "st", "ck"]
_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*$")


@dataclass(frozen=True)
class Sample:
    """One prompt of a RULER task.

    ``ids`` (exactly ``length`` tokens) is the whole prompt: instruction, context, question and
    answer prefix; ``text`` is ``tokenizer.decode(ids)`` and ends with ``answer_prefix``, the
    opening of the answer the model continues (split there to put the rest through a chat
    template). ``answers`` are the strings :func:`score` looks for in the model's output.
    """

    task: str
    length: int
    ids: list[int]
    text: str
    answers: tuple[str, ...]
    seed: int
    answer_prefix: str


class LengthError(ValueError):
    """A requested length too small for a task's fixed parts; ``minimum`` is the smallest that fits."""

    def __init__(self, task: str, length: int, minimum: int, what: str):
        super().__init__(
            f"{task} needs at least {minimum} tokens with this tokenizer and seed ({what}); got {length}"
        )
        self.minimum = minimum


class _Encoder:
    """``tokenizer.encode`` without special tokens, cached per piece (haystacks repeat pieces)."""

    def __init__(self, tokenizer: Any):
        encode = tokenizer.encode
        try:
            params = inspect.signature(encode).parameters.values()
            takes_flag = any(p.name == "add_special_tokens" or p.kind is p.VAR_KEYWORD for p in params)
        except (TypeError, ValueError):  # builtins without a signature
            takes_flag = False
        # memstack's Tokenizer interface has encode(text) with no special tokens; a transformers
        # tokenizer would add BOS to every piece unless told not to.
        self._encode: Callable[[str], Any] = (
            functools.partial(encode, add_special_tokens=False) if takes_flag else encode
        )
        self._cache: dict[str, list[int]] = {}
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        """Token ids of ``text``; the returned list is shared, so callers never mutate it."""
        ids = self._cache.get(text)
        if ids is None:
            raw = self._encode(text)
            ids = [int(i) for i in (raw.tolist() if hasattr(raw, "tolist") else raw)]
            if not ids:
                raise ValueError(f"tokenizer {self.tokenizer!r} encoded {text!r} to no tokens")
            self._cache[text] = ids
        return ids


@dataclass
class _Context:
    task: str
    enc: _Encoder
    length: int
    seed: int
    rng: random.Random
    haystack: str | None


# Shared pieces --------------------------------------------------------------------------------


def _rng(task: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"memstack.ruler:{task}:{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _numbers(rng: random.Random, n: int, digits: int = 7) -> list[str]:
    return [str(v) for v in rng.sample(range(10 ** (digits - 1), 10**digits), n)]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


_KEY_SPACE = len(ADJECTIVES) * len(NOUNS)


def _word_key(i: int) -> str:
    return f"{ADJECTIVES[i // len(NOUNS)]}-{NOUNS[i % len(NOUNS)]}"


class _Keys:
    """Distinct keys (word pairs or UUIDs) and values (7-digit numbers or UUIDs) of one sample."""

    def __init__(self, ctx: _Context, uuid_keys: bool, uuid_values: bool):
        self.ctx, self.uuid_keys, self.uuid_values = ctx, uuid_keys, uuid_values
        self.keys: set[str] = set()
        self.values: set[str] = set()

    def key(self) -> str:
        rng = self.ctx.rng
        if not self.uuid_keys and len(self.keys) >= _KEY_SPACE:
            raise ValueError(
                f"{self.ctx.task} at {self.ctx.length} tokens needs more than {_KEY_SPACE} distinct keys; "
                "use a shorter length"
            )
        while True:
            k = _uuid(rng) if self.uuid_keys else _word_key(rng.randrange(_KEY_SPACE))
            if k not in self.keys:
                self.keys.add(k)
                return k

    def value(self) -> str:
        rng = self.ctx.rng
        while True:
            v = _uuid(rng) if self.uuid_values else _numbers(rng, 1)[0]
            if v not in self.values:
                self.values.add(v)
                return v


def _noise_units() -> Iterator[str]:
    return itertools.cycle(s.strip() for s in re.findall(r"[^.]+\.", NOISE))


@functools.lru_cache(maxsize=4)
def _words_of(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _text_units(ctx: _Context) -> Iterator[str]:
    words = _words_of(filler_text("test") if ctx.haystack is None else ctx.haystack)
    if not words:
        raise ValueError("haystack holds no words")
    start = ctx.rng.randrange(len(words))
    return (words[(start + i) % len(words)] for i in itertools.count())


def _tail(question: str, answer_prefix: str) -> str:
    return "\n" + question + " " + answer_prefix


def _finish(
    ctx: _Context, ids: list[int], answers: Sequence[str], prefix: str, verbatim: Sequence[str]
) -> Sample:
    if len(ids) != ctx.length:  # by construction; a failure here is a bug, not bad input
        raise AssertionError(f"{ctx.task}: built {len(ids)} tokens for length {ctx.length}")
    text = ctx.enc.tokenizer.decode(ids)
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.decode returned {type(text).__name__}, not str")
    missing = [s for s in (*verbatim, *answers) if s not in text]
    if missing or not text.endswith(prefix):
        raise RuntimeError(
            f"{ctx.task}: decoding the concatenated pieces does not reproduce them (missing {missing[:3]!r}, "
            f"ends {text[-60:]!r}); the tokenizer does not round-trip separately encoded pieces"
        )
    return Sample(ctx.task, ctx.length, ids, text, tuple(answers), ctx.seed, prefix)


def _assemble(
    ctx: _Context,
    instruction: str,
    tail: str,
    needles: Sequence[str],
    depths: Sequence[float],
    units: Iterator[str],
) -> list[int]:
    """Instruction, haystack units with the needles inside, tail: exactly ``ctx.length`` tokens.

    Needle ``i`` goes at the sentence-ending unit boundary nearest ``depths[i]`` of the haystack
    (needles at one boundary in the order of their depths, then of their index); the last unit
    is cut at token level to make the length exact.
    """
    enc, length = ctx.enc, ctx.length
    head, end = enc(instruction + "\n"), enc(tail)
    spaced = [enc(" " + s) for s in needles]
    fixed = len(head) + len(end) + sum(map(len, spaced))
    budget = length - fixed
    order = sorted(range(len(needles)), key=lambda i: (depths[i], i))
    first = next(units)
    first_ids = enc(first)
    if budget >= len(first_ids):
        # Whole units first, then needles between them: the context opens with a haystack unit.
        hay, pos, ends = [first_ids], [0, len(first_ids)], [bool(_SENTENCE_END.search(first))]
        while True:
            unit = next(units)
            ids = enc(" " + unit)
            if pos[-1] + len(ids) > budget:
                cut = ids[: budget - pos[-1]]
                break
            hay.append(ids)
            pos.append(pos[-1] + len(ids))
            ends.append(bool(_SENTENCE_END.search(unit)))
        bounds = [j for j in range(1, len(hay) + 1) if ends[j - 1]] or list(range(1, len(hay) + 1))
        at: dict[int, list[int]] = {}
        for i in order:
            target = depths[i] * budget
            k = bisect.bisect_left(bounds, target, key=lambda j: pos[j])
            near = min(bounds[max(k - 1, 0) : k + 1], key=lambda j: (abs(pos[j] - target), j))
            at.setdefault(near, []).append(i)
        out = list(head)
        for j, unit_ids in enumerate(hay):
            out += unit_ids
            for i in at.get(j + 1, []):
                out += spaced[i]
        return out + cut + end
    # No whole unit fits: the needles open the context (the first without its leading space) and
    # the haystack is the tokens left after them.
    opening = enc(needles[order[0]])
    rest = budget + len(spaced[order[0]]) - len(opening)
    if rest < 0:
        raise LengthError(
            ctx.task, length, length - rest, "its instruction, needles, question and answer prefix"
        )
    out = list(head) + opening
    for i in order[1:]:
        out += spaced[i]
    filler: list[int] = []
    for unit in itertools.chain([first], units):
        if len(filler) >= rest:
            break
        filler += enc(" " + unit)
    return out + filler[:rest] + end


# NIAH -------------------------------------------------------------------------------------------


def _niah(
    ctx: _Context,
    haystack: str,
    *,
    uuid_keys: bool = False,
    uuid_values: bool = False,
    keys: int = 1,
    values: int = 1,
    distractors: int = 0,
) -> Sample:
    rng = ctx.rng
    kind = "uuid" if uuid_values else "number"
    kinds = kind + "s"
    draw = _Keys(ctx, uuid_keys, uuid_values)
    queried = [draw.key() for _ in range(keys)]
    pairs = [(k, draw.value()) for k in queried for _ in range(values)]
    others = [(draw.key(), draw.value()) for _ in range(distractors)]
    needles = [NEEDLE.format(kinds=kinds, key=k, value=v) for k, v in pairs + others]
    depths = [rng.random() for _ in needles]
    if haystack == "noise":
        units = _noise_units()
    elif haystack == "text":
        units = _text_units(ctx)
    else:  # the haystack is distractor needles drawn as long as they fit

        def _distractors() -> Iterator[str]:
            while True:
                yield NEEDLE.format(kinds=kinds, key=draw.key(), value=draw.value())

        units = _distractors()
    key = queried[0] if keys == 1 else ", ".join(queried[:-1]) + ", and " + queried[-1]
    if keys == 1 and values == 1:
        question = NIAH_QUESTION_ONE.format(kind=kind, key=key)
        prefix = NIAH_ANSWER_ONE.format(kind=kind, key=key)
    else:
        question = NIAH_QUESTION_ALL.format(kinds=kinds, key=key)
        prefix = NIAH_ANSWER_ALL.format(kinds=kinds, key=key)
    instruction = NIAH_INSTRUCTION.format(kinds=kinds)
    ids = _assemble(ctx, instruction, _tail(question, prefix), needles, depths, units)
    return _finish(ctx, ids, [v for _, v in pairs], prefix, needles)


# Variable tracking --------------------------------------------------------------------------------


def _variable_tracking(ctx: _Context) -> Sample:
    rng = ctx.rng
    n = VT_HOPS + 1
    names: list[str] = []
    while len(names) < VT_CHAINS * n:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    values = _numbers(rng, VT_CHAINS, digits=5)
    needles: list[str] = []
    depths: list[float] = []
    for c in range(VT_CHAINS):
        chain = names[c * n : (c + 1) * n]
        sources = [values[c]] + [f"VAR {name}" for name in chain[:-1]]
        needles += [VT_NEEDLE.format(name=name, source=s) for name, s in zip(chain, sources, strict=True)]
        # sorted depths keep each chain in assignment order through the haystack
        depths += sorted(rng.random() for _ in chain)
    question = VT_QUESTION.format(value=values[0])
    prefix = VT_ANSWER.format(n=n, value=values[0])
    ids = _assemble(ctx, VT_INSTRUCTION, _tail(question, prefix), needles, depths, _noise_units())
    return _finish(ctx, ids, names[:n], prefix, needles)


# Common and frequent words --------------------------------------------------------------------------


def _template_words(*texts: str) -> set[str]:
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


_CWE_WORDS = tuple(
    w for w in ADJECTIVES + NOUNS if w not in _template_words(CWE_INSTRUCTION, CWE_QUESTION, CWE_ANSWER)
)


def _made_up_word(rng: random.Random) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(2, 3))
    )


def _cwe_vocabulary(rng: random.Random) -> Iterator[str]:
    yield from rng.sample(_CWE_WORDS, len(_CWE_WORDS))
    seen = set(_CWE_WORDS)
    while True:
        word = _made_up_word(rng)
        if word not in seen:
            seen.add(word)
            yield word


def _dots(enc: _Encoder, n: int) -> list[int]:
    unit = enc(" " + DOTS)
    return (unit * (n // len(unit) + 1))[:n]


def _common_words(ctx: _Context) -> Sample:
    enc, rng, length = ctx.enc, ctx.rng, ctx.length
    head = enc(CWE_INSTRUCTION + "\n")
    end = enc(_tail(CWE_QUESTION, CWE_ANSWER))

    def number(i: int) -> list[int]:
        return enc(f"{i}." if i == 1 else f" {i}.")

    def word(w: str) -> list[int]:
        return enc(" " + w)

    budget = length - len(head) - len(end)
    longest = max(len(word(w)) for w in _CWE_WORDS)
    minimum = (
        length - budget + sum(len(number(i)) for i in range(1, CWE_MIN_ITEMS + 1)) + CWE_MIN_ITEMS * longest
    )
    if length < minimum:
        raise LengthError(
            ctx.task, length, minimum, f"its instruction and question and {CWE_MIN_ITEMS} list items"
        )
    vocabulary = _cwe_vocabulary(rng)
    drawn: list[str] = []

    def nth(j: int) -> str:
        while len(drawn) <= j:
            drawn.append(next(vocabulary))
        return drawn[j]

    # How many items of distinct words fit sets the counts (the module docstring's scaling).
    size = used = 0
    while used + len(number(size + 1)) + len(word(nth(size))) <= budget:
        used += len(number(size + 1)) + len(word(nth(size)))
        size += 1
    common = drawn[:CWE_COMMON]

    def common_cost(c: int) -> int:
        numbers = sum(len(number(i)) for i in range(1, CWE_COMMON * c + 1))
        return numbers + c * sum(len(word(w)) for w in common)

    count = min(CWE_MAX_COMMON_COUNT, max(2, size // (2 * CWE_COMMON)))
    while common_cost(count) > budget:  # long common words: fewer copies (the minimum fits 2)
        count -= 1
    rare = min(CWE_MAX_RARE_COUNT, max(1, count // 10))
    items = [w for w in common for _ in range(count)]
    used = common_cost(count)
    j, full = CWE_COMMON, True
    while full:
        w = nth(j)
        for _ in range(rare):
            cost = len(number(len(items) + 1)) + len(word(w))
            if used + cost > budget:
                full = False
                break
            items.append(w)
            used += cost
        j += 1
    rng.shuffle(items)
    ids = list(head)
    for i, w in enumerate(items, 1):
        ids += number(i) + word(w)
    ids += _dots(enc, budget - used) + end
    return _finish(ctx, ids, common, CWE_ANSWER, [CWE_QUESTION])


@functools.cache
def _zipf_cumulative() -> tuple[float, ...]:
    return tuple(itertools.accumulate(r**-FWE_ALPHA for r in range(1, FWE_VOCAB + 1)))


def _frequent_words(ctx: _Context) -> Sample:
    enc, rng, length = ctx.enc, ctx.rng, ctx.length
    head = enc(FWE_INSTRUCTION + "\n")
    end = enc(_tail(FWE_QUESTION, FWE_ANSWER))
    budget = length - len(head) - len(end)
    minimum = length - budget + FWE_MIN_WORDS * FWE_MAX_WORD_TOKENS
    if length < minimum:
        raise LengthError(
            ctx.task, length, minimum, f"its instruction and question and {FWE_MIN_WORDS} words of the text"
        )
    avoid = _template_words(FWE_INSTRUCTION, FWE_QUESTION, FWE_ANSWER)
    vocabulary: dict[int, str] = {}  # rank -> word, made up on first use
    taken: set[str] = set()

    def word_of(rank: int) -> str:
        if rank not in vocabulary:
            while True:
                w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*FWE_LETTERS)))
                if w not in taken and w not in avoid:
                    break
            vocabulary[rank] = w
            taken.add(w)
        return vocabulary[rank]

    cumulative, ranks = _zipf_cumulative(), range(FWE_VOCAB)
    for _ in range(FWE_REDRAWS):
        words: list[str] = []
        ids = list(head)
        while True:
            w = word_of(rng.choices(ranks, cum_weights=cumulative)[0])
            piece = enc(w if not words else " " + w)
            if len(ids) + len(piece) > len(head) + budget:
                break
            words.append(w)
            ids += piece
        counts = Counter(words)
        first = {w: i for i, w in reversed(list(enumerate(words)))}
        ranked = sorted(counts, key=lambda w: (-counts[w], first[w]))
        top, after = ranked[FWE_TOP - 1 : FWE_TOP], ranked[FWE_TOP : FWE_TOP + 1]
        if top and (not after or counts[top[0]] > counts[after[0]]):  # a top 3 without ties
            break
    if len(ranked) < FWE_TOP:
        raise RuntimeError(f"{ctx.task}: {FWE_REDRAWS} draws gave fewer than {FWE_TOP} distinct words")
    ids += _dots(enc, length - len(ids) - len(end)) + end
    return _finish(ctx, ids, ranked[:FWE_TOP], FWE_ANSWER, [FWE_QUESTION])


# Public API -----------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[_Context], Sample]] = {
    "niah_single_1": lambda ctx: _niah(ctx, "noise"),
    "niah_single_2": lambda ctx: _niah(ctx, "text"),
    "niah_single_3": lambda ctx: _niah(ctx, "text", uuid_values=True),
    "niah_multikey_1": lambda ctx: _niah(ctx, "text", distractors=3),
    "niah_multikey_2": lambda ctx: _niah(ctx, "needles"),
    "niah_multikey_3": lambda ctx: _niah(ctx, "needles", uuid_keys=True, uuid_values=True),
    "niah_multivalue": lambda ctx: _niah(ctx, "text", values=4),
    "niah_multiquery": lambda ctx: _niah(ctx, "text", keys=4),
    "variable_tracking": _variable_tracking,
    "common_words": _common_words,
    "frequent_words": _frequent_words,
}


def _check_task(task: str) -> None:
    if task not in _BUILDERS:
        raise ValueError(f"unknown RULER task {task!r}; expected one of {', '.join(TASK_NAMES)}")


def make_sample(task: str, tokenizer: Any, length: int, seed: int, haystack: str | None = None) -> Sample:
    """One prompt of ``task`` of exactly ``length`` tokens of ``tokenizer``.

    Args:
        task: one of :data:`TASK_NAMES`.
        tokenizer: anything with ``encode(text)`` (called with ``add_special_tokens=False`` when it
            takes that argument) and ``decode(ids)``: memstack's tokenizers or a transformers one.
        length: tokens of the whole prompt, question and answer prefix included.
        seed: the sample's seed; the same task, length, seed and tokenizer give the same sample.
        haystack: the real text of ``niah_single_2``/``_3``, ``niah_multikey_1``, ``niah_multivalue``
            and ``niah_multiquery`` (its words, wrapping around); None for the King James Bible's
            test split. The other tasks ignore it.

    Raises:
        ValueError: for an unknown task, a length that is not a positive int, or a length too small
            for the task (:class:`LengthError`, whose message and ``minimum`` give the smallest).
        RuntimeError: if the tokenizer's ``decode`` of concatenated pieces loses a needle or answer.
        FileNotFoundError: for the real-text tasks without ``haystack`` when the corpus is missing.
    """
    _check_task(task)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    ctx = _Context(task, _Encoder(tokenizer), length, seed, _rng(task, seed), haystack)
    return _BUILDERS[task](ctx)


def min_length(task: str, tokenizer: Any, seed: int = 0) -> int:
    """The smallest length :func:`make_sample` accepts for ``task``, ``tokenizer`` and ``seed``
    (needles and keys differ in tokens from seed to seed; CWE and FWE bound it for any seed)."""
    try:  # the minimum holds no haystack: a stand-in text spares reading the corpus
        make_sample(task, tokenizer, 1, seed, haystack="x")
    except LengthError as e:
        return e.minimum
    raise AssertionError(f"{task} fit in one token")  # no task does: its instruction alone is longer


TASKS: dict[str, Callable[..., Sample]] = {name: functools.partial(make_sample, name) for name in TASK_NAMES}
"""Each task's generator: ``TASKS[name](tokenizer, length, seed, haystack=None)``."""


def max_new_tokens(task: str) -> int:
    """Tokens to generate for an answer to ``task`` (:data:`MAX_NEW_TOKENS`)."""
    _check_task(task)
    return MAX_NEW_TOKENS[task]


def score(output: str, answers: Sequence[str]) -> float:
    """RULER's metric: the share of ``answers`` found in ``output`` (case-sensitive substrings).

    Raises:
        ValueError: if ``answers`` is empty.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("score needs at least one expected answer")
    return sum(a in output for a in answers) / len(answers)
