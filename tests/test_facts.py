"""Tests of memstack.evals.facts (the invented facts of the sleep experiment on a real model) and
of sleep's ``adapter="continue"`` (one adapter that keeps training)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_model
from test_sleep import make_stack, read_stream

from memstack.evals.facts import (
    PARAPHRASES,
    QUESTIONS,
    STORED,
    TRAINING_QUESTIONS,
    Fact,
    day_text,
    find_facts,
    greedy_hits,
    invent_facts,
    question_prompt,
    split_answer,
    stored_prompt,
    training_chat,
)
from memstack.sleep import SleepConfig, sleep

WORDS = ("and the waters went forth upon the face of the earth in those days " * 20).split()


class ChatBytes:
    """Bytes as tokens, with a chat template of its own: what the facts module needs of a
    Hugging Face tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode()

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:
        assert not tokenize
        chat = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return chat + ("<assistant>" if add_generation_prompt else "")


def test_invented_facts_are_distinct_reproducible_and_alternate_relations():
    facts = invent_facts(90, seed=3)
    assert facts == invent_facts(90, seed=3)
    assert facts != invent_facts(90, seed=4)
    assert len({f.name for f in facts}) == 90
    for relation in STORED:
        values = [f.value for f in facts if f.relation == relation]
        assert len(values) == 45 and len(set(values)) == 45
    assert [f.relation for f in facts[:4]] == ["locker", "town", "locker", "town"]
    assert all(1000 <= int(f.value) <= 9999 for f in facts if f.relation == "locker")
    with pytest.raises(ValueError, match="n must be"):
        invent_facts(-1, seed=0)


def test_day_text_states_every_fact_once_and_find_facts_reads_them_back():
    facts = invent_facts(12, seed=0)
    text = day_text(facts, WORDS, random.Random(0), gap=7)
    assert find_facts(text) == facts
    assert all(text.count(f.sentence()) == 1 for f in facts)
    # every paraphrase is found as no stored fact (augmentation never feeds itself)
    assert find_facts(" ".join(f.sentence(t) for f in facts for t in PARAPHRASES[f.relation])) == []
    with pytest.raises(ValueError, match="need more than gap"):
        day_text(facts, WORDS[:5], random.Random(0), gap=7)


def test_training_questions_teach_the_fact_without_the_unseen_questions_or_stored_phrasing():
    tok = ChatBytes()
    for fact in invent_facts(6, seed=1):
        chat = training_chat(tok, fact)
        pairs = TRAINING_QUESTIONS[fact.relation]
        expected = "".join(
            f"<user>{q.format(name=fact.name)}</user>"
            f"<assistant>{a.format(name=fact.name, value=fact.value)}</assistant>"
            for q, a in pairs
        )
        assert chat == expected and chat.count(fact.value) == 2
        # the unseen test stays unseen: neither its questions nor its answers' openings are trained
        for question, opening in QUESTIONS[fact.relation]:
            assert question.format(name=fact.name) not in chat
            assert opening.format(name=fact.name) not in chat
        # nor is the stored phrasing, so augmentation never finds a fact in its own output
        assert find_facts(chat) == []
        assert fact.sentence() not in chat


def test_prompts_split_where_the_value_starts():
    tok = ChatBytes()
    fact = Fact("Talvo Quenning", "locker", "4821")
    head, value = stored_prompt(tok, fact)
    assert tok.decode(head) == "Talvo Quenning's locker number is" and tok.decode(value) == " 4821"
    for which in range(2):
        head, value = question_prompt(tok, fact, which)
        question, opening = QUESTIONS["locker"][which]
        text = tok.decode(head)
        assert text.startswith(f"<user>{question.format(name=fact.name)}</user><assistant>")
        assert text.endswith(opening.format(name=fact.name)) and tok.decode(value) == " 4821"

    class Merging(ChatBytes):  # a tokenizer whose tokens cross the prompt's end
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [len(text)]

    with pytest.raises(ValueError, match="cannot split"):
        split_answer(Merging(), "abc", "1")


