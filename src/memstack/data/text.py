"""Real text for language-model training: load documents, tokenize them, pack them into sequences.

The pipeline is three calls, each returning a ``datasets`` dataset, in memory or streamed::

    ds = load_text_dataset("../shared/data/kjv.txt", doc_separator=KJV_BOOK_SEPARATOR)
    ds = tokenize_dataset(ds, load_tokenizer("bytes"))
    ds = pack(ds, seq_len=4096)          # rows of exactly 4096 token ids

With ``streaming=True`` every step is lazy (an ``IterableDataset``), for corpora that do not fit in
memory, and gives the same sequences in the same order as the in-memory path.

Documents are never cut short or dropped: packing concatenates them (with the tokenizer's EOS
between them, when it has one) and cuts the stream into sequences, so a long document runs on into
the next sequence. That is what a long-context memory needs to learn from: the continuation of a
document whose beginning is only in memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from memstack.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets

    AnyDataset = datasets.Dataset | datasets.IterableDataset

TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
"""Local file suffixes understood by :func:`load_text_dataset`, and the loader each one uses."""

KJV_BOOK_SEPARATOR = r"(?m)^(?=(?:[1-3] )?[A-Z][A-Za-z]*(?: [A-Za-z]+)* 1\r?$)"
"""``doc_separator`` that splits the King James Bible as printed by the ``bible`` program (see
``../shared/data/README.md``) into books: a zero-width match before each chapter heading whose
chapter number is 1 (``Genesis 1``, ``1 Samuel 1``, ``Song of Solomon 1``), so each book keeps its
headings. Verse lines are indented, so they never match."""


def _datasets() -> ModuleType:
    """The ``datasets`` library, imported on first use: it is the optional ``text`` extra."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError('loading text datasets needs datasets: pip install "memstack[text]"') from e
    return datasets


def _text_features() -> datasets.Features:
    datasets = _datasets()
    return datasets.Features({"text": datasets.Value("string")})


def _ids_features() -> datasets.Features:
    datasets = _datasets()
    return datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"))})


def _split_documents(text: str, separator: re.Pattern[str] | None) -> list[str]:
    # Blank lines around a separator are not content; whitespace-only pieces (such as the text
    # before the first separator) are not documents.
    parts = [text] if separator is None else separator.split(text)
    docs = [p.strip("\r\n") for p in parts]
    return [d for d in docs if d.strip()]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text ({e})") from e


def _txt_documents(files: list[str], doc_separator: str | None) -> Iterator[dict[str, str]]:
    """Documents of text files, one file at a time (the generator behind streaming mode)."""
    separator = re.compile(doc_separator) if doc_separator is not None else None
    for path in files:
        for doc in _split_documents(_read_text(path), separator):
            yield {"text": doc}


def _local_files(path: Path) -> tuple[str, list[str]]:
    """(loader kind, sorted files) of a local file or directory of one kind of file."""
    accepted = f"accepted: {', '.join(sorted(TEXT_SUFFIXES))} files or a directory of them"
    if path.is_file():
        kind = TEXT_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise ValueError(f"unknown file type {path.suffix!r} for {str(path)!r}; {accepted}")
        return kind, [str(path)]
    by_kind: dict[str, list[str]] = {}
    skipped = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # no caches, no .git
        for name in sorted(names):
            if name.startswith("."):
                continue
            kind = TEXT_SUFFIXES.get(Path(name).suffix.lower())
            if kind is None:
                skipped.append(name)
            else:
                by_kind.setdefault(kind, []).append(os.path.join(root, name))
    if not by_kind:
        seen = f" (found only {skipped[:5]})" if skipped else " (it is empty)"
        raise ValueError(f"directory {str(path)!r} holds no text files{seen}; {accepted}")
    if len(by_kind) > 1:
        raise ValueError(
            f"directory {str(path)!r} mixes file kinds {sorted(by_kind)}; put each kind in its own "
            "directory and load them separately"
        )
    ((kind, files),) = by_kind.items()
    return kind, files


def _looks_like_path(source: str) -> bool:
    # A Hub dataset is named "name" or "owner/name"; anything else that does not exist locally is
    # a mistyped path, and sending it to the Hub would only hide that behind a network error.
    return (
        source.startswith(("/", ".", "~"))
        or Path(source).suffix.lower() in TEXT_SUFFIXES
        or source.count("/") > 1
        or (os.sep != "/" and os.sep in source)
    )


def _has_text(batch: dict[str, list[Any]]) -> list[bool]:
    return [t is not None and bool(t.strip()) for t in batch["text"]]


