"""Pass key on a pretrained model, in its own tokens: the rows every long-context table compares.

The protocol (``scripts/eval_smollm2.py`` and ``scripts/quickstart.py`` use it):

- the prompt is the papers' pass-key format (:func:`memstack.data.tasks.passkey_sample`) in the
  model's tokens, ending with the question "What is the pass key? The pass key is";
- a prompt counts as found when the key's digits appear in the greedy continuation
  (:data:`ANSWER_TOKENS` tokens; RULER scores the same way, by the expected string's presence);
- memstack rows answer a prompt longer than one segment with ``generate(..., close_prompt=True)``:
  the prompt's end closes a segment, so the question's own last queries search the store, and
  the answer opens a fresh segment whose prefix holds the retrieved chunks' tokens and the
  carried end of the prompt. A prompt that fits in one segment with its answer is read whole,
  as the bare model reads it (the first segment is exactly the unwrapped model), whatever the
  memory; at exactly one segment (2,048 tokens) the answer would cross a boundary, so it closes.

Rows (:data:`ROWS`): ``bare`` (the model alone, full attention over the whole prompt), ``off``
(memstack with the store switched off: segments that see the previous segment's last 256 tokens,
so the answer sees the question and nothing older), ``store`` (the store searched by the
calibrated retrieval heads alone), ``store_near`` (the same, each hit read with the :data:`NEAR`
chunks before and after it: a number cut by a chunk boundary comes back whole), ``store_all``
(the store on every layer and head with
InfLLM's representative tokens: the configuration before calibration), ``compressive``
(Infini-attention's compressive memory with its gates untrained, no store), ``tuned`` (a
fine-tuned stack, ``configs/smollm2_passkey.py``: LoRA adapters and gates trained, every memory
on) and ``tuned_off`` (the same weights with every memory but the carried tokens off).

With ``chat=True`` (:func:`chat_prompt`) a prompt goes through the tokenizer's chat template:
the instruction, text and question as the user's message, "The pass key is" opening the
assistant's reply.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from memstack.config import StackConfig
from memstack.memory.carry import CarryConfig
from memstack.memory.store.kind import StoreConfig
from memstack.stack import MemoryStack

ROWS = ("bare", "off", "compressive", "store", "store_near", "store_all", "tuned", "tuned_off")
OFF_ROWS = ("off", "tuned_off")
"""Rows that switch every memory kind off but the carried tokens."""
ANSWER_PREFIX = "The pass key is"
"""The end of the question that opens the answer (the assistant's reply with a chat template)."""
ANSWER_TOKENS = 8
RECENT = 256
"""Tokens of the previous segment every segment sees (the carry kind)."""
NEAR = 1
"""The ``store_near`` row's ``StoreConfig.neighbours``: chunks read before and after each hit."""


def compressive_config(segment_len: int = 2048) -> StackConfig:
    """The ``compressive`` row: compressive memory on every layer, its gates at their initial
    value (untrained), the same carried tokens, no store."""
    from memstack.memory.compressive import CompressiveConfig

    return StackConfig(
        segment_len=segment_len,
        compressive=CompressiveConfig(layers="all"),
        store=None,
        kinds={"carry": CarryConfig(recent=RECENT)},
    )


def stack_config(
    heads: str | None,
    segment_len: int = 2048,
    neighbours: int = 0,
    top_k: int = 4,
    window: int = 16,
    initial: int = 0,
) -> StackConfig:
    """The stack of the ``store`` row (``heads``: its calibrated retrieval heads), of
    ``store_near`` (the same with ``neighbours=NEAR``) or of the ``store_all`` row (``heads=None``);
    ``off`` is the ``store`` stack with the store switched off.

    Training-free: no compressive memory (its gates would need training), the store's
    ``tokens`` readout (the hits' tokens go back in front of the segment, which any model reads
    without training), every token's key indexed at the searching heads (``every_token``), each of
    the question's last ``window`` (16) queries searching (``query_pool="max"``), the ``top_k``
    (4) best 32-token chunks (and ``neighbours`` chunks before and after each, in text order: up
    to 12 with 1).

    ``window`` is the store's ``block_len``: with the ``tokens`` readout the only search is the
    one before each segment, from the last ``block_len`` queries of the segment before, so it is
    how much of the question searches. 16 tokens hold a one-key question's key but only the last
    two of multi-query's four keys (its answer prefix alone is about 30 tokens).

    ``initial`` > 0 keeps the prompt's first ``initial`` tokens in view (the carry's ``initial``)
    and out of the store's search (``skip_initial``), the layout of the RAG rows (instruction,
    hits, question): a RULER instruction ("Some special magic numbers are hidden within the
    following text...") otherwise matches every question about special magic numbers and takes
    one of the 4 hits.
    """
    shared = dict(
        block_len=window,
        top_k=top_k,
        chunk_len=32,
        readout="tokens",
        skip_recent=RECENT,
        neighbours=neighbours,
        skip_initial=initial,
    )
    if heads is None:
        store = StoreConfig(layers="all", **shared)
    else:
        store = StoreConfig(layers="heads", heads=heads, strategy="every_token", query_pool="max", **shared)
    return StackConfig(
        segment_len=segment_len,
        compressive=None,
        store=store,
        kinds={"carry": CarryConfig(recent=RECENT, initial=initial)},
    )


def off_suffix(ids: list[int], segment_len: int) -> list[int]:
    """What the ``off`` row needs of a prompt: its last two segments as ``forward`` cuts it from
    the start. With the store off nothing older reaches the answer (the carry holds only the
    previous segment's end), so the answer is the same as over the whole prompt, at a fraction
    of the cost (``tests/test_heads_carry.py`` checks the equality). Exact when the carry kind
    keeps no initial tokens and ``recent <= segment_len`` (:func:`answer` checks)."""
    cut = max(0, (len(ids) - 1) // segment_len - 1) * segment_len
    return ids[cut:]


@torch.no_grad()
def answer(
    row: str,
    model: Any,
    stack: MemoryStack | None,
    ids: list[int],
    max_new_tokens: int = ANSWER_TOKENS,
    eos_token_id: int | None = None,
) -> list[int]:
    """The ``max_new_tokens`` greedy tokens a row generates after the prompt ``ids``.

    The bare row stops where the model's own ``generate`` does (its generation config's end of
    turn); the memstack rows run on unless ``eos_token_id`` is given, so that the pass-key tables
    made before this argument reproduce (their 8 tokens rarely reach an end of turn).

    ``model`` is the unwrapped model for ``bare`` (``stack`` must then be None or unwrapped);
    ``stack`` the row's stack otherwise: ``off`` and ``tuned_off`` switch every memory kind of
    it off but the carried tokens (``off`` is the ``store`` stack with the store off).
    """
    if row == "bare":
        x = torch.tensor([ids], device=next(model.parameters()).device)
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False
        )
        return out[0, x.shape[1] :].tolist()
    if stack is None:
        raise ValueError(f"row {row!r} needs a stack")
    carry = stack.config.kinds.get("carry")
    if (
        row in OFF_ROWS
        and carry is not None
        and carry.initial == 0
        and carry.recent <= stack.config.segment_len
    ):
        ids = off_suffix(ids, stack.config.segment_len)
    x = torch.tensor([ids], device=stack.device)
    others = [k for k in stack.kinds if k != "carry"]
    off = stack.memory_off(*others) if row in OFF_ROWS and others else contextlib.nullcontext()
    # a prompt that fits in one segment with its answer is read whole
    close = x.shape[1] + max_new_tokens > stack.config.segment_len
    with off:
        out = stack.generate(x, max_new_tokens=max_new_tokens, close_prompt=close, eos_token_id=eos_token_id)
        return out[0, x.shape[1] :].tolist()


def load_heads(out: Path) -> str:
    """The calibrated retrieval heads that ``scripts/eval_smollm2.py --calibrate`` wrote to
    ``<out>/heads.json``.

    Raises:
        FileNotFoundError: if there is no such file (with the command that writes it).
    """
    path = Path(out) / "heads.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run python scripts/eval_smollm2.py --calibrate")
    return json.loads(path.read_text())["heads"]


