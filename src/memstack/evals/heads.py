"""Find a model's retrieval heads: the few query heads that look up a needle from the question.

Wu et al. (2024, https://arxiv.org/abs/2404.15574) find that a handful of heads do the copying
in needle-in-a-haystack retrieval, and QRHead (https://arxiv.org/abs/2506.09944) scores heads by
the attention a query puts on the relevant span. :func:`retrieval_heads` does the latter on
synthetic needles: for each prompt, the share of attention that the question's last token gives
the needle's value tokens, on every (layer, query head), averaged over the prompts. The store
then searches with the best heads alone (``StoreConfig(heads=..., layers="heads")``), and the
choice is saved with the stack's config.

The calibration prompts share nothing with the evaluations: their haystack is the Python
language reference that ships with every Python (``pydoc_data.topics``; the evaluations read the
King James text and the papers' synthetic filler), their needle is an access code of letters and
digits (the evaluations ask for a 5-digit pass key), and their question is worded differently.
"""

from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from einops import rearrange
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from memstack.data.tokenizer import HFTokenizer, Tokenizer

CALIBRATION_NAME = "memstack_head_calibration"
NEEDLE = "The access code for the archive is {code}."
QUESTION = "Which access code opens the archive? The access code for the archive is"


@dataclass
class HeadScore:
    """One query head's calibration score, averaged over the calibration prompts:
    :func:`retrieval_heads`' attention share on the needle's value, or :func:`search_heads`' mean
    reciprocal rank of the needle's chunk."""

    layer: int
    head: int
    score: float

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


_recorded: list[torch.Tensor] | None = None  # per layer, the last query's attention (B, H, T)


def _recording_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs
):
    """SDPA as usual, and the last query's softmax over the keys recorded per layer (in call order)."""
    if _recorded is not None:
        g = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(g, dim=1).float()  # HF's repeat_kv
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        logits = torch.einsum("bhd,bhtd->bht", query[:, :, -1].float(), k) * scale
        _recorded.append(torch.softmax(logits, dim=-1))  # the last query sees every key
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


AttentionInterface.register(CALIBRATION_NAME, _recording_attention)


@functools.cache
def _haystack_words() -> list[str]:
    """The words of Python's own language reference (``pydoc_data.topics``, in the standard library)."""
    from pydoc_data.topics import topics

    return " ".join(topics[k] for k in sorted(topics)).split()


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(2))
    return f"{letters}-{rng.randint(1000, 9999)}"