def _select_text(ds: AnyDataset, text_field: str, where: str) -> AnyDataset:
    """Keep only ``text_field``, renamed to "text", and only rows where it is not blank."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"{where} has no column {text_field!r}; its columns are {columns}; pass text_field")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    # Blank rows (wikitext has one between paragraphs) are no documents: with an EOS tokenizer
    # each would add a lone EOS to the packed stream.
    return ds.filter(_has_text, batched=True)


def load_text_dataset(
    source: str | os.PathLike,
    split: str = "train",
    streaming: bool = False,
    text_field: str = "text",
    doc_separator: str | None = None,
    *,
    config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnyDataset:
    """Documents from local files or the Hugging Face Hub, as a dataset with one "text" column.

    Local sources:

    - ``.txt``: each file is one document, or, with ``doc_separator``, split into documents
      wherever the regular expression matches (a zero-width pattern such as
      :data:`KJV_BOOK_SEPARATOR` keeps the text it matches before; a consuming one drops it).
      Leading and trailing newlines are stripped and whitespace-only documents skipped.
    - ``.jsonl`` / ``.json`` (JSON lines or an array of objects) and ``.parquet``: one document
      per row, read from column ``text_field``; rows whose text is empty, whitespace or null are
      skipped.
    - a directory: every file of one of those kinds under it, recursively, in sorted path order
      (hidden files and files of other types are skipped; mixing kinds is an error).

    Anything else is taken as a Hub dataset name (``"name"`` or ``"owner/name"``) and passed to
    ``datasets.load_dataset``; that needs network access and permission for the dataset. Blank
    rows are skipped there too.

    Args:
        source: a file, a directory, or a Hub dataset name.
        split: the split of a Hub dataset (slicing such as ``"train[:1%]"`` works). Local files
            form a single split, so it must be ``"train"`` for them.
        streaming: return a lazy ``IterableDataset`` that reads files as it is iterated, for
            corpora that do not fit in memory.
        text_field: the column holding the text in JSON, Parquet and Hub data.
        doc_separator: for ``.txt`` files only, a regular expression where documents split
            (None: each file is one document).
        config: the configuration name of a Hub dataset (such as ``"wikitext-103-raw-v1"``).
        cache_dir: where ``datasets`` caches converted JSON/Parquet/Hub data (None: its default,
            ``~/.cache/huggingface/datasets``).

    Returns:
        A ``datasets.Dataset`` (``IterableDataset`` when streaming) with exactly one column,
        "text".

    Raises:
        FileNotFoundError: if ``source`` looks like a path but does not exist, or is neither a
            local path nor a loadable Hub dataset.
        ValueError: for an unknown file type, a directory without text files or with mixed
            kinds, a missing ``text_field``, a bad ``doc_separator``, or ``split`` other than
            "train" for local files.
    """
    datasets = _datasets()
    source_str = str(source)
    path = Path(source_str).expanduser()
    cache = str(cache_dir) if cache_dir is not None else None
    if doc_separator is not None:
        try:
            re.compile(doc_separator)
        except re.error as e:
            raise ValueError(f"doc_separator {doc_separator!r} is not a valid regular expression: {e}") from e

    if not path.exists():
        if isinstance(source, os.PathLike) or _looks_like_path(source_str):
            raise FileNotFoundError(
                f"no such file or directory: {source_str!r}; accepted: {', '.join(sorted(TEXT_SUFFIXES))} "
                "files, a directory of them, or a Hugging Face Hub dataset name"
            )
        if doc_separator is not None:
            raise ValueError("doc_separator applies to local .txt files only")
        try:
            ds = datasets.load_dataset(source_str, config, split=split, streaming=streaming, cache_dir=cache)
        except Exception as e:  # offline, gated, misspelled: all end here, say what was tried
            raise FileNotFoundError(
                f"{source_str!r} is not a local file or directory, and loading it as a Hugging Face Hub "
                f"dataset failed: {type(e).__name__}: {e}"
            ) from e
        return _select_text(ds, text_field, f"Hub dataset {source_str!r}")

    if split != "train":
        raise ValueError(f"local files form a single split, 'train'; got split={split!r}")
    kind, files = _local_files(path)
    if kind == "text":
        if streaming:
            # The file list goes in gen_kwargs, so datasets can shard it across DataLoader workers.
            return datasets.IterableDataset.from_generator(
                _txt_documents,
                features=_text_features(),
                gen_kwargs={"files": files, "doc_separator": doc_separator},
            )
        docs = [row["text"] for row in _txt_documents(files, doc_separator)]
        return datasets.Dataset.from_dict({"text": docs}, features=_text_features())
    if doc_separator is not None:
        raise ValueError(f"doc_separator applies to .txt files only; {source_str!r} holds {kind} files")
    ds = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming, cache_dir=cache)
    return _select_text(ds, text_field, source_str)


class _Tokenize:
    """Batched map function: text -> input_ids, EOS appended to each document if there is one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts = batch["text"]
        encode_all = getattr(self.tokenizer, "batch_encode", None)
        ids = encode_all(texts) if encode_all is not None else [self.tokenizer.encode(t) for t in texts]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            ids = [list(x) + [eos] for x in ids]
        return {"input_ids": [list(x) for x in ids]}


def _only(ds: AnyDataset, column: str, what: str) -> AnyDataset:
    if ds.column_names is not None and column not in ds.column_names:
        raise ValueError(f"{what} needs a {column!r} column; the dataset has {ds.column_names}")
    return ds.select_columns([column])


