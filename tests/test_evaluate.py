"""Evaluations against the stack's own forward pass and a brute-force pass-key check."""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memstack import MemoryStack, StackConfig
from memstack.data.tasks import passkey_sample
from memstack.data.tokenizer import ByteTokenizer
from memstack.train.evaluate import (
    format_passkey_table,
    loss_by_segment,
    passkey_accuracy,
    passkey_by_offset,
)
from tests.conftest import make_model


def test_loss_by_segment_matches_one_long_forward():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=8, gate_init=1.0))
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
            answer = key if int(key[-1]) % 2 == 0 else key[::-1] + "x"
            rows.append(p + list((" " + answer).encode())[:max_new_tokens])
        return torch.tensor(rows)


def test_passkey_accuracy_counts_exact_answers():
    tok = ByteTokenizer()
    table = passkey_accuracy(OracleStack(), tok, [120, 200], [0.0, 1.0], samples=6, seed=5, instruction=False)
    for i, length in enumerate([120, 200]):
        for j, depth in enumerate([0.0, 1.0]):
            keys = [
                passkey_sample(tok, length, depth, 5 + 1000 * k, instruction=False).passkey for k in range(6)
            ]
            expected = sum(int(k[-1]) % 2 == 0 for k in keys) / 6
            assert table["accuracy"][i][j] == expected
    assert 0 < sum(map(sum, table["accuracy"])) < 4  # the oracle is neither always right nor always wrong
    assert "| 120 |" in format_passkey_table(table)


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
