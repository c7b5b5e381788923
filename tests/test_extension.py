"""Extension is one place: a fifth memory kind, a key strategy and a store readout, each written in
this file alone and registered with one call (no monkeypatching of memstack), work everywhere the
built-in ones do: forward, step, generate, save_pretrained / from_pretrained, state files,
describe() and explain()."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch

from memstack import (
    MemoryKind,
    MemoryStack,
    Readout,
    StackConfig,
    StackState,
    StoreConfig,
    StoreReadout,
    register_kind,
    register_readout,
    register_strategy,
    unregister_kind,
)
from memstack.fields import check_number
from memstack.memory.store.keys import STRATEGIES, ChunkKeys, unregister_strategy
from memstack.memory.store.readouts import READOUTS, unregister_readout
from tests.conftest import make_model

SEG = 8


# ------------------------------------------------------------------ a fifth kind, written here


@dataclass
class MeanConfig:
    layers: str = "1"
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        check_number("stack.kinds.mean.gate_init", self.gate_init, "a finite number", math.isfinite)


class MeanState(NamedTuple):
    total: torch.Tensor  # (B, H_kv, d) float32: sum of every past position-free key
    count: torch.Tensor  # (B, H_kv) float32


class MeanMemory(MemoryKind):
    """Reads the running mean of every past position-free key (a toy, but with tensor state and a gate)."""

    name = "mean"
    state_type = MeanState
    colour = "tab:purple"

    def __init__(self, layers, gate_init):
        self.layers = frozenset(layers)
        self.gate_init = gate_init

    @classmethod
    def build(cls, config, ctx):
        return cls(ctx.layers(config.layers, "stack.kinds.mean.layers"), config.gate_init)

    def empty(self, record):
        b, h_kv, _, d = record.key.shape
        return MeanState(torch.zeros(b, h_kv, d), torch.zeros(b, h_kv))

    def read(self, state, query, ctx):
        mean = state.total / state.count.clamp(min=1)[..., None]  # (B, H_kv, d)
        heads = query.shape[1]
        out = mean.repeat_interleave(heads // mean.shape[1], dim=1)[:, None].expand(
            -1, query.shape[2], -1, -1
        )
        empty = (state.count == 0).repeat_interleave(heads // mean.shape[1], dim=1)
        return Readout(out.float(), empty if bool(empty.any()) else None)

    def write(self, state, record, segment):
        key = record.key.detach().float()
        return MeanState(state.total + key.sum(2), state.count + key.shape[2])

    def describe(self):
        return f"5. running mean of keys: layers {sorted(self.layers)}"


@pytest.fixture
def mean_kind():
    register_kind(MeanMemory, MeanConfig)
    yield
    unregister_kind("mean")


def mean_stack(seed=0, gate=0.0):
    config = StackConfig(segment_len=SEG, compressive=None, kinds={"mean": MeanConfig(gate_init=gate)})
    return MemoryStack(make_model("llama", seed=seed), config)


def test_a_fifth_kind_reads_and_writes_what_its_formula_says(mean_kind):
    stack = mean_stack(gate=0.0)
    assert list(stack.kinds) == ["mean"] and set(stack.gate_values("mean")) == {1}
    ids = torch.randint(0, 256, (2, 3 * SEG))
    with torch.no_grad():
        out = stack(ids)
        off = stack.memory_off()
        with off:
            plain = stack(ids)
    # only layer 1 has memory, so its keys do not depend on it: the state is their plain sum
    keys = [stack.position_free_qk(ids[:, i : i + SEG])[1][1] for i in range(0, 3 * SEG, SEG)]
    state = out.state.memories["mean"][1]
    torch.testing.assert_close(state.total, sum(k.sum(2) for k in keys), atol=1e-4, rtol=1e-5)
    assert torch.equal(state.count, torch.full((2, 2), 3.0 * SEG))
    # the first segment reads empty memory (the mixer keeps local attention); later ones differ
    torch.testing.assert_close(out.logits[:, :SEG], plain.logits[:, :SEG], atol=1e-5, rtol=0)
    assert (out.logits[:, SEG:] - plain.logits[:, SEG:]).abs().max() > 1e-3
    # a gate closed to sigmoid(-30) gives the model alone back
    with torch.no_grad():
        closed = mean_stack(gate=-30.0)(ids).logits
    torch.testing.assert_close(closed, plain.logits, atol=1e-5, rtol=0)


def test_a_fifth_kind_streams_generates_and_saves(mean_kind, tmp_path):
    stack = mean_stack(gate=0.5)
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        whole = stack(ids).logits
    stack.reset()
    steps = [stack.step(ids[:, i : i + SEG]).logits for i in range(0, 3 * SEG, SEG)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)

    prompt, new = ids[:, : SEG + 3], SEG + 2
    out, seq = stack.generate(prompt, max_new_tokens=new), prompt
    with torch.no_grad():
        for _ in range(new):
            seq = torch.cat([seq, stack(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)

    # the state file: rebuilt as the kind's own tuple, bit for bit
    stack.state.save(tmp_path / "state.safetensors")
    back = StackState.load(tmp_path / "state.safetensors")
    assert isinstance(back.memories["mean"][1], MeanState)
    assert all(
        torch.equal(a, b)
        for a, b in zip(back.memories["mean"][1], stack.state.memories["mean"][1], strict=True)
    )
    # the stack's files: the kind's config section and its gate
    with torch.no_grad():
        stack.gate_parameters()[0].fill_(1.25)
        expected = stack(ids).logits
    stack.save_pretrained(tmp_path / "stack")
    model = make_model("llama")  # same seed: the same base weights
    restored = MemoryStack.from_pretrained(tmp_path / "stack", model)
    assert restored.config.kinds == {"mean": MeanConfig(gate_init=0.5)}
    assert torch.equal(restored.gate_parameters()[0], torch.full((4,), 1.25))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, expected, atol=0, rtol=0)


def test_a_fifth_kind_is_described_and_explained(mean_kind):
    stack = mean_stack(gate=0.0)
    assert "  5. running mean of keys: layers [1]" in stack.describe().splitlines()
    ids = torch.randint(0, 256, (1, 2 * SEG))
    shares = stack.explain(ids).shares[1]
    assert set(shares) == {"local", "mean"}
    for h in range(4):
        assert math.isclose(shares["local"][h] + shares["mean"][h], 1.0, rel_tol=1e-5)
    # half the queries (the second segment) read memory with gate sigmoid(0) = 0.5
    assert shares["mean"] == pytest.approx([0.25] * 4, abs=1e-5)


def test_a_kind_section_round_trips_and_unknown_sections_are_refused(mean_kind):
    config = StackConfig(segment_len=SEG, kinds={"mean": MeanConfig(layers="0,1", gate_init=-1.0)})
    assert StackConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"kinds\['nope'\]: not a registered memory kind"):
        StackConfig(kinds={"nope": MeanConfig()})
    with pytest.raises(ValueError, match=r"kinds\['mean'\] must be a MeanConfig, got StoreConfig"):
        StackConfig(kinds={"mean": StoreConfig()})
    with pytest.raises(ValueError, match=r"stack.kinds.mean.gate_init must be a finite number"):
        StackConfig.from_dict({"kinds": {"mean": {"gate_init": float("nan")}}})


# ------------------------------------------------------------------ a key strategy, written here


def first_key(chunks, key_pf, query_pf, mass, *, keys_per_chunk, keyword_pool):
    """Each chunk keyed by its first token's position-free key."""
    vectors = torch.stack([key_pf[:, a].reshape(-1) for a, _ in chunks]) if chunks else key_pf.new_zeros(0)
    return ChunkKeys(vectors.float(), torch.arange(len(chunks)))