class Rows:
    """The stack of each row of :data:`ROWS`, for a loop over rows: one stack wrapped at a time
    around ``model`` (``stack("bare")`` unwraps it and returns None); the tuned rows' stack is the
    latest checkpoint of the training run ``run`` (``configs/smollm2_passkey.py``), on a model of
    its own, loaded when first asked for and moved to ``model``'s device. ``top_k``, ``window``
    and ``initial``: the hits, the searching queries and the prompt's first tokens kept in view of
    the untrained store rows (:func:`stack_config`; the tuned rows keep their run's)."""

    def __init__(
        self,
        model: Any,
        heads: str,
        segment_len: int,
        run: Path | None = None,
        top_k: int = 4,
        window: int = 16,
        initial: int = 0,
    ):
        self.model, self.heads, self.segment_len, self.run = model, heads, segment_len, run
        self.top_k, self.window, self.initial = top_k, window, initial
        self.current: tuple[str, MemoryStack] | None = None
        self.tuned: MemoryStack | None = None

    def stack(self, row: str) -> MemoryStack | None:
        """The row's stack (None for ``bare``: the model unwrapped)."""
        if row in ("tuned", "tuned_off"):
            if self.run is None:
                raise ValueError(f"row {row!r} needs the training run of its weights (run=...)")
            if self.tuned is None:
                from memstack.train.evaluate import load_run  # the training package imports this one

                # on the wrapped model's device, whatever the run's config said
                self.tuned = load_run(self.run)[1].to(next(self.model.parameters()).device)
            return self.tuned
        if row not in ROWS:
            raise ValueError(f"unknown row {row!r}; expected one of {', '.join(ROWS)}")
        want = (
            None if row == "bare" else (row if row in ("store_all", "store_near", "compressive") else "store")
        )
        if self.current is not None and self.current[0] == want:
            return self.current[1]
        if self.current is not None:
            self.current[1].unwrap()
            self.current = None
        if want is None:
            return None
        if want == "compressive":
            config = compressive_config(self.segment_len)
        else:
            near = NEAR if want == "store_near" else 0
            config = stack_config(
                None if want == "store_all" else self.heads,
                self.segment_len,
                near,
                self.top_k,
                self.window,
                self.initial,
            )
        self.current = (want, MemoryStack(self.model, config))
        return self.current[1]


