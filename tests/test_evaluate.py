"""Evaluations against the stack's own forward pass and a brute-force pass-key check."""

import contextlib
import hashlib
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memstack import CompressiveConfig, MemoryStack, StackConfig
from memstack.data.tasks import filler_text, passkey_sample
from memstack.data.tokenizer import ByteTokenizer
from memstack.train.evaluate import (
    format_kv_table,
    format_passkey_table,
    kv_recall_accuracy,
    loss_by_segment,
    passkey_accuracy,
    passkey_by_offset,
    sample_seed,
    wilson_interval,
)
from tests.conftest import make_model


def test_loss_by_segment_matches_one_long_forward():
    stack = MemoryStack(
        make_model("llama"), StackConfig(segment_len=8, compressive=CompressiveConfig(gate_init=1.0))
    )
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        logits = stack(ids).logits
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(
        2, -1
    )
    expected = [per_token[:, s : s + 8].mean().item() for s in range(0, 29, 8)]
    got = loss_by_segment(stack, ids)
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected, strict=True):
        assert abs(a - b) < 1e-5
    off = loss_by_segment(stack, ids, use_memory=False)
    assert abs(off[0] - got[0]) < 1e-6 and abs(off[2] - got[2]) > 1e-6  # memory only changes later segments
    assert stack.use_memory


class OracleStack:
    """Answers a prompt's pass key right when its last digit is even, wrong otherwise."""

    use_memory = True

    def memory_enabled(self, enabled=True):
        return contextlib.nullcontext(self)

    def generate(self, prompts, max_new_tokens):
        rows = []
        for p in prompts.tolist():
            key = re.search(r"pass key is (\d+)", bytes(p).decode()).group(1)
            # wrong answers differ in the last digit (a reversed key would be right for palindromes)
            answer = key if int(key[-1]) % 2 == 0 else key[:-1] + str((int(key[-1]) + 1) % 10)
            rows.append(p + list((" " + answer).encode())[:max_new_tokens])
        return torch.tensor(rows)


def test_sample_seed_is_a_pure_function_of_the_tuple():
    # written out independently: SHA-256 of the reprs joined by "|", first 8 bytes, top bit dropped
    expected = int.from_bytes(hashlib.sha256(b"'passkey'|5|120|0.0|3").digest()[:8], "big") >> 1
    assert sample_seed("passkey", 5, 120, 0.0, 3) == expected
    seeds = {sample_seed("passkey", 5, n, d, i) for n in (120, 200) for d in (0.0, 1.0) for i in range(20)}
    assert len(seeds) == 80 and all(0 <= x < 2**63 for x in seeds)


def wilson_by_hand(k: int, n: int) -> tuple[float, float]:
    p, z = k / n, 1.96
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


