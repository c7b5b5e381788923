"""Layer 4's recipe: :class:`SleepConfig`, how the store's new records become a LoRA adapter
(:func:`memstack.sleep.sleep`). Also the ``sleep`` section of a training run's config."""

from __future__ import annotations

from dataclasses import dataclass

from memstack.fields import check_choice, check_int, check_number, reject_bool_ints


@dataclass
class SleepConfig:
    """Layer 4, sleep: how the store's new records become a LoRA adapter (memory/sleep.py)."""

    objective: str = "lm"
    """``lm``: next-token loss on the records; ``distill``: KL from the stack with its memories on
    (teacher) to the adapted model with memories off (student) on the same tokens."""
    rank: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: str | None = None
    """Comma-separated module names LoRA adapts (``q_proj,v_proj``); None: peft's default for the
    model type, else the linear layers found inside the model's attention (memstack/discovery.py)."""
    steps: int = 100
    """Optimiser steps (ignored when ``epochs`` is set)."""
    epochs: float | None = None
    """Passes over the night's windows instead of ``steps`` (rounded up to whole steps)."""
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int | None = None
    """Tokens per training window; None: the stack's segment length."""
    replay_ratio: float = 0.0
    """Weight r of general-text replay: loss = (1 - r) * night + r * replay (needs replay data)."""
    kl_weight: float = 0.0
    """Weight of KL(base || adapted) on the replay batches, against forgetting."""
    replay_batch_size: int | None = None
    """Replay windows per step; None: ``batch_size``. Fewer make a step cheaper (the replay and
    its KL's base forward cost more than the night's own batch) at the price of a noisier replay
    term; its weight is still ``replay_ratio``."""
    rehearsal: float = 1.0
    """Fraction of earlier, already consolidated records trained on again with the night's.
    Default all of them: a night's adapter trained on its own records alone overrides what the
    earlier nights' adapters hold (on SmolLM2-135M night 1's facts went from 6/30 to 0/30 the
    next night while night 1's adapter alone still recalled 6/30; with rehearsal they stayed;
    docs/results.md, sleep on SmolLM2). 0 trains on the night alone (cheaper, forgets)."""
    record_share: float | None = None
    """Share of the training rows drawn from the records (the night's and the rehearsed ones), the
    rest from the augmented texts; None: every text drawn in proportion to its length. Augmented
    texts can outnumber the records several times over (paraphrases and chats: 4,000 tokens
    beside a day's 1,300 on SmolLM2), and then a night's steps pass over the records themselves
    less often; a share keeps their passes whatever the augmentation adds. A pool with no texts
    (no augmentation) gives its rows to the other."""
    pack: bool = False
    """Fill every training row with text: a text that ends before its row is followed by the
    model's end-of-text token (``config.eos_token_id``; nothing where it has none) and a crop of
    another, as in packed pretraining, instead of padding. Short augmented texts (40-token chats
    in 128-token rows) then stop costing a whole row each, so a step holds two to three times
    the text at the same cost. Off by default: the recorded runs trained on padded crops. Not
    with ``objective="distill"`` (the teacher's targets are per text)."""
    distill_top_k: int = 64
    """``distill``: teacher log-probs kept per token (plus one bucket for the rest)."""
    adapter: str = "new"
    """``new``: each sleep trains a fresh adapter (earlier ones active and frozen); ``continue``:
    each sleep trains the latest active sleep adapter further (one adapter that keeps learning;
    the first sleep makes it)."""
    merge: str = "none"
    """After the sleep: ``none`` (adapters stay separate, active together), ``cat`` (the active
    sleep adapters become one, their exact sum) or ``base`` (merged into the base weights)."""
    evict_consolidated: bool = False
    """Remove the consolidated records from the store (default: keep them, marked)."""
    seed: int = 0
    every_steps: int | None = None
    """Training runs (``scripts/train.py``): sleep every this many optimiser steps (None: never)."""
    every_records: int | None = None
    """Training runs: sleep once the day's store holds this many new records (None: never)."""

    def __post_init__(self) -> None:
        reject_bool_ints(self, "sleep")
        check_choice("sleep.objective", self.objective, ("lm", "distill"))
        check_int("sleep.rank", self.rank, minimum=1)
        for name in ("alpha", "lr"):
            check_number(f"sleep.{name}", getattr(self, name), "a number > 0", lambda v: v > 0)
        for name in ("dropout", "replay_ratio", "rehearsal"):
            check_number(f"sleep.{name}", getattr(self, name), "a number in [0, 1]", lambda v: 0 <= v <= 1)
        if self.record_share is not None:
            check_number(
                "sleep.record_share", self.record_share, "None or a number in [0, 1]", lambda v: 0 <= v <= 1
            )
        if not isinstance(self.pack, bool):
            raise ValueError(f"sleep.pack must be true or false, got {self.pack!r}")
        if self.pack and self.objective == "distill":
            raise ValueError(
                "sleep.pack=True works with objective='lm' only: distill's teacher targets belong to "
                "one text each; set pack=False for distill"
            )
        check_number("sleep.kl_weight", self.kl_weight, "a number >= 0", lambda v: v >= 0)
        check_int("sleep.steps", self.steps, minimum=0)
        if self.epochs is not None:
            check_number("sleep.epochs", self.epochs, "a number > 0 or None", lambda v: v > 0)
        check_int("sleep.batch_size", self.batch_size, minimum=1)
        if self.replay_batch_size is not None:
            check_int("sleep.replay_batch_size", self.replay_batch_size, minimum=1, optional=True)
        if self.seq_len is not None:
            check_int("sleep.seq_len", self.seq_len, minimum=2, optional=True)
        check_int("sleep.distill_top_k", self.distill_top_k, minimum=1)
        check_choice("sleep.merge", self.merge, ("none", "cat", "base"))
        check_choice("sleep.adapter", self.adapter, ("new", "continue"))
        if not isinstance(self.evict_consolidated, bool):
            raise ValueError(
                f"sleep.evict_consolidated must be true or false, got {self.evict_consolidated!r}"
            )
        if self.target_modules is not None and (
            not isinstance(self.target_modules, str) or not all(self.target_modules.split(","))
        ):
            raise ValueError(
                f"sleep.target_modules must be None or comma-separated module names such as "
                f"'q_proj,v_proj', got {self.target_modules!r}"
            )
        for name in ("every_steps", "every_records"):
            if getattr(self, name) is not None:
                check_int(f"sleep.{name}", getattr(self, name), minimum=1, optional=True)
        check_int("sleep.seed", self.seed, minimum=0)
