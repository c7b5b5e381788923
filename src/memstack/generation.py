"""Streams and generation for a MemoryStack: ``reset``, ``step`` and ``generate``.

``generate`` cuts the prompt exactly as ``forward`` would; inside a segment a KV cache serves
local attention while memory is only read; when a segment fills, it is closed through the same
path as in ``forward`` (:meth:`MemoryStack._close_segment`) and the cache starts over (with the
``tokens`` readout's prefix, when a store uses it). So each token is what ``forward`` on the whole
sequence would predict at that position (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import Cache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from memstack.attention import SegmentContext
from memstack.memory.base import LayerRecord
from memstack.state import StackState

if TYPE_CHECKING:
    from memstack.stack import StackOutput


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` float32 -log p(ids[t] | ids[<t]) within one segment, NaN at position 0 (its
    prediction belongs to the segment before)."""
    nll = torch.full(ids.shape, float("nan"), dtype=torch.float32, device=ids.device)
    if ids.shape[1] > 1:
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll[:, 1:] = -logp.gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]
    return nll


@dataclass
class _OpenSegment:
    """A segment being decoded token by token: its KV cache, what its layers recorded, the read
    scratch, and the tokens readout's prefix (``offset`` tokens, ``mask`` over the cache)."""

    cache: Cache | None = None
    """None until the first call: the model builds the cache its layers need (hybrid models'
    recurrent states, sparse attention's indexer keys), as in its own ``generate``."""
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)
    offset: int = 0
    mask: torch.Tensor | None = None
    unread: frozenset[str] = frozenset()
    """Kinds whose retrieval policy skips this segment."""