def clamped(k: int, n: int) -> tuple[float, float]:
    low, high = wilson_by_hand(k, n)
    return max(0.0, low), min(1.0, high)


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [(0, 20, 0.0, 0.1611), (10, 20, 0.2993, 0.7007), (20, 20, 0.8389, 1.0), (1, 5, 0.0362, 0.6245)],
)
def test_wilson_interval(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=1e-4)  # published / hand-computed values
    assert got == pytest.approx(clamped(k, n), abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_passkey_accuracy_counts_exact_answers():
    tok = ByteTokenizer()
    table = passkey_accuracy(OracleStack(), tok, [120, 200], [0.0, 1.0], samples=6, seed=5, instruction=False)
    for i, length in enumerate([120, 200]):
        for j, depth in enumerate([0.0, 1.0]):
            seeds = [sample_seed("passkey", 5, length, depth, k) for k in range(6)]
            keys = [passkey_sample(tok, length, depth, x, instruction=False).passkey for x in seeds]
            hits = sum(int(k[-1]) % 2 == 0 for k in keys)
            assert table["hits"][i][j] == hits
            assert table["accuracy"][i][j] == hits / 6
            assert table["ci95"][i][j] == pytest.approx(clamped(hits, 6), abs=1e-12)
        pooled = sum(table["hits"][i])
        assert table["by_length"][i]["hits"] == pooled and table["by_length"][i]["n"] == 12
        assert table["by_length"][i]["ci95"] == pytest.approx(clamped(pooled, 12), abs=1e-12)
    assert table["n"] == table["samples"] == 6 and table["filler"] == "synthetic" and table["split"] is None
    assert 0 < sum(map(sum, table["accuracy"])) < 4  # the oracle is neither always right nor always wrong

    text = format_passkey_table(table)
    assert "n=6 per cell" in text and "synthetic filler" in text
    for i, length in enumerate([120, 200]):
        row = next(line for line in text.splitlines() if line.startswith(f"| {length} |"))
        counts = [(h, 6) for h in table["hits"][i]] + [(sum(table["hits"][i]), 12)]
        expected = []
        for hits, n in counts:
            lo, hi = clamped(hits, n)
            expected.append(f"{round(100 * hits / n)}% [{round(100 * lo)}-{round(100 * hi)}]")
        assert row == f"| {length} | " + " | ".join(expected) + " |"


def test_format_reads_tables_written_before_intervals():
    old = {"lengths": [960], "depths": [0.0, 1.0], "accuracy": [[0.8, 0.2]], "use_memory": True, "samples": 5}
    text = format_passkey_table(old)
    assert "| 960 | 80% [38-96] | 20% [4-62] | 50% [24-76] |" in text


class RecordingOracle(OracleStack):
    """The oracle above, with a segment length, keeping every prompt it was given."""

    def __init__(self, segment_len: int):
        self.config = SimpleNamespace(segment_len=segment_len)
        self.prompts: list[str] = []

    def generate(self, prompts, max_new_tokens):
        self.prompts += [bytes(p).decode() for p in prompts.tolist()]
        return super().generate(prompts, max_new_tokens)


@pytest.mark.parametrize("instruction", [False, True])
def test_passkey_by_offset_puts_the_needle_at_each_offset(instruction):
    tok, seg, offsets = ByteTokenizer(), 64, [0, 17, 63]
    oracle = RecordingOracle(seg)
    result = passkey_by_offset(oracle, tok, 700, offsets, samples=3, seed=2, instruction=instruction)
    assert len(oracle.prompts) == 9
    for j, off in enumerate(offsets):
        prompts = oracle.prompts[3 * j : 3 * j + 3]
        starts = [p.index(" The pass key is") for p in prompts]  # the needle opens with a space
        assert all(st % seg == off for st in starts)
        assert len(set(starts)) == 3  # spread over different segments
        keys = [re.search(r"pass key is (\d+)", p).group(1) for p in prompts]
        assert result["accuracy"][j] == sum(int(k[-1]) % 2 == 0 for k in keys) / 3
    assert 0 < sum(result["accuracy"]) < 3
    with pytest.raises(ValueError, match="offsets must be in"):
        passkey_by_offset(oracle, tok, 700, [64])


def prompt_keys(prompts: list[str]) -> list[str]:
    return [re.search(r"pass key is (\d+)", p).group(1) for p in prompts]


@pytest.mark.parametrize("filler", ["synthetic", "text"])
def test_every_cell_has_its_own_keys_and_passages(filler):
    tok, samples = ByteTokenizer(), 20
    oracle = RecordingOracle(64)
    table = passkey_accuracy(
        oracle, tok, [300, 400], [0.0, 1.0], samples=samples, seed=1, instruction=False, filler=filler
    )
    cells = [oracle.prompts[i : i + samples] for i in range(0, 4 * samples, samples)]
    key_sets = [frozenset(prompt_keys(c)) for c in cells]
    assert len(set(key_sets)) == 4  # no two cells share their key set
    all_keys = [k for c in cells for k in prompt_keys(c)]
    assert len(set(all_keys)) >= 78  # 80 draws from 90,000 keys: almost all distinct
    expected = [[sum(int(k[-1]) % 2 == 0 for k in prompt_keys(c)) for c in cells[i : i + 2]] for i in (0, 2)]
    assert table["hits"] == expected
    if filler == "text":
        test = filler_text("test")
        assert table["split"] == "test"
        for p in oracle.prompts:
            # without its needle, a prompt's filler is one run of words of the test split
            passage = re.sub(r" The pass key is \d+\. Remember it\. \d+ is the pass key\.", "", p)
            assert passage.rsplit(" What is", 1)[0] in " " + test + " " + test
        assert len({p[-150:] for p in oracle.prompts}) == 80  # new text in every prompt


class KVOracle(OracleStack):
    """Answers the asked key's value right when the value is even, wrong otherwise."""

    def generate(self, prompts, max_new_tokens):
        rows = []
        for p in prompts.tolist():
            text = bytes(p).decode()
            key = re.search(r"What is the value of key ([A-Z]+)\?", text).group(1)
            value = re.search(rf"value of key {key} is (\d+)\.", text).group(1)
            answer = value if int(value) % 2 == 0 else "0" + value[1:]
            rows.append(p + list((" " + answer).encode())[:max_new_tokens])
        return torch.tensor(rows)


@pytest.mark.parametrize("filler", ["synthetic", "text"])
def test_kv_recall_accuracy(filler):
    tok = ByteTokenizer()
    table = kv_recall_accuracy(KVOracle(), tok, [600, 900], 4, samples=20, seed=3, filler=filler)
    from memstack.data.tasks import multi_needle_sample

    for i, length in enumerate([600, 900]):
        answers = [
            multi_needle_sample(
                tok, length, 4, sample_seed("kv", 3, length, 4, k), filler=filler, split="test"
            ).answer
            for k in range(20)
        ]
        hits = sum(int(a) % 2 == 0 for a in answers)
        assert table["hits"][i] == hits and table["accuracy"][i] == hits / 20
        assert table["ci95"][i] == list(wilson_interval(hits, 20))
    assert 0 < sum(table["hits"]) < 40
    text = format_kv_table(table)
    assert "4 needles" in text and "n=20" in text and re.search(r"\| 600 \| \d+% \[\d+-\d+\] \|", text)


def test_by_offset_with_text_filler_keeps_offsets_and_reports_intervals():
    tok, seg, offsets = ByteTokenizer(), 64, [0, 17, 63]
    oracle = RecordingOracle(seg)
    result = passkey_by_offset(oracle, tok, 700, offsets, samples=3, seed=2, instruction=False, filler="text")
    for j, off in enumerate(offsets):
        prompts = oracle.prompts[3 * j : 3 * j + 3]
        assert all(p.index(" The pass key is") % seg == off for p in prompts)
        assert result["hits"][j] == sum(int(k[-1]) % 2 == 0 for k in prompt_keys(prompts))
    assert len(set(prompt_keys(oracle.prompts))) == 9  # every offset its own keys
    assert result["overall"]["n"] == 9 and result["overall"]["hits"] == sum(result["hits"])
