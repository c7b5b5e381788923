"""Retrieval policies (memstack/policy.py): when the long-term store is read."""

import pytest
import torch

from memstack import CompressiveConfig, MemoryStack, StackConfig
from memstack.memory.store.kind import LongTermMemory
from memstack.memory.store.policy import RetrievalPolicy, mean_entropy
from tests.conftest import model_pair
from tests.test_longterm import SEG, greedy_by_forward, store_config


def stacks(policy: str):
    """(stack with a store under ``policy``, the same weights without a store)."""
    model, ref = model_pair("llama")
    cfg = dict(segment_len=SEG, compressive=CompressiveConfig(gate_init=1.0))
    with_store = MemoryStack(model, StackConfig(**cfg, store=store_config(policy=policy)))
    return with_store, MemoryStack(ref, StackConfig(**cfg))


@pytest.mark.parametrize(
    "spec", ["sometimes", "every:0", "every:x", "uncertainty:-1", "uncertainty:nan", "always:2"]
)
def test_a_bad_policy_is_refused_with_what_is_accepted(spec):
    with pytest.raises(ValueError, match="accepted.*every:K"):
        store_config(policy=spec)


def test_parse():
    assert RetrievalPolicy.parse("always") == RetrievalPolicy()
    assert RetrievalPolicy.parse("every:3") == RetrievalPolicy(every=3)
    assert RetrievalPolicy.parse("uncertainty:inf").threshold == float("inf")


def test_every_k_consults_exactly_on_the_kth_segments(monkeypatch):
    reads = []
    read = LongTermMemory.read
    monkeypatch.setattr(LongTermMemory, "read", lambda self, *a, **k: reads.append(1) or read(self, *a, **k))
    ids = torch.randint(0, 256, (1, 8 * SEG))
    counts = {}
    for policy in ("always", "every:3"):
        stack, _ = stacks(policy)
        reads.clear()
        with torch.no_grad():
            stack(ids)
        counts[policy] = (list(stack.consulted), len(reads), len(stack.kinds["store"].layers))
    consulted, n_reads, layers = counts["every:3"]
    assert consulted == [2, 5]  # 0-based stream segments 2 and 5: the 3rd and the 6th
    assert n_reads == 2 * layers  # each store layer reads once on each of them, never otherwise
    assert counts["always"][:2] == (list(range(1, 8)), 7 * layers)  # segment 0: nothing stored yet


def test_uncertainty_with_an_infinite_threshold_never_consults_and_equals_no_store():
    with_store, plain = stacks("uncertainty:inf")
    ids = torch.randint(0, 256, (2, 4 * SEG + 3))
    with torch.no_grad():
        out, ref = with_store(ids), plain(ids)
    assert with_store.consulted == [] and out.state.memories["store"]  # written, never read
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_uncertainty_consults_where_entropy_passes_the_threshold():
    ids = torch.randint(0, 256, (1, 5 * SEG))
    always, _ = stacks("always")
    zero, _ = stacks("uncertainty:0")  # any entropy > 0: consults like always
    with torch.no_grad():
        a, z = always(ids), zero(ids)
    assert zero.consulted == always.consulted == [1, 2, 3, 4]
    torch.testing.assert_close(z.logits, a.logits)
    # A threshold between the segments' entropies consults exactly the segments above it.
    plain_store, _ = stacks("uncertainty:inf")
    with torch.no_grad():
        logits = plain_store(ids).logits
    entropies = [mean_entropy(logits[:, s * SEG : (s + 1) * SEG], None) for s in range(5)]
    # The dry run of segment s sees the same memory as this run up to s, as long as nothing was
    # read before s: true for the first consulted segment, so test that one.
    threshold = sorted(entropies[1:])[-2]
    mid, _ = stacks(f"uncertainty:{threshold}")
    with torch.no_grad():
        mid(ids)
    first = next(s for s in range(1, 5) if entropies[s] > threshold)
    assert mid.consulted and mid.consulted[0] == first


def test_generate_follows_every_k_and_uncertainty_decides_from_the_known_tokens():
    prompt = torch.randint(0, 256, (1, 2 * SEG + 3))
    for policy in ("every:2", "uncertainty:inf", "uncertainty:0"):
        # every:K, never and always are decided without the segment's future: generate = forward
        stack, _ = stacks(policy)
        with torch.no_grad():
            assert torch.equal(
                stack.generate(prompt, max_new_tokens=SEG), greedy_by_forward(stack, prompt, SEG)
            )
    stack, _ = stacks("uncertainty:0")
    with torch.no_grad():
        stack.generate(prompt, max_new_tokens=SEG)
    assert stack.consulted == [
        1,
        2,
        3,
    ]  # the prompt's two closed segments after the first, then two open ones


def test_eval_policy_script_reports_the_share_each_policy_reads(tmp_path):
    """The share of segments read, and each policy's accuracy recomputed from its own prompts: each
    prompt rebuilt from its documented seed, its recorded answer checked to be the greedy one by a
    forward pass (not generate) of a freshly loaded stack under the same policy, and compared with
    its pass key."""
    import json
    import runpy
    from pathlib import Path

    from memstack.data.tasks import passkey_sample
    from memstack.train.evaluate import load_run, sample_seed

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "eval_policy.py"))
    out = tmp_path / "p.json"
    policies, depths = ["always", "every:2"], [0.0, 0.25, 0.5, 0.75, 1.0]  # the script's default depths
    script["main"](["--lengths", "300", "--samples", "5", "--policies", *policies, "--out", str(out)])
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    # 300 prompt tokens and a short answer in 128-token segments: the 2nd and 3rd segments can read
    assert rows["always"]["consulted_share"] == 1.0 and rows["every:2"]["consulted_share"] == 0.5
    _, stack, tokenizer = load_run(script["SHIPPED"])
    for policy in policies:
        stack.kinds["store"].policy = RetrievalPolicy.parse(policy)
        row = rows[policy]
        assert [(r["depth"], r["sample"]) for r in row["records"]] == [(d, 0) for d in depths]
        hits = 0
        for record in row["records"]:
            seed = sample_seed("passkey", script["SEED"], 300, record["depth"], 0)
            sample = passkey_sample(tokenizer, 300, record["depth"], seed, filler="text", split="test")
            answer = record["generated_ids"]
            assert len(answer) == len(sample.answer_ids)
            # greedy: one forward over prompt + answer predicts each answer token from those before it
            with torch.no_grad():
                logits = stack(torch.tensor([sample.prompt_ids + answer])).logits[0, 299:-1]
            assert logits.argmax(-1).tolist() == answer
            hits += answer == sample.answer_ids
        assert row["n"] == 5 and row["accuracy"] == pytest.approx(hits / 5)