def test_a_key_strategy_is_one_registered_function():
    register_strategy("first_key", first_key)
    try:
        assert "first_key" in STRATEGIES and not STRATEGIES["first_key"].needs_mass
        with pytest.raises(ValueError, match="strategy must be one of .*first_key"):
            StoreConfig(strategy="second_key")
        stack = MemoryStack(
            make_model("llama"),
            StackConfig(
                segment_len=SEG,
                compressive=None,
                store=StoreConfig(layers="1", chunk_len=4, strategy="first_key"),
            ),
        )
        ids = torch.randint(0, 256, (1, SEG))
        with torch.no_grad():
            store = stack(ids).state.memories["store"][1].stores[0]
        key = stack.position_free_qk(ids)[1][1][0]  # (H_kv, T, D)
        expected = torch.stack([key[:, 0].reshape(-1), key[:, 4].reshape(-1)])
        scores, found = store.search(0, expected[1:2], 1)
        assert found[0, 0].item() == 1  # the second chunk's own key finds it first
        torch.testing.assert_close(scores[0, 0], (expected[1] * expected[1]).sum(), atol=1e-3, rtol=1e-3)
    finally:
        unregister_strategy("first_key")
    with pytest.raises(ValueError, match="strategy must be one of"):
        StoreConfig(strategy="first_key")


# ------------------------------------------------------------------ a readout, written here


class PlainGated(StoreReadout):
    """The kv_gated readout, written again here: attention over the hits, mixed in by a gate."""

    name = "plain_gated"
    gated = True

    def read(self, memory, ctx):
        b, h, t_q, _ = memory.query.shape
        return Readout(memory.attend(ctx.scaling), ~memory.visible.any(-1)[:, :, None].expand(b, t_q, h))


def test_a_readout_is_one_registered_class():
    register_readout(PlainGated)
    try:
        ids = torch.randint(0, 256, (1, 4 * SEG))
        logits = {}
        for readout in ("plain_gated", "kv_gated"):
            cfg = StoreConfig(layers="1", chunk_len=4, top_k=2, block_len=4, readout=readout, gate_init=0.5)
            stack = MemoryStack(
                make_model("llama"), StackConfig(segment_len=SEG, compressive=None, store=cfg)
            )
            assert set(stack.gate_values("store")) == {1}  # gated: the stack gave it a gate
            with torch.no_grad():
                logits[readout] = stack(ids).logits
        torch.testing.assert_close(logits["plain_gated"], logits["kv_gated"], atol=0, rtol=0)
        with torch.no_grad(), stack.memory_off():
            plain = stack(ids).logits
        assert (logits["kv_gated"] - plain).abs().max() > 1e-4  # the store did change the output
    finally:
        unregister_readout("plain_gated")
    assert "plain_gated" not in READOUTS
