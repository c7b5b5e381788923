"""The data of sleep (memory/sleep.py): the night's documents from the store, the fixed
windows that measure a night's loss, the random training crops, and the training run's day."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from memstack.memory.store.kind import StoreState
from memstack.sleep.config import SleepConfig
from memstack.state import StackState

if TYPE_CHECKING:  # annotations only: the stack never imports sleep
    from memstack.stack import MemoryStack


def night_documents(state: StackState, consolidated: bool = False) -> tuple[list[list[torch.Tensor]], dict]:
    """Per stream, the records not yet consolidated, joined where they were adjacent.

    Returns:
        ``docs[row]``: 1-D token tensors in stream order, and ``ids[(layer, row)]``: the record ids
        of each store layer's row store that these documents came from (to mark afterwards).
    """
    stores = state.memories.get("store") if state is not None else None
    if not stores:
        return [], {}
    first = min(stores)
    docs, ids = [], {}
    for row, store in enumerate(stores[first].stores):
        rec = store.ids(consolidated=consolidated)
        for layer, layer_state in stores.items():
            ids[(layer, row)] = layer_state.stores[row].ids(consolidated=consolidated)
        if len(rec) == 0:
            docs.append([])
            continue
        fields = store.records(rec)
        toks = store.tokens(rec)
        row_docs, current = [], [toks[0]]
        for i in range(1, len(toks)):
            adjacent = int(fields["start"][i]) == int(fields["start"][i - 1] + fields["length"][i - 1])
            if adjacent:
                current.append(toks[i])
            else:
                row_docs.append(torch.cat(current))
                current = [toks[i]]
        row_docs.append(torch.cat(current))
        docs.append(row_docs)
    return docs, ids


def text_windows(text: str, tokenizer: Any, seq_len: int, n: int | None = None) -> torch.Tensor:
    """``(N, seq_len)`` consecutive windows of ``text``'s tokens (the first ``n`` of them; all
    whole windows if None): replay and held-out data for a sleep."""
    ids = torch.tensor(tokenizer.encode(text if n is None else text[: 2 * seq_len * n]))
    ids = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)
    return ids if n is None else ids[:n]


@torch.no_grad()
def generated_windows(
    stack: MemoryStack,
    prompts: Sequence[Sequence[int]],
    per_prompt: int,
    seq_len: int,
    temperature: float = 1.0,
    top_p: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Replay written by the frozen base model itself: ``(len(prompts) * per_prompt, seq_len)``
    windows, each a prompt and the base's sampled continuation (every adapter off, every memory
    off), prompt by prompt.

    Why: replay with the KL to the base holds the adapted model to the base only on the replay's
    distribution. Text the base writes from varied prompts (chat turns, code requests) covers what
    the base does, where one corpus (the Bible) covers one kind of text; this is generative replay
    (self-synthesised rehearsal) when no pretraining data is at hand. The continuation runs to the
    full window past any end-of-turn token (the base's own next turn is its distribution too), so
    every window is whole and needs no mask.

    Args:
        prompts: token ids, each shorter than ``seq_len`` (e.g. chat-templated requests).
        per_prompt: sampled windows per prompt.
        temperature, top_p: the sampling of :meth:`MemoryStack.generate`.
        seed: the sampling generator's seed (the same seed gives the same windows).
    """
    if isinstance(per_prompt, bool) or not isinstance(per_prompt, int) or per_prompt < 1:
        raise ValueError(f"per_prompt must be an int >= 1, got {per_prompt!r}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of token ids)")
    bad = [i for i, p in enumerate(prompts) if not 1 <= len(p) < seq_len]
    if bad:
        raise ValueError(
            f"prompts {bad} have lengths outside [1, seq_len={seq_len}): each needs room to continue"
        )
    gen = torch.Generator(stack.device).manual_seed(seed)
    out = []
    with stack.memory_off(), stack.adapters.disabled():
        for p in prompts:
            ids = torch.tensor([list(p)] * per_prompt, device=stack.device)
            new = seq_len - len(p)
            out.append(
                stack.generate(ids, new, do_sample=True, temperature=temperature, top_p=top_p, generator=gen)
            )
    return torch.cat(out).cpu()


