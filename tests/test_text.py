"""Text corpora: loading local files, tokenizing, packing (checked against brute force), streaming, KJV."""

from __future__ import annotations

import itertools
import json
import random

import datasets
import pytest

from memstack.data.text import (
    KJV_BOOK_SEPARATOR,
    kjv_documents,
    load_text_dataset,
    pack,
    tokenize_dataset,
)
from memstack.data.tokenizer import ByteTokenizer

datasets.disable_progress_bars()

DOCS = [
    "In the beginning was the word.",
    "Memory is the residue of thought. 記憶.",
    "x",
    "A much longer document " * 12,
    "Short one.",
    "Multi-line\ndocument\nwith three lines.",
]


class EosBytes(ByteTokenizer):
    """Bytes plus an end-of-document id 256, to check that EOS goes after every document."""

    vocab_size = 257
    eos_token_id = 256


def rows(ds) -> list:
    return [r["input_ids"] for r in ds]


def brute_force_pack(docs: list[list[int]], seq_len: int) -> list[list[int]]:
    stream = [t for doc in docs for t in doc]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def write_txt_dir(root, docs):
    root.mkdir()
    for i, doc in enumerate(docs):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return root


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({field: doc, "id": i}) + "\n")
    return path


def test_load_txt_file_and_directory(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("\n" + DOCS[5] + "\n\n", encoding="utf-8")
    ds = load_text_dataset(str(one))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["text"]
    assert ds["text"] == [DOCS[5]]  # one file, one document; surrounding newlines stripped

    root = write_txt_dir(tmp_path / "corpus", DOCS)
    (root / "notes.md").write_text("not a text file for the loader")
    (root / ".hidden.txt").write_text("hidden files are skipped")
    sub = root / "sub"
    sub.mkdir()
    (sub / "z.txt").write_text("in a subdirectory")
    (root / "blank.txt").write_text("  \n\n")  # whitespace only: not a document
    ds = load_text_dataset(root)
    assert ds["text"] == DOCS + ["in a subdirectory"]  # sorted paths: doc00..doc05, then sub/z.txt


def test_load_txt_with_doc_separator(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("preamble\n=====\nfirst doc\nline two\n=====\n\n=====\nsecond doc\n", encoding="utf-8")
    ds = load_text_dataset(path, doc_separator=r"\n=====\n")
    assert ds["text"] == ["preamble", "first doc\nline two", "second doc"]
    with pytest.raises(ValueError, match="not a valid regular expression"):
        load_text_dataset(path, doc_separator="(")


def test_load_jsonl_json_and_parquet(tmp_path):
    jsonl = write_jsonl(tmp_path / "data.jsonl", DOCS, field="body")
    ds = load_text_dataset(jsonl, text_field="body", cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text"]
    assert ds["text"] == DOCS
    with pytest.raises(ValueError, match="no column 'text'"):
        load_text_dataset(jsonl, cache_dir=tmp_path / "cache")

    blanks = tmp_path / "blanks.jsonl"
    rows_with_blanks = [{"text": "a"}, {"text": ""}, {"text": " \n "}, {"text": None}, {"text": "b"}]
    blanks.write_text("\n".join(json.dumps(r) for r in rows_with_blanks), encoding="utf-8")
    assert load_text_dataset(blanks, cache_dir=tmp_path / "cache")["text"] == ["a", "b"]
    streamed = load_text_dataset(blanks, streaming=True, cache_dir=tmp_path / "cache")
    assert [r["text"] for r in streamed] == ["a", "b"]

    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": d} for d in DOCS[:3]]), encoding="utf-8")
    assert load_text_dataset(array, cache_dir=tmp_path / "cache")["text"] == DOCS[:3]

    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    half = len(DOCS) // 2
    datasets.Dataset.from_dict({"text": DOCS[:half], "n": list(range(half))}).to_parquet(
        parquet_dir / "a.parquet"
    )
    datasets.Dataset.from_dict({"text": DOCS[half:]}).to_parquet(parquet_dir / "b.parquet")
    ds = load_text_dataset(parquet_dir / "a.parquet", cache_dir=tmp_path / "cache")
    assert ds.column_names == ["text"] and ds["text"] == DOCS[:half]
    ds = load_text_dataset(parquet_dir, cache_dir=tmp_path / "cache")
    assert sorted(ds["text"]) == sorted(DOCS)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_dataset(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_dataset(tmp_path / "missing-dir")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_text_dataset("./data/not-here")

    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unknown file type '.csv'"):
        load_text_dataset(csv)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        load_text_dataset(empty)

    mixed = write_txt_dir(tmp_path / "mixed", DOCS[:2])
    write_jsonl(mixed / "more.jsonl", DOCS[2:])
    with pytest.raises(ValueError, match="mixes file kinds"):
        load_text_dataset(mixed)

    txt = tmp_path / "mixed" / "doc00.txt"
    with pytest.raises(ValueError, match="single split"):
        load_text_dataset(txt, split="validation")
    with pytest.raises(ValueError, match="doc_separator applies to .txt files only"):
        load_text_dataset(mixed / "more.jsonl", doc_separator="x")


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), EosBytes()], ids=["bytes", "bytes+eos"])
def test_tokenize_dataset(tokenizer):
    ds = datasets.Dataset.from_dict({"text": DOCS, "other": list(range(len(DOCS)))})
    tokenized = tokenize_dataset(ds, tokenizer, batch_size=4)
    assert tokenized.column_names == ["input_ids"]
    eos = [] if tokenizer.eos_token_id is None else [256]
    assert tokenized["input_ids"] == [list(d.encode("utf-8")) + eos for d in DOCS]
    with pytest.raises(ValueError, match="needs a 'text' column"):
        tokenize_dataset(datasets.Dataset.from_dict({"body": DOCS}), tokenizer)


def random_docs(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(rng.choice([0, 1, 3, 9, 40, 130]))] for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 1000])
@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_pack_keeps_every_token_once_in_order(seq_len, batch_size):
    docs = random_docs(seq_len, 60)
    expected = brute_force_pack(docs, seq_len)
    ds = datasets.Dataset.from_dict({"input_ids": docs, "extra": ["x"] * len(docs)})
    packed = pack(ds, seq_len, batch_size=batch_size)
    assert packed.column_names == ["input_ids"]
    assert rows(packed) == expected
    assert all(len(r) == seq_len for r in rows(packed))
    total = sum(len(d) for d in docs)
    assert len(packed) == total // seq_len  # only the final partial sequence is dropped


