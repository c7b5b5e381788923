"""scripts/ruler_recall.py without the real model: the store's reads for several search windows
from one forward pass against a stack built for each window alone, the score against a count
written here, the paired differences of ``+wN`` rows, and argument errors."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from memstack import MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.memory.carry import CarryConfig
from memstack.memory.store.kind import StoreState
from tests.conftest import VOCAB, make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_ruler  # noqa: E402
import ruler_recall  # noqa: E402

RECENT = 8


def config(block_len: int, initial: int = 0) -> StackConfig:
    """eval_ruler's store_near stack (longcontext.stack_config) at a tiny model's scale."""
    store = StoreConfig(
        layers="heads",
        heads="0.1,1.3",
        strategy="every_token",
        query_pool="max",
        block_len=block_len,
        top_k=2,
        chunk_len=4,
        readout="tokens",
        skip_recent=RECENT,
        neighbours=1,
        skip_initial=initial,
    )
    carry = CarryConfig(recent=RECENT, initial=initial)
    return StackConfig(segment_len=16, compressive=None, store=store, kinds={"carry": carry})


def reads_in_generate(stack: MemoryStack, ids: list[int]) -> list[int]:
    """The tokens ``generate(close_prompt=True)`` puts in front of the answer's segment, recorded
    from inside it (its last ``_prefix`` call: the answer's segment opens last)."""
    seen, inner = [], stack._prefix

    def recording(*args, **kwargs):
        out = inner(*args, **kwargs)
        seen.append(None if out is None else out[0][0][out[1][0]].tolist())
        return out

    stack._prefix = recording
    stack.generate(torch.tensor([ids]), max_new_tokens=1, close_prompt=True)
    del stack._prefix
    return seen[-1]


@pytest.mark.parametrize("initial", [0, 4])
def test_store_reads_are_what_generate_puts_before_the_answer(initial):
    """Carried first and last tokens and the store's hits, the same tokens (their order aside)."""
    model = make_model("llama", seed=3)
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(seed)).tolist()
        stack = MemoryStack(model, config(2, initial))
        reads, starts = ruler_recall.store_reads(stack, ids)
        assert sorted(reads) == sorted(reads_in_generate(stack, ids))
        stack.unwrap()
        assert reads[:initial] == ids[:initial] and reads[-RECENT:] == ids[-RECENT:]
        assert len(reads) > initial + RECENT  # the store found something
        assert 0 < len(starts) <= 2 and len(set(starts)) == len(starts)
        for start in starts:  # each hit is read, a run of 4 prompt tokens at its start
            assert start % 4 == 0
            assert any(reads[i : i + 4] == ids[start : start + 4] for i in range(len(reads)))
        if initial:
            assert 0 not in starts  # the first tokens give no keys (skip_initial)


def test_hit_starts_are_the_chunks_read_without_neighbours():
    """With no neighbours the store's reads are exactly the hits' chunks, in prompt order."""
    model = make_model("llama", seed=3)
    first = 0
    for seed in range(6):
        ids = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(seed)).tolist()
        cfg = config(2)
        stack = MemoryStack(
            model, dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, neighbours=0))
        )
        reads, starts = ruler_recall.store_reads(stack, ids)
        stack.unwrap()
        assert reads[:-RECENT] == [t for s in sorted(starts) for t in ids[s : s + 4]]
        first += 0 in starts
    assert first  # the first chunk, an attention sink, is found on some of these prompts


def test_first_chunk_hits_counts_the_prompts_whose_hits_start_at_0():
    records = [
        {"row": "store_near", "task": "niah_multiquery", "length": 4096, "sample": i, "hit_starts": h}
        for i, h in enumerate([[0, 64], [32, 96], [96, 0], [128]])
    ]
    records.append({"row": "store_near", "task": "niah_multiquery", "length": 4096, "sample": 4})  # older
    records.append({"row": "rag_bm25_near", "task": "niah_multiquery", "length": 4096, "sample": 0})
    (item,) = ruler_recall.first_chunk_hits(records)
    assert (item["row"], item["prompts"], item["first_chunk"]) == ("store_near", 4, 2)
    assert item["share"]["mean"] == pytest.approx(0.5)
    assert "store_near, niah_multiquery at 4096: 2 of 4" in ruler_recall.first_chunk_markdown([item])


