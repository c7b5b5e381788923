"""Long-term memory in the stack: the kv readout against a hand-built attention, causality,
generate == forward, padding never stored, batch rows apart, checkpointing writes once."""

import functools

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.memory.store.chunk_store import ChunkStore
from memstack.memory.store.keys import chunk_keys, segment_query
from tests.conftest import make_model, model_pair

SEG = 16


def greedy_by_forward(stack: MemoryStack, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference for generate: one full forward per new token, argmax of the last logits."""
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, stack(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def llama_rotate(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Llama's rotation, written from its modeling code: x cos + rotate_half(x) sin."""
    cos, sin = model.model.rotary_emb(x, positions[None])
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]


def store_config(**kw) -> StoreConfig:
    base = dict(layers="all", chunk_len=4, top_k=2, block_len=8, strategy="received_attention")
    return StoreConfig(**{**base, **kw})


def test_nothing_retrieved_or_gate_closed_equals_the_stack_without_a_store():
    ids = torch.randint(0, 256, (2, 3 * SEG))
    plain = MemoryStack(
        make_model("llama", seed=5),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0)),
    )
    gated = MemoryStack(
        make_model("llama", seed=5),
        StackConfig(
            segment_len=SEG,
            compressive=CompressiveConfig(gate_init=1.0),
            store=store_config(readout="kv_gated", gate_init=-1e4),
        ),
    )
    one = MemoryStack(
        make_model("llama", seed=5),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), store=store_config()),
    )
    with torch.no_grad():
        expected = plain(ids).logits
        torch.testing.assert_close(gated(ids).logits, expected, atol=1e-5, rtol=0)
        # one segment: the store is empty throughout, so nothing is retrieved
        torch.testing.assert_close(one(ids[:, :SEG]).logits, expected[:, :SEG], atol=1e-5, rtol=0)
        out = one(ids)
    assert (out.logits[:, SEG:] - expected[:, SEG:]).abs().max() > 1e-4  # and later it reads
    assert out.state.memories["store"][0].num_records() == [3 * SEG // 4] * 2  # every chunk kept


KV_ATOL = 1e-5  # float32: the readout and the hand-built softmax agree to ~1e-7
WRONG_DISTANCES = [0, 3, 4, 6, 16]


@functools.cache
def kv_readout_case(family: str) -> tuple[torch.Tensor, dict]:
    """Segment 1, layer 0, block 0 of a store stack with ``distance=5`` (it searches with segment
    0's tail query): the attention output the stack computed, and the pieces a hand-built
    reference needs (un-rotated q/k/v of the segment, the retrieved keys and values; the stack
    and its two segments' ids, which it reads from scratch on another call)."""
    torch.manual_seed(1234)
    model = make_model(family, layers=1)
    cfg = StackConfig(segment_len=SEG, compressive=None, store=store_config(block_len=SEG, distance=5))
    stack = MemoryStack(model, cfg)
    ids = torch.randint(0, 256, (1, 2 * SEG))
    with torch.no_grad():
        state = stack(ids[:, :SEG]).state
    store_state = state.memories["store"][0]
    # what segment 1's first block must retrieve, found before segment 1 writes its own chunks
    _, hit = store_state.stores[0].search(0, store_state.tail[0][None], 2)
    k_mem, v_mem, lengths = store_state.stores[0].kv(0, hit[0])
    seen = {}
    attn = stack.model.model.layers[0].self_attn if family == "llama" else stack.model.transformer.h[0].attn
    out_proj = attn.o_proj if family == "llama" else attn.c_proj
    hook = out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0]))
    with torch.no_grad():
        stack(ids[:, SEG:], state=state)
    hook.remove()

    q, k = stack.position_free_qk(ids[:, SEG:])[0]  # layer 0 reads no memory before attention
    v_seen = {}
    if family == "llama":
        h2 = attn.v_proj.register_forward_hook(lambda m, a, o: v_seen.__setitem__("v", o))
        with torch.no_grad():
            stack.position_free_qk(ids[:, SEG:])
        h2.remove()
        v = v_seen["v"].view(1, SEG, -1, q.shape[-1]).transpose(1, 2)
    else:
        h2 = attn.c_attn.register_forward_hook(lambda m, a, o: v_seen.__setitem__("qkv", o))
        with torch.no_grad():
            stack.position_free_qk(ids[:, SEG:])
        h2.remove()
        v = (
            v_seen["qkv"]
            .split(model.config.hidden_size, dim=2)[2]
            .view(1, SEG, -1, q.shape[-1])
            .transpose(1, 2)
        )
    h_kv, d = k.shape[1], q.shape[-1]
    assert int(lengths.sum()) == 8  # two chunks of 4 retrieved
    parts = dict(
        family=family,
        stack=stack,
        ids=ids,
        model=model,
        q=q,
        k=k,
        v=v.float(),
        k_mem=k_mem.float().permute(1, 0, 2, 3).reshape(h_kv, -1, d)[None],
        v_mem=v_mem.float().permute(1, 0, 2, 3).reshape(h_kv, -1, d)[None],
    )
    return seen["out"].view(1, SEG, q.shape[1], d), parts


