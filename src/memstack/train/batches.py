"""Batch sources for the training loop.

A source is a pure function of (step, micro-batch, rank): ``batch(step, micro, rank, world)``
returns a dict with ``input_ids``, ``labels`` and, for tasks with an answer, ``answer_mask``.
Resuming at any step draws exactly the batches an uninterrupted run would have drawn, and each
DDP rank draws its own.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from memstack.data.tasks import filler_text, passkey_batch, passkey_min_length
from memstack.data.text import load_text_dataset, pack, tokenize_dataset
from memstack.data.tokenizer import load_tokenizer
from memstack.train.config import Config

_REPEAT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def _seed(*parts: int) -> int:
    return random.Random(" ".join(map(str, parts))).getrandbits(63)


def curriculum_length(step: int, curriculum: list[int], steps_per_stage: int, final: int) -> int:
    """Sequence length at ``step``: each curriculum entry for ``steps_per_stage`` steps, then ``final``."""
    stage = step // max(1, steps_per_stage)
    return curriculum[stage] if stage < len(curriculum) else final


class PasskeyBatches:
    """Pass-key retrieval batches (memstack.data.tasks) after an optional copy warm-up, with a
    length curriculum.

    Steps ``< data.copy_steps`` are made of "repeated random string" rows only; afterwards a
    fraction ``data.repeat_fraction`` of each batch still is. A row repeats a random string of
    8-24 characters drawn from a random alphabet of 2-36 symbols: the pure copy signal that makes
    small models form induction heads, and small alphabets make them match on several previous
    tokens, as telling "the pass key is" from "the sky is" needs.

    ``data.filler`` picks the pass-key filler: ``synthetic``, ``text`` (passages of the train split
    of ``data.filler_path``, by default the King James Bible in ``corpora/``; evaluations read the
    test split) or ``mix`` (each row draws one of the two from the batch's seed).
    """

    def __init__(self, config: Config, tokenizer: Any):
        self.config, self.tokenizer = config, tokenizer
        self.batch_size = config.run.batch_size
        if config.data.length_jitter < 0:
            raise ValueError(f"data.length_jitter must be >= 0, got {config.data.length_jitter}")
        self.min_length = passkey_min_length(tokenizer, instruction=config.data.instruction)
        if config.data.filler in ("text", "mix"):
            # read (and cache) the text now, so a missing file fails before the first step
            filler_text("train", config.data.filler_path)

    def length(self, step: int) -> int:
        """Prompt length of the curriculum stage at ``step`` (before ``length_jitter``)."""
        d = self.config.data
        stage_step = max(0, step - d.copy_steps)
        return curriculum_length(stage_step, d.curriculum, d.curriculum_steps, d.seq_len)

    def prompt_length(self, step: int, rng: random.Random) -> int:
        """The stage length shortened by a random 0..``length_jitter``, never below the task's minimum."""
        length = self.length(step)
        jitter = self.config.data.length_jitter
        if not jitter:
            return length
        return max(min(length, self.min_length), length - rng.randint(0, jitter))

    def _repeat_rows(self, n: int, width: int, rng: random.Random) -> torch.Tensor:
        rows = []
        for _ in range(n):
            alphabet = rng.sample(_REPEAT_ALPHABET, rng.randint(2, len(_REPEAT_ALPHABET)))
            unit = "".join(rng.choice(alphabet) for _ in range(rng.randint(8, 24))) + " "
            rows.append(self.tokenizer.encode(unit * (width // len(unit) + 2))[:width])
        return torch.tensor(rows, dtype=torch.long)

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        d, seed = self.config.data, self.config.run.seed
        length = self.length(step)
        rng = random.Random(_seed(seed, step, micro, rank, 1))
        if step < d.copy_steps:
            rep = self._repeat_rows(self.batch_size, length, rng)
            return {
                "input_ids": rep,
                "labels": rep.clone(),
                "answer_mask": torch.zeros_like(rep, dtype=torch.bool),
            }
        n_repeat = round(self.batch_size * d.repeat_fraction)
        pk = passkey_batch(
            self.tokenizer,
            self.batch_size - n_repeat,
            self.prompt_length(step, rng),
            seed=_seed(seed, step, micro, rank),
            instruction=d.instruction,
            filler=d.filler,
            filler_path=d.filler_path,
            split="train",
        )
        out = {"input_ids": pk.input_ids, "labels": pk.labels, "answer_mask": pk.answer_mask}
        if n_repeat:
            rep = self._repeat_rows(n_repeat, pk.input_ids.shape[1], rng)
            out = {
                "input_ids": torch.cat([out["input_ids"], rep]),
                "labels": torch.cat([out["labels"], rep]),
                "answer_mask": torch.cat([out["answer_mask"], torch.zeros_like(rep, dtype=torch.bool)]),
            }
        return out


class TextBatches:
    """Packed sequences of a text corpus, visited in a seeded random order (epochs reshuffle)."""

    def __init__(self, config: Config, tokenizer: Any):
        d = config.data
        if d.path is None:
            raise ValueError("data.task=text needs data.path (a text file, a directory or a dataset name)")
        ds = load_text_dataset(d.path, doc_separator=d.doc_separator)
        packed = pack(tokenize_dataset(ds, tokenizer), d.seq_len)
        self.sequences = torch.tensor(packed["input_ids"], dtype=torch.long)
        if len(self.sequences) == 0:
            raise ValueError(f"{d.path} holds fewer than seq_len={d.seq_len} tokens")
        self.batch_size, self.seed, self.accum = (
            config.run.batch_size,
            config.run.seed,
            config.optim.grad_accum,
        )

    def batch(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        n = len(self.sequences)
        # consecutive micro-batches of all ranks tile the shuffled stream without overlap
        flat = ((step * self.accum + micro) * world + rank) * self.batch_size
        epoch = flat // n
        order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(self.seed, epoch)))
        idx = [order[(flat + i) % n].item() for i in range(self.batch_size)]
        ids = self.sequences[idx]
        return {"input_ids": ids, "labels": ids.clone()}


def make_batches(config: Config) -> tuple[Any, Any]:
    """(tokenizer, batch source) for ``config.data``."""
    tokenizer = load_tokenizer(config.data.tokenizer)
    if config.data.task == "passkey":
        return tokenizer, PasskeyBatches(config, tokenizer)
    if config.data.task == "text":
        return tokenizer, TextBatches(config, tokenizer)
    raise ValueError(f"data.task must be 'passkey' or 'text', got {config.data.task!r}")
