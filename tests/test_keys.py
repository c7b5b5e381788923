"""Key strategies against references written here from an explicit attention map, with loops."""

import math

import pytest
import torch

from memstack.memory.store.chunks import fixed_chunks, surprise_chunks
from memstack.memory.store.keys import (
    STRATEGIES,
    attention_weighted,
    chunk_keys,
    group_mean,
    mean_key,
    mean_query,
    normalise,
    received_attention,
    received_attention_mass,
    segment_query,
)

H, H_KV, D = 4, 2, 8
GROUP = H // H_KV


def attention_map(q, k, q_pos, k_pos, valid, scale):
    """Full softmax map ``(H, Tq, T)`` in float64, one query and head at a time.

    Query head h reads KV head h // group; query i sees key j iff k_pos[j] <= q_pos[i] and valid[j]."""
    heads, q_len, _ = q.shape
    kv_heads, kv_len, _ = k.shape
    group = heads // kv_heads
    out = torch.zeros(heads, q_len, kv_len, dtype=torch.float64)
    for h in range(heads):
        for i in range(q_len):
            js = [j for j in range(kv_len) if k_pos[j] <= q_pos[i] and (valid is None or valid[j])]
            if not js:
                continue
            logits = torch.stack([q[h, i].double() @ k[h // group, j].double() * scale for j in js])
            for n, j in enumerate(js):
                out[h, i, j] = torch.softmax(logits, dim=0)[n]
    return out


def mass_from_map(amap, kv_heads):
    """Sum the map over queries and over the query heads of each KV head: ``(H_kv, T)``."""
    group = amap.shape[0] // kv_heads
    mass = torch.zeros(kv_heads, amap.shape[2], dtype=torch.float64)
    for h in range(amap.shape[0]):
        mass[h // group] += amap[h].sum(dim=0)
    return mass


def flat(per_head):
    """Concatenate a list of per-KV-head vectors, head 0 first."""
    return torch.cat([v.reshape(-1) for v in per_head])


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    t = 12
    return torch.randn(H, t, D, generator=g), torch.randn(H_KV, t, D, generator=g)


# --- chunking -----------------------------------------------------------------------------------


def test_fixed_chunks_padding_and_holes():
    # left padding (0, 1), a hole at 7, right padding (12, 13)
    valid = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    chunks = fixed_chunks(valid, 3)
    assert chunks == [(2, 5), (5, 7), (8, 11), (11, 12)]
    covered = [t for s, e in chunks for t in range(s, e)]
    assert sorted(covered) == valid.nonzero().flatten().tolist()  # each valid index exactly once
    assert len(covered) == len(set(covered))
    assert all(valid[t] for t in covered)
    assert all(e - s <= 3 for s, e in chunks)


def test_fixed_chunks_partial_last_and_edge_cases():
    assert fixed_chunks(torch.ones(10, dtype=torch.bool), 4) == [(0, 4), (4, 8), (8, 10)]
    assert fixed_chunks(torch.ones(8, dtype=torch.bool), 4) == [(0, 4), (4, 8)]
    assert fixed_chunks(torch.zeros(5, dtype=torch.bool), 4) == []
    with pytest.raises(ValueError, match="chunk_len must be >= 1"):
        fixed_chunks(torch.ones(4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="1-D bool"):
        fixed_chunks(torch.ones(4), 2)


def _spiky_nll():
    # 9 tokens at 1.0 and spikes of 10.0 before tokens 3, 4, 9: mean 3.25, population std 3.897,
    # threshold (gamma=1) 7.15, so exactly 3, 4 and 9 are surprising.
    nll = torch.ones(12)
    nll[[3, 4, 9]] = 10.0
    return nll


def test_surprise_chunks_hand_example():
    nll, valid = _spiky_nll(), torch.ones(12, dtype=torch.bool)
    # 3 starts a chunk; 4 is surprising but [3, 4) would be shorter than min_len; 9 starts one
    assert surprise_chunks(nll, valid, min_len=2, max_len=12) == [(0, 3), (3, 9), (9, 12)]
    # max_len=4 cuts [3, 9) at 7; 9 is then 2 tokens into [7, ...), long enough
    assert surprise_chunks(nll, valid, min_len=2, max_len=4) == [(0, 3), (3, 7), (7, 9), (9, 12)]
    # min_len=1: the early surprise at 4 is a boundary too
    assert surprise_chunks(nll, valid, min_len=1, max_len=12) == [(0, 3), (3, 4), (4, 9), (9, 12)]
    # a huge gamma: nothing is surprising, only max_len cuts (last chunk shorter)
    assert surprise_chunks(nll, valid, min_len=2, max_len=5, gamma=10.0) == [(0, 5), (5, 10), (10, 12)]


def test_surprise_chunks_population_std():
    # [0, 0, 0, 1, 0, 0]: mean 1/6, population std 0.373, sample std 0.408. With gamma=2.1 the
    # threshold is 0.95 with the population std (1 is surprising) but 1.02 with the sample std.
    nll, valid = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0]), torch.ones(6, dtype=torch.bool)
    assert surprise_chunks(nll, valid, 1, 6, gamma=2.1) == [(0, 3), (3, 6)]
    assert surprise_chunks(nll, valid, 1, 6, gamma=2.3) == [(0, 6)]


def test_surprise_chunks_statistics_use_valid_finite_tokens_only():
    nll, valid = _spiky_nll(), torch.ones(12, dtype=torch.bool)
    # padding with enormous nll would raise the threshold above the spikes if it were counted
    padded_nll = torch.cat([torch.full((3,), 1e4), nll])
    padded_valid = torch.cat([torch.zeros(3, dtype=torch.bool), valid])
    shifted = [(s + 3, e + 3) for s, e in [(0, 3), (3, 9), (9, 12)]]
    assert surprise_chunks(padded_nll, padded_valid, 2, 12) == shifted
    # NaN where there is no prediction (first token): excluded from the statistics
    nan_first = nll.clone()
    nan_first[0] = float("nan")
    assert surprise_chunks(nan_first, valid, 2, 12) == [(0, 3), (3, 9), (9, 12)]


def test_surprise_chunks_random_respects_lengths():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        t = 60
        nll = torch.rand(t, generator=g) ** 4 * 10
        valid = torch.rand(t, generator=g) > 0.1
        chunks = surprise_chunks(nll, valid, min_len=3, max_len=7, gamma=0.5)
        covered = [i for s, e in chunks for i in range(s, e)]
        assert covered == valid.nonzero().flatten().tolist()
        for n, (s, e) in enumerate(chunks):
            assert e - s <= 7
            last_of_run = n + 1 == len(chunks) or chunks[n + 1][0] != e
            assert e - s >= 3 or last_of_run


def test_surprise_chunks_errors():
    with pytest.raises(ValueError, match="min_len <= max_len"):
        surprise_chunks(torch.ones(4), torch.ones(4, dtype=torch.bool), 5, 3)
    with pytest.raises(ValueError, match="must both be"):
        surprise_chunks(torch.ones(4), torch.ones(5, dtype=torch.bool), 1, 3)


# --- received attention mass --------------------------------------------------------------------


@pytest.mark.parametrize("scaling", [None, 0.2])
def test_received_mass_gqa_and_padding(qk, scaling):
    q, k = qk
    t = q.shape[1]
    pos = torch.arange(t)
    valid = torch.ones(t, dtype=torch.bool)
    valid[[0, 1, 6]] = False  # left padding and a hole
    scale = 1 / math.sqrt(D) if scaling is None else scaling
    expected = mass_from_map(attention_map(q, k, pos, pos, valid, scale), H_KV)
    got = received_attention_mass(q, k, pos, pos, scaling, valid)
    assert got.shape == (H_KV, t) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got[:, ~valid] == 0).all()
    # query 0 and 1 see nothing (only padding before them): the total mass is one per
    # (query head, query) that sees at least one key
    assert got.sum().item() == pytest.approx(H * (t - 2), rel=1e-5)


def test_received_mass_observation_window_only(qk):
    q, k = qk
    t = q.shape[1]
    pos = torch.arange(t)
    full = attention_map(q, k, pos, pos, None, 1 / math.sqrt(D))
    window = slice(t - 3, t)
    expected = mass_from_map(full[:, window], H_KV)
    got = received_attention_mass(q[:, window], k, pos[window], pos, None, None)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got.double(), mass_from_map(full, H_KV), atol=1e-2)
    # blocking over queries changes nothing
    torch.testing.assert_close(got, received_attention_mass(q[:, window], k, pos[window], pos, query_block=1))


def test_received_mass_causal_by_positions(qk):
    q, k = qk
    t = q.shape[1]
    key_pos = torch.randperm(t, generator=torch.Generator().manual_seed(3))  # keys out of order
    query_pos = torch.tensor([2, 5, 9])
    got = received_attention_mass(q[:, :3], k, query_pos, key_pos, None, None)
    expected = mass_from_map(attention_map(q[:, :3], k, query_pos, key_pos, None, 1 / math.sqrt(D)), H_KV)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got[:, key_pos > 9] == 0).all()  # later than every query: never seen
    assert (got[:, key_pos <= 9] > 0).all()
    # a query earlier than every key gets nothing and adds nothing
    none = received_attention_mass(q[:, :1], k, torch.tensor([-1]), key_pos)
    assert (none == 0).all()


