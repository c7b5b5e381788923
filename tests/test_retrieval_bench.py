"""The retrieval benchmark's pieces, against brute force and the model's own attention."""

from __future__ import annotations

import copy
import math
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from memstack.data.tasks import PASSKEY_QUESTION
from memstack.evals.retrieval import (
    AttentionKeyer,
    AttentionReader,
    byte_tokenize,
    headline,
    key_strategies,
    markdown,
    rank_by_heads,
    rank_by_tokens,
    rank_by_vectors,
    rank_metrics,
    summarise,
    token_chunk_spans,
)
from memstack.evals.retrieval_tasks import (
    Sample,
    chunks_overlapping,
    corpus,
    facts_task,
    invented_names,
    kv_task,
    passkey_task,
    plant,
)
from memstack.memory.store.keys import chunk_keys
from memstack.memory.store.readouts import reciprocal_rank_fusion

ROOT = Path(__file__).resolve().parents[1]

TEXT = "the quick brown fox jumps over the lazy dog and runs far away from the farm " * 4


def test_plant_overwrites_at_a_word_boundary_and_keeps_the_length():
    new, (start, end) = plant(TEXT, "Ada's code is 48213.", 7)
    assert len(new) == len(TEXT)
    assert new[start:end] == "Ada's code is 48213."
    assert start == TEXT.index(" ", 7) + 1  # the word after the first space at or after 7
    assert new[start - 1] == " " and new[end] == " "
    assert new[:start] == TEXT[:start] and new[end + 1 :] == TEXT[end + 1 :]
    with pytest.raises(ValueError, match="no room"):
        plant(TEXT, "x" * 400, 0)


def test_chunks_overlapping_matches_brute_force():
    for span in [(0, 1), (5, 9), (63, 65), (64, 128), (10, 200)]:
        brute = {i // 64 for i in range(*span)}
        assert chunks_overlapping(span, 64) == brute


def test_invented_names_are_distinct_and_absent_from_the_text():
    names = invented_names(30, 0, avoid="Bana kolo")
    assert len(set(names)) == 30
    assert all(n not in "Bana kolo" and n[0].isupper() for n in names)


def test_rank_metrics():
    assert rank_metrics([4, 2, 9], {4}) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}
    assert rank_metrics([1, 2, 3, 4, 5, 6, 7], {7, 6}) == {"recall@1": 0.0, "recall@5": 0.0, "mrr": 1 / 6}
    assert rank_metrics([1, 2, 3], {8}) == {"recall@1": 0.0, "recall@5": 0.0, "mrr": 0.0}


def test_summarise_intervals():
    rows = [{"recall@1": float(i < 5), "mrr": 1.0 / (i + 1), "ms": 2.0} for i in range(20)]
    s = summarise(rows)
    assert s["recall@1"]["mean"] == 0.25 and s["recall@1"]["low"] < 0.25 < s["recall@1"]["high"]
    mrr = np.array([1.0 / (i + 1) for i in range(20)])
    half = 1.96 * mrr.std(ddof=1) / math.sqrt(20)
    assert s["mrr"]["low"] == pytest.approx(mrr.mean() - half) and s["mrr"]["high"] == pytest.approx(
        mrr.mean() + half
    )
    assert s["ms"] == {"mean": 2.0} and s["n"] == {"mean": 20.0}


def test_rank_by_vectors_scores_a_chunk_by_its_best_vector():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    chunk = np.repeat(np.arange(10), 3)
    query = rng.normal(size=8).astype(np.float32)
    ranking, _, size = rank_by_vectors(vectors, chunk, query, 10)
    best = [max(vectors[chunk == c] @ query) for c in range(10)]
    assert ranking == sorted(range(10), key=lambda c: -best[c])
    assert size == 30 * 8 * 4


def test_rank_by_tokens_is_knn_attention_mass_per_chunk():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(50, 6)).astype(np.float32)
    token_chunk = np.arange(50) // 5
    queries = rng.normal(size=(3, 6)).astype(np.float32)
    ranking, _, _ = rank_by_tokens(keys, token_chunk, queries, k=7, scale=0.5, depth=10)
    total = np.zeros(10)
    for q in queries:
        scores = keys @ q
        top = np.argsort(-scores)[:7]
        w = np.exp(0.5 * scores[top]) / np.exp(0.5 * scores[top]).sum()
        np.add.at(total, token_chunk[top], w)
    expected = [c for c in np.argsort(-total, kind="stable") if total[c] > 0]
    assert ranking == expected