def test_pack_errors():
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="seq_len"):
            pack(ds, bad)
    with pytest.raises(ValueError, match="needs a 'input_ids' column"):
        pack(datasets.Dataset.from_dict({"text": ["a"]}), 4)
    assert len(pack(ds, 4)) == 0  # shorter than one sequence: nothing to train on


def test_streaming_packs_like_in_memory(tmp_path):
    docs = [" ".join(f"w{j}" for j in range(k * 13 % 97)) for k in range(40)]
    root = write_txt_dir(tmp_path / "corpus", docs)
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", docs)
    tokenizer = EosBytes()
    expected = brute_force_pack([list(d.encode()) + [256] for d in docs if d.strip()], 50)

    for source in (root, jsonl):
        in_memory = pack(tokenize_dataset(load_text_dataset(source, cache_dir=tmp_path / "c"), tokenizer), 50)
        stream = load_text_dataset(source, streaming=True, cache_dir=tmp_path / "c")
        assert isinstance(stream, datasets.IterableDataset)
        streamed = pack(tokenize_dataset(stream, tokenizer, batch_size=3), 50, batch_size=5)
        assert isinstance(streamed, datasets.IterableDataset)
        assert rows(in_memory) == expected
        # A partial pass must not leave tokens behind for the next full pass.
        assert [r["input_ids"] for r in itertools.islice(streamed, 4)] == expected[:4]
        assert rows(streamed) == expected
        assert rows(streamed) == expected


KJV_LIKE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep.

Genesis 2

  1 Thus the heavens and the earth were finished, and all the host of them.

1 Samuel 1

  1 Now there was a certain man of Ramathaimzophim, of mount Ephraim, and his
name was Elkanah.

Song of Solomon 1

  1 The song of songs, which is Solomon's.

Song of Solomon 2

  1 I am the rose of Sharon, and the lily of the valleys.
  10 My beloved spake, and said unto me, Rise up, my love, my fair one, and come
away. Psalm 1
"""


def test_kjv_documents(tmp_path):
    path = tmp_path / "kjv.txt"
    path.write_text(KJV_LIKE, encoding="utf-8")
    books = kjv_documents(path)
    assert [b.splitlines()[0] for b in books] == ["Genesis 1", "1 Samuel 1", "Song of Solomon 1"]
    assert "Genesis 2\n" in books[0] and "finished" in books[0] and "Samuel" not in books[0]
    assert books[1].endswith("name was Elkanah.")
    assert "Song of Solomon 2" in books[2] and books[2].endswith("away. Psalm 1")
    # Nothing lost: the books are the file's text, split at the headings.
    assert "\n\n".join(books) == KJV_LIKE.strip("\n")

    # The same split through the loader, in memory and streamed.
    assert load_text_dataset(path, doc_separator=KJV_BOOK_SEPARATOR)["text"] == books
    streamed = load_text_dataset(path, streaming=True, doc_separator=KJV_BOOK_SEPARATOR)
    assert [r["text"] for r in streamed] == books

    plain = tmp_path / "plain.txt"
    plain.write_text("no headings here\n")
    with pytest.raises(ValueError, match="no book heading"):
        kjv_documents(plain)
    with pytest.raises(FileNotFoundError):
        kjv_documents(tmp_path / "absent.txt")