def calibration_prompt(
    tokenizer: Tokenizer, length: int, depth: float, seed: int
) -> tuple[list[int], tuple[int, int]]:
    """One calibration prompt of exactly ``length`` tokens and the span of the needle's code.

    A passage of Python's language reference from a word the seed picks, the needle after
    ``depth`` of it, the question last.

    Raises:
        ValueError: ``length`` too short for needle and question, or ``depth`` outside [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    rng = random.Random(seed)
    code = _code(rng)
    before_code, after_code = NEEDLE.split("{code}")
    needle_head = tokenizer.encode(" " + before_code.strip())
    code_ids = tokenizer.encode(" " + code)
    needle_tail = tokenizer.encode(after_code)
    question = tokenizer.encode(" " + QUESTION)
    fixed = len(needle_head) + len(code_ids) + len(needle_tail) + len(question)
    if length < fixed + 2:
        raise ValueError(f"length {length} is too short for the needle and question ({fixed} tokens)")
    words = _haystack_words()
    n_filler = length - fixed
    start = rng.randrange(len(words) - 4 * n_filler)  # ample words: a token is rarely under 1/4 word
    filler = tokenizer.encode(" " + " ".join(words[start : start + 4 * n_filler]))[:n_filler]
    cut = round(depth * n_filler)
    prompt = filler[:cut] + needle_head + code_ids + needle_tail + filler[cut:] + question
    start = cut + len(needle_head)
    return prompt, (start, start + len(code_ids))


@torch.no_grad()
def retrieval_heads(
    model: Any, tokenizer: Any, *, prompts: int = 8, length: int = 1024, seed: int = 0
) -> list[HeadScore]:
    """Every (layer, query head) of ``model`` ranked by the attention share the question's last
    token puts on a synthetic needle's code (full attention, mean over ``prompts`` prompts at
    depths spread over [0.05, 0.95]).

    Args:
        model: a Hugging Face causal LM whose attention goes through transformers'
            ``AttentionInterface`` (what :class:`memstack.MemoryStack` wraps anyway); unwrapped.
        tokenizer: a :class:`~memstack.data.tokenizer.Tokenizer` or a transformers tokenizer.
        prompts: calibration prompts (distinct codes and depths).
        length: tokens per prompt; keep it inside the model's window.
        seed: seed of the first prompt's code (prompt i uses ``seed + i``).

    Returns:
        Every head, best first.

    Raises:
        ValueError: ``prompts < 1``, or a prompt too short.
    """
    global _recorded
    if prompts < 1:
        raise ValueError(f"prompts must be >= 1, got {prompts}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else HFTokenizer(tokenizer)
    device = next(model.parameters()).device
    previous = model.config._attn_implementation
    total: torch.Tensor | None = None
    model.set_attn_implementation(CALIBRATION_NAME)
    try:
        for i in range(prompts):
            depth = 0.05 + 0.9 * i / max(1, prompts - 1)
            ids, (a, e) = calibration_prompt(tok, length, depth, seed + i)
            _recorded = []
            model(torch.tensor([ids], device=device), use_cache=False)
            share = torch.stack([w[0, :, a:e].sum(-1) for w in _recorded])  # (layers, H)
            total = share if total is None else total + share
    finally:
        _recorded = None
        model.set_attn_implementation(previous)
    return _ranked((total / prompts).cpu())


@torch.no_grad()
def search_heads(
    model: Any,
    tokenizer: Any,
    *,
    prompts: int = 8,
    length: int = 1024,
    window: int = 16,
    chunk_len: int = 32,
    seed: int = 0,
) -> list[HeadScore]:
    """Every (layer, query head) of ``model`` ranked by how well its own search, the one the
    long-term store runs, finds a synthetic needle's chunk (mean reciprocal rank over ``prompts``
    prompts at depths spread over [0.05, 0.95]; the prompts of :func:`retrieval_heads`).

    :func:`retrieval_heads` scores the attention a head pays the needle in full attention, with
    rotary positions; the store searches position-free keys (before rotary) with a few queries, so
    a head can attend well and search badly. Here each head searches alone, as
    ``StoreConfig(strategy="every_token", heads=..., query_pool="max")`` does: every token's key
    before rotary, in ``chunk_len``-token chunks from the prompt's start up to the question; the
    prompt's last ``window`` queries (the store's ``block_len``) at the head, each against the
    keys of its KV head; a chunk scores its best (query, key) product. The prompt's first chunk
    holds the attention sink, whose keys every query matches, and is left out of the search, as
    the store's ``skip_initial`` leaves a prompt's first tokens out. A head's score for a prompt
    is the reciprocal rank of the first chunk holding a token of the needle's code (ties go to the
    earlier chunk).

    Args:
        model: a Hugging Face causal LM with ``q_proj``/``k_proj`` attention modules; unwrapped.
        tokenizer: a :class:`~memstack.data.tokenizer.Tokenizer` or a transformers tokenizer.
        prompts, length, seed: as in :func:`retrieval_heads`.
        window: the question's last queries that search (the store's ``block_len``).
        chunk_len: tokens per chunk (the store's ``chunk_len``).

    Returns:
        Every head, best first (ties in layer, head order).

    Raises:
        ValueError: ``prompts < 1``, a prompt too short, ``window`` or ``chunk_len`` below 1, or a
            needle inside the first chunk (make ``length`` longer).
    """
    from memstack.evals.retrieval import AttentionReader, rank_by_heads, rank_metrics

    if prompts < 1 or window < 1 or chunk_len < 1:
        raise ValueError(f"prompts, window and chunk_len must be >= 1, got {prompts}, {window}, {chunk_len}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else HFTokenizer(tokenizer)
    device = next(model.parameters()).device
    reader = AttentionReader(model, eager=False)
    group = reader.heads // reader.kv_heads
    question = len(tok.encode(" " + QUESTION))
    total = torch.zeros(reader.num_layers, reader.heads, dtype=torch.float64)
    for i in range(prompts):
        depth = 0.05 + 0.9 * i / max(1, prompts - 1)
        ids, (a, e) = calibration_prompt(tok, length, depth, seed + i)
        if a < chunk_len:
            raise ValueError(f"prompt {i}'s needle is in the first chunk, not searched: raise length")
        end = len(ids) - question
        token_chunk = np.arange(chunk_len, end) // chunk_len - 1
        relevant = {t // chunk_len - 1 for t in range(a, e)}
        n_chunks = int(token_chunk[-1]) + 1  # the whole ranking: the reciprocal rank is exact
        for layer, (q, k) in enumerate(reader.queries_and_keys(torch.tensor([ids], device=device))):
            keys = rearrange(k[0, :, chunk_len:end].cpu(), "hkv t d -> t (hkv d)").numpy()
            queries = q[0, :, -window:].cpu().numpy()
            for h in range(reader.heads):
                ranking, _ = rank_by_heads(keys, token_chunk, queries, [h], group, depth=n_chunks)
                total[layer, h] += rank_metrics(ranking, relevant)["mrr"]
    return _ranked(total / prompts)


def _ranked(mean: torch.Tensor) -> list[HeadScore]:
    """``(layers, heads)`` scores as :class:`HeadScore` s, best first (a stable sort: ties in order)."""
    order = mean.flatten().argsort(descending=True, stable=True)
    heads = mean.shape[1]
    return [HeadScore(int(i) // heads, int(i) % heads, float(mean.flatten()[i])) for i in order]


def heads_spec(scores: list[HeadScore], top: int) -> str:
    """``StoreConfig.heads`` for the ``top`` best heads, e.g. ``"17.3,18.7"``."""
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    return ",".join(str(s) for s in sorted(scores[:top], key=lambda s: (s.layer, s.head)))
