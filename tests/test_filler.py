"""Tests of data/filler.py: the real text around pass keys."""

from memstack.data.filler import clean_filler_text


def test_clean_filler_text():
    raw = (
        "\nGenesis 1\n\n  1 In the beginning.\n  2 And the earth\nwas void.\n\n"
        "1 Samuel 2\n\n  1 And Hannah.\n"
    )
    assert clean_filler_text(raw) == "In the beginning. And the earth was void. And Hannah."
    assert clean_filler_text("Plain  prose,\nover two lines.") == "Plain prose, over two lines."
