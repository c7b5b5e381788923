"""Layer 4, conceptual memory: sleep consolidates the long-term store into a LoRA adapter.

``stack.sleep()`` takes the store's records written since the last sleep (token ids as stored),
trains a fresh LoRA adapter (peft, :mod:`memstack.memory.adapters`) on them with the memories
off, marks the records consolidated, and reports what was learned and what was lost.

The objective, per training step, with ``r = replay_ratio`` and ``lam = kl_weight``::

    loss = (1 - r) * L_night + r * (NLL(student, replay) + lam * KL(base || student on replay))

- ``L_night`` is ``NLL(student, night)`` for ``objective="lm"``, or for ``"distill"`` the KL
  from the teacher to the student on the night's tokens, ``KL(teacher || student)``. The teacher
  is the full stack *with* its memories on, having read the night's records in order (and, for
  augmented text, the record it came from first); the student is the model with the adapters,
  memories off, on one window alone. Sleep literally moves what memory knows into the weights.
- The teacher is kept as its top ``distill_top_k`` log-probabilities per token plus one bucket
  for the rest of the vocabulary, so the KL is over ``top_k + 1`` outcomes: exact when the
  teacher and student agree, exact in full when ``distill_top_k >= vocab``.
- ``base`` is the model with every adapter off (the frozen base), memories off.
- All NLL and KL terms are means over predicted tokens (padding excluded); every KL is summed
  over the vocabulary (or buckets) and averaged over tokens.
- ``r = 0`` (the default) skips replay; ``r > 0`` needs ``replay`` windows.

What trains: a fresh adapter per night (``adapter="new"``; the earlier ones stay active and
frozen, so the new one learns on top of them), or the latest sleep adapter again
(``adapter="continue"``: one adapter that keeps learning, a fresh optimiser each night).

Data: the night's records, joined in stream order where they were adjacent in the stream (a gap
left by eviction starts a new document), plus what ``augment`` makes of them and, with
``rehearsal``, earlier records. Each step trains on random crops of ``seq_len`` tokens (the
segment length by default: the student sees one segment, as the stack's first segment sees it),
so a fact is seen after every amount of preceding text; the night loss of the report is measured
on the fixed grid of windows. ``record_share`` fixes the share of rows the records get against
the augmented texts (default: by length), and ``pack`` fills each row with several texts, end of
text between them, where the default pads a short text's row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from memstack.io import atomic_file
from memstack.losses import lm_loss, prediction_mask
from memstack.memory.adapters import PREFIX, default_targets, lora_config
from memstack.sleep.config import SleepConfig
from memstack.sleep.data import crops, end_of_text, night_documents, record_pools, windows
from memstack.sleep.losses import kl_bucketed, kl_full, teacher_targets

if TYPE_CHECKING:  # annotations only: sleep runs above the stack, which never imports it
    from memstack.stack import MemoryStack
    from memstack.state import StackState


@dataclass
class SleepReport:
    """What one sleep did: what it learned (night loss) and what it lost (held-out loss)."""

    adapter: str | None
    """Name of the new adapter (None when there was nothing to consolidate)."""
    objective: str
    records: int
    """Records consolidated (per stream, summed over streams)."""
    tokens: int
    """Tokens in those records."""
    documents: int
    """The night's records joined where adjacent in their stream."""
    augmented_texts: int
    """Texts ``augment`` made from them."""
    rehearsal_documents: int
    """Earlier documents (consolidated records, joined) trained on again (``rehearsal``)."""
    train_tokens: int
    """Tokens the training crops are drawn from (documents + augmented texts + rehearsal)."""
    steps: int
    seconds: float
    night_loss_before: float | None
    """Mean NLL per token on the night's windows, memories off, before the sleep."""
    night_loss_after: float | None
    held_out_loss_before: float | None
    """Mean NLL per token on ``held_out`` windows before the sleep (None without held-out data)."""
    held_out_loss_after: float | None
    path: str | None = None
    """Where the adapters and this report were saved (None when not saved)."""
    message: str = ""

    @property
    def forgetting(self) -> float | None:
        """Relative change of held-out loss, ``after / before - 1`` (positive: worse)."""
        if self.held_out_loss_before is None or self.held_out_loss_after is None:
            return None
        return self.held_out_loss_after / self.held_out_loss_before - 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``forgetting`` included)."""
        return {**dataclasses.asdict(self), "forgetting": self.forgetting}


# ---------------------------------------------------------------------------------- data


@torch.no_grad()
def mean_nll(
    stack: MemoryStack, ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int
) -> float | None:
    """Mean next-token NLL per predicted token over ``ids`` windows, memories off."""
    if ids is None or len(ids) == 0:
        return None
    total, count = 0.0, 0
    device = stack.device
    with stack.memory_off():
        for a in range(0, len(ids), batch_size):
            x = ids[a : a + batch_size].to(device)
            m = None if mask is None else mask[a : a + batch_size].to(device)
            logits = stack(x, attention_mask=m).logits
            n = int(prediction_mask(x, m).sum())
            total += float(lm_loss(logits, x, m)) * n
            count += n
    return total / max(count, 1)


@torch.no_grad()
def _teacher(
    stack: MemoryStack, doc: torch.Tensor, extra: list[torch.Tensor], top_k: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Teacher targets (memories on) for ``doc`` and then for each ``extra`` text read after it
    (with the memory ``doc`` left): one ``(idx (L, k), logp (L, k + 1))`` pair per text, on CPU."""
    result = stack(doc[None].to(stack.device))
    logits = [result.logits[0]] + [
        stack(e[None].to(stack.device), state=result.state).logits[0] for e in extra
    ]
    return [tuple(t.cpu() for t in teacher_targets(x, top_k)) for x in logits]