def windows(docs: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut documents into ``(N, seq_len)`` windows, the last of each right-padded (mask False)."""
    ids, mask = [], []
    for doc in docs:
        for a in range(0, len(doc), seq_len):
            piece = doc[a : a + seq_len]
            ids.append(F.pad(piece, (0, seq_len - len(piece))))
            mask.append(torch.arange(seq_len) < len(piece))
    if not ids:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool)
    return torch.stack(ids), torch.stack(mask)


def crops(
    docs: list[torch.Tensor],
    teachers: list[tuple[torch.Tensor, torch.Tensor]] | None,
    seq_len: int,
    batch_size: int,
    gen: torch.Generator,
    *,
    pools: Sequence[tuple[float, Sequence[int]]] | None = None,
    pack: bool = False,
    separator: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """A batch of random ``seq_len`` crops: a document drawn with probability proportional to its
    length, a start uniform over the crops that fit (0 for a short document), right-padded.

    Why crops and not a fixed grid: a fact then appears after every amount of preceding text,
    from none to a whole window, so it is not learned as the continuation of one fixed context.

    Args:
        pools: ``[(share, doc indices), ...]``: each row first picks a pool with probability
            ``share`` (the shares are normalised), then a document of that pool by length. None:
            one pool of every document (and the exact draws of the plain version).
        pack: fill each row instead of padding it: a document that ends before the row does is
            followed by ``separator`` (when not None) and another crop drawn from the same pool,
            cut to the room left, until the row is full. Short texts (a paraphrase, a chat) then
            cost a fraction of a row each instead of a whole padded one. Texts in one row attend
            to the earlier ones, as in packed pretraining. Not with ``teachers``.
        separator: the token between packed texts (the model's end of text), or None for none.
    """
    if pack and teachers is not None:
        raise ValueError("crops: pack=True cannot carry teacher targets (distill); use pack=False")
    if pools is None and not pack:
        return _plain_crops(docs, teachers, seq_len, batch_size, gen)
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.float)
    pools = [(1.0, range(len(docs)))] if pools is None else pools
    members = [torch.as_tensor(list(idx), dtype=torch.long) for _, idx in pools]
    shares = torch.tensor([float(s) if len(m) else 0.0 for (s, _), m in zip(pools, members, strict=True)])
    if not bool((shares > 0).any()):
        given = [(float(s), len(m)) for (s, _), m in zip(pools, members, strict=True)]
        raise ValueError(f"crops: no pool has both a share > 0 and documents; (share, documents): {given}")
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    for row in range(batch_size):
        pool = members[int(torch.multinomial(shares, 1, generator=gen))]
        pos = 0
        while pos < seq_len:
            d = int(pool[torch.multinomial(lengths[pool], 1, generator=gen)])
            room = seq_len - pos
            start = int(torch.randint(max(len(docs[d]) - room, 0) + 1, (1,), generator=gen))
            piece = docs[d][start : start + room]
            ids[row, pos : pos + len(piece)], mask[row, pos : pos + len(piece)] = piece, True
            pos += len(piece)
            if not pack or pos >= seq_len:
                break
            if separator is not None:
                ids[row, pos], mask[row, pos] = separator, True
                pos += 1
    return ids, mask, None


def record_pools(
    share: float | None, records: Sequence[int], augmented: Sequence[int]
) -> list[tuple[float, Sequence[int]]] | None:
    """:func:`crops`'s pools for ``SleepConfig.record_share``: ``share`` of the rows to the
    records, the rest to the augmented texts (None: no pools, every text by length). With no
    augmented text every row goes to the records."""
    if share is None:
        return None
    if not augmented:
        return [(1.0, records)]
    return [(share, records), (1 - share, augmented)]


def end_of_text(model_config: Any) -> int | None:
    """The token :func:`crops` puts between packed texts: the model's ``eos_token_id`` (the first
    where it lists several), or None where it has none."""
    eos = getattr(model_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        return eos[0] if eos else None
    return eos if isinstance(eos, int) else None


def _plain_crops(
    docs: list[torch.Tensor],
    teachers: list[tuple[torch.Tensor, torch.Tensor]] | None,
    seq_len: int,
    batch_size: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`crops` with one pool and no packing, drawn as before pools existed (a batch's
    documents in one draw), so that recorded runs reproduce; the only path that carries teachers."""
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.float)
    picks = torch.multinomial(lengths, batch_size, replacement=True, generator=gen).tolist()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    t_idx = t_logp = None
    if teachers is not None:
        k = teachers[0][0].shape[-1]
        t_idx = torch.zeros(batch_size, seq_len, k, dtype=torch.long)
        t_logp = torch.zeros(batch_size, seq_len, k + 1)
    for row, d in enumerate(picks):
        start = int(torch.randint(max(len(docs[d]) - seq_len, 0) + 1, (1,), generator=gen))
        piece = slice(start, start + seq_len)
        n = len(docs[d][piece])
        ids[row, :n], mask[row, :n] = docs[d][piece], True
        if teachers is not None:
            t_idx[row, :n], t_logp[row, :n] = teachers[d][0][piece], teachers[d][1][piece]
    return ids, mask, None if teachers is None else (t_idx, t_logp)


class Day:
    """What a training run read since its last sleep: the stores of every batch, for the
    ``SleepConfig.every_steps`` / ``every_records`` schedule of :func:`memstack.train.loop.fit`.

    Each training batch starts a fresh stream, so its stores hold only that batch; the day keeps
    them as extra rows of one state, and a sleep consolidates them all.
    """

    def __init__(self, config: SleepConfig) -> None:
        self.config = config
        self.stores: dict[int, list] = {}

    def add(self, state: StackState | None) -> None:
        """Keep the stores of one batch's final state."""
        for layer, layer_state in (state.memories.get("store", {}) if state is not None else {}).items():
            self.stores.setdefault(layer, []).extend(layer_state.stores)

    def records(self) -> int:
        """New records held (at the first store layer)."""
        if not self.stores:
            return 0
        return sum(len(s.ids(consolidated=False)) for s in self.stores[min(self.stores)])

    def due(self, step: int) -> bool:
        """Whether the schedule asks for a sleep after optimiser step ``step``."""
        c = self.config
        return bool(
            (c.every_steps and step % c.every_steps == 0)
            or (c.every_records and self.records() >= c.every_records)
        )

    def state(self) -> StackState:
        """The day as one state whose rows are every batch row seen."""
        stores = {layer: StoreState(list(s)) for layer, s in self.stores.items()}
        return StackState(memories={"store": stores} if stores else {})

    def clear(self) -> None:
        """Start a new day (the consolidated stores are dropped)."""
        self.stores = {}
