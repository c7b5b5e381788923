"""Searching heads, every-token keys, the tokens readout's rank fusion, carried tokens,
``generate(close_prompt=True)`` and retrieval-head calibration, each against a reference written
here: brute-force rankings from Q/K recomputed from the weights (or from the unwrapped model),
the unwrapped model on explicitly concatenated ids, and eager attention maps."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from memstack import MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.data.tokenizer import ByteTokenizer
from memstack.evals.heads import QUESTION, calibration_prompt, heads_spec, retrieval_heads, search_heads
from memstack.memory.carry import CarryConfig
from memstack.memory.store.keys import chunk_keys
from memstack.memory.store.kind import _best_distinct, parse_heads
from tests.conftest import make_model, model_pair

SEG = 16
H, H_KV, D = 4, 2, 16  # the tiny llama of conftest: grouped-query attention, 2 query heads per KV head
GROUP = H // H_KV
CHUNK, BLOCK = 4, 8


def tiny_llama(seed: int = 0, layers: int = 2):
    model = make_model("llama", seed=seed, layers=layers, hidden=64, heads=4)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (H, H_KV)
    return model


# ------------------------------------------------------------------ parse_heads and config checks


def test_parse_heads_groups_sorts_and_deduplicates():
    assert parse_heads("18.7,17.3,18.6") == {17: (3,), 18: (6, 7)}
    assert parse_heads(" 0.2 , 0.2,1.0") == {0: (2,), 1: (0,)}


@pytest.mark.parametrize("bad", ["18", "a.b", "", "1.2.3", "1.-2", "1.2,", " "])
def test_parse_heads_refuses_bad_specs_naming_the_format(bad):
    with pytest.raises(ValueError, match='"layer.head"'):
        parse_heads(bad)
    with pytest.raises(ValueError, match='"layer.head"'):
        StoreConfig(heads=bad)


def test_heads_config_errors():
    with pytest.raises(ValueError, match='layers="heads" needs stack.store.heads'):
        StoreConfig(layers="heads")
    # a head of a layer without a store: refused when the stack is built
    with pytest.raises(ValueError, match=r"names layers \[1\], which have no store"):
        MemoryStack(
            tiny_llama(),
            StackConfig(segment_len=SEG, compressive=None, store=StoreConfig(heads="1.0", layers="0")),
        )
    # a query head the layer does not have: refused at the first write
    stack = MemoryStack(
        tiny_llama(),
        StackConfig(segment_len=SEG, compressive=None, store=StoreConfig(heads="0.4", layers="heads")),
    )
    with pytest.raises(ValueError, match="query head 4 of layer 0, which has 4 query heads"):
        with torch.no_grad():
            stack(torch.randint(0, 256, (1, SEG)))


@pytest.mark.parametrize("spec, layers", [("1.3", [1]), ("0.1,1.2,0.0", [0, 1])])
def test_store_layers_are_exactly_the_layers_heads_names(spec, layers):
    stack = MemoryStack(
        tiny_llama(layers=3),
        StackConfig(
            segment_len=SEG, compressive=None, store=StoreConfig(heads=spec, layers="heads", chunk_len=CHUNK)
        ),
    )
    assert sorted(stack.kinds["store"].layers) == layers
    with torch.no_grad():
        state = stack(torch.randint(0, 256, (1, SEG))).state
    assert sorted(state.memories["store"]) == layers
    named = parse_heads(spec)
    for layer, s in state.memories["store"].items():  # index width: one D per searching head
        assert s.stores[0].dim == len(named[layer]) * D


# ------------------------------------------------------------------ _best_distinct and every_token


def brute_best_distinct(scores, ids, k):
    best: dict[int, float] = {}
    for s, i in zip(scores.flatten().tolist(), ids.flatten().tolist(), strict=True):
        if i >= 0 and (i not in best or s > best[i]):
            best[i] = s
    ranked = sorted(best.items(), key=lambda item: -item[1])[:k]
    return [s for _, s in ranked], [i for i, _ in ranked]


@pytest.mark.parametrize("seed", range(6))
def test_best_distinct_equals_each_ids_best_score_ranked(seed):
    g = torch.Generator().manual_seed(seed)
    q, width = 5, 6
    scores = torch.randn(q, width, generator=g)
    ids = torch.randint(0, 7, (q, width), generator=g)  # repeats within and across queries
    pad = torch.rand(q, width, generator=g) < 0.3
    ids[pad] = -1
    scores[pad] = torch.randn(int(pad.sum()), generator=g) + 10.0  # high padded scores must not count
    for k in (1, 3, 8):
        got_s, got_i = _best_distinct(scores, ids, k)
        want_s, want_i = brute_best_distinct(scores, ids, k)
        assert got_i.tolist() == want_i
        assert got_s.tolist() == want_s
    # all padding: nothing
    got_s, got_i = _best_distinct(scores, torch.full_like(ids, -1), 3)
    assert got_i.numel() == 0 and got_s.numel() == 0


def test_every_token_keys_are_each_in_chunk_tokens_key():
    g = torch.Generator().manual_seed(0)
    t = 13
    key = torch.randn(H_KV, t, D, generator=g)
    chunks = [(1, 4), (4, 6), (8, 12)]  # 0, 6, 7 and 12 are outside every chunk
    keys = chunk_keys("every_token", chunks, key, None, None)
    inside = [p for a, e in chunks for p in range(a, e)]
    assert keys.vectors.shape == (len(inside), H_KV * D) and keys.vectors.dtype == torch.float32
    for n, p in enumerate(inside):
        expected = torch.cat([key[h, p] for h in range(H_KV)])  # heads concatenated
        assert torch.equal(keys.vectors[n], expected)
        owner = next(i for i, (a, e) in enumerate(chunks) if a <= p < e)
        assert int(keys.chunk_index[n]) == owner
    assert chunk_keys("every_token", [], key, None, None).vectors.shape[0] == 0


# ------------------------------------------------------------------ the searching heads, by brute force


@torch.no_grad()
def layer0_qk(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's position-free Q/K of tokens ``(T,)``, from the weights alone: nothing is mixed
    across tokens before layer 0's attention, so q = W_q RMSNorm(embedding) per token (no rotation).
    Returns ``(H, T, D)``, ``(H_kv, T, D)`` in float64."""
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    attn = model.model.layers[0].self_attn
    q = attn.q_proj(x).view(len(ids), H, D).transpose(0, 1)
    k = attn.k_proj(x).view(len(ids), H_KV, D).transpose(0, 1)
    return q.double(), k.double()