def chat_prompt(tokenizer: Any, prompt_ids: list[int]) -> list[int]:
    """A pass-key prompt put through the tokenizer's chat template: everything before
    :data:`ANSWER_PREFIX` is the user's message, and the assistant's reply opens with it.

    The template adds its own tokens (for SmolLM2 about 30: the default system prompt and the
    role markers), so the result is that much longer than ``prompt_ids``.

    Raises:
        ValueError: if the tokenizer has no chat template, or the prompt does not end with
            :data:`ANSWER_PREFIX`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; evaluate without chat")
    text = tokenizer.decode(prompt_ids)
    if not text.endswith(ANSWER_PREFIX):
        raise ValueError(f"a pass-key prompt ends with {ANSWER_PREFIX!r}; this one ends {text[-40:]!r}")
    body = text[: -len(ANSWER_PREFIX)].strip()
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(chat + ANSWER_PREFIX, add_special_tokens=False)


def heldout_passages(tokenizer: Any, text: str, n: int, length: int) -> list[list[int]]:
    """``n`` consecutive, non-overlapping passages of ``length`` tokens from the start of ``text``
    (``tokenizer``: memstack's interface, :class:`~memstack.data.tokenizer.HFTokenizer` for a
    Hugging Face one).

    Raises:
        ValueError: if the text holds fewer than ``n * length`` tokens.
    """
    ids: list[int] = []
    words = text.split()
    step = 20_000  # words per piece: tokenizing a whole book at once is slow and not needed
    for start in range(0, len(words), step):
        ids += tokenizer.encode(" " + " ".join(words[start : start + step]))
        if len(ids) >= n * length:
            return [ids[i * length : (i + 1) * length] for i in range(n)]
    raise ValueError(f"the text holds {len(ids)} tokens, fewer than {n} passages of {length}")


@torch.no_grad()
def passage_losses(stack: MemoryStack, passages: list[list[int]]) -> list[float]:
    """Mean next-token loss (nats) of each passage, read by ``stack`` from a fresh state."""
    losses = []
    for ids in passages:
        x = torch.tensor([ids], device=stack.device)
        losses.append(float(stack(x, labels=x).loss))
    return losses


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean and a normal 95% interval over ``values`` (the passages are the samples)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}
