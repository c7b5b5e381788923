"""The shape every memory kind shares: a kind joins the stack through register_kind alone, and each
closed segment reaches every kind exactly once, through one path, from forward, step and generate."""

from dataclasses import dataclass

import pytest
import torch

from memstack import (
    CompressiveConfig,
    LayerRecord,
    MemoryKind,
    MemoryStack,
    Readout,
    StackConfig,
    register_kind,
    unregister_kind,
)
from tests.conftest import make_model

SEG = 8


@dataclass
class EpisodesConfig:
    layer: int = 1


class Episodes(MemoryKind):
    """A toy non-differentiable kind (like the long-term store): keeps every closed segment's
    position-free keys and queries of layer 1, read by nobody's gate."""

    name = "episodes"
    differentiable = False
    needs_query = True

    def __init__(self, layer: int):
        self.layers = frozenset({layer})
        self.writes: list[LayerRecord] = []

    @classmethod
    def build(cls, config, ctx):
        return cls(config.layer)

    def empty(self, record):
        return []

    def read(self, state, query, ctx):
        return Readout(torch.zeros(query.shape[0], query.shape[2], query.shape[1], 16))

    def write(self, state, record, segment):
        self.writes.append(
            record._replace(**{f: getattr(record, f).detach().clone() for f in ("key", "value", "query")})
        )
        return state + [len(self.writes)]


@pytest.fixture
def episodes():
    register_kind(Episodes, EpisodesConfig)
    yield {"episodes": EpisodesConfig()}
    unregister_kind("episodes")


def writes(stack: MemoryStack) -> list[LayerRecord]:
    return stack.kinds["episodes"].writes


def test_a_new_kind_joins_through_kinds_and_changes_nothing_it_does_not_gate(episodes):
    ids = torch.randint(0, 256, (2, 3 * SEG))
    config = StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), kinds=episodes)
    plain = MemoryStack(make_model("llama", seed=3), config)
    with_kind = MemoryStack(make_model("llama", seed=3), config)
    assert list(with_kind.kinds) == ["compressive", "episodes"]
    with torch.no_grad(), plain.memory_off("episodes"):
        reference = plain(ids).logits
    assert writes(plain) == []  # switched off: nothing written
    with torch.no_grad():
        out = with_kind(ids)
    torch.testing.assert_close(out.logits, reference, atol=0, rtol=0)
    assert out.state.memories["episodes"][1] == [1, 2, 3]  # a handle carried across segments
    qk = with_kind.position_free_qk(ids[:, :SEG])  # the first segment reads no memory
    torch.testing.assert_close(writes(with_kind)[0].key, qk[1][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(writes(with_kind)[0].query, qk[1][0], atol=1e-5, rtol=1e-5)
    assert len(writes(with_kind)) == 3


def test_activation_checkpointing_writes_each_segment_once(episodes):
    stack = MemoryStack(
        make_model("llama"), StackConfig(segment_len=SEG, checkpoint_segments=True, kinds=episodes)
    )
    ids = torch.randint(0, 256, (1, 3 * SEG))
    out = stack(ids, labels=ids)
    out.loss.backward()  # re-runs every segment's forward
    assert len(writes(stack)) == 3
    assert all(w.key.shape[2] == SEG for w in writes(stack))


def test_generate_closes_segments_through_the_same_path_as_forward(episodes):
    stack = MemoryStack(
        make_model("llama"),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), kinds=episodes),
    )
    prompt = torch.randint(0, 256, (1, SEG + 3))
    out = stack.generate(prompt, max_new_tokens=SEG)  # closes segment 1 while decoding
    generated = list(writes(stack))
    writes(stack).clear()
    with torch.no_grad():
        stack(out[:, : 2 * SEG])  # the same two closed segments, in one forward
    assert len(generated) == 2 and len(writes(stack)) == 2
    for a, b in zip(generated, writes(stack), strict=True):
        torch.testing.assert_close(a.key, b.key, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.value, b.value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.query, b.query, atol=1e-5, rtol=1e-5)


def test_memory_off_names_unknown_kinds():
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG))
    with pytest.raises(
        ValueError, match=r"unknown memory kinds \['store'\]; this stack has \['compressive'\]"
    ):
        with stack.memory_off("store"):
            pass