def test_reciprocal_rank_fusion_sums_inverse_ranks_and_breaks_ties_to_the_smaller_id():
    # 5: 1 + 1/2; 2: 1/2 + 1 (a tie with 5); 9: 1/3 + 1; 7: 1/2
    assert reciprocal_rank_fusion([[5, 2, 9], [2, 7], [9, 5]]) == [2, 5, 9, 7]
    assert reciprocal_rank_fusion([]) == []


def test_rank_by_heads_is_the_best_query_key_pair_summed_over_the_named_heads():
    """Written out: query head h reads KV head h // group; a chunk scores the best (query token,
    key token) pair of the sum over the named heads; a chunk with no token is never ranked."""
    rng = np.random.default_rng(0)
    d, group, m = 8, 2, 3
    keys = rng.standard_normal((30, 2 * d)).astype(np.float32)
    token_chunk = np.repeat([0, 1, 3, 4, 5, 6], 5)  # chunk 2 holds no token
    queries = rng.standard_normal((4, m, d)).astype(np.float32)
    heads = (1, 2)

    def score(c: int) -> float:
        pairs = [(q, t) for q in range(m) for t in range(30) if token_chunk[t] == c]
        return max(
            sum(float(queries[h, q] @ keys[t, (h // group) * d : (h // group + 1) * d]) for h in heads)
            for q, t in pairs
        )

    expected = sorted([0, 1, 3, 4, 5, 6], key=lambda c: -score(c))
    ranking, seconds = rank_by_heads(keys, token_chunk, queries, heads, group, depth=4)
    assert ranking == expected[:4] and seconds >= 0
    assert rank_by_heads(keys, token_chunk, queries, heads, group, depth=100)[0] == expected


@pytest.mark.parametrize("prefix", ["", "Read on.\n"])
def test_store_heads_variant_fuses_each_layers_named_heads_over_segments_read_alone(prefix: str):
    """bench_retrieval's ``fused/store_heads`` against brute force from the reader: each
    16-character segment read on its own (after ``prefix``, whose tokens are not keyed, and so is
    the question), per layer every chunk's best (question token, key token) pair over the named
    heads, the layers fused by 1 / (1 + rank). One sample per chunk, each with that chunk
    relevant, so the reciprocal ranks give back the whole fused ranking."""
    eval_attention = runpy.run_path(str(ROOT / "scripts" / "bench_retrieval.py"))["eval_attention"]
    keyer = AttentionKeyer(AttentionReader(_tiny_llama()), byte_tokenize, chunk_len=8)
    text, question = TEXT[:48], "where does the fox run?"
    samples = [Sample(text, question, {c}) for c in range(6)]
    # heads whose per-layer maxima are apart by 0.1 or more: one head of layer 0 alone ties
    # chunks exactly (the same byte pair wins in each), which float noise then orders either way
    heads = {0: (0, 1, 3), 1: (1,)}
    rows = eval_attention(keyer, samples, 16, {}, 0, heads, prefix)["fused/store_heads"]
    got = [round(1 / r["mrr"]) for r in rows]
    q_views = keyer.reader(*byte_tokenize([prefix + question])[:2])
    p = len(prefix)
    per_layer = []
    for layer, hs in heads.items():
        best: dict[int, float] = {}
        for start in range(0, len(text), 16):
            key = keyer.reader(*byte_tokenize([prefix + text[start : start + 16]])[:2])[layer].key[0]
            for i in range(16):
                for qi in range(len(question)):
                    s = sum(float(q_views[layer].query[0, h, p + qi] @ key[h // 2, p + i]) for h in hs)
                    best[(start + i) // 8] = max(best.get((start + i) // 8, -math.inf), s)
        per_layer.append(sorted(best, key=lambda c: (-best[c], c)))
    fused: dict[int, float] = {}
    for ranking in per_layer:
        for r, c in enumerate(ranking):
            fused[c] = fused.get(c, 0.0) + 1 / (1 + r)
    expected = sorted(fused, key=lambda c: (-fused[c], c))
    assert got == [expected.index(c) + 1 for c in range(6)]
    # float32 keys of the KV heads the named heads read: at layer 0 heads 0 and 1, at layer 1 head 0
    assert rows[0]["bytes_per_token"] == pytest.approx((1 + 2) * 8 * 4 * 48 / 48)


def test_token_chunk_spans_follow_each_token_start():
    offsets = [(0, 0), (0, 3), (3, 9), (9, 12), (12, 20), (20, 21), (0, 0)]
    assert token_chunk_spans(offsets, 10, 3) == [(1, 4), (4, 5), (5, 6)]
    assert token_chunk_spans([(0, 0), (0, 4)], 10, 2) == [(1, 2), (0, 0)]


def _keep_hidden(store: dict):
    """A forward hook that keeps the attention input and leaves the output alone (returns None)."""

    def hook(_module, _args, kwargs, _out) -> None:
        store.setdefault("h", kwargs["hidden_states"])

    return hook


def _tiny(model_type: str = "llama", layers: int = 2, **extra) -> torch.nn.Module:
    """A seeded tiny byte-level causal LM: 4 query heads and 2 KV heads of 8."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, **extra,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).eval()


def _tiny_llama() -> torch.nn.Module:
    return _tiny(initializer_range=0.2)


def test_reader_gives_position_free_qk_and_the_models_own_received_attention():
    model = _tiny_llama()
    reader = AttentionReader(model)
    ids, mask, _ = byte_tokenize(["some words of text", "short"])
    views = reader(ids, mask)
    assert reader.num_layers == 2 and len(views) == 2
    attn = model.model.layers[1].self_attn
    hidden = {}
    attn.register_forward_hook(_keep_hidden(hidden), with_kwargs=True)
    reader(ids, mask)
    h = hidden["h"]
    q = attn.q_proj(h).view(2, -1, 4, 8).transpose(1, 2)
    k = attn.k_proj(h).view(2, -1, 2, 8).transpose(1, 2)
    torch.testing.assert_close(views[1].query, q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(views[1].key, k, rtol=1e-4, atol=1e-5)
    # mass from the rotated Q/K, written out here: causal softmax, padded keys and queries excluded
    cos, sin = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    k_rot = k_rot.repeat_interleave(2, dim=1)
    logits = q_rot @ k_rot.transpose(-1, -2) / math.sqrt(8)
    t = ids.shape[1]
    allowed = torch.ones(t, t).tril().bool()[None, None] & mask.bool()[:, None, None, :]
    w = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0) * mask[:, None, :, None]
    expected = w.sum(2).view(2, 2, 2, t).sum(2) * mask[:, None, :]
    torch.testing.assert_close(views[1].mass, expected, rtol=1e-4, atol=1e-5)


def test_reader_without_eager_reads_the_same_qk_and_keeps_the_models_attention():
    model = _tiny_llama()
    ids, mask, _ = byte_tokenize(["some words of text", "short"])
    before = model.config._attn_implementation
    plain = AttentionReader(model, eager=False)
    assert model.config._attn_implementation == before != "eager"
    got = plain.queries_and_keys(ids, mask)
    views = AttentionReader(copy.deepcopy(model))(ids, mask)
    for (q, k), v in zip(got, views, strict=True):
        torch.testing.assert_close(q, v.query)
        torch.testing.assert_close(k, v.key)
    with pytest.raises(RuntimeError, match="eager=False"):
        plain(ids, mask)


def test_keyer_indexes_each_chunk_with_the_library_strategies():
    model = _tiny_llama()
    keyer = AttentionKeyer(AttentionReader(model), byte_tokenize, chunk_len=8, batch_size=2)
    texts = ["the fox jumps over the dog.", "a farm far away"]
    segs = keyer.segments(texts)
    view = keyer.reader(*byte_tokenize(texts[:1])[:2])[0]
    chunks = [(0, 8), (8, 16), (16, 24), (24, 27)]
    for ks in key_strategies():
        got = segs[0][0].vectors[ks.name]
        expected = chunk_keys(
            ks.strategy, chunks, view.key[0], view.query[0], view.mass[0], ks.keys_per_chunk, ks.keyword_pool
        )
        np.testing.assert_allclose(got[0], expected.vectors.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got[1], expected.chunk_index.numpy())
    tokens, token_chunk = segs[1][0].tokens
    assert tokens.shape == (15, 2 * 8) and token_chunk.tolist() == [0] * 8 + [1] * 7
    raw = keyer.reader(*byte_tokenize(texts[1:])[:2])[0].key[0]  # (H_kv, T, D)
    np.testing.assert_allclose(tokens, raw.permute(1, 0, 2).reshape(15, 16).numpy(), rtol=1e-4, atol=1e-5)
    # every_token holds the same keys; the keyer keeps one copy of them, not two
    assert np.shares_memory(tokens, segs[1][0].vectors["every_token"][0])
    pooled, per_token = keyer.question("what is it?")[0]
    assert pooled.shape == (16,) and per_token.shape == (11, 16)
    np.testing.assert_allclose(per_token.mean(0), pooled, rtol=1e-4, atol=1e-5)


def test_keyer_prefix_is_read_but_not_keyed_and_a_token_across_its_end_is_dropped():
    """A segment read after a prefix: its token keys are the joint forward's keys at the segment's
    own positions, chunks counted from the segment's start; a token whose span starts inside the
    prefix and ends past it (a BPE merge across the boundary) belongs to neither."""
    model = _tiny_llama()
    prefix, text = "Read on.\n", "the fox jumps over"

    def merging(texts):  # byte tokens, except that the prefix's last byte claims the next one too
        ids, mask, offsets = byte_tokenize(texts)
        for row in offsets:
            row[len(prefix) - 1] = (len(prefix) - 1, len(prefix) + 1)
            row[len(prefix)] = (len(prefix) + 1, len(prefix) + 1)
        return ids, mask, offsets

    keyer = AttentionKeyer(AttentionReader(model), merging, chunk_len=8)
    tokens, token_chunk = keyer.segments([text], prefix)[0][1].tokens
    key = keyer.reader(*byte_tokenize([prefix + text])[:2])[1].key[0]  # (H_kv, T, D)
    own = list(range(len(prefix) + 1, len(prefix) + len(text)))  # the text's first byte is dropped
    np.testing.assert_allclose(tokens, key[:, own].permute(1, 0, 2).reshape(len(own), -1).numpy(), rtol=1e-5)
    assert token_chunk.tolist() == [(i - len(prefix)) // 8 for i in own]


def test_question_read_after_context_pools_its_own_tokens_only():
    """The question read after a context: its pooled query is the mean of the group-averaged queries
    at the question's positions of the joint forward; layer 0's position-free queries see no other
    token, so there it equals the question read alone, and deeper layers differ."""
    model = _tiny_llama()
    keyer = AttentionKeyer(AttentionReader(model), byte_tokenize, chunk_len=8)
    context, question = "the fox jumps over the dog.\n", "what is it?"
    views = keyer.reader(*byte_tokenize([context + question])[:2])
    alone = keyer.question(question)
    for layer, (pooled, per_token) in enumerate(keyer.question(question, context)):
        q = views[layer].query[0][:, len(context) :]  # (H, T_q, D), the question's positions
        grouped = q.reshape(keyer.reader.kv_heads, -1, *q.shape[1:]).mean(1)
        expected = grouped.permute(1, 0, 2).reshape(len(question), -1)
        np.testing.assert_allclose(per_token, expected.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(pooled, expected.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        same = np.allclose(pooled, alone[layer][0], rtol=1e-4, atol=1e-5)
        assert same == (layer == 0)
    with pytest.raises(ValueError, match="no token of its own"):
        keyer.question("", context)


def test_byte_tokenize_refuses_non_ascii():
    with pytest.raises(ValueError, match="ASCII"):
        byte_tokenize(["café"])


def _chunk_text(text: str, chunks: set[int], chunk_len: int) -> str:
    return "".join(text[c * chunk_len : (c + 1) * chunk_len] for c in sorted(chunks))


def test_facts_task_each_question_names_its_fact_and_the_relevant_chunk_holds_the_code():
    samples = facts_task(12, 8192, 64, seed=3)
    base = corpus(300_000, 8192)
    text = samples[0].text
    assert len(text) == len(base) and all(s.text is text for s in samples)
    assert len({s.question for s in samples}) == 12
    for s in samples:
        (name,) = set(re.findall(r"[A-Z][a-z]+", s.question)) - {"What", "Which", "Tell"}
        at = text.index(f"{name}'s code is ") + len(f"{name}'s code is ")
        code = text[at : at + 5]
        assert code.isdigit() and text[at + 5] == "." and text.count(name) == 1
        assert s.relevant == {i // 64 for i in range(at, at + 5)}
        assert code[0] in _chunk_text(text, s.relevant, 64)


def test_passkey_task_changes_only_the_needle_and_marks_both_copies_of_the_key():
    samples = passkey_task(5, 4096, 32, seed=1)
    base = corpus(0, 4096)
    keys = set()
    for s in samples:
        diff = [i for i, (a, b) in enumerate(zip(s.text, base, strict=True)) if a != b]
        key = s.text[diff[0] :].split("The pass key is ", 1)[1][:5]
        keys.add(key)
        spans = [(i, i + 5) for i in range(len(s.text)) if s.text.startswith(key, i)]
        assert len(spans) == 2 and diff[-1] - diff[0] < 64
        assert s.relevant == {i // 32 for a, b in spans for i in range(a, b)}
        assert s.question == PASSKEY_QUESTION
    assert len(keys) == 5


def test_kv_task_asks_each_key_once_and_is_reproducible():
    a, b = kv_task(6, 4096, 64, seed=2), kv_task(6, 4096, 64, seed=2)
    assert [s.question for s in a] == [s.question for s in b] and a[0].text == b[0].text
    for s in a:
        key = s.question.split("key ")[1].split("?")[0]
        at = s.text.index(f"The value of key {key} is ") + len(f"The value of key {key} is ")
        assert s.text[at : at + 5].isdigit() and s.relevant == {i // 64 for i in range(at, at + 5)}
    assert len({s.question for s in a}) == 6


def test_reader_reads_q_and_k_after_the_per_head_norms_of_qwen3():
    model = _tiny("qwen3", layers=1, head_dim=8)
    with torch.no_grad():  # norms that are not the identity, so reading before them would differ
        for p in (
            model.model.layers[0].self_attn.q_norm.weight,
            model.model.layers[0].self_attn.k_norm.weight,
        ):
            p.uniform_(0.5, 2.0)
    reader = AttentionReader(model)
    ids, mask, _ = byte_tokenize(["a few words"])
    attn = model.model.layers[0].self_attn
    hidden = {}
    attn.register_forward_hook(_keep_hidden(hidden), with_kwargs=True)
    view = reader(ids, mask)[0]
    h = hidden["h"]
    q = attn.q_norm(attn.q_proj(h).view(1, -1, 4, 8)).transpose(1, 2)
    k = attn.k_norm(attn.k_proj(h).view(1, -1, 2, 8)).transpose(1, 2)
    torch.testing.assert_close(view.query, q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(view.key, k, rtol=1e-4, atol=1e-5)


def _cell(mrr: float) -> dict:
    return {"mrr": {"mean": mrr, "low": 0.0, "high": 1.0}, "recall@1": {"mean": mrr, "low": 0.0, "high": 1.0},
            "recall@5": {"mean": mrr}, "ms": {"mean": 1.0}, "bytes_per_token": {"mean": 8.0}}  # fmt: skip


def test_headline_picks_each_strategys_variant_on_the_held_out_task_only():
    dev = {"m": {"0/ip/mean_key": _cell(0.2), "1/cos/mean_key": _cell(0.5), "0/ip/token_keys": _cell(0.1)},
           "bm25": {"bm25": _cell(0.7)}}  # fmt: skip
    test = {"m": {"0/ip/mean_key": _cell(0.9), "1/cos/mean_key": _cell(0.3), "0/ip/token_keys": _cell(0.4)},
            "bm25": {"bm25": _cell(0.6)}}  # fmt: skip
    table = headline({"facts_dev": dev, "facts": test})
    assert set(table) == {"m: mean_key", "m: token_keys", "bm25"}
    row = table["m: mean_key"]
    assert row["variant"] == "1/cos/mean_key" and row["facts"]["mrr"]["mean"] == 0.3  # chosen on dev
    assert row["best_on_test"]["facts"] == {"variant": "0/ip/mean_key", "mrr": 0.9}  # the upper bound
    text = markdown(table, ["facts"], dev)
    assert "| m: mean_key | 0.30 / 0.90 |" in text
    assert "| facts | m: mean_key (`1/cos/mean_key`)" in text  # the model's best held-out strategy
    assert "m: token_keys (`" not in text.split("\n\n")[0]