def test_greedy_hits_equal_greedy_generation_in_padded_batches():
    model = make_model("llama", seed=1)
    gen = torch.Generator().manual_seed(0)
    pairs, wrong = [], []
    for n in (3, 9, 5, 12, 7):  # different lengths: the batch is padded
        prompt = torch.randint(1, 256, (1, n), generator=gen)
        mask = torch.ones_like(prompt)
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        answer = out[0, n:].tolist()
        pairs.append((prompt[0].tolist(), answer))
        # the same answer with one token changed: greedy decoding does not produce it
        k = n % 4
        wrong.append((prompt[0].tolist(), answer[:k] + [(answer[k] + 1) % 256] + answer[k + 1 :]))

    def logits(ids, mask):
        return model(ids, attention_mask=mask).logits

    assert greedy_hits(logits, pairs, batch_size=2) == [True] * 5
    assert greedy_hits(logits, wrong, batch_size=3) == [False] * 5
    assert greedy_hits(logits, [pairs[0], wrong[1], pairs[2]]) == [True, False, True]


def test_continue_trains_one_adapter_and_new_adds_one_per_night():
    snapshots = {}
    for mode in ("new", "continue"):
        stack, _ = make_stack()
        read_stream(stack, 48)
        first = sleep(stack, SleepConfig(steps=3, lr=1e-2, adapter=mode), progress=False)
        after_one = {n: p.detach().clone() for n, p in stack.named_parameters() if "lora_" in n}
        read_stream(stack, 32, seed=1)
        second = sleep(stack, SleepConfig(steps=3, lr=1e-2, adapter=mode), progress=False)
        after_two = {n: p.detach().clone() for n, p in stack.named_parameters() if "lora_" in n}
        snapshots[mode] = (first, second, after_one, after_two, stack.adapters.names())
        assert all(not p.requires_grad for n, p in stack.named_parameters() if "lora_" in n)
    first, second, one, two, names = snapshots["new"]
    assert names == ["sleep-0001", "sleep-0002"] and second.adapter == "sleep-0002"
    assert all(torch.equal(one[n], two[n]) for n in one)  # night 1's adapter is left as it was
    first, second, one, two, names = snapshots["continue"]
    assert names == ["sleep-0001"] and first.adapter == second.adapter == "sleep-0001"
    assert one.keys() == two.keys()
    assert any(not torch.equal(one[n], two[n]) for n in one if "lora_B" in n)  # trained further
    assert second.night_loss_after < second.night_loss_before
    with pytest.raises(ValueError, match="sleep.adapter"):
        SleepConfig(adapter="fresh")


def test_a_later_night_overrides_earlier_nights_and_rehearsal_keeps_them():
    """Why nights erase each other (docs/results.md, sleep on SmolLM2): night 1's adapter is left
    exactly as it was, yet with night 2's adapter active night 1's text is predicted worse; the
    new adapter, trained on night 2 alone, overrides it. Rehearsal of the earlier records is the
    library's remedy: the same night 2 with them keeps night 1's loss lower."""
    from memstack.sleep import mean_nll, windows

    after = {}
    for rehearsal in (0.0, 1.0):
        stack, _ = make_stack()
        first_ids = read_stream(stack, 48)
        recipe = dict(steps=60, lr=3e-2, batch_size=4)
        sleep(stack, SleepConfig(**recipe), progress=False)
        night1 = windows([first_ids[0]], 16)
        loss_1 = mean_nll(stack, *night1, batch_size=4)
        read_stream(stack, 48, seed=1)
        sleep(stack, SleepConfig(**recipe, rehearsal=rehearsal), progress=False)
        after[rehearsal] = mean_nll(stack, *night1, batch_size=4)
        stack.adapters.activate(["sleep-0001"])
        assert mean_nll(stack, *night1, batch_size=4) == pytest.approx(loss_1, rel=1e-6)
    assert after[0.0] > loss_1 + 0.2  # overridden by night 2's adapter (4.95 -> 5.38 nats)
    assert after[1.0] < after[0.0] - 0.2  # kept with rehearsal (4.94)


def test_a_nights_adapter_is_the_same_whatever_the_global_generator_did_before():
    weights = []
    for noise in (0, 5):
        stack, _ = make_stack()
        read_stream(stack, 32)
        torch.manual_seed(noise)  # what other code did with the global generator in between
        torch.rand(noise)
        sleep(stack, SleepConfig(steps=2, lr=1e-2, seed=3), progress=False)
        weights.append({n: p.detach().clone() for n, p in stack.named_parameters() if "lora_" in n})
        state = torch.random.get_rng_state()
        torch.manual_seed(noise)
        torch.rand(noise)
        assert torch.equal(state, torch.random.get_rng_state())  # and the global one is left alone
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