class StackGeneration:
    """The streaming and decoding half of :class:`~memstack.stack.MemoryStack`."""

    def reset(self) -> None:
        """Forget the stream's memory (start a new stream)."""
        self.state = None

    def step(
        self,
        segment_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> StackOutput:
        """Process one segment of a stream, reading and then updating :attr:`state`.

        Args:
            segment_ids: ``(B, T)`` with ``T <= segment_len``; each call is one segment.
        """
        if segment_ids.shape[-1] > self.config.segment_len:
            raise ValueError(
                f"step() takes at most segment_len={self.config.segment_len} tokens, got "
                f"{segment_ids.shape[-1]}; use stack(input_ids) for longer inputs"
            )
        out = self.forward(segment_ids, attention_mask, labels, state=self.state)
        self.state = out.state
        return out

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        state: StackState | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``prompt_ids`` (greedy, or sampling with temperature / top-k / top-p).

        The prompt is cut into segments exactly as :meth:`forward` would cut it. Inside a segment
        a KV cache serves local attention while memory is only read; when a segment fills, its
        keys and values go into compressive memory and the cache starts over. So each token is
        what ``forward`` on the whole sequence would predict at that position.

        Args:
            prompt_ids: ``(B, P)`` unpadded prompts (rows of equal length), P >= 1.
            state: memory to start from (e.g. ``stack.state`` after :meth:`step` calls); default
                empty. The stream state :attr:`state` is not changed.
            generator: for reproducible sampling.

        Returns:
            ``(B, P + n)`` prompt and continuation, n <= max_new_tokens (stops early once every
            row has produced ``eos_token_id``).
        """
        self._check_ids("prompt_ids", prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if eos_token_id is not None and (
            isinstance(eos_token_id, bool)
            or not isinstance(eos_token_id, int)
            or not 0 <= eos_token_id < self.vocab_size
        ):
            raise ValueError(
                f"eos_token_id must be None or a token id in [0, {self.vocab_size - 1}], got {eos_token_id!r}"
            )
        if state is not None:
            self._check_state(state, prompt_ids.shape[0])
        warpers = LogitsProcessorList()
        if do_sample:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_k is not None:
                warpers.append(TopKLogitsWarper(top_k))
            if top_p is not None:
                warpers.append(TopPLogitsWarper(top_p))
        ids = prompt_ids.to(self.device)
        seg = self.config.segment_len
        state = state if state is not None else StackState()
        n_closed = (ids.shape[1] // seg) * seg
        logits = None
        if n_closed:
            # Only the last closed segment's logits can be needed: a million-token prompt's
            # logits would not fit in memory.
            if n_closed > seg:
                state = self.forward(ids[:, : n_closed - seg], state=state, return_logits=False).state
            out = self.forward(ids[:, n_closed - seg : n_closed], state=state)
            state, logits = out.state, out.logits[:, -1]
        # The open segment: prefill its tokens into a fresh cache, memory read-only.
        fill = ids.shape[1] - n_closed
        # An uncertainty policy decides from the tokens known when the segment opens: the
        # prompt's part of it, else the segment before (memstack/policy.py).
        known = ids[:, n_closed:] if fill else (ids[:, n_closed - seg : n_closed] if n_closed else None)
        seg_open = self._open_segment(state, ids.shape[0], known)
        surprise = self._needs_surprise()
        nll: list[torch.Tensor] = []  # per position of the open segment, when a kind needs it
        if fill:
            all_logits = self._decode(ids[:, n_closed:], 0, seg_open, state)
            logits = all_logits[:, -1]
            if surprise:
                nll = list(token_nll(all_logits, ids[:, n_closed:]).unbind(1))
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for i in range(max_new_tokens):
            scores = logits.float()
            if do_sample:
                probs = torch.softmax(warpers(ids, scores), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            else:
                token = scores.argmax(dim=-1, keepdim=True)
            if eos_token_id is not None:
                token = torch.where(finished[:, None], eos_token_id, token)
                finished |= token[:, 0] == eos_token_id
            ids = torch.cat([ids, token], dim=1)
            if i == max_new_tokens - 1 or bool(finished.all()):
                break
            if surprise:  # the token sits at segment position `fill`; position 0 has no prediction
                picked = -torch.log_softmax(scores, dim=-1).gather(-1, token)[:, 0]
                nll.append(torch.full_like(picked, float("nan")) if fill == 0 else picked)
            logits = self._decode(token, fill, seg_open, state)[:, -1]
            fill += 1
            if fill == seg:
                seg_nll = torch.stack(nll, dim=1) if surprise else None
                for differentiable in (True, False):
                    state = self._close_segment(
                        state, seg_open.records, ids[:, -seg:], None, differentiable, seg_nll
                    )
                nll = []
                state = StackState(state.memories, state.segments + 1)
                seg_open, fill = self._open_segment(state, ids.shape[0], ids[:, -seg:]), 0
        return ids

    def _open_segment(self, state: StackState, batch: int, known: torch.Tensor | None = None) -> _OpenSegment:
        """A fresh KV cache for the next segment, with the tokens readout's prefix prefilled."""
        open_ = _OpenSegment(unread=self._unread(state, known))
        prefix = self._prefix(state, batch, open_.unread)
        if prefix is not None:
            prefix_ids, prefix_valid = prefix
            open_.offset, open_.mask = prefix_ids.shape[1], prefix_valid.long()
            pos = self._positions(0, open_.offset)
            ctx = SegmentContext(self._inputs(state, 0, 0, None, {}, open_.unread))  # not the segment's
            open_.cache = self.model(
                input_ids=prefix_ids,
                attention_mask=open_.mask,
                position_ids=pos,
                cache=None,
                use_cache=True,
                memstack=ctx,
            ).cache
        return open_

    def _decode(
        self, ids: torch.Tensor, start: int, seg_open: _OpenSegment, state: StackState
    ) -> torch.Tensor:
        """Feed tokens at segment positions ``start..`` through the open segment's cache, memory
        read-only, and record what each layer saw; return the logits ``(B, T, V)``."""
        first = seg_open.offset + start
        pos = self._positions(first, ids.shape[1])
        inputs = self._inputs(state, first, start, None, seg_open.scratch, seg_open.unread)
        ctx = SegmentContext(inputs, records=seg_open.records)
        mask = None
        if seg_open.mask is not None:
            seg_open.mask = torch.cat([seg_open.mask, torch.ones_like(ids, dtype=torch.long)], dim=1)
            mask = seg_open.mask
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=seg_open.cache,
            use_cache=True,
            memstack=ctx,
        )
        seg_open.cache = out.cache
        return out.logits
