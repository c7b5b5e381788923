"""stack.explain: what each block retrieved and each head's shares, on cases with known answers."""

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, StoreConfig
from memstack.data.tokenizer import ByteTokenizer
from tests.conftest import make_model

SEG = 8


def stack_with_store(**store):
    base = dict(layers="0", chunk_len=4, block_len=4, top_k=2, strategy="mean_query", metric="cosine")
    cfg = StackConfig(
        segment_len=SEG, compressive=CompressiveConfig(), store=StoreConfig(**{**base, **store})
    )
    return MemoryStack(make_model("llama"), cfg)


def fact_stream(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[fact, 4 others] [8 others] [fact again, 4 others]: segment 2's block 1 searches with the
    queries of block 0, which repeats the fact's tokens."""
    g = torch.Generator().manual_seed(seed)
    fact = torch.randint(0, 128, (4,), generator=g)
    other = torch.randint(128, 256, (16,), generator=g)  # never one of the fact's bytes
    return torch.cat([fact, other[:4], other[4:12], fact, other[12:]]), fact


def test_explain_names_the_chunk_that_holds_the_fact_first():
    # Layer 0's position-free queries depend on the tokens only, so the query made from the fact's
    # second occurrence equals the key the fact's chunk was stored under (mean_query): cosine 1.
    ids, fact = fact_stream()
    tok = ByteTokenizer()
    found = stack_with_store().explain(ids, tokenizer=tok)
    top = found.for_block(0, 2 * SEG + 4)
    assert top[0].start == 0 and top[0].length == 4 and top[0].segment == 2 and top[0].block == 1
    assert top[0].score == pytest.approx(1.0, abs=1e-5) and top[0].text == tok.decode(fact.tolist())
    assert all(r.score < 1.0 - 1e-3 for r in top[1:])
    # the same through generate: the generated tokens' block retrieves the same chunk
    prompt = ids[: 2 * SEG + 4]
    gen = stack_with_store().explain(prompt, tokenizer=tok, max_new_tokens=3)
    assert gen.for_block(0, 2 * SEG + 4)[0].start == 0 and gen.output.shape == (1, 2 * SEG + 7)


def test_shares_add_up_and_follow_the_gates():
    ids, _ = fact_stream(1)
    stack = stack_with_store()
    shares = stack.explain(ids).shares
    assert sorted(shares) == [0, 1]  # compressive on both layers, the store on layer 0
    for layer, kinds in shares.items():
        total = torch.tensor(list(kinds.values())).sum(0)
        torch.testing.assert_close(total, torch.ones_like(total))
        # the gate's sigmoid on the 16 of 24 queries whose compressive memory holds something
        gate = torch.sigmoid(stack.model.model.layers[layer].self_attn.memstack_memory.gates["compressive"])
        torch.testing.assert_close(torch.tensor(kinds["compressive"]), gate.detach() * 16 / 24)
    store = torch.tensor(shares[0]["store"])
    assert bool((store > 0).all()) and bool((store < 0.5).all())
    assert "store" not in shares[1]


def test_explain_takes_one_stream():
    with pytest.raises(ValueError, match="one stream"):
        stack_with_store().explain(torch.zeros(2, 8, dtype=torch.long))


def test_plot_writes_a_png(tmp_path):
    ids, _ = fact_stream(2)
    path = stack_with_store().explain(ids).plot(tmp_path / "explain.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shares_of_a_store_only_stack_are_the_attention_mass_on_the_retrieved_keys():
    """No compressive memory, so no gates: the store's share is the attention mass the head puts
    on the retrieved keys, here built by hand (tests/test_longterm.py's reference softmax)."""
    from tests.test_longterm import SEG as LT_SEG
    from tests.test_longterm import kv_attention, kv_readout_case

    _, parts = kv_readout_case("llama")  # 1 layer, a kv store, segment 1 retrieves 2 chunks of 4
    stack, ids = parts["stack"], parts["ids"]
    assert "compressive" not in stack.kinds and not stack._mixers[0].gates
    shares = stack.explain(ids).shares
    assert list(shares) == [0] and sorted(shares[0]) == ["local", "store"]
    weights, _ = kv_attention(parts, 5)  # segment 1's queries over [8 retrieved keys; local keys]
    on_retrieved = weights[0, :, :, :8].sum(-1)  # (heads, queries)
    # averaged over both segments' queries: segment 0 had nothing stored to read
    expected = on_retrieved.sum(-1) / (2 * LT_SEG)
    store, local = torch.tensor(shares[0]["store"]), torch.tensor(shares[0]["local"])
    torch.testing.assert_close(store, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(local + store, torch.ones_like(store))
    assert bool((store > 1e-3).all())
    # and through generate
    gen = stack.explain(ids[:, : LT_SEG + 4], max_new_tokens=2)
    total = torch.tensor(list(gen.shares[0].values())).sum(0)
    torch.testing.assert_close(total, torch.ones_like(total))
