"""Layer 1's reach across a segment boundary: tokens carried in front of every segment.

Local attention never looks outside its segment, so the first tokens of a segment read almost
nothing: a question that ends just before a boundary leaves the answer's first token with no
question in sight. InfLLM (https://arxiv.org/abs/2402.04617) keeps two things in view of every
token besides what it retrieves: a sliding local window and the stream's initial tokens
(attention sinks, Xiao et al. 2023). This kind gives segments both, as tokens re-read in front of
the segment: the stream's first ``initial`` tokens and the previous segment's last ``recent``
tokens, so every token sees at least ``recent`` tokens of context. They are recomputed (the
prefix costs ``initial + recent`` extra tokens a segment) and never written again into memory.
The order is InfLLM's: the initial tokens first (:meth:`CarryTokens.opening`), then what other
kinds put before the segment (the store's ``tokens`` hits), then the recent tokens.

Enable it with ``StackConfig(kinds={"carry": CarryConfig(initial=4, recent=256)})``; it composes
with the store's ``tokens`` readout (whose hits go between the initial and the recent tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from memstack.fields import check_int, reject_bool_ints
from memstack.memory.base import (
    BuildContext,
    ClosedSegment,
    LayerRecord,
    MemoryKind,
    ReadContext,
    Readout,
    register_kind,
)


@dataclass
class CarryConfig:
    """Tokens carried in front of every segment (see :mod:`memstack.memory.carry`)."""

    initial: int = 0
    """The stream's first tokens, kept in view of every segment (InfLLM keeps them)."""
    recent: int = 256
    """The previous segment's last tokens: every token then sees at least this many before it."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "stack.kinds.carry")
        check_int("stack.kinds.carry.initial", self.initial, minimum=0)
        check_int("stack.kinds.carry.recent", self.recent, minimum=0)
        if self.initial + self.recent == 0:
            raise ValueError(
                "stack.kinds.carry: initial and recent are both 0; carry nothing by leaving it out"
            )


class CarryState(NamedTuple):
    """Per row: the stream's first tokens and the last ones, each left-padded (``*_valid`` False)."""

    initial: torch.Tensor  # (B, I) int64
    initial_valid: torch.Tensor  # (B, I) bool
    recent: torch.Tensor  # (B, R) int64
    recent_valid: torch.Tensor  # (B, R) bool


def _last(ids: torch.Tensor, valid: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last ``n`` valid tokens, left-padded to ``(B, n)``."""
    out = torch.zeros(ids.shape[0], n, dtype=torch.long)
    ok = torch.zeros(ids.shape[0], n, dtype=torch.bool)
    for row in range(ids.shape[0]):
        kept = ids[row][valid[row]][-n:] if n else ids[row, :0]
        if len(kept):
            out[row, n - len(kept) :], ok[row, n - len(kept) :] = kept, True
    return out, ok


class CarryTokens(MemoryKind):
    """Carries the stream's initial tokens and the previous segment's last tokens (no gate, no read)."""

    name = "carry"
    state_type = CarryState
    colour = "tab:olive"
    prefix_last = True  # the previous segment's end leads straight into the segment

    def __init__(self, layer: int, config: CarryConfig):
        self.layers = frozenset({layer})  # one layer sees every segment's tokens close
        self.config = config

    @classmethod
    def build(cls, config: CarryConfig, ctx: BuildContext) -> CarryTokens:
        """Kept by the first attention layer (any one layer would do: only the token ids matter)."""
        return cls(ctx.attention_layers[0], config)

    def describe(self) -> str:
        c = self.config
        return (
            f"1+. carried tokens: the stream's first {c.initial} and the previous segment's last "
            f"{c.recent} before every segment"
        )

    def empty(self, record: LayerRecord) -> CarryState:
        b = record.key.shape[0]
        zeros = torch.zeros(b, 0, dtype=torch.long)
        return CarryState(zeros, zeros.bool(), zeros, zeros.bool())

    def read(self, state: CarryState, query: torch.Tensor, ctx: ReadContext) -> Readout:
        return Readout(None)  # the carried tokens are in the segment itself (prefix)

    def write(self, state: CarryState, record: LayerRecord, segment: ClosedSegment) -> CarryState:
        ids = segment.ids.detach().cpu()
        valid = torch.ones_like(ids, dtype=torch.bool) if segment.valid is None else segment.valid.cpu()
        c = self.config
        initial, initial_valid = state.initial, state.initial_valid
        if initial.shape[1] == 0 and c.initial:  # the stream's first segment
            initial, initial_valid = _first(ids, valid, c.initial)
        # the stream's last tokens, even when this segment was shorter than ``recent``
        recent, recent_valid = _last(
            torch.cat([state.recent, ids], 1), torch.cat([state.recent_valid, valid], 1), c.recent
        )
        return CarryState(initial, initial_valid, recent, recent_valid)

    @classmethod
    def check_loaded(cls, layer: int, state: CarryState, source: str) -> None:
        """Token ids int64 and validity bool, of matching shapes."""
        for ids, ok, name in (
            (state.initial, state.initial_valid, "initial"),
            (state.recent, state.recent_valid, "recent"),
        ):
            if ids.dtype != torch.int64 or ok.dtype != torch.bool or ids.shape != ok.shape or ids.ndim != 2:
                raise ValueError(
                    f"{source}: carry {name} tokens must be int64 (B, n) with a bool mask of the same shape, "
                    f"got {ids.dtype} {tuple(ids.shape)} and {ok.dtype} {tuple(ok.shape)}"
                )

    def opening(self, layers: dict[int, CarryState]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stream's initial tokens, first of all (before the store's hits); None if none."""
        state = layers[min(layers)]
        return (state.initial, state.initial_valid) if bool(state.initial_valid.any()) else None

    def prefix(self, layers: dict[int, CarryState]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The previous segment's last tokens, last (straight before the segment); None if none."""
        state = layers[min(layers)]
        return (state.recent, state.recent_valid) if bool(state.recent_valid.any()) else None


def _first(ids: torch.Tensor, valid: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first ``n`` valid tokens (from a left-padded batch), left-padded to ``(B, n)``."""
    out = torch.zeros(ids.shape[0], n, dtype=torch.long)
    ok = torch.zeros(ids.shape[0], n, dtype=torch.bool)
    for row in range(ids.shape[0]):
        kept = ids[row][valid[row]][:n]
        if len(kept):
            out[row, n - len(kept) :], ok[row, n - len(kept) :] = kept, True
    return out, ok


register_kind(CarryTokens, CarryConfig)
