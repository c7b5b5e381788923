"""The filler of the synthetic tasks (memstack.data.tasks): the text around the needles.

Two fillers: ``"synthetic"``, the repeated sentences of the papers' format (:data:`FILLER`), and
``"text"``, a passage of real English. A tiny model trained on the synthetic filler can learn the
filler rather than retrieval (it scored 8% at 960 bytes once the filler was real text), so train on
``"text"`` (or a mix) and report both. The text filler reads a text file (default: the King
James Bible, ``corpora/kjv.txt`` in the repository, see :func:`default_filler_path`; cleaned of
chapter headings and verse numbers, see :func:`filler_text`), split by words into ``"train"``
(the first 90%) and ``"test"`` (the last 10%), so an evaluation on ``split="test"`` uses text the
model never trained on. The passage starts at a word chosen by the seed; the needle(s) go between
two words, never inside one; a passage longer than its split wraps around to the split's first
word (the test split is ~420 KB, so a 1M-byte prompt holds it about 2.4 times).

Like every piece of a prompt, the filler is tokenized on its own, with the leading space it has in
the running text (:func:`_piece`), and cut at token level, so a prompt is exactly the requested
number of tokens for any tokenizer.
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from memstack.data.tokenizer import Tokenizer

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("synthetic", "text")
SPLITS = ("train", "test")
TRAIN_FRACTION = 0.9
"""Share of a filler text's words in the ``"train"`` split; the rest is ``"test"``."""


def _piece(tokenizer: Tokenizer, text: str) -> list[int]:
    # Every piece but the instruction follows other text, so it is encoded with the space that
    # precedes it there: subword tokenizers fold that space into the first word's token.
    ids = list(tokenizer.encode(" " + text))
    if not ids:
        raise ValueError(f"tokenizer {tokenizer!r} encoded {text!r} to no tokens")
    return ids