def chunk_score(q: torch.Tensor, k: torch.Tensor, heads, pool: str) -> float:
    """A chunk's search score for one block of queries ``q (H, T, D)``, chunk keys ``k (H_kv, L, D)``:
    heads named: sum over them of q_h . k_{h // group}; None: each KV head's group of queries
    averaged. ``max``: the best (query, token) pair; ``mean``: the block's mean query, best token."""
    if heads is None:  # group means, one per KV head
        q = torch.stack([q[g * GROUP : (g + 1) * GROUP].mean(0) for g in range(H_KV)])
        pairs = [(g, g) for g in range(H_KV)]
    else:
        pairs = [(h, h // GROUP) for h in heads]
    if pool == "mean":
        q = q.mean(1, keepdim=True)
    best = -float("inf")
    for t in range(q.shape[1]):
        for s in range(k.shape[1]):
            best = max(best, float(sum(q[hq, t] @ k[hk, s] for hq, hk in pairs)))
    return best


def brute_ranking(q, chunks, heads, pool, top_k):
    """``[(start, score)]`` of the ``top_k`` best chunks ``[(start, keys)]`` (all with ``None``),
    best first."""
    scored = [(start, chunk_score(q, k, heads, pool)) for start, k in chunks]
    return sorted(scored, key=lambda item: -item[1])[:top_k]


def assert_ranking(got: list[tuple[int, float]], ranked: list[tuple[int, float]], top_k: int):
    """``got`` is a best-first top ``top_k`` of ``ranked`` (the brute force's full ranking): rank
    by rank the same score, every returned chunk distinct and its own brute-force score equal to
    its rank's. Why not the same starts: chunks whose scores tie (within float32 rounding; the
    search runs in float32, the brute force in float64) may come in either order or trade places
    at the cut, and one CI run did (two chunks at 0.05600794)."""
    want = ranked[:top_k]
    assert len(got) == len(want) and len({s for s, _ in got}) == len(got)
    true = dict(ranked)
    want_scores = torch.tensor([x for _, x in want], dtype=torch.float64)
    torch.testing.assert_close(
        torch.tensor([x for _, x in got], dtype=torch.float64), want_scores, atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor([true[s] for s, _ in got], dtype=torch.float64), want_scores, atol=1e-6, rtol=0
    )


HEADS = "0.3,0.0,0.1"  # two query heads of KV head 0, one of KV head 1
HEAD_LIST = (0, 1, 3)


def heads_store(pool: str, readout: str, top_k: int, **more) -> StoreConfig:
    """The store on :data:`HEADS`, every token's key indexed, ``CHUNK``-token chunks."""
    return StoreConfig(
        heads=HEADS,
        layers="heads",
        strategy="every_token",
        query_pool=pool,
        readout=readout,
        chunk_len=CHUNK,
        block_len=BLOCK,
        top_k=top_k,
        **more,
    )


@pytest.mark.parametrize("pool", ["max", "mean"])
@pytest.mark.parametrize("readout", ["kv", "tokens"])
def test_named_heads_search_equals_a_brute_force_ranking(pool, readout):
    """The store on layer 0, where Q/K come from the weights alone, so every search of the stream
    (every block of every segment, with ``kv``; each segment's tail, with ``tokens``) is exact."""
    model, ref = model_pair("llama", seed=7)
    top_k, n_seg = 3, 4
    cfg = StackConfig(segment_len=SEG, compressive=None, store=heads_store(pool, readout, top_k))
    stack = MemoryStack(model, cfg)
    ids = torch.randint(0, 256, (1, n_seg * SEG))
    qk = [layer0_qk(ref, ids[0, i * SEG : (i + 1) * SEG]) for i in range(n_seg)]

    def stored(before: int):  # every chunk of segments < before: (stream start, keys (H_kv, L, D))
        return [
            (s * SEG + a, qk[s][1][:, a : a + CHUNK]) for s in range(before) for a in range(0, SEG, CHUNK)
        ]

    searches, differs = [], False
    if readout == "kv":
        explanation = stack.explain(ids)
        got: dict[tuple[int, int], list] = {}
        for r in sorted(explanation.retrievals, key=lambda r: r.rank):
            assert r.layer == 0
            got.setdefault((r.segment, r.block), []).append((r.start, r.score))
        assert sorted(got) == [(s, j) for s in range(1, n_seg) for j in range(SEG // BLOCK)]
        for (s, j), ranking in got.items():
            # block j > 0: block j - 1's queries; block 0: the previous segment's last block
            q = qk[s][0][:, (j - 1) * BLOCK : j * BLOCK] if j else qk[s - 1][0][:, -BLOCK:]
            searches.append((ranking, q, stored(s)))
    else:
        state, kind = None, stack.kinds["store"]
        for s in range(n_seg):
            with torch.no_grad():
                state = stack(ids[:, s * SEG : (s + 1) * SEG], state=state).state
            layer = state.memories["store"][0]
            scores, found = kind.search(layer.stores[0], layer.tail[0])
            starts = layer.stores[0].records(found)["start"].tolist()
            ranking = list(zip(starts, scores.tolist(), strict=True))
            searches.append((ranking, qk[s][0][:, -BLOCK:], stored(s + 1)))
            # the prefix: those chunks' tokens, in stream order
            prefix, valid = kind.prefix(state.memories["store"])
            want = torch.cat([ids[0, a : a + CHUNK] for a in sorted(starts)])
            assert bool(valid.all()) and torch.equal(prefix[0], want)
    for ranking, q, chunks in searches:
        assert_ranking(ranking, brute_ranking(q, chunks, HEAD_LIST, pool, None), top_k)
        differs |= [a for a, _ in brute_ranking(q, chunks, None, pool, top_k)] != [a for a, _ in ranking]
    assert differs  # all heads would have found other chunks: the test sees the heads' restriction


def test_skip_initial_leaves_the_first_tokens_keys_out_of_the_search():
    """``skip_initial=6`` with 4-token chunks: chunk 0 has no key left and is never found, chunk 1
    is searched by its tokens 6 and 7 alone; every search equals the brute force over the keys
    that remain, and differs from the brute force over all keys somewhere."""
    model, ref = model_pair("llama", seed=7)
    top_k, n_seg, sinks = 3, 3, 6
    store = heads_store("max", "tokens", top_k, skip_initial=sinks)
    stack = MemoryStack(model, StackConfig(segment_len=SEG, compressive=None, store=store))
    differs = False
    for seed in range(4):
        ids = torch.randint(0, 256, (1, n_seg * SEG), generator=torch.Generator().manual_seed(seed))
        qk = [layer0_qk(ref, ids[0, i * SEG : (i + 1) * SEG]) for i in range(n_seg)]
        state, kind = None, stack.kinds["store"]
        for s in range(n_seg):
            with torch.no_grad():
                state = stack(ids[:, s * SEG : (s + 1) * SEG], state=state).state
            layer = state.memories["store"][0]
            scores, found = kind.search(layer.stores[0], layer.tail[0], top_k=100)
            starts = layer.stores[0].records(found)["start"].tolist()
            every = [
                (t * SEG + a, qk[t][1][:, a : a + CHUNK]) for t in range(s + 1) for a in range(0, SEG, CHUNK)
            ]
            kept = [(a, k[:, max(0, sinks - a) :]) for a, k in every if a + CHUNK > sinks]
            q = qk[s][0][:, -BLOCK:]
            assert 0 not in starts and len(starts) == len(kept)  # every chunk but the first is searchable
            assert_ranking(
                list(zip(starts, scores.tolist(), strict=True)),
                brute_ranking(q, kept, HEAD_LIST, "max", None),
                len(kept),
            )
            top = [[a for a, _ in brute_ranking(q, c, HEAD_LIST, "max", top_k)] for c in (every, kept)]
            differs |= top[0] != top[1]
    assert differs  # with every key, some search would have returned other chunks


# ------------------------------------------------------------------ the tokens readout's rank fusion


def test_tokens_readout_fuses_the_layers_rankings_by_reciprocal_rank():
    """Store on layers 0 and 1 (each searched by its own heads); each layer's ranking of each
    segment's tail brute-forced from the unwrapped model's Q/K on [prefix, segment], fused here."""
    model, ref = model_pair("llama", seed=11)
    top_k, n_seg = 3, 4
    cfg = StackConfig(
        segment_len=SEG,
        compressive=None,
        store=StoreConfig(
            heads="0.1,1.2,1.3",
            layers="heads",
            strategy="every_token",
            query_pool="max",
            readout="tokens",
            chunk_len=CHUNK,
            block_len=BLOCK,
            top_k=top_k,
        ),
    )
    stack = MemoryStack(model, cfg)
    kind, named = stack.kinds["store"], {0: (1,), 1: (2, 3)}
    ids = torch.randint(0, 256, (1, n_seg * SEG))
    state, prefix, keys = None, None, {0: [], 1: []}
    fused_differs = False
    for s in range(n_seg):
        seg = ids[:, s * SEG : (s + 1) * SEG]
        # the segment's Q/K as the stack saw them: after the prefix, at positions P..P+T-1
        context = seg if prefix is None else torch.cat([prefix, seg], 1)
        qk = {
            la: (q[0, :, -SEG:].double(), k[0, :, -SEG:].double())
            for la, (q, k) in stack.position_free_qk(context).items()
        }
        with torch.no_grad():
            out = stack(seg, state=state)
        if prefix is not None:  # the stack read [prefix, segment]: its logits say so
            with torch.no_grad():
                torch.testing.assert_close(out.logits, ref(context).logits[:, -SEG:], atol=1e-5, rtol=0)
        state = out.state
        votes: dict[int, float] = {}
        rankings = {}
        for layer in (0, 1):
            keys[layer] += [(s * SEG + a, qk[layer][1][:, a : a + CHUNK]) for a in range(0, SEG, CHUNK)]
            ranking = brute_ranking(qk[layer][0][:, -BLOCK:], keys[layer], named[layer], "max", top_k)
            # the stack's own per-layer search agrees
            store_layer = state.memories["store"][layer]
            scores, found = kind.search(store_layer.stores[0], store_layer.tail[0])
            starts = store_layer.stores[0].records(found)["start"].tolist()
            everything = brute_ranking(qk[layer][0][:, -BLOCK:], keys[layer], named[layer], "max", None)
            assert_ranking(list(zip(starts, scores.tolist(), strict=True)), everything, top_k)
            rankings[layer] = [a for a, _ in ranking]
            for rank, (a, _) in enumerate(ranking):
                votes[a] = votes.get(a, 0.0) + 1.0 / (1 + rank)
        best = sorted(votes, key=lambda a: (-votes[a], a))[:top_k]  # ties: the earlier chunk
        fused_differs |= all(set(best) != set(r) for r in rankings.values())
        prefix, valid = kind.prefix(state.memories["store"])
        want = torch.cat([ids[0, a : a + CHUNK] for a in sorted(best)])  # stream order
        assert bool(valid.all()) and torch.equal(prefix[0], want)
    assert fused_differs  # the fusion chose a set neither layer ranks on its own


# ------------------------------------------------------------------ carried tokens


def carry_stack(model, initial: int, recent: int, store: StoreConfig | None = None) -> MemoryStack:
    cfg = StackConfig(
        segment_len=SEG,
        compressive=None,
        store=store,
        kinds={"carry": CarryConfig(initial=initial, recent=recent)},
    )
    return MemoryStack(model, cfg)


@pytest.mark.parametrize("initial, recent", [(3, 5), (0, 4), (2, 0), (4, SEG)])
def test_carry_forward_equals_the_model_on_carried_tokens_and_segment(initial, recent):
    model, ref = model_pair("llama", seed=3)
    stack = carry_stack(model, initial, recent)
    ids = torch.randint(0, 256, (2, 3 * SEG + 7))  # a partial last segment
    with torch.no_grad():
        logits = stack(ids).logits
        for start in range(0, ids.shape[1], SEG):
            seg = ids[:, start : start + SEG]
            # the stream's first tokens, then the previous segment's last ones
            carried = [] if start == 0 else [ids[:, :initial], ids[:, start - recent : start]]
            expected = ref(torch.cat([*carried, seg], 1)).logits[:, -seg.shape[1] :]
            torch.testing.assert_close(logits[:, start : start + SEG], expected, atol=1e-5, rtol=0)


def greedy_by_forward(stack, prompt, steps):
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, stack(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_carry_generate_equals_greedy_forward():
    stack = carry_stack(tiny_llama(seed=4), initial=2, recent=5)
    prompt = torch.randint(0, 256, (2, 2 * SEG + 3))
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=2 * SEG)
        expected = greedy_by_forward(stack, prompt, 2 * SEG)
    assert torch.equal(out, expected)


def test_carry_with_padding_carries_only_valid_tokens():
    model, ref = model_pair("llama", seed=5)
    initial, recent = 3, 6
    stack = carry_stack(model, initial, recent)
    ids = torch.randint(1, 256, (3, 3 * SEG))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    mask[2, :9] = 0  # 7 valid tokens in segment 0: still at least initial and recent
    with torch.no_grad():
        batch = stack(ids, attention_mask=mask).logits
        for row in range(3):
            ok = mask[row].bool()
            alone = stack(ids[row : row + 1], attention_mask=mask[row : row + 1]).logits
            torch.testing.assert_close(batch[row, ok], alone[0, ok], atol=1e-5, rtol=0)
            # the model on the row's valid tokens only: what is carried is valid tokens
            stream = ids[row]
            first = stream[ok][:initial]
            for start in range(0, ids.shape[1], SEG):
                seg = stream[start : start + SEG][ok[start : start + SEG]]
                prev = stream[start - SEG : start][ok[start - SEG : start]] if start else None
                carried = [] if start == 0 else [first, prev[-recent:]]
                expected = ref(torch.cat([*carried, seg])[None]).logits[0, -len(seg) :]
                got = batch[row, start : start + SEG][ok[start : start + SEG]]
                torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(initial=-1), "initial"),
        (dict(initial=0, recent=0), "both 0"),
        (dict(initial=True), "initial"),
        (dict(recent=False), "recent"),
        (dict(recent=2.5), "recent"),
    ],
)
def test_carry_config_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        CarryConfig(**kw)


def test_carry_state_round_trips_through_a_stream_file(tmp_path):
    stack = carry_stack(tiny_llama(seed=6), initial=2, recent=5)
    ids = torch.randint(0, 256, (2, 3 * SEG))
    with torch.no_grad():
        for i in range(0, 2 * SEG, SEG):
            stack.step(ids[:, i : i + SEG])
        stack.save_stream(tmp_path / "stream")
        saved = stack.state.memories["carry"]
        expected = stack.step(ids[:, 2 * SEG :]).logits
    fresh = carry_stack(tiny_llama(seed=6), initial=2, recent=5)
    state = fresh.load_stream(tmp_path / "stream")
    assert state.segments == 2
    for layer, s in saved.items():
        back = state.memories["carry"][layer]
        assert all(torch.equal(a, b) for a, b in zip(s, back, strict=True))
        assert torch.equal(back.initial, ids[:, :2]) and torch.equal(
            back.recent, ids[:, 2 * SEG - 5 : 2 * SEG]
        )
    with torch.no_grad():
        assert torch.equal(fresh.step(ids[:, 2 * SEG :]).logits, expected)


def test_carry_gives_every_segment_recent_tokens_even_after_a_short_segment():
    model, ref = model_pair("llama", seed=3)
    initial, recent = 2, 6
    stack = carry_stack(model, initial, recent)
    first, short, last = (torch.randint(0, 256, (1, n)) for n in (SEG, 3, SEG))
    with torch.no_grad():
        state = stack(first).state
        state = stack(short, state=state).state  # a stream cut early (as close_prompt does)
        got = stack(last, state=state).logits
        stream = torch.cat([first, short], 1)
        expected = ref(torch.cat([first[:, :initial], stream[:, -recent:], last], 1)).logits[:, -SEG:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_carry_and_store_hits_rows_do_not_depend_on_each_other():
    store = StoreConfig(layers="0", readout="tokens", chunk_len=5, block_len=BLOCK, top_k=2)
    stack = carry_stack(tiny_llama(seed=0), initial=2, recent=4, store=store)
    with torch.no_grad():
        for seed in range(20):  # a stream whose rows' hits differ in length (5- and 1-token chunks)
            ids = torch.randint(0, 256, (2, 3 * SEG), generator=torch.Generator().manual_seed(seed))
            if not bool(stack._prefix(stack(ids[:, : 2 * SEG]).state, 2)[1].all()):
                break
        else:
            raise RuntimeError("no stream with a padded prefix found")
        batch = stack(ids).logits
        for row in range(2):
            torch.testing.assert_close(batch[row], stack(ids[row : row + 1]).logits[0], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ generate(close_prompt=True)


def test_close_prompt_needs_carry_with_recent():
    prompt = torch.randint(0, 256, (1, SEG + 3))
    store = StoreConfig(layers="0", readout="tokens")
    no_carry = MemoryStack(tiny_llama(), StackConfig(segment_len=SEG, compressive=None, store=store))
    with pytest.raises(ValueError, match=r"CarryConfig"):
        no_carry.generate(prompt, max_new_tokens=2, close_prompt=True)
    with pytest.raises(ValueError, match=r"CarryConfig"):
        carry_stack(tiny_llama(), initial=2, recent=0).generate(prompt, max_new_tokens=2, close_prompt=True)


@pytest.mark.parametrize("with_store", [False, True])
def test_close_prompt_generates_from_the_kinds_prefix(with_store):
    """Reference: the prompt closed (``stack(prompt).state``), then greedy decoding of the unwrapped
    model on [the stream's initial tokens, store hits, the closed segment's last tokens] + what it
    generated; after ``SEG`` new tokens the answer segment closes (its last token still predicts
    the next) and the next prefix comes from the state after it."""
    model, ref = model_pair("llama", seed=8)
    initial, recent, top_k = 2, 6, 2
    store = StoreConfig(layers="0", readout="tokens", chunk_len=CHUNK, block_len=BLOCK, top_k=top_k)
    stack = carry_stack(model, initial, recent, store=store if with_store else None)
    prompt = torch.randint(0, 256, (2, 2 * SEG + 8))  # the last segment holds >= recent tokens
    n_new = SEG + 4
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=n_new, close_prompt=True)
        state = stack(prompt).state

        def prefix_of(state, stream):
            """[initial, hits, recent]: every part full here (4-token chunks, long segments)."""
            parts = [stream[:, :initial]]
            if with_store:
                hits, ok = stack.kinds["store"].prefix(state.memories["store"])
                assert bool(ok.all()) and hits.shape[1] == top_k * CHUNK
                parts.append(hits)
            parts.append(stream[:, -recent:])
            prefix = torch.cat(parts, 1)
            got, ok = stack._prefix(state, 2)
            assert bool(ok.all()) and torch.equal(got, prefix)
            return prefix

        prefix = prefix_of(state, prompt)
        new = torch.zeros(2, 0, dtype=torch.long)
        for i in range(n_new):
            # token i is predicted at token i - 1 (the prefix's last for i = 0), in its answer segment
            if i == SEG + 1:  # the first answer segment is full: it closes, the next has its own prefix
                state = stack(new[:, :SEG], state=state).state
                prefix = prefix_of(state, torch.cat([prompt, new[:, :SEG]], 1))
            seg_new = new[:, (max(i - 1, 0) // SEG) * SEG :]
            logits = ref(torch.cat([prefix, seg_new], 1)).logits[:, -1]
            new = torch.cat([new, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    assert torch.equal(out[:, prompt.shape[1] :], new)


def test_tokens_readout_with_neighbours_reads_each_hit_with_the_chunks_beside_it():
    """``neighbours=1`` (the ``store_near`` row): the prefix is the plain readout's hits, each
    widened by the chunk before and after it in the stream (clipped to what is stored), in stream
    order, every chunk once; found here by matching the hits' tokens against the stream."""
    model = tiny_llama(seed=6)
    prompt = torch.randint(0, 256, (1, 4 * SEG), generator=torch.Generator().manual_seed(3))
    chunks = [tuple(prompt[0, a : a + CHUNK].tolist()) for a in range(0, prompt.shape[1], CHUNK)]
    assert len(set(chunks)) == len(chunks)  # a hit's tokens name its chunk
    prefixes = {}
    for n in (0, 1):
        store = StoreConfig(
            layers="0", readout="tokens", chunk_len=CHUNK, block_len=BLOCK, top_k=2, neighbours=n
        )
        stack = carry_stack(model, initial=0, recent=4, store=store)
        with torch.no_grad():
            state = stack(prompt).state
        hits, ok = stack.kinds["store"].prefix(state.memories["store"])
        prefixes[n] = hits[0, ok[0]].tolist()
        stack.unwrap()
    stored = len(next(iter(state.memories["store"].values())).stores[0])
    assert 0 < stored <= len(chunks)
    plain = [prefixes[0][a : a + CHUNK] for a in range(0, len(prefixes[0]), CHUNK)]
    found = sorted(chunks.index(tuple(c)) for c in plain)
    assert len(found) == 2
    widened = sorted({j for i in found for j in (i - 1, i, i + 1) if 0 <= j < stored})
    assert len(widened) > len(found)  # the neighbours add chunks here
    assert prefixes[1] == [t for j in widened for t in chunks[j]]


# ------------------------------------------------------------------ retrieval heads


def test_retrieval_heads_equal_eager_attention_shares():
    model = tiny_llama(seed=9)
    tok = ByteTokenizer()
    length, prompts, seed = 200, 2, 5
    scores = retrieval_heads(model, tok, prompts=prompts, length=length, seed=seed)
    assert model.config._attn_implementation == "sdpa"  # restored
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    total = torch.zeros(2, H, dtype=torch.float64)
    with torch.no_grad():
        for i in range(prompts):
            depth = 0.05 + 0.9 * i / (prompts - 1)
            ids, (a, e) = calibration_prompt(tok, length, depth, seed + i)
            assert len(ids) == length and re.fullmatch(r" [A-Z]{2}-\d{4}", tok.decode(ids[a:e]))
            attentions = eager(torch.tensor([ids]), output_attentions=True).attentions
            for layer, w in enumerate(attentions):
                total[layer] += w[0, :, -1, a:e].sum(-1).double()
    mean = total / prompts
    assert len(scores) == 2 * H
    assert sorted((s.layer, s.head) for s in scores) == [(la, h) for la in range(2) for h in range(H)]
    for s in scores:
        assert s.score == pytest.approx(float(mean[s.layer, s.head]), abs=1e-6)
    order = mean.flatten().argsort(descending=True)
    assert [(s.layer, s.head) for s in scores] == [(int(i) // H, int(i) % H) for i in order]
    top = sorted([(int(i) // H, int(i) % H) for i in order[:2]])
    assert heads_spec(scores, 2) == ",".join(f"{la}.{h}" for la, h in top)
    with pytest.raises(ValueError):
        heads_spec(scores, 0)


def test_search_heads_rank_each_heads_own_search_by_the_needles_reciprocal_rank():
    """Brute force here: Q and K from each layer's input through its own projections, every
    query head's last ``window`` queries against its KV head's keys after the first chunk, a
    chunk's best product, the reciprocal rank of the first chunk with a code token."""
    model = tiny_llama(seed=4)
    tok = ByteTokenizer()
    length, prompts, seed, window, chunk = 240, 3, 2, 8, 8
    scores = search_heads(
        model, tok, prompts=prompts, length=length, window=window, chunk_len=chunk, seed=seed
    )
    assert model.config._attn_implementation == "sdpa"  # left as it was
    inputs: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(
            lambda _m, _a, kw, _o, i=i: inputs.__setitem__(i, kw["hidden_states"]), with_kwargs=True
        )
    question = len(tok.encode(" " + QUESTION))
    total = torch.zeros(2, H, dtype=torch.float64)
    with torch.no_grad():
        for i in range(prompts):
            ids, (a, e) = calibration_prompt(tok, length, 0.05 + 0.9 * i / (prompts - 1), seed + i)
            model(torch.tensor([ids]))
            end = length - question
            needle = {t // chunk - 1 for t in range(a, e)}
            last = range(length - window, length)
            for layer in range(2):
                attn, h = model.model.layers[layer].self_attn, inputs[layer][0]
                q = attn.q_proj(h).view(length, H, D)
                k = attn.k_proj(h).view(length, H_KV, D)
                for head in range(H):
                    best: dict[int, float] = {}
                    for t in range(chunk, end):
                        c = t // chunk - 1
                        dot = max(float(q[u, head] @ k[t, head // GROUP]) for u in last)
                        best[c] = max(best.get(c, -math.inf), dot)
                    ranking = sorted(best, key=lambda c: (-best[c], c))
                    total[layer, head] += 1.0 / (1 + next(r for r, c in enumerate(ranking) if c in needle))
    mean = total / prompts
    assert len({round(float(m), 6) for m in mean.flatten()}) > 1  # the heads do differ here
    assert sorted((s.layer, s.head) for s in scores) == [(la, h) for la in range(2) for h in range(H)]
    for s in scores:
        assert s.score == pytest.approx(float(mean[s.layer, s.head]), abs=1e-9)
    assert [s.score for s in scores] == sorted((s.score for s in scores), reverse=True)
    with pytest.raises(ValueError, match="first chunk"):
        search_heads(model, tok, prompts=2, length=length, chunk_len=length // 2)
    with pytest.raises(ValueError, match=">= 1"):
        search_heads(model, tok, window=0)


def test_store_near_row_is_the_store_row_reading_each_hits_neighbours():
    """evals.longcontext: ``store_near`` differs from ``store`` in ``neighbours`` alone, for the
    calibrated heads and for every head; ``Rows`` builds each row's own stack and refuses a row
    it does not know."""
    import dataclasses

    from memstack.evals.longcontext import NEAR, Rows, stack_config

    for heads in ("0.1,1.3", None):
        base, near = stack_config(heads, 16), stack_config(heads, 16, neighbours=NEAR)
        assert NEAR == 1 and base.store.neighbours == 0
        assert near == dataclasses.replace(base, store=dataclasses.replace(base.store, neighbours=1))
    rows = Rows(tiny_llama(), "0.1,1.3", 16)
    assert rows.stack("store_near").config == stack_config("0.1,1.3", 16, neighbours=1)
    assert rows.stack("off").config == stack_config("0.1,1.3", 16)  # off is the store row's stack
    assert rows.stack("bare") is None
    with pytest.raises(ValueError, match="unknown row 'store_far'; expected one of bare, off"):
        rows.stack("store_far")
    # eval_ruler's --top-k: the store rows retrieve that many chunks, nothing else changes
    wide = Rows(tiny_llama(), "0.1,1.3", 16, top_k=16).stack("store_near").config
    assert wide.store.top_k == 16 and stack_config("0.1,1.3", 16).store.top_k == 4
    near = stack_config("0.1,1.3", 16, neighbours=NEAR)
    assert wide == dataclasses.replace(near, store=dataclasses.replace(near.store, top_k=16))
    # and --window: the prompt's last 32 queries search (the store's block_len), nothing else changes
    longer = Rows(tiny_llama(), "0.1,1.3", 16, window=32).stack("store_near").config
    assert near.store.block_len == 16
    assert longer == dataclasses.replace(near, store=dataclasses.replace(near.store, block_len=32))
    # and --keep-initial: the first 32 tokens carried in view and left out of the search
    kept = Rows(tiny_llama(), "0.1,1.3", 16, initial=32).stack("store_near").config
    carry = dataclasses.replace(near.kinds["carry"], initial=32)
    store = dataclasses.replace(near.store, skip_initial=32)
    assert near.store.skip_initial == 0 and near.kinds["carry"].initial == 0
    assert kept == dataclasses.replace(near, store=store, kinds={"carry": carry})


def test_memory_off_on_the_last_two_segments_equals_the_whole_prompt():
    """evals.longcontext.off_suffix: with the store off, only the last two segments reach the
    answer; and a prompt inside one segment is answered as the unwrapped model answers it."""
    from memstack.evals.longcontext import ANSWER_TOKENS, answer, off_suffix

    config = StackConfig(
        segment_len=16,
        compressive=None,
        store=StoreConfig(layers="all", chunk_len=4, top_k=2, block_len=4, readout="tokens", skip_recent=8),
        kinds={"carry": CarryConfig(recent=8)},
    )
    stack = MemoryStack(make_model("llama", seed=3), config)
    torch.manual_seed(5)
    for length in (7, 16, 23, 64, 77):
        ids = torch.randint(0, 256, (1, length))
        cut = off_suffix(ids[0].tolist(), 16)
        assert len(cut) <= 32 and (length - len(cut)) % 16 == 0
        with torch.no_grad(), stack.memory_off("store"):
            # a prompt inside one segment is read whole (close_prompt only past one segment)
            whole = stack.generate(
                ids, max_new_tokens=ANSWER_TOKENS, close_prompt=length + ANSWER_TOKENS > 16
            )[0, length:]
        assert answer("off", None, stack, ids[0].tolist()) == whole.tolist()
        if length + ANSWER_TOKENS <= 16:
            plain = stack.unwrap().generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=ANSWER_TOKENS,
                pad_token_id=0,
            )[0, length:]
            stack = MemoryStack(stack.model, config)
            assert answer("store", None, stack, ids[0].tolist()) == plain.tolist()