def kv_attention(parts: dict, distance: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, values) of a softmax over [retrieved keys, queries rotated ``distance`` ahead of
    them; the segment's causal keys], built by hand: weights ``(1, H, SEG, N + SEG)``, the N
    retrieved keys first; ``distance=None``: the local keys alone."""
    q, k, v, k_mem, v_mem = (parts[n] for n in ("q", "k", "v", "k_mem", "v_mem"))
    h, d = q.shape[1], q.shape[-1]
    pos = torch.arange(SEG)
    if parts["family"] == "llama":
        model = parts["model"]
        q_loc, k_loc = llama_rotate(model, q, pos), llama_rotate(model, k, pos)
        q_m = llama_rotate(model, q, torch.full((SEG,), distance or 0))
        k_m = llama_rotate(model, k_mem, torch.zeros(k_mem.shape[2], dtype=torch.long))
    else:
        q_loc, k_loc, q_m, k_m = q, k, q, k_mem
    rep = lambda t: t.repeat_interleave(h // k.shape[1], dim=1)  # noqa: E731
    logits_loc = torch.einsum("bhqd,bhkd->bhqk", q_loc, rep(k_loc)) / d**0.5
    logits_loc = logits_loc.masked_fill(~torch.ones(SEG, SEG, dtype=torch.bool).tril(), float("-inf"))
    if distance is None:
        return torch.softmax(logits_loc, -1), rep(v)
    logits_mem = torch.einsum("bhqd,bhnd->bhqn", q_m, rep(k_m)) / d**0.5
    weights = torch.softmax(torch.cat([logits_mem, logits_loc], dim=-1), dim=-1)
    return weights, torch.cat([rep(v_mem), rep(v)], dim=2)


def kv_reference(parts: dict, distance: int | None) -> torch.Tensor:
    """The output ``(1, SEG, H, D)`` of :func:`kv_attention`."""
    return torch.einsum("bhqn,bhnd->bqhd", *kv_attention(parts, distance))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_retrieved_kv_enter_the_softmax_at_the_documented_distance(family):
    """The output equals the hand-built softmax with the retrieved keys 5 positions behind."""
    out, parts = kv_readout_case(family)
    torch.testing.assert_close(out, kv_reference(parts, 5), atol=KV_ATOL, rtol=0)
    # and memory really mattered: the same without the retrieved keys is farther away
    assert (out - kv_reference(parts, None)).abs().max() > 1e-2


@pytest.mark.parametrize("wrong", WRONG_DISTANCES)
def test_a_reference_at_another_distance_does_not_match(wrong):
    """The tolerance above tells the documented distance from its neighbours (rotary: llama)."""
    out, parts = kv_readout_case("llama")
    assert (out - kv_reference(parts, wrong)).abs().max() > 10 * KV_ATOL


@pytest.mark.parametrize("readout", ["kv", "kv_gated"])
def test_causality_with_the_store(readout):
    stack = MemoryStack(
        make_model("qwen2"), StackConfig(segment_len=SEG, store=store_config(readout=readout, gate_init=1.0))
    )
    ids = torch.randint(0, 256, (1, 4 * SEG))
    t = 2 * SEG + 5
    changed = ids.clone()
    changed[0, t] = (ids[0, t] + 1) % 256
    with torch.no_grad():
        a, b = stack(ids).logits, stack(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=0, rtol=0)
    assert (a[:, 3 * SEG :] - b[:, 3 * SEG :]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_generate_equals_greedy_forward_with_the_store(family):
    stack = MemoryStack(
        make_model(family),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), store=store_config()),
    )
    prompt = torch.randint(0, 256, (2, 2 * SEG + 3))
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=2 * SEG)
        expected = greedy_by_forward(stack, prompt, 2 * SEG)
    assert torch.equal(out, expected)


def test_padding_is_never_stored_and_rows_never_see_each_other():
    stack = MemoryStack(
        make_model("llama"),
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), store=store_config()),
    )
    a, b = torch.randint(0, 256, (1, 3 * SEG)), torch.randint(0, 256, (1, 3 * SEG - 5))
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], 1)])
    mask = torch.ones_like(batch)
    mask[1, -5:] = 0
    with torch.no_grad():
        both = stack(batch, attention_mask=mask)
        alone_a, alone_b = stack(a), stack(b)
    torch.testing.assert_close(both.logits[:1], alone_a.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(both.logits[1:, : b.shape[1]], alone_b.logits, atol=1e-4, rtol=0)
    for layer, s in both.state.memories["store"].items():
        row_a, row_b = s.stores
        stored_b = torch.cat(row_b.tokens(row_b.ids()))
        assert torch.equal(stored_b, b[0]), layer  # every valid token once, no padding
        assert torch.equal(torch.cat(row_a.tokens(row_a.ids())), a[0])


def test_checkpointing_writes_each_record_once_and_keeps_gradients():
    ids = torch.randint(0, 256, (1, 4 * SEG))
    grads, records = [], []
    for ckpt in (False, True):
        model = make_model("llama", seed=7)
        cfg = StackConfig(segment_len=SEG, checkpoint_segments=ckpt, store=store_config())
        stack = MemoryStack(model, cfg)
        out = stack(ids, labels=ids)
        out.loss.backward()
        grads.append(model.model.embed_tokens.weight.grad.clone())
        records.append(out.state.memories["store"][0].num_records())
    assert records[0] == records[1] == [4 * SEG // 4]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_a_chunk_is_found_by_a_query_made_from_it():
    torch.manual_seed(0)
    h, h_kv, t, d = 4, 2, 64, 16
    q, k = torch.randn(h, t, d), torch.randn(h_kv, t, d)
    chunks = [(i, i + 8) for i in range(0, t, 8)]
    keys = chunk_keys("mean_query", chunks, k, q, None)
    store = ChunkStore([0], h_kv * d, metric="cosine")
    store.add([torch.arange(a, b) for a, b in chunks], [a for a, _ in chunks], 0, {0: keys})
    for i, (a, b) in enumerate(chunks):
        _, ids = store.search(0, segment_query(q[:, a:b], h_kv)[None], 1)
        assert ids.item() == i


def test_memory_off_store_equals_the_stack_without_it():
    model, ref = model_pair("llama")
    with_store = MemoryStack(
        model,
        StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0), store=store_config()),
    )
    plain = MemoryStack(ref, StackConfig(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0)))
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad(), with_store.memory_off("store"):
        off = with_store(ids)
        torch.testing.assert_close(off.logits, plain(ids).logits, atol=1e-5, rtol=0)
    assert "store" not in off.state.memories


def test_a_state_with_a_store_is_checked_and_never_half_saved(tmp_path):
    stack = MemoryStack(make_model("llama"), StackConfig(segment_len=SEG, store=store_config()))
    ids = torch.randint(0, 256, (2, 2 * SEG))
    with torch.no_grad():
        state = stack(ids).state
    with pytest.raises(ValueError, match=r"store memory of layer 0 holds 2 streams, the input has 1 rows"):
        stack(ids[:1], state=state)
    with pytest.raises(ValueError, match=r"\['store'\] memory, which a single file cannot hold; save the"):
        state.save(tmp_path / "state.safetensors")
    assert not list(tmp_path.iterdir())
    row = state.memories["store"][1].stores[0]
    row.save(tmp_path / "row0")
    assert torch.equal(torch.cat(ChunkStore.load(tmp_path / "row0").tokens(row.ids())), ids[0])


def test_save_pretrained_round_trips_a_stack_with_a_gated_store(tmp_path):
    model, fresh = model_pair("llama")
    cfg = StackConfig(segment_len=SEG, store=store_config(readout="kv_gated", gate_init=0.5))
    stack = MemoryStack(model, cfg)
    with torch.no_grad():
        for gate in stack.gate_parameters():
            gate.normal_()
    assert {kind for _, kind in stack.named_gates()} == {"compressive", "store"}
    stack.save_pretrained(tmp_path)
    restored = MemoryStack.from_pretrained(tmp_path, fresh)
    assert restored.config == cfg
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        assert torch.equal(restored(ids).logits, stack(ids).logits)


def test_surprise_chunks_are_cut_where_the_stack_is_surprised():
    from memstack.memory.store.chunks import surprise_chunks
    from memstack.stack import token_nll

    model, ref = model_pair("llama")
    cfg = StackConfig(
        segment_len=SEG, store=store_config(chunking="surprise", chunk_len=8, surprise_gamma=0.5)
    )
    stack = MemoryStack(model, cfg)
    ids = torch.randint(0, 256, (1, SEG))
    with torch.no_grad():
        state = stack(ids).state
        nll = token_nll(ref(ids).logits, ids)[0]  # one segment, no memory read: the model alone
    assert torch.isnan(nll[0]) and bool(torch.isfinite(nll[1:]).all())
    expected = surprise_chunks(nll, torch.ones(SEG, dtype=torch.bool), 2, 8, 0.5)
    store = state.memories["store"][0].stores[0]
    starts = [int(store.records(torch.tensor([i]))["start"][0]) for i in store.ids().tolist()]
    assert starts == [a for a, _ in expected] and len(expected) > SEG // 8  # cut by surprise, not every 8


def test_generate_equals_forward_with_surprise_chunking():
    cfg = StackConfig(
        segment_len=SEG,
        compressive=CompressiveConfig(gate_init=1.0),
        store=store_config(chunking="surprise", chunk_len=8),
    )
    stack = MemoryStack(make_model("llama", seed=2), cfg)
    prompt = torch.randint(0, 256, (1, SEG + 5))
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=2 * SEG)
        expected = greedy_by_forward(stack, prompt, 2 * SEG)
    assert torch.equal(out, expected)


def test_tokens_readout_equals_the_model_on_the_concatenated_ids():
    model, ref = model_pair("llama")
    cfg = StackConfig(segment_len=SEG, compressive=None, store=store_config(readout="tokens", top_k=2))
    stack = MemoryStack(model, cfg)
    ids = torch.randint(0, 256, (1, 2 * SEG))
    with torch.no_grad():
        state = stack(ids[:, :SEG]).state
        layers = state.memories["store"]
        prefix, valid = stack.kinds["store"].prefix(layers)  # before segment 1 writes
        assert bool(valid.all()) and prefix.shape[1] == 2 * 4  # two chunks of 4 tokens
        out = stack(ids[:, SEG:], state=state)
        expected = ref(torch.cat([prefix, ids[:, SEG:]], dim=1)).logits[:, prefix.shape[1] :]
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    store = out.state.memories["store"][0].stores[0]
    assert torch.equal(torch.cat(store.tokens(store.ids())), ids[0])  # the prefix is never stored again


@pytest.mark.parametrize("chunk_len", [4, 5])  # 5: the rows' hits differ in length (padded prefix)
def test_generate_equals_greedy_forward_with_the_tokens_readout(chunk_len):
    cfg = StackConfig(
        segment_len=SEG,
        compressive=CompressiveConfig(gate_init=1.0),
        store=store_config(readout="tokens", chunk_len=chunk_len),
    )
    stack = MemoryStack(make_model("llama", seed=4), cfg)
    prompt = torch.randint(0, 256, (2, 2 * SEG + 3))
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=2 * SEG)
        expected = greedy_by_forward(stack, prompt, 2 * SEG)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("readout", ["kv", "kv_gated", "tokens"])
def test_the_store_trains_under_bf16_autocast_close_to_float32(readout):
    # the training loop's CUDA path autocasts to bf16; the store's search must not break under it
    ids = torch.randint(0, 256, (2, 12 * SEG), generator=torch.Generator().manual_seed(3))
    losses, grads = [], []
    for autocast in (False, True):
        stack = MemoryStack(
            make_model("llama", seed=2),
            StackConfig(segment_len=SEG, store=store_config(readout=readout, gate_init=0.0)),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = stack(ids, labels=ids, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in stack.parameters() if p.grad is not None]))
        assert all(len(s.stores[0]) > 0 for s in out.state.memories["store"].values())
    assert all(torch.isfinite(g).all() for g in grads)
    # bf16 rounds the activations, not the result: within 2% of float32's loss
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