def test_received_mass_mean_over_queries(qk):
    q, k = qk
    t = q.shape[1]
    pos = torch.arange(t)
    valid = torch.ones(t, dtype=torch.bool)
    valid[4] = False
    summed = mass_from_map(attention_map(q, k, pos, pos, valid, 0.3), H_KV)
    seen = torch.tensor([sum(1 for i in range(t) if j <= i) if valid[j] else 0 for j in range(t)])
    expected = summed / seen.clamp_min(1)
    got = received_attention_mass(q, k, pos, pos, 0.3, valid, mean_over_queries=True)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_received_mass_bfloat16_in_float32_out(qk):
    q, k = qk
    pos = torch.arange(q.shape[1])
    got = received_attention_mass(q.bfloat16(), k.bfloat16(), pos, pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(
        got, received_attention_mass(q.bfloat16().float(), k.bfloat16().float(), pos, pos)
    )


def test_received_mass_errors(qk):
    q, k = qk
    pos = torch.arange(q.shape[1])
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        received_attention_mass(q[:3], k, pos, pos)
    with pytest.raises(ValueError, match="key_positions"):
        received_attention_mass(q, k, pos, pos[:-1])
    with pytest.raises(ValueError, match="valid must be"):
        received_attention_mass(q, k, pos, pos, valid=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"need query \(H, Tq, D\)"):
        received_attention_mass(q[..., :4], k, pos, pos)


# --- strategies ---------------------------------------------------------------------------------

CHUNKS = [(0, 5), (5, 9), (9, 10), (10, 12)]  # (9, 10) is shorter than keys_per_chunk


@pytest.fixture
def hand_mass(qk):
    """Mass from an explicit map (not from received_attention_mass): all queries, causal."""
    q, k = qk
    pos = torch.arange(q.shape[1])
    return mass_from_map(attention_map(q, k, pos, pos, None, 1 / math.sqrt(D)), H_KV).float()


def hand_keywords(mass, start, end, n):
    score = [(mass[:, t].sum().item(), t) for t in range(start, end)]
    return sorted(t for _, t in sorted(score, reverse=True)[:n])


def test_received_attention_each(qk, hand_mass):
    q, k = qk
    got = received_attention(CHUNKS, k, q, hand_mass, keys_per_chunk=2, keyword_pool="each")
    vectors, index = [], []
    for i, (s, e) in enumerate(CHUNKS):
        for t in hand_keywords(hand_mass, s, e, 2):
            vectors.append(flat([k[h, t] for h in range(H_KV)]))
            index.append(i)
    assert got.chunk_index.tolist() == index == [0, 0, 1, 1, 2, 3, 3]
    torch.testing.assert_close(got.vectors, torch.stack(vectors))


def test_received_attention_mean(qk, hand_mass):
    q, k = qk
    got = received_attention(CHUNKS, k, q, hand_mass, keys_per_chunk=3, keyword_pool="mean")
    expected = []
    for s, e in CHUNKS:
        words = hand_keywords(hand_mass, s, e, 3)
        expected.append(flat([sum(k[h, t] for t in words) / len(words) for h in range(H_KV)]))
    assert got.chunk_index.tolist() == [0, 1, 2, 3]
    assert got.vectors.shape == (4, H_KV * D) and got.vectors.dtype == torch.float32
    torch.testing.assert_close(got.vectors, torch.stack(expected))


def test_received_attention_from_computed_mass_matches_hand_map(qk, hand_mass):
    q, k = qk
    pos = torch.arange(q.shape[1])
    mass = received_attention_mass(q, k, pos, pos)
    for pool in ("each", "mean"):
        got = chunk_keys("received_attention", CHUNKS, k, q, mass, keys_per_chunk=2, keyword_pool=pool)
        ref = received_attention(CHUNKS, k, q, hand_mass, keys_per_chunk=2, keyword_pool=pool)
        torch.testing.assert_close(got.vectors, ref.vectors)


def test_attention_weighted(qk, hand_mass):
    q, k = qk
    got = attention_weighted(CHUNKS, k, q, hand_mass)
    expected = []
    for s, e in CHUNKS:
        per_head = []
        for h in range(H_KV):
            w = [hand_mass[h, t].item() for t in range(s, e)]
            per_head.append(sum(w[n] * k[h, t] for n, t in enumerate(range(s, e))) / sum(w))
        expected.append(flat(per_head))
    assert got.chunk_index.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(got.vectors, torch.stack(expected))


def test_attention_weighted_zero_mass_falls_back_to_mean(qk, hand_mass):
    q, k = qk
    mass = hand_mass.clone()
    mass[1, 5:9] = 0.0  # chunk 1 got nothing on head 1
    got = attention_weighted(CHUNKS, k, q, mass)
    assert torch.isfinite(got.vectors).all()
    torch.testing.assert_close(got.vectors[1, D:], k[1, 5:9].mean(dim=0))


def test_mean_key_and_mean_query(qk):
    q, k = qk
    keys = mean_key(CHUNKS, k, q)
    queries = mean_query(CHUNKS, k, q)
    exp_k, exp_q = [], []
    for s, e in CHUNKS:
        exp_k.append(flat([sum(k[h, t] for t in range(s, e)) / (e - s) for h in range(H_KV)]))
        per_head = []
        for kv in range(H_KV):
            heads = range(kv * GROUP, (kv + 1) * GROUP)  # repeat_kv order
            per_head.append(sum(q[h, t] for h in heads for t in range(s, e)) / (GROUP * (e - s)))
        exp_q.append(flat(per_head))
    torch.testing.assert_close(keys.vectors, torch.stack(exp_k))
    torch.testing.assert_close(queries.vectors, torch.stack(exp_q))
    assert keys.chunk_index.tolist() == queries.chunk_index.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_chunk_keys_dispatches_and_handles_no_chunks(qk, hand_mass, name):
    q, k = qk
    got = chunk_keys(name, CHUNKS, k, q, hand_mass, keys_per_chunk=2, keyword_pool="each")
    ref = STRATEGIES[name].fn(CHUNKS, k, q, hand_mass, keys_per_chunk=2, keyword_pool="each")
    torch.testing.assert_close(got.vectors, ref.vectors)
    assert got.chunk_index.dtype == torch.int64
    empty = chunk_keys(name, [], k, q, hand_mass)
    assert empty.vectors.shape == (0, H_KV * D) and empty.chunk_index.shape == (0,)


def test_strategy_errors(qk, hand_mass):
    q, k = qk
    with pytest.raises(ValueError, match="unknown key strategy 'nope'.*received_attention.*mean_query"):
        chunk_keys("nope", CHUNKS, k, q, hand_mass)
    for name in ("received_attention", "attention_weighted"):
        with pytest.raises(ValueError, match=f"'{name}' needs mass"):
            chunk_keys(name, CHUNKS, k, q, None)
    with pytest.raises(ValueError, match="'mean_query' needs query_pf"):
        chunk_keys("mean_query", CHUNKS, k, None, None)
    with pytest.raises(ValueError, match="mass must be"):
        chunk_keys("attention_weighted", CHUNKS, k, q, hand_mass[:, :5])
    with pytest.raises(ValueError, match="query_pf .* must be"):
        chunk_keys("mean_query", CHUNKS, k, q[:3], None)
    with pytest.raises(ValueError, match="query_pf .* must be"):
        chunk_keys("mean_key", CHUNKS, k, q[:, :5], None)
    with pytest.raises(ValueError, match="key_pf must be"):
        chunk_keys("mean_key", CHUNKS, k[0], q, None)
    with pytest.raises(ValueError, match=r"chunk \(9, 13\)"):
        chunk_keys("mean_key", [(9, 13)], k, q, None)
    with pytest.raises(ValueError, match="keyword_pool"):
        chunk_keys("received_attention", CHUNKS, k, q, hand_mass, keyword_pool="max")


# --- query side ---------------------------------------------------------------------------------


def test_segment_query_manual_mean(qk):
    q, _ = qk
    valid = torch.ones(q.shape[1], dtype=torch.bool)
    valid[[0, 7, 11]] = False  # left padding, a hole, right padding
    every = [1, 2, 3, 4, 5, 6, 8, 9, 10]
    for window, positions in [(None, every), (3, [8, 9, 10]), (100, every)]:
        per_head = []
        for kv in range(H_KV):
            heads = range(kv * GROUP, (kv + 1) * GROUP)
            per_head.append(sum(q[h, t] for h in heads for t in positions) / (GROUP * len(positions)))
        got = segment_query(q, H_KV, valid, window)
        assert got.shape == (H_KV * D,) and got.dtype == torch.float32
        torch.testing.assert_close(got, flat(per_head))
    torch.testing.assert_close(segment_query(q, H_KV), group_mean(q, H_KV).mean(dim=1).reshape(-1))
    assert (segment_query(q, H_KV, torch.zeros(q.shape[1], dtype=torch.bool)) == 0).all()


def test_segment_query_errors(qk):
    q, _ = qk
    with pytest.raises(ValueError, match="window must be >= 1"):
        segment_query(q, H_KV, window=0)
    with pytest.raises(ValueError, match="multiple of h_kv"):
        segment_query(q, 3)
    with pytest.raises(ValueError, match="valid must be"):
        segment_query(q, H_KV, torch.ones(3, dtype=torch.bool))


def test_score_is_sum_of_per_head_logits(qk):
    q, k = qk
    score = segment_query(q, H_KV) @ mean_key([(0, 12)], k).vectors[0]
    grouped_q = group_mean(q, H_KV).mean(dim=1)  # (H_kv, D)
    per_head = sum(grouped_q[h] @ k[h].mean(dim=0) for h in range(H_KV))
    assert score.item() == pytest.approx(per_head.item(), rel=1e-5)


def test_chunk_queries_find_their_own_chunk():
    # 6 chunks, each with its own query direction per head plus noise
    g = torch.Generator().manual_seed(5)
    chunk_len, n = 6, 6
    topics = torch.randn(n, H, D, generator=g)
    q = torch.cat([topics[i][:, None] + 0.3 * torch.randn(H, chunk_len, D, generator=g) for i in range(n)], 1)
    k = torch.randn(H_KV, n * chunk_len, D, generator=g)
    chunks = fixed_chunks(torch.ones(n * chunk_len, dtype=torch.bool), chunk_len)
    index = normalise(mean_query(chunks, k, q).vectors)
    for i, (s, e) in enumerate(chunks):
        valid = torch.zeros(n * chunk_len, dtype=torch.bool)
        valid[s:e] = True
        scores = index @ normalise(segment_query(q, H_KV, valid))
        assert scores.argmax().item() == i
        assert scores[i].item() == pytest.approx(1.0, abs=1e-5)


def test_normalise():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(normalise(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]]))
    assert torch.isfinite(normalise(torch.zeros(2, 5))).all()