# ---------------------------------------------------------------------------------- sleep


def sleep(
    stack: MemoryStack,
    config: SleepConfig | None = None,
    *,
    state: StackState | None = None,
    replay: torch.Tensor | None = None,
    held_out: torch.Tensor | None = None,
    augment: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
    directory: str | Path | None = None,
    progress: bool = True,
) -> SleepReport:
    """Consolidate the store's new records into a LoRA adapter (see the module docstring).

    Args:
        stack: the stack; its model gets the adapter (peft, in place).
        config: the recipe; defaults to ``SleepConfig()``.
        state: whose store to consolidate; default the stream state ``stack.state``.
        replay: ``(N, L)`` windows of general text for replay and the KL term (``replay_ratio > 0``).
        held_out: ``(M, L)`` windows never trained on: the forgetting measure of the report.
        augment: maps one night document (1-D ids) to extra texts (e.g. paraphrases of what it
            states); they are trained on with the records (and read by the teacher after them).
        directory: save the adapters (``<directory>/adapters``) and the report
            (``<directory>/sleep_reports/<name>.json``) there.
        progress: show a tqdm bar.

    Returns:
        a :class:`SleepReport`. With nothing new in the store, no adapter is made and the report
        says so in ``message`` (not an error).
    """
    cfg = config or SleepConfig()
    state = stack.state if state is None else state
    if cfg.replay_ratio > 0 and (replay is None or len(replay) == 0):
        raise ValueError(f"replay_ratio={cfg.replay_ratio} needs replay windows (replay=...), got none")
    t0 = time.perf_counter()
    docs, ids = night_documents(state)
    night_docs = [d for row in docs for d in row]
    first_layer = min((layer for layer, _ in ids), default=None)
    n_records = sum(len(v) for (layer, _), v in ids.items() if layer == first_layer)
    if not night_docs:
        msg = "sleep: nothing to consolidate (the store has no records written since the last sleep)"
        print(msg)
        return SleepReport(None, cfg.objective, 0, 0, 0, 0, 0, 0, 0, 0.0, None, None, None, None, message=msg)

    seq_len = cfg.seq_len or stack.config.segment_len
    gen = torch.Generator().manual_seed(cfg.seed)
    extra = [augment(d) if augment is not None else [] for d in night_docs]
    rehearse = []
    if cfg.rehearsal > 0:
        old = [d for row in night_documents(state, consolidated=True)[0] for d in row]
        take = torch.randperm(len(old), generator=gen)[: round(cfg.rehearsal * len(old))].tolist()
        rehearse = [old[i] for i in sorted(take)]
    augmented = [e for es in extra for e in es]
    train_docs = night_docs + augmented + rehearse
    night_ids, night_mask = windows(night_docs, seq_len)  # the fixed grid measures the night loss

    teachers = None
    if cfg.objective == "distill":  # before the new adapter exists: the teacher is the stack now
        by_text = {}
        for d, e in zip(night_docs, extra, strict=True):
            for text, t in zip([d, *e], _teacher(stack, d, e, cfg.distill_top_k), strict=True):
                by_text[id(text)] = t
        teachers = [by_text[id(t)] for t in night_docs + augmented]
        teachers += [_teacher(stack, d, [], cfg.distill_top_k)[0] for d in rehearse]

    night_before = mean_nll(stack, night_ids, night_mask, cfg.batch_size)
    held_before = mean_nll(stack, held_out, None, cfg.batch_size)

    adapters = stack.adapters
    name = adapters.next_name()
    targets = (
        cfg.target_modules.split(",")
        if cfg.target_modules
        else default_targets(stack.model, stack.arch.lora_targets)
    )
    previously_active = adapters.active()
    earlier = [n for n in previously_active if n.startswith(PREFIX)]
    if cfg.adapter == "continue" and earlier:
        name = earlier[-1]
        params = adapters.parameters(name)
    else:
        # the adapter's random init (peft's kaiming A) from the recipe's seed and the adapter's
        # name, not the global generator: the same night gives the same adapter whatever ran before
        device = stack.device
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            digest = hashlib.sha256(f"{cfg.seed}|{name}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "big") >> 1)
            params = adapters.add(name, lora_config(targets, cfg.rank, cfg.alpha, cfg.dropout))
        adapters.activate([*previously_active, name])
    n_tokens = sum(len(d) for d in train_docs)
    steps = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * n_tokens / (cfg.batch_size * seq_len))
    n_night, n_aug = len(night_docs), len(augmented)
    records = [*range(n_night), *range(n_night + n_aug, len(train_docs))]  # the rehearsed ones too
    pools = record_pools(cfg.record_share, records, range(n_night, n_night + n_aug))
    _train(stack, cfg, params, train_docs, teachers, seq_len, replay, steps, gen, progress, pools)

    night_after = mean_nll(stack, night_ids, night_mask, cfg.batch_size)
    held_after = mean_nll(stack, held_out, None, cfg.batch_size)
    for (layer, row), rec in ids.items():
        store = state.memories["store"][layer].stores[row]
        store.mark_consolidated(rec)
        if cfg.evict_consolidated:
            store.remove(rec)
    if cfg.merge == "cat":
        sleeps = [n for n in adapters.active() if n.startswith(PREFIX)]
        if len(sleeps) > 1:
            first, last = sleeps[0][len(PREFIX) :].split("-")[0], name[len(PREFIX) :]
            merged = f"{PREFIX}{first}-{last}"
            adapters.merge(sleeps, merged)
            name = merged
    message = ""
    if cfg.merge == "base":
        adapters.merge_into_base()
        message = f"{name} merged into the base weights (no adapter remains)"
    report = SleepReport(
        adapter=name,
        objective=cfg.objective,
        records=n_records,
        tokens=int(night_mask.sum()),
        documents=len(night_docs),
        augmented_texts=len(augmented),
        rehearsal_documents=len(rehearse),
        train_tokens=n_tokens,
        steps=steps,
        seconds=time.perf_counter() - t0,
        night_loss_before=night_before,
        night_loss_after=night_after,
        held_out_loss_before=held_before,
        held_out_loss_after=held_after,
        message=message,
    )
    if directory is not None:
        directory = Path(directory)
        adapters.save(directory / "adapters")
        report.path = str(directory)
        with atomic_file(directory / "sleep_reports" / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _train(
    stack: MemoryStack,
    cfg: SleepConfig,
    params: list[torch.nn.Parameter],
    docs: list[torch.Tensor],
    teachers: list[tuple[torch.Tensor, torch.Tensor]] | None,
    seq_len: int,
    replay: torch.Tensor | None,
    steps: int,
    gen: torch.Generator,
    progress: bool,
    pools: list[tuple[float, Any]] | None = None,
) -> None:
    """Train ``params`` (the new adapter) for ``steps`` steps; every other parameter frozen.
    ``pools``: :func:`~memstack.sleep.data.crops`'s, from ``record_share``."""
    separator = end_of_text(stack.model.config)
    flags = {p: p.requires_grad for p in stack.parameters()}
    for p in stack.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    was_training = stack.training
    stack.train()
    device = stack.device
    try:
        for _ in tqdm(range(steps), desc="sleep", disable=not progress, leave=False):
            ids, mask, teacher = crops(
                docs, teachers, seq_len, cfg.batch_size, gen, pools=pools, pack=cfg.pack, separator=separator
            )
            replay_batch = None
            if cfg.replay_ratio > 0:
                n_replay = cfg.replay_batch_size or cfg.batch_size
                replay_batch = replay[torch.randint(len(replay), (n_replay,), generator=gen)].to(device)
            if teacher is not None:
                teacher = (teacher[0].to(device), teacher[1].to(device))
            loss = sleep_loss(stack, cfg, ids.to(device), mask.to(device), teacher, replay_batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        stack.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.requires_grad_(False)  # consolidated: later training leaves this night alone
            p.grad = None  # or the run's gradient clipping would count the night's last gradients


def sleep_loss(
    stack: MemoryStack,
    cfg: SleepConfig,
    ids: torch.Tensor,
    mask: torch.Tensor,
    teacher: tuple[torch.Tensor, torch.Tensor] | None,
    replay: torch.Tensor | None,
) -> torch.Tensor:
    """The objective of the module docstring on one batch (night windows, optional replay)."""
    with stack.memory_off():
        logits = stack(ids, attention_mask=mask).logits
        if cfg.objective == "distill":
            night = kl_bucketed(teacher[0], teacher[1], logits, prediction_mask(ids, mask))
        else:
            night = lm_loss(logits, ids, mask)
        if cfg.replay_ratio == 0 or replay is None:
            return night
        r_logits = stack(replay).logits
        replay_loss = lm_loss(r_logits, replay, None)
        if cfg.kl_weight > 0:
            with torch.no_grad(), stack.adapters.disabled():
                base = stack(replay).logits
            replay_loss = replay_loss + cfg.kl_weight * kl_full(base, r_logits, prediction_mask(replay, None))
    return (1 - cfg.replay_ratio) * night + cfg.replay_ratio * replay_loss