def _filler(tokenizer: Tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the filler sentences repeated (cut at token level)."""
    if n <= 0:
        return []
    unit = _piece(tokenizer, FILLER)
    return (unit * (n // len(unit) + 1))[:n]


# Real-text filler ---------------------------------------------------------------------------

# A line alone after a blank line that ends in a number ("Genesis 1", "Song of Solomon 3") is a
# chapter heading; a number opening a line is a verse number. Both are dropped, so the filler is
# running prose without digits: a pass key's digits then occur only in its needle.
_HEADING = re.compile(r"(?:\A|\n)[ \t]*\n\S[^\n]* \d+[ \t]*(?=\n[ \t]*\n)")
_LINE_NUMBER = re.compile(r"^[ \t]*\d+[ \t]+", re.MULTILINE)
_MIN_WORDS = 10  # so that both splits hold at least one word
_ENCODE_CHUNK = 1024  # words encoded per batch_encode call
_MAX_SLIDE = 1000  # words the passage start may move to fit the first stretch exactly


@dataclass(frozen=True)
class _Corpus:
    """One split of a cleaned filler text: its words joined by single spaces."""

    text: str
    starts: tuple[int, ...]
    """Character offset of each word in ``text``."""

    def __len__(self) -> int:
        return len(self.starts)

    def word(self, i: int) -> str:
        end = self.starts[i + 1] - 1 if i + 1 < len(self.starts) else len(self.text)
        return self.text[self.starts[i] : end]


CORPORA_ENV = "MEMSTACK_CORPORA"
"""Environment variable: a folder holding memstack's corpora (``kjv.txt``). Unset, they are read
from ``corpora/`` in the source checkout memstack runs from; an installed wheel has no corpora."""
DEFAULT_FILLER = "kjv.txt"


@functools.cache
def _checkout(start: Path) -> Path | None:
    """The memstack source checkout holding ``start``: the first folder above it with a
    ``pyproject.toml`` of the project ``memstack``; None if there is none."""
    for folder in start.parents:
        project = folder / "pyproject.toml"
        if project.is_file():
            name = re.search(r'(?m)^name\s*=\s*"([^"]*)"', project.read_text(encoding="utf-8"))
            return folder if name and name.group(1) == "memstack" else None
    return None


def default_filler_path() -> Path:
    """The default filler text: the King James Bible (public domain, 4.3 MB), ``kjv.txt`` in the
    folder ``$MEMSTACK_CORPORA``, or else in ``corpora/`` of the source checkout.

    The corpora live in the repository, not in the installed package (they would be most of the
    wheel), so an installed memstack finds them only through :data:`CORPORA_ENV`.

    Raises:
        FileNotFoundError: if that file does not exist; the message says what to do.
    """
    folder = os.environ.get(CORPORA_ENV)
    if folder:
        where = f"{CORPORA_ENV}={folder!r}"
        path = Path(folder).expanduser() / DEFAULT_FILLER
    else:
        checkout = _checkout(Path(__file__).resolve())
        path = None if checkout is None else checkout / "corpora" / DEFAULT_FILLER
        where = f"{Path(__file__).parents[1]} is in no source checkout" if path is None else str(path.parent)
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the default filler text {DEFAULT_FILLER} is missing ({where}): it is in the memstack "
            f"repository's corpora/ folder, not in the installed package; set {CORPORA_ENV} to a "
            "folder holding kjv.txt, or pass your own UTF-8 text file as filler_path"
        )
    return path


def clean_filler_text(raw: str) -> str:
    """``raw`` as running prose: chapter headings and verse numbers dropped, whitespace collapsed.

    Made for the KJV's layout (a ``Genesis 1`` line between blank lines opens each chapter, and
    each verse line opens with its number); plain prose passes through with only its whitespace
    collapsed to single spaces.
    """
    text = _HEADING.sub("\n", raw)
    text = _LINE_NUMBER.sub("", text)
    return " ".join(text.split())


def _corpus(path: str | None, split: str) -> _Corpus:
    # the default is resolved on every call, so a changed MEMSTACK_CORPORA is seen
    return _read_corpus(default_filler_path() if path is None else Path(path).expanduser(), split)


@functools.lru_cache(maxsize=4)
def _read_corpus(source: Path, split: str) -> _Corpus:
    try:
        raw = source.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError) as e:
        raise FileNotFoundError(f"filler text {str(source)!r} is not a readable file: {e}") from e
    words = clean_filler_text(raw).split(" ")
    if len(words) < _MIN_WORDS:
        raise ValueError(f"filler text {str(source)!r} holds {len(words)} words; it needs >= {_MIN_WORDS}")
    cut = round(TRAIN_FRACTION * len(words))
    words = words[:cut] if split == "train" else words[cut:]
    starts = tuple(itertools.accumulate((len(w) + 1 for w in words[:-1]), initial=0))
    return _Corpus(" ".join(words), starts)


def _check_filler(filler: str, split: str, allowed: Sequence[str] = FILLERS) -> None:
    if filler not in allowed:
        raise ValueError(f"filler must be one of {list(allowed)}, got {filler!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def filler_text(split: str = "train", path: str | Path | None = None) -> str:
    """The text the ``"text"`` filler draws its passages from: one split of a cleaned text file.

    The file is cleaned by :func:`clean_filler_text` and split by words: ``"train"`` is the first
    ``TRAIN_FRACTION`` (90%) of them, ``"test"`` the rest, so the two never share a passage.

    Args:
        split: ``"train"`` or ``"test"``.
        path: a UTF-8 text file; None for the King James Bible (:func:`default_filler_path`).

    Returns:
        The split's words joined by single spaces (cached per file and split).

    Raises:
        ValueError: for an unknown split or a file of fewer than 10 words.
        FileNotFoundError: if ``path`` is not a readable file, or is None and the default text is
            missing (an installed memstack without the repository: see :func:`default_filler_path`).
    """
    _check_filler("text", split)
    return _corpus(None if path is None else str(path), split).text


class _WordTokens:
    """Token ids of a split's words read cyclically from word ``start``, each with its leading space.

    Words are encoded one by one (each as ``" " + word``, like every other piece of a prompt) so a
    stretch of filler can end exactly between two words; they are encoded lazily, in chunks.
    """

    def __init__(self, corpus: _Corpus, tokenizer: Tokenizer, start: int):
        self.corpus, self.tokenizer, self.start = corpus, tokenizer, start
        self._chunks: dict[int, list[list[int]]] = {}

    def __getitem__(self, k: int) -> list[int]:
        chunk, i = divmod((self.start + k) % len(self.corpus), _ENCODE_CHUNK)
        if chunk not in self._chunks:
            lo = chunk * _ENCODE_CHUNK
            pieces = [" " + self.corpus.word(j) for j in range(lo, min(lo + _ENCODE_CHUNK, len(self.corpus)))]
            batch_encode: Callable | None = getattr(self.tokenizer, "batch_encode", None)
            ids = batch_encode(pieces) if batch_encode else [self.tokenizer.encode(x) for x in pieces]
            ids = [list(x) for x in ids]
            if not all(ids):
                bad = next(x for x, t in zip(pieces, ids, strict=True) if not t)
                raise ValueError(f"tokenizer {self.tokenizer!r} encoded filler word {bad!r} to no tokens")
            self._chunks[chunk] = ids
        return self._chunks[chunk][i]

    def join(self, lo: int, hi: int) -> list[int]:
        """Token ids of words ``lo`` to ``hi - 1``."""
        return [t for k in range(lo, hi) for t in self[k]]


def _exact_run(words: _WordTokens, n: int) -> tuple[int, int, bool]:
    """(i, j, exact): words i..j-1 hold exactly ``n`` tokens when ``exact``, else at least ``n``.

    Slides a window of whole words forward from word 0 until its token count is exactly ``n``
    (a few words with the byte tokenizer, whose words are 2-15 tokens). If no window within
    ``_MAX_SLIDE`` words fits, returns the first window holding ``n`` or more tokens.
    """
    i = j = total = 0
    first = None
    while i <= _MAX_SLIDE:
        while total < n:
            total += len(words[j])
            j += 1
        if first is None:
            first = j
        if total == n:
            return i, j, True
        total -= len(words[i])
        i += 1
    return 0, first, False


def _text_stretches(tokenizer: Tokenizer, corpus: _Corpus, start: int, sizes: list[int]) -> list[list[int]]:
    """A passage cut into stretches that sum to ``sum(sizes)`` tokens, for the gaps around needles.

    Every cut between two stretches falls between two words, so a needle placed there is never
    inside a word. The first stretch has exactly ``sizes[0]`` tokens: the passage start slides
    forward from word ``start`` until a run of whole words fits (if none does, that run is cut
    inside its first word instead, at the very start of the filler). Each middle stretch ends at
    the word boundary nearest ``sum(sizes[:k + 1])``, so later needles sit within a word of their
    place. The last stretch takes the tokens left, whole words and then a cut inside a word,
    right before the question (as the synthetic filler is cut).
    """
    words = _WordTokens(corpus, tokenizer, start)
    total, target = sum(sizes), sizes[0]
    i, at, exact = _exact_run(words, sizes[0])
    first = words.join(i, at)
    stretches = [first if exact else first[len(first) - sizes[0] :]]
    pos = sizes[0]
    for size in sizes[1:-1]:
        target += size
        stop = at
        while pos + len(words[stop]) <= total and abs(pos + len(words[stop]) - target) < abs(pos - target):
            pos += len(words[stop])
            stop += 1
        stretches.append(words.join(at, stop))
        at = stop
    last: list[int] = []
    while len(last) < total - pos:
        last += words[at]
        at += 1
    stretches.append(last[: total - pos])
    return stretches


def _filler_stretches(
    tokenizer: Tokenizer, sizes: list[int], filler: str, rng: random.Random, split: str, path: str | None
) -> list[list[int]]:
    """The filler between and around the needles: one token list per size in ``sizes``."""
    if filler == "synthetic":
        # each stretch starts again from the first sentence, as in the papers' prompts
        return [_filler(tokenizer, n) for n in sizes]
    corpus = _corpus(None if path is None else str(path), split)
    return _text_stretches(tokenizer, corpus, rng.randrange(len(corpus)), sizes)