def tokenize_dataset(
    ds: AnyDataset, tokenizer: Tokenizer, num_proc: int | None = None, batch_size: int = 1000
) -> AnyDataset:
    """Tokenize every document: one "input_ids" row per "text" row.

    No special tokens are added except the tokenizer's EOS after each document (when
    ``tokenizer.eos_token_id`` is not None; the byte tokenizer has none, so its documents are
    simply concatenated when packed).

    Args:
        ds: a dataset with a "text" column, as :func:`load_text_dataset` returns.
        tokenizer: a :class:`~memstack.data.tokenizer.Tokenizer`.
        num_proc: worker processes for an in-memory ``Dataset`` (None: this process). Ignored for
            an ``IterableDataset``, which tokenizes lazily while it is iterated.
        batch_size: documents per call of the tokenizer.

    Returns:
        A dataset of the same kind with exactly one column, "input_ids" (int64 lists).

    Raises:
        ValueError: if ``ds`` has no "text" column.
    """
    ds = _only(ds, "text", "tokenize_dataset")
    kwargs: dict[str, Any] = dict(
        batched=True, batch_size=batch_size, remove_columns=["text"], features=_ids_features()
    )
    if isinstance(ds, _datasets().Dataset):
        kwargs.update(num_proc=num_proc, desc="tokenize")
    return ds.map(_Tokenize(tokenizer), **kwargs)


class _Packer:
    """Batched map function cutting the concatenated token stream into ``seq_len`` pieces.

    Tokens that do not fill a sequence at the end of a batch are carried into the next batch, so
    no token is lost or repeated at batch boundaries. The carry is reset when a batch starts at
    example index 0, i.e. each time the dataset is iterated from the start (an
    ``IterableDataset`` calls the same function object on every pass). This requires the map to
    run in order in one process, which :func:`pack` ensures.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.carry: list[int] = []

    def __call__(
        self, batch: dict[str, list[list[int]]], indices: Sequence[int]
    ) -> dict[str, list[list[int]]]:
        if len(indices) and indices[0] == 0:
            self.carry = []
        stream = self.carry
        for ids in batch["input_ids"]:
            stream.extend(ids)
        n = len(stream) // self.seq_len
        out = [stream[i * self.seq_len : (i + 1) * self.seq_len] for i in range(n)]
        self.carry = stream[n * self.seq_len :]
        return {"input_ids": out}


def pack(ds_tokenized: AnyDataset, seq_len: int, batch_size: int = 1000) -> AnyDataset:
    """Concatenate tokenized documents in order and cut them into sequences of ``seq_len`` tokens.

    Documents are kept whole and in order; one that does not fit in the current sequence runs on
    into the next (and the next, if it is long). Every token appears exactly once, in order,
    except the final partial sequence (fewer than ``seq_len`` tokens at the very end of the
    corpus), which is dropped: a map over a stream cannot tell which batch is the last, and
    dropping it means no row needs padding or an attention mask. The same call works on a
    ``Dataset`` and on a streaming ``IterableDataset``, with the same rows.

    Args:
        ds_tokenized: a dataset with an "input_ids" column, as :func:`tokenize_dataset` returns
            (other columns are dropped).
        seq_len: tokens per output row.
        batch_size: documents read per call of the packing function (memory only; the output
            does not depend on it).

    Returns:
        A dataset of the same kind with one column, "input_ids", every row ``seq_len`` tokens.

    Raises:
        ValueError: if ``seq_len < 1`` or there is no "input_ids" column.

    Note:
        The packing runs in order in one process (``num_proc`` is not offered). Resuming an
        ``IterableDataset`` from a ``state_dict`` in the middle of the stream loses the tokens
        carried between batches at that point, so sequences after it are shifted.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    ds = _only(ds_tokenized, "input_ids", "pack")
    kwargs: dict[str, Any] = dict(
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        remove_columns=["input_ids"],
        features=_ids_features(),
    )
    if isinstance(ds, _datasets().Dataset):
        kwargs.update(desc="pack")
    return ds.map(_Packer(seq_len), **kwargs)


def kjv_documents(path: str | os.PathLike) -> list[str]:
    """The books of a King James Bible text file, one document per book.

    The file is the format of ``../shared/data/kjv.txt``: chapters headed by lines like
    ``Genesis 1`` or ``1 Samuel 3``, verses indented and numbered. A book starts at a heading with
    chapter number 1 (see :data:`KJV_BOOK_SEPARATOR`); each document keeps its headings.

    Args:
        path: the text file.

    Returns:
        The books in file order (66 for the whole Bible).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file has no chapter heading with chapter number 1.
    """
    text = _read_text(str(path))
    separator = re.compile(KJV_BOOK_SEPARATOR)
    if separator.search(text) is None:
        raise ValueError(f"{str(path)!r} has no book heading such as 'Genesis 1' on a line of its own")
    return _split_documents(text, separator)
