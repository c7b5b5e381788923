"""Tests of memory/sleep.py and memory/adapters.py: layer 4, sleep into LoRA adapters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from memstack import MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.memory.adapters import lora_config
from memstack.sleep import SleepConfig
from memstack.sleep.consolidate import _teacher, sleep, sleep_loss
from memstack.sleep.data import crops, generated_windows
from memstack.sleep.losses import kl_bucketed, teacher_targets

SEG = 16


def make_stack(seed: int = 0) -> tuple[MemoryStack, torch.nn.Module]:
    """A tiny Llama with compressive memory and a store on layer 1, plus an unwrapped copy."""
    model = make_model("llama", seed=seed)
    reference = copy.deepcopy(model)
    stack = MemoryStack(model, StackConfig(segment_len=SEG, store=StoreConfig(layers="1", chunk_len=8)))
    return stack, reference


def read_stream(stack: MemoryStack, n_tokens: int = 96, seed: int = 0) -> torch.Tensor:
    """Feed one stream through ``stack.step`` segment by segment; return its ids."""
    ids = torch.randint(0, 256, (1, n_tokens), generator=torch.Generator().manual_seed(seed))
    for a in range(0, n_tokens, SEG):
        stack.step(ids[:, a : a + SEG])
    return ids


def frozen_snapshot(stack: MemoryStack) -> dict[str, torch.Tensor]:
    """Every parameter that is not LoRA (base weights and memory gates), cloned, by its name in
    the unwrapped model (peft renames ``q_proj.weight`` to ``q_proj.base_layer.weight``)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in stack.named_parameters()
        if "lora_" not in n
    }


def nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL, written out by hand."""
    log_p = logits.float().log_softmax(-1)[:, :-1]
    return -log_p.gather(-1, ids[:, 1:, None]).mean()


def test_sleep_changes_only_adapter_weights_and_lowers_the_night_loss():
    stack, _ = make_stack()
    ids = read_stream(stack)
    before = frozen_snapshot(stack)
    flags = {n: p.requires_grad for n, p in stack.named_parameters()}
    assert all(flags.values())
    report = sleep(stack, SleepConfig(steps=30, lr=1e-2, batch_size=4), progress=False)
    after = frozen_snapshot(stack)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert report.adapter == "sleep-0001" and stack.adapters.active() == ["sleep-0001"]
    assert report.records == 12 and report.tokens == 96
    assert report.night_loss_after < report.night_loss_before - 0.1
    # the report's figure is the loss of the memory-off model on the stream's segments
    with torch.no_grad(), stack.memory_off():
        direct = torch.stack(
            [nll(stack(ids[:, a : a + SEG]).logits, ids[:, a : a + SEG]) for a in range(0, 96, SEG)]
        )
    assert report.night_loss_after == pytest.approx(float(direct.mean()), rel=1e-5)
    # trainability is as it was (base and gates trainable), and the night's adapter is frozen
    for n, p in stack.named_parameters():
        assert p.requires_grad == ("lora_" not in n), n


def test_store_marks_what_was_consolidated_and_an_empty_night_is_a_no_op(capsys):
    stack, _ = make_stack()
    read_stream(stack, 48)
    store = stack.state.memories["store"][1].stores[0]
    first = store.ids()
    sleep(stack, SleepConfig(steps=2), progress=False)
    assert torch.equal(store.ids(consolidated=True), first) and len(store.ids(consolidated=False)) == 0
    report = sleep(stack, SleepConfig(steps=2), progress=False)
    assert report.adapter is None and "nothing to consolidate" in capsys.readouterr().out
    assert stack.adapters.names() == ["sleep-0001"]
    for _ in range(2):  # new records: only they make the next night
        stack.step(torch.randint(0, 256, (1, SEG)))
    report = sleep(stack, SleepConfig(steps=2, evict_consolidated=True), progress=False)
    assert report.adapter == "sleep-0002" and report.records == 4
    assert torch.equal(store.ids(), first)  # this night's records evicted; earlier ones kept


def test_sleep_on_a_fresh_stack_is_a_no_op(capsys):
    stack, reference = make_stack()
    report = sleep(stack, progress=False)
    assert report.adapter is None and report.steps == 0 and stack.adapters.names() == []
    assert stack.describe().endswith(
        "4. sleep (LoRA adapters from the store, memstack.sleep.sleep(stack)): none yet"
    )
    assert "nothing to consolidate" in capsys.readouterr().out


def _perturb(stack: MemoryStack, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.adapters.parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_cat_merge_is_the_exact_sum_and_linear_is_not():
    stack, _ = make_stack()
    read_stream(stack, 32)
    sleep(stack, SleepConfig(steps=1), progress=False)
    read_stream(stack, 32, seed=1)
    sleep(stack, SleepConfig(steps=1), progress=False)
    _perturb(stack, "sleep-0001", 1)
    _perturb(stack, "sleep-0002", 2)
    x = torch.randint(0, 256, (2, SEG))
    with stack.memory_off():
        both = stack(x).logits
        stack.adapters.activate(["sleep-0001"])
        one = stack(x).logits
        stack.adapters.activate(["sleep-0001", "sleep-0002"])
        peft = stack.adapters.peft
        peft.add_weighted_adapter(["sleep-0001", "sleep-0002"], [1.0, 1.0], "lin", combination_type="linear")
        stack.adapters.activate(["lin"])
        linear = stack(x).logits
        peft.delete_adapter("lin")
        stack.adapters.activate(["sleep-0001", "sleep-0002"])
        stack.adapters.merge(["sleep-0001", "sleep-0002"], "sleep-0001-0002")
        merged = stack(x).logits
    assert (both - one).abs().max() > 1e-2  # the second adapter matters
    assert torch.allclose(merged, both, atol=1e-5)
    assert (linear - both).abs().max() > 1e-2
    assert stack.adapters.names() == ["sleep-0001-0002"] and stack.adapters.next_name() == "sleep-0003"
    with pytest.raises(ValueError, match="exists already"):
        stack.adapters.merge(["sleep-0001-0002"], "sleep-0001-0002")


def test_merge_into_base_keeps_the_outputs_and_changes_the_base():
    stack, _ = make_stack()
    read_stream(stack, 32)
    sleep(stack, SleepConfig(steps=1), progress=False)
    _perturb(stack, "sleep-0001", 3)
    x = torch.randint(0, 256, (1, 40))
    with_adapter = stack(x).logits
    before = frozen_snapshot(stack)
    stack.adapters.merge_into_base()
    assert stack.adapters.names() == [] and not any("lora_" in n for n, _ in stack.named_parameters())
    assert torch.allclose(stack(x).logits, with_adapter, atol=1e-5)
    changed = [n for n, t in frozen_snapshot(stack).items() if not torch.equal(t, before[n])]
    assert changed and all("proj" in n for n in changed)
    assert stack.adapters.next_name() == "sleep-0002"  # numbering goes on after the merge


def test_adapters_save_and_load_by_name_and_a_clash_raises(tmp_path):
    stack, _ = make_stack()
    read_stream(stack, 32)
    sleep(stack, SleepConfig(steps=1), progress=False, directory=tmp_path)
    _perturb(stack, "sleep-0001", 4)
    stack.adapters.save(tmp_path / "adapters")
    x = torch.randint(0, 256, (1, 40))
    expected = stack(x, state=None).logits
    fresh, _ = make_stack()
    fresh.adapters.load(tmp_path / "adapters")
    assert fresh.adapters.active() == ["sleep-0001"]
    assert torch.equal(fresh(x).logits, expected)
    with pytest.raises(ValueError, match="exists already"):
        fresh.adapters.load(tmp_path / "adapters")
    assert (tmp_path / "sleep_reports" / "sleep-0001.json").is_file()


@pytest.mark.parametrize("replay_ratio,kl_weight", [(0.0, 0.0), (0.25, 0.0), (0.25, 2.0), (1.0, 0.5)])
def test_replay_ratio_and_kl_weight_weigh_the_objective_as_documented(replay_ratio, kl_weight):
    """loss = (1 - r) NLL(night) + r (NLL(replay) + lam KL(base || adapted)), by hand."""
    stack, reference = make_stack()
    stack.adapters.add("sleep-0001", lora_config(["q_proj", "v_proj"], 4, 8, 0.0))
    stack.adapters.activate(["sleep-0001"])
    _perturb(stack, "sleep-0001", 5)
    night = torch.randint(0, 256, (3, SEG))
    replay = torch.randint(0, 256, (2, SEG))
    cfg = SleepConfig(replay_ratio=replay_ratio, kl_weight=kl_weight)
    with torch.no_grad():
        got = sleep_loss(stack, cfg, night, torch.ones_like(night, dtype=torch.bool), None, replay)
    with torch.no_grad(), stack.memory_off():
        s_night, s_replay = stack(night).logits, stack(replay).logits
        base = reference(replay).logits  # the unwrapped model without adapters: the frozen base
    p_log, q_log = base.log_softmax(-1)[:, :-1], s_replay.log_softmax(-1)[:, :-1]
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean()
    want = (1 - replay_ratio) * nll(s_night, night) + replay_ratio * (nll(s_replay, replay) + kl_weight * kl)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    if kl_weight:
        assert float(kl) > 1e-3  # the term is really there


@pytest.mark.parametrize("replay_batch_size,want", [(None, 3), (1, 1), (5, 5)])
def test_replay_batch_size_sets_the_replay_windows_per_step(monkeypatch, replay_batch_size, want):
    """Each step's replay batch holds ``replay_batch_size`` windows of the replay data (default
    ``batch_size``), and the night batch keeps ``batch_size``."""
    import memstack.sleep.consolidate as consolidate

    seen = []
    real = consolidate.sleep_loss

    def spy(stack, cfg, ids, mask, teacher, replay):
        seen.append((ids.shape[0], replay.shape[0], {tuple(r.tolist()) for r in replay}))
        return real(stack, cfg, ids, mask, teacher, replay)

    monkeypatch.setattr(consolidate, "sleep_loss", spy)
    stack, _ = make_stack()
    read_stream(stack, 32)
    replay = torch.randint(0, 256, (7, SEG), generator=torch.Generator().manual_seed(3))
    cfg = SleepConfig(
        steps=4, batch_size=3, replay_ratio=0.5, kl_weight=1.0, replay_batch_size=replay_batch_size
    )
    sleep(stack, cfg, replay=replay, progress=False)
    windows = {tuple(r.tolist()) for r in replay}
    assert [(n, r) for n, r, _ in seen] == [(3, want)] * 4
    assert all(rows <= windows for _, _, rows in seen)  # drawn from the replay data


def test_distill_kl_is_zero_for_identical_models_and_exact_with_the_whole_vocabulary():
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    where = torch.ones(2, 5, dtype=torch.bool)
    for k in (1, 4, 30):
        idx, logp = teacher_targets(t_logits, k)
        assert float(kl_bucketed(idx, logp, t_logits, where)) == pytest.approx(0.0, abs=1e-6)
    idx, logp = teacher_targets(t_logits, 30)
    p, q = F.softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    full = (p * (p.log() - q)).sum(-1).mean()
    assert float(kl_bucketed(idx, logp, s_logits, where)) == pytest.approx(float(full), rel=1e-5)
    idx, logp = teacher_targets(t_logits, 4)  # bucketing can only lose information
    assert 0 < float(kl_bucketed(idx, logp, s_logits, where)) < float(full)


def test_distill_sleep_moves_the_memory_on_predictions_into_the_adapter():
    """After a distill sleep, the memory-off student is closer to the memory-on teacher."""
    stack, _ = make_stack()
    ids = read_stream(stack, 64)[0]
    t_idx, t_logp = _teacher(stack, ids, [], 16)[0]
    x, mask = ids.view(-1, SEG), torch.ones(64 // SEG, SEG, dtype=torch.bool)
    t_idx, t_logp = t_idx.view(-1, SEG, 16), t_logp.view(-1, SEG, 17)

    def distance() -> float:
        with torch.no_grad(), stack.memory_off():
            return float(kl_bucketed(t_idx, t_logp, stack(x).logits, mask))

    before = distance()
    report = sleep(
        stack, SleepConfig(objective="distill", steps=30, lr=1e-2, distill_top_k=16), progress=False
    )
    assert report.adapter == "sleep-0001" and report.steps == 30
    assert distance() < 0.8 * before


def test_bad_sleep_configs_name_the_field():
    with pytest.raises(ValueError, match="sleep.objective"):
        SleepConfig(objective="dream")
    with pytest.raises(ValueError, match="sleep.replay_ratio"):
        SleepConfig(replay_ratio=1.5)
    with pytest.raises(ValueError, match="sleep.merge"):
        SleepConfig(merge="svd")
    with pytest.raises(ValueError, match="sleep.replay_batch_size"):
        SleepConfig(replay_batch_size=0)
    with pytest.raises(ValueError, match="sleep.record_share"):
        SleepConfig(record_share=1.5)
    with pytest.raises(ValueError, match="sleep.pack"):
        SleepConfig(pack=1)
    with pytest.raises(ValueError, match="sleep.pack=True works with objective='lm' only"):
        SleepConfig(pack=True, objective="distill")
    stack, _ = make_stack()
    read_stream(stack, 32)
    with pytest.raises(ValueError, match="needs replay windows"):
        sleep(stack, SleepConfig(replay_ratio=0.5), progress=False)


def test_from_pretrained_restores_the_adapters_and_reproduces_the_outputs(tmp_path):
    stack, reference = make_stack()
    read_stream(stack, 32)
    sleep(stack, SleepConfig(steps=1), progress=False)
    read_stream(stack, 32, seed=1)
    sleep(stack, SleepConfig(steps=1), progress=False)
    _perturb(stack, "sleep-0001", 6)
    _perturb(stack, "sleep-0002", 7)
    stack.adapters.activate(["sleep-0002"])  # which ones are active is saved too
    x = torch.randint(0, 256, (1, 40))
    expected = stack(x).logits
    stack.save_pretrained(tmp_path)
    stack.save_pretrained(tmp_path)  # saving twice keeps one adapters directory
    assert len(list(tmp_path.glob("memstack_adapters-*"))) == 1
    back = MemoryStack.from_pretrained(tmp_path, copy.deepcopy(reference))
    assert back.adapters.names() == ["sleep-0001", "sleep-0002"] and back.adapters.active() == ["sleep-0002"]
    assert back.describe().endswith("adapters sleep-0001, sleep-0002 (active: sleep-0002)")
    assert torch.equal(back(x).logits, expected)
    assert not any(p.requires_grad for n, p in back.named_parameters() if "lora_" in n)
    # a later sleep on the restored stack continues the numbering
    read_stream(back, 32, seed=2)
    assert sleep(back, SleepConfig(steps=1), progress=False).adapter == "sleep-0003"


def test_training_crops_cover_every_offset_and_carry_their_teacher():
    """Crops: documents by length, starts spread over all that fit, teacher rows aligned."""
    docs = [torch.arange(100), torch.arange(1000, 1010)]
    teachers = [(d[:, None].repeat(1, 2), d[:, None].float().repeat(1, 3)) for d in docs]
    ids, mask, (t_idx, t_logp) = crops(docs, teachers, 16, 2000, torch.Generator().manual_seed(0))
    short = ids[:, 0] >= 1000
    assert 0.05 < short.float().mean() < 0.15  # 10 of 110 tokens
    assert torch.equal(mask[short].sum(1), torch.full((int(short.sum()),), 10))  # padded, not cut
    starts = ids[~short, 0]
    assert starts.min() == 0 and starts.max() == 100 - 16 and len(starts.unique()) == 85
    assert torch.equal(t_idx[..., 0][mask], ids[mask]) and torch.equal(
        t_logp[..., 2][mask], ids[mask].float()
    )


def _runs(row: torch.Tensor, separator: int) -> list[list[int]]:
    """A packed row cut at its separators."""
    runs, run = [], []
    for t in row.tolist():
        if t == separator:
            runs.append(run)
            run = []
        else:
            run.append(t)
    return [*runs, run]


def test_pooled_packed_crops_give_each_pool_its_rows_and_fill_them_with_whole_texts():
    """Pools: a row's pool by its share, a text of the pool by length. Packing: every row full,
    each stretch between separators a contiguous piece of one text, every stretch that a
    separator ends the whole rest of its text (a text is never cut before its end but by the
    row's end), and the next text drawn from the row's pool."""
    record = torch.arange(100)
    short = [torch.arange(1000, 1010), torch.arange(2000, 2030)]
    docs, sep, n = [record, *short], -1, 4000
    ids, mask, teacher = crops(
        docs,
        None,
        16,
        n,
        torch.Generator().manual_seed(0),
        pools=[(0.7, [0]), (0.3, [1, 2])],
        pack=True,
        separator=sep,
    )
    assert teacher is None and bool(mask.all())
    from_record = ids[:, 0] < 100
    assert abs(float(from_record.float().mean()) - 0.7) < 0.03
    assert not bool((ids[from_record] >= 1000).any())  # a row stays in its pool
    other = ids[~from_record]
    assert not bool(((other >= 0) & (other < 100)).any())
    first = ids[~from_record, 0]
    assert abs(float((first >= 2000).float().mean()) - 30 / 40) < 0.05  # by length: 30 of 40 tokens
    texts = {int(d[0]) // 1000: d.tolist() for d in short}
    seen_whole = 0
    for row in other:
        runs = _runs(row, sep)
        for i, run in enumerate(runs):
            text = texts[run[0] // 1000]
            at = text.index(run[0])
            assert run == text[at : at + len(run)]  # contiguous, one text
            if i < len(runs) - 1:
                assert run[-1] == text[-1]  # a separator follows only a text's end
                seen_whole += at == 0
    assert seen_whole > 0
    # without packing a short text's row is padded, not filled
    ids, mask, _ = crops(
        docs, None, 16, 200, torch.Generator().manual_seed(1), pools=[(0.0, [0]), (1.0, [1])]
    )
    assert torch.equal(mask.sum(1), torch.full((200,), 10)) and bool((ids[:, :10] == short[0]).all())


def test_pooled_crops_reject_what_they_cannot_draw():
    docs = [torch.arange(20), torch.arange(5)]
    teachers = [(d[:, None], d[:, None].float().repeat(1, 2)) for d in docs]
    with pytest.raises(ValueError, match="pack=True cannot carry teacher"):
        crops(docs, teachers, 8, 2, torch.Generator(), pack=True)
    with pytest.raises(ValueError, match="no pool has both a share > 0 and documents"):
        crops(docs, None, 8, 2, torch.Generator(), pools=[(1.0, []), (0.0, [0, 1])])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_record_share_draws_rows_from_the_records_or_the_augmented_texts(monkeypatch, share):
    """``record_share`` 1: no augmented token is trained on; 0: nothing else (rehearsed records
    count as records); packed rows are full."""
    import memstack.sleep.consolidate as consolidate

    rows = []
    real = consolidate.sleep_loss

    def spy(stack, cfg, ids, mask, teacher, replay):
        rows.append((ids.clone(), mask.clone()))
        return real(stack, cfg, ids, mask, teacher, replay)

    monkeypatch.setattr(consolidate, "sleep_loss", spy)
    stack, _ = make_stack()
    first = read_stream(stack, 32)
    sleep(stack, SleepConfig(steps=1), progress=False)
    second = read_stream(stack, 32, seed=1)
    eos = stack.model.config.eos_token_id
    unused = set(range(stack.model.config.vocab_size)) - set(
        first.flatten().tolist() + second.flatten().tolist()
    )
    marker = min(unused - {eos})  # a token neither night's records hold

    def augment(doc: torch.Tensor) -> list[torch.Tensor]:
        return [torch.full((5,), marker)]

    cfg = SleepConfig(steps=12, batch_size=4, record_share=share, pack=True, rehearsal=1.0)
    sleep(stack, cfg, augment=augment, progress=False)
    ids = torch.cat([i for i, _ in rows[-12:]])
    assert bool(torch.cat([m for _, m in rows[-12:]]).all())
    body = ids[ids != eos] if eos is not None else ids.flatten()
    if share == 1.0:
        assert not bool((body == marker).any())
        only_first = set(first.flatten().tolist()) - set(second.flatten().tolist()) - {eos}
        assert only_first & set(body.tolist())  # the rehearsed night is a record too
    else:
        assert bool((body == marker).all())


def test_rehearsal_trains_on_earlier_records_again():
    reports = []
    for rehearsal in (0.0, 1.0):
        stack, _ = make_stack()
        read_stream(stack, 48)
        first = sleep(stack, SleepConfig(steps=1), progress=False)
        read_stream(stack, 32, seed=1)
        reports.append(sleep(stack, SleepConfig(steps=1, rehearsal=rehearsal), progress=False))
    plain, rehearsed = reports
    assert first.train_tokens == 48 and plain.train_tokens == 32 and plain.rehearsal_documents == 0
    assert rehearsed.rehearsal_documents == 1 and rehearsed.train_tokens == 32 + 48


def test_merge_base_sleeps_fold_each_night_into_the_weights():
    stack, _ = make_stack()
    read_stream(stack, 32)
    report = sleep(stack, SleepConfig(steps=3, lr=1e-2, merge="base"), progress=False)
    assert stack.adapters.names() == [] and "merged into the base" in report.message
    assert report.night_loss_after < report.night_loss_before
    read_stream(stack, 32, seed=1)
    assert sleep(stack, SleepConfig(steps=1, merge="base"), progress=False).adapter == "sleep-0002"


def test_generated_windows_are_the_frozen_base_s_own_continuations():
    """Replay the base writes: with near-zero temperature each window is the prompt and the greedy
    continuation of the unwrapped model (no adapter, no memory), found here by an argmax loop;
    the same seed gives the same sampled windows, another seed others."""
    stack, reference = make_stack()
    stack.adapters.add("sleep-0001", lora_config(["q_proj", "v_proj"], 4, 8, 0.0))
    stack.adapters.activate(["sleep-0001"])
    _perturb(stack, "sleep-0001", 5)  # an adapter that changes the model: the replay must ignore it
    read_stream(stack)  # and a full store: the replay must not read it
    prompts = [[5, 17, 99], [200, 3]]
    got = generated_windows(stack, prompts, per_prompt=2, seq_len=12, temperature=1e-6)
    assert got.shape == (4, 12)

    def greedy(model, prompt):
        ids = torch.tensor([prompt])
        while ids.shape[1] < 12:
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        return ids[0]

    with torch.no_grad():
        want = [greedy(reference, p) for p in prompts for _ in range(2)]
        adapted = [greedy(lambda x: stack(x, state=None), p) for p in prompts]
    assert torch.equal(got, torch.stack(want))
    assert any(not torch.equal(a, w) for a, w in zip(adapted, want[::2], strict=True))  # the adapter mattered
    one = generated_windows(stack, prompts, per_prompt=3, seq_len=24, seed=1)
    assert torch.equal(one, generated_windows(stack, prompts, per_prompt=3, seq_len=24, seed=1))
    assert not torch.equal(one, generated_windows(stack, prompts, per_prompt=3, seq_len=24, seed=2))
    assert all(r[:3].tolist() == prompts[0] for r in one[:3])


@pytest.mark.parametrize(
    "prompts,per_prompt,match",
    [([[1, 2]], 0, "per_prompt"), ([], 2, "prompts is empty"), ([[1] * 12], 1, "outside")],
)
def test_generated_windows_reject_bad_input(prompts, per_prompt, match):
    stack, _ = make_stack()
    with pytest.raises(ValueError, match=match):
        generated_windows(stack, prompts, per_prompt=per_prompt, seq_len=12)