def test_a_window_is_a_run_of_its_own():
    """Why ruler_recall reads the stream once per window: searched with the last 2 queries of its
    tail, a stream read with 8 queries searching finds other chunks than one read with 2."""
    model = make_model("llama", seed=3)
    differ = False
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(seed)).tolist()
        narrow = MemoryStack(model, config(2, 4))
        reads, _ = ruler_recall.store_reads(narrow, ids)
        narrow.unwrap()
        wide = MemoryStack(model, config(8, 4))
        with torch.no_grad():
            layers = wide.forward(torch.tensor([ids])).state.memories["store"]
        hits, valid = wide.kinds["store"].prefix(
            {n: StoreState(v.stores, v.tail[:, -2:]) for n, v in layers.items()}
        )
        wide.unwrap()
        differ |= ids[:4] + hits[0][valid[0]].tolist() + ids[-RECENT:] != reads
    assert differ


def test_store_reads_refuses_a_store_without_the_tokens_readout():
    stack = MemoryStack(make_model("llama", seed=0), config(4))
    stack.kinds["store"].config = dataclasses.replace(stack.kinds["store"].config, readout="kv")
    with pytest.raises(ValueError, match="needs a store with the tokens readout, got readout='kv'"):
        ruler_recall.store_reads(stack, list(range(64)))


def test_found_is_the_share_of_answers_in_the_text():
    assert ruler_recall.found(["123", "456", "789"], "a 123 b 7890") == pytest.approx(2 / 3)
    assert ruler_recall.found(["x-1"], "nothing") == 0.0


def test_lever_rows_pair_with_the_row_without_each_lever_and_with_the_rag_rows():
    score = {
        "store_near": [0.0, 0.5, 0.25],
        "store_near+w32": [1.0, 0.5, 0.5],
        "rag_bm25_near": [1.0, 1.0, 0.75],
        "store_near+w32+bf16": [0.5, 0.5, 0.5],
        "store_near+bf16": [0.0, 0.0, 0.5],
        "rag_bm25_near+bf16": [1.0, 0.0, 0.0],
        "store_near+w32+i32": [1.0, 1.0, 0.75],
    }
    records = [
        {"row": row, "task": "niah_multiquery", "length": 4096, "sample": i, "score": v}
        for row, vs in score.items()
        for i, v in enumerate(vs)
    ]
    pairs = {(d["a"], d["b"]): d["difference"]["mean"] for d in eval_ruler.summarise(records)["paired"]}

    def mean_diff(a: str, b: str) -> float:
        return sum(x - y for x, y in zip(score[a], score[b], strict=True)) / 3

    for a, b in (
        ("store_near+w32", "store_near"),
        ("rag_bm25_near", "store_near+w32"),
        ("store_near+w32+bf16", "store_near+bf16"),
        ("rag_bm25_near+bf16", "store_near+w32+bf16"),
        ("rag_bm25_near", "store_near"),
        ("store_near+w32+i32", "store_near+w32"),  # what each store-only lever adds
        ("store_near+w32+i32", "store_near"),  # and both together
        ("rag_bm25_near", "store_near+w32+i32"),
    ):
        assert pairs[(a, b)] == pytest.approx(mean_diff(a, b)), (a, b)
    # never across precisions: bf16 changes the rows' numbers, not only their search
    assert ("rag_bm25_near", "store_near+w32+bf16") not in pairs
    assert ("store_near+w32+bf16", "store_near") not in pairs
    assert ("store_near+w32+i32", "store_near+i32") not in pairs  # no such row ran


@pytest.mark.parametrize("bad", [["--windows", "0"], ["--samples", "0"], ["--tasks", "common_words"]])
def test_bad_arguments_exit_before_anything_loads(bad, capsys):
    with pytest.raises(SystemExit) as e:
        ruler_recall.main(bad)
    assert e.value.code == 2 and capsys.readouterr().err


def test_each_length_averages_over_its_own_tasks():
    scores = {(4096, "niah_single_1"): [1.0, 0.0], (4096, "niah_multiquery"): [0.5, 0.5]}
    scores[(16384, "niah_multiquery")] = [0.25, 0.75]
    records = [
        {"row": "store_near", "task": task, "length": n, "sample": i, "score": v}
        for (n, task), vs in scores.items()
        for i, v in enumerate(vs)
    ]
    averages = {c["length"]: c["average"]["mean"] for c in ruler_recall.summarise(records)["cells"]}
    assert averages == {4096: pytest.approx((1.0 + 0.5 + 0.0 + 0.5) / 4), 16384: pytest.approx(0.5)}
    # eval_ruler's own summary would leave 16K running: it lacks a task run at 4K
    assert [c["average"] for c in eval_ruler.summarise(records)["cells"] if c["length"] == 16384] == [None]
