"""scripts/ruler_recall.py without the real model: the store's reads for several search windows
from one forward pass against a stack built for each window alone, the score against a count
written here, the paired differences of ``+wN`` rows, and argument errors."""

import sys
from pathlib import Path

import pytest
import torch

from memstack import MemoryStack, StackConfig
from memstack.config import StoreConfig
from memstack.memory.carry import CarryConfig
from tests.conftest import VOCAB, make_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_ruler  # noqa: E402
import ruler_recall  # noqa: E402

RECENT = 8


def config(block_len: int) -> StackConfig:
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
    )
    return StackConfig(
        segment_len=16, compressive=None, store=store, kinds={"carry": CarryConfig(recent=RECENT)}
    )


def test_each_window_reads_what_a_stack_with_that_block_len_reads():
    model = make_model("llama", seed=3)
    differ = False
    for seed in range(3):
        ids = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(seed)).tolist()
        wide = MemoryStack(model, config(8))
        reads = ruler_recall.store_reads(wide, ids, [2, 8], recent=RECENT)
        wide.unwrap()
        for w in (2, 8):
            alone = MemoryStack(model, config(w))
            with torch.no_grad():
                layers = alone.forward(torch.tensor([ids])).state.memories["store"]
            ids_, valid = alone.kinds["store"].prefix(layers)
            alone.unwrap()
            assert reads[w] == ids_[0][valid[0]].tolist() + ids[-RECENT:]
            assert 0 < int(valid.sum()) <= 2 * 3 * 4  # top_k chunks, each with a neighbour either side
        differ |= reads[2] != reads[8]
    assert differ, "2 queries and 8 found the same chunks on every prompt: the windows are not applied"


def test_store_reads_refuses_a_window_longer_than_the_stack_keeps():
    stack = MemoryStack(make_model("llama", seed=0), config(4))
    with pytest.raises(
        ValueError, match="block_len >= 8, got readout='tokens', query_pool='max', block_len=4"
    ):
        ruler_recall.store_reads(stack, list(range(64)), [4, 8])


def test_found_is_the_share_of_answers_in_the_text():
    assert ruler_recall.found(["123", "456", "789"], "a 123 b 7890") == pytest.approx(2 / 3)
    assert ruler_recall.found(["x-1"], "nothing") == 0.0


def test_window_rows_pair_with_their_plain_row_and_the_rag_rows_with_the_same_other_suffixes():
    score = {
        "store_near": [0.0, 0.5, 0.25],
        "store_near+w32": [1.0, 0.5, 0.5],
        "rag_bm25_near": [1.0, 1.0, 0.75],
        "store_near+w32+bf16": [0.5, 0.5, 0.5],
        "store_near+bf16": [0.0, 0.0, 0.5],
        "rag_bm25_near+bf16": [1.0, 0.0, 0.0],
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
    ):
        assert pairs[(a, b)] == pytest.approx(mean_diff(a, b)), (a, b)
    # never across precisions: bf16 changes the rows' numbers, not only their search
    assert ("rag_bm25_near", "store_near+w32+bf16") not in pairs
    assert ("store_near+w32+bf16", "store_near") not in pairs


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
