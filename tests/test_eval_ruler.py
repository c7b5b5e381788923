"""scripts/eval_ruler.py without the real model: the RAG rows' prompts, the summary's means and
intervals against their formulas, and argument errors before anything loads."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from memstack.data.tokenizer import load_tokenizer
from memstack.evals.ruler import make_sample

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import eval_ruler  # noqa: E402


def overlap(query: str, chunks: list[str]) -> list[float]:
    """A scorer written here: how many of the query's words of 4+ letters each chunk holds."""
    words = set(re.findall(r"[a-z]{4,}", query.lower()))
    return [len(words & set(re.findall(r"[a-z]{4,}", c.lower()))) for c in chunks]


def test_rag_prompt_keeps_the_best_chunks_in_text_order_between_instruction_and_question():
    tok = load_tokenizer("bytes")
    s = make_sample("niah_single_2", tok, 3000, seed=4)
    instruction, context, question = eval_ruler.split_prompt(s.text)
    assert s.text == instruction + "\n" + context + "\n" + question and question.endswith(s.answer_prefix)
    prompt = tok.decode(eval_ruler.rag_prompt(tok, s.text, overlap, chunk_len=32, top_k=4))
    assert prompt.startswith(instruction + "\n") and prompt.endswith("\n" + question)
    ids = tok.encode(context)
    chunks = [tok.decode(ids[a : a + 32]) for a in range(0, len(ids), 32)]
    scores = overlap(question, chunks)
    # brute force: the 4 best (earlier first on ties), in text order
    best = sorted(sorted(range(len(chunks)), key=lambda i: (-scores[i], i))[:4])
    assert prompt == instruction + "\n" + " ".join(chunks[i] for i in best) + "\n" + question
    key = re.search(r"for ([a-z]+-[a-z]+) mentioned", question).group(1)
    assert any(key in chunks[i] for i in best)  # the needle's key words are found


def test_rag_prompt_with_neighbours_reads_runs_of_adjacent_chunks_as_spans_of_the_text():
    tok = load_tokenizer("bytes")  # one token per character here: a span of ids is a span of text
    s = make_sample("niah_single_2", tok, 3000, seed=4)
    instruction, context, question = eval_ruler.split_prompt(s.text)
    n = len(tok.encode(context))
    chunks = [context[a : a + 32] for a in range(0, n, 32)]
    scores = overlap(question, chunks)
    best = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))[:4]
    keep = sorted({j for i in best for j in (i - 1, i, i + 1)} & set(range(len(chunks))))
    runs = [[keep[0]]]
    for j in keep[1:]:
        if j == runs[-1][-1] + 1:
            runs[-1].append(j)
        else:
            runs.append([j])
    spans = [context[r[0] * 32 : (r[-1] + 1) * 32] for r in runs]
    prompt = tok.decode(eval_ruler.rag_prompt(tok, s.text, overlap, chunk_len=32, top_k=4, neighbours=1))
    assert prompt == instruction + "\n" + " ".join(spans) + "\n" + question
    assert len(keep) > len(best) and s.answers[0] in prompt  # the needle's number is whole
    with pytest.raises(ValueError, match="neighbours=-1: expected an int >= 0"):
        eval_ruler.rag_prompt(tok, s.text, overlap, neighbours=-1)


def test_bm25_scorer_ranks_the_chunk_with_the_query_words_first():
    pytest.importorskip(
        "bm25s", reason="the RAG rows need the retrieval extra: pip install -e '.[retrieval]'"
    )
    chunks = ["the sky is blue today", "one of the special magic numbers for brave-otter is 1234567", "grass"]
    scores = eval_ruler.bm25_scorer()("What is the special magic number for brave-otter?", chunks)
    assert max(range(3), key=lambda i: scores[i]) == 1


def test_summary_means_and_intervals_follow_their_formulas():
    scores = {"niah_single_1": [1.0, 0.0, 1.0, 1.0], "common_words": [0.3, 0.5, 0.2, 0.4]}
    records = [
        {"row": "store", "task": t, "length": 4096, "sample": i, "score": v}
        for t, vs in scores.items()
        for i, v in enumerate(vs)
    ]
    records.append({"row": "bare", "task": "niah_single_1", "length": 4096, "sample": 0, "score": 1.0})
    cells = {(c["row"], c["length"]): c for c in eval_ruler.summarise(records)["cells"]}
    assert [c["row"] for c in eval_ruler.summarise(records)["cells"]] == ["bare", "store"]  # the ROWS order
    store = cells[("store", 4096)]

    def normal(v):
        m = sum(v) / len(v)
        half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v))
        return m, m - half, m + half

    for task, v in scores.items():
        m, lo, hi = normal(v)
        assert store["tasks"][task]["mean"] == pytest.approx(m)
        assert store["tasks"][task]["ci95"] == pytest.approx([lo, hi])
    m, lo, hi = normal([(a + b) / 2 for a, b in zip(*scores.values(), strict=True)])
    assert store["average"]["mean"] == pytest.approx(m) and store["average"]["ci95"] == pytest.approx(
        [lo, hi]
    )
    table = eval_ruler.markdown(eval_ruler.summarise(records))
    assert "store | 75 [" in table and "| 35 [" in table
    # bare has one task of two, one sample of four: still running, no average to compare
    assert cells[("bare", 4096)]["average"] is None
    assert table.splitlines()[-2] == "bare | 100 [100, 100] (n=1) |  | running"


def test_a_row_with_a_task_short_of_samples_has_no_average():
    records = [
        {"row": row, "task": t, "length": 4096, "sample": i, "score": 1.0}
        for row, n_last in (("bare", 3), ("store", 2))
        for t in ("niah_single_1", "common_words")
        for i in range(3 if t == "niah_single_1" else n_last)
    ]
    cells = {c["row"]: c for c in eval_ruler.summarise(records)["cells"]}
    assert cells["bare"]["average"]["mean"] == 1.0 and cells["store"]["average"] is None
    # a longer length begun on one task of the two: no average there, though no row has more
    records += [
        {"row": "store", "task": "niah_single_1", "length": 32768, "sample": i, "score": 1.0}
        for i in range(3)
    ]
    (long,) = [c for c in eval_ruler.summarise(records)["cells"] if c["length"] == 32768]
    assert long["average"] is None and "running" in eval_ruler.markdown(eval_ruler.summarise(records))


def test_paired_differences_match_per_prompt_averages_and_leave_out_rows_still_running():
    tasks = ("niah_single_1", "common_words")
    score = {
        ("bare", "niah_single_1"): [1.0, 0.0, 1.0, 0.0],
        ("bare", "common_words"): [0.2, 0.4, 0.0, 0.6],
        ("store", "niah_single_1"): [1.0, 1.0, 0.0, 1.0],
        ("store", "common_words"): [0.4, 0.4, 0.2, 0.2],
    }
    records = [
        {"row": row, "task": t, "length": 4096, "sample": i, "score": v}
        for (row, t), vs in score.items()
        for i, v in enumerate(vs)
    ]
    # a resumed run appends out of order: one task's samples reversed, the pairing and the
    # averages go by sample index
    records = [r for r in records if r["task"] == tasks[0]] + [r for r in records if r["task"] == tasks[1]][
        ::-1
    ]
    records += [{"row": "store_near", "task": t, "length": 4096, "sample": 0, "score": 1.0} for t in tasks]
    summary = eval_ruler.summarise(records)
    # store_near ran one prompt of four: it is in no pair
    assert [(d["a"], d["b"]) for d in summary["paired"]] == [("store", "bare")]
    diffs = [
        (score[("store", tasks[0])][i] + score[("store", tasks[1])][i]) / 2
        - (score[("bare", tasks[0])][i] + score[("bare", tasks[1])][i]) / 2
        for i in range(4)
    ]
    m = sum(diffs) / 4
    half = 1.96 * math.sqrt(sum((d - m) ** 2 for d in diffs) / 3) / 2
    got = summary["paired"][0]["difference"]
    assert got["mean"] == pytest.approx(m) and got["ci95"] == pytest.approx([m - half, m + half])
    line = f"- store − bare: {100 * m:.0f} [{100 * (m - half):.0f}, {100 * (m + half):.0f}]"
    assert line in eval_ruler.markdown(summary).splitlines()
    assert eval_ruler.points(-0.004) == "0" and eval_ruler.points(-0.006) == "-1"
    per_prompt = [(score[("store", tasks[0])][i] + score[("store", tasks[1])][i]) / 2 for i in range(4)]
    m = sum(per_prompt) / 4
    half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in per_prompt) / 3) / 2
    (store,) = [c for c in summary["cells"] if c["row"] == "store"]
    assert store["average"]["ci95"] == pytest.approx([m - half, m + half])


def test_past_the_window_the_store_rows_pair_with_memory_off():
    """Where the bare model is not run (past its window), ``off`` is the memory-less row the
    store rows are measured against."""
    score = {"off": [0.0, 0.5, 0.0], "store": [1.0, 0.5, 0.0], "store_near": [1.0, 1.0, 0.5]}
    records = [
        {"row": row, "task": "niah_single_1", "length": 16384, "sample": i, "score": v}
        for row, vs in score.items()
        for i, v in enumerate(vs)
    ]
    pairs = {(d["a"], d["b"]): d["difference"]["mean"] for d in eval_ruler.summarise(records)["paired"]}
    assert set(pairs) == {("store", "off"), ("store_near", "off"), ("store_near", "store")}
    for a, b in pairs:
        assert pairs[(a, b)] == pytest.approx(sum(x - y for x, y in zip(score[a], score[b], strict=True)) / 3)


def test_bf16_rows_sort_after_their_float32_row_and_pair_with_it():
    score = {"store": [1.0, 0.0, 1.0], "bare+bf16": [0.0, 0.0, 1.0], "bare": [1.0, 0.0, 0.0]}
    records = [
        {"row": row, "task": "niah_single_1", "length": 4096, "sample": i, "score": v}
        for row, vs in score.items()
        for i, v in enumerate(vs)
    ]
    summary = eval_ruler.summarise(records)
    assert [c["row"] for c in summary["cells"]] == ["bare", "bare+bf16", "store"]
    pairs = {(d["a"], d["b"]): d["difference"]["mean"] for d in summary["paired"]}
    assert pairs[("bare+bf16", "bare")] == pytest.approx((-1 + 0 + 1) / 3)
    assert pairs[("store", "bare")] == pytest.approx((0 + 0 + 1) / 3)
    # the same pair between the rows under bf16 (the 32K table): store+bf16 - bare+bf16
    records += [
        {"row": "store+bf16", "task": "niah_single_1", "length": 4096, "sample": i, "score": v}
        for i, v in enumerate([1.0, 1.0, 0.0])
    ]
    pairs = {(d["a"], d["b"]): d["difference"]["mean"] for d in eval_ruler.summarise(records)["paired"]}
    assert pairs[("store+bf16", "bare+bf16")] == pytest.approx((1 + 1 - 1) / 3)
    assert ("store+bf16", "bare") not in pairs


def test_argument_errors_come_before_the_model_loads(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        eval_ruler.main(["--rows", "tuned", "--out", str(tmp_path)])
    assert e.value.code == 2 and "tuned needs --run DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        eval_ruler.main(["--rows", "store", "--heads", str(tmp_path), "--out", str(tmp_path)])
    assert "heads.json is missing" in str(e.value) and "--calibrate" in str(e.value)
    with pytest.raises(SystemExit) as e:
        eval_ruler.main(["--tasks", "niah_single_9"])
    assert e.value.code == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, why in (
        ("gpu", "expected cpu or cuda[:N]"),
        ("mps", "expected cpu or cuda[:N]"),
        ("cuda", "is False"),
    ):
        with pytest.raises(SystemExit) as e:
            eval_ruler.main(["--device", device, "--out", str(tmp_path)])
        assert e.value.code == 2 and why in capsys.readouterr().err, device


def test_bf16_on_a_cpu_without_bf16_units_warns_before_the_model_loads(tmp_path, capsys, monkeypatch):
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(eval_ruler, "cpu_has_bf16", lambda native=native: native)
        with pytest.raises(SystemExit) as e:  # the missing heads stop it before the model loads
            eval_ruler.main(["--bf16", "--rows", "store", "--heads", str(tmp_path), "--out", str(tmp_path)])
        assert "heads.json is missing" in str(e.value)
        assert ("without native bf16" in capsys.readouterr().err) is warned, native
    monkeypatch.setattr(eval_ruler, "cpu_has_bf16", lambda: False)
    assert eval_ruler.bf16_warning(torch.device("cpu"), bf16=False) is None
    assert eval_ruler.bf16_warning(torch.device("cuda"), bf16=True) is None  # CUDA's autocast is its own


def test_top_k_suffix_rows_sort_after_their_row_pair_among_themselves_and_refuse_fixed_rows(capsys):
    score = {
        "store_near+k16": [1.0, 1.0, 0.0],
        "rag_bm25_near+k16": [0.0, 1.0, 0.0],
        "store_near": [0.0, 0.0, 1.0],
        "rag_bm25_near": [1.0, 1.0, 1.0],
    }
    records = [
        {"row": row, "task": "niah_multiquery", "length": 16384, "sample": i, "score": v}
        for row, vs in score.items()
        for i, v in enumerate(vs)
    ]
    summary = eval_ruler.summarise(records)
    assert [c["row"] for c in summary["cells"]] == [
        "store_near",
        "store_near+k16",
        "rag_bm25_near",
        "rag_bm25_near+k16",
    ]
    pairs = {(d["a"], d["b"]): d["difference"]["mean"] for d in summary["paired"]}
    assert pairs[("rag_bm25_near+k16", "store_near+k16")] == pytest.approx((-1 + 0 + 0) / 3)
    assert pairs[("rag_bm25_near", "store_near")] == pytest.approx((1 + 1 + 0) / 3)
    # a pair across budgets is not made: the rows retrieved different numbers of chunks
    assert not any(("+k16" in a) != ("+k16" in b) for a, b in pairs)
    for bad, why in (
        (["--top-k", "0"], "expected a positive integer"),
        (["--rows", "bare", "--top-k", "8"], "not to bare"),
        (["--window", "0"], "expected a positive integer"),
        (["--rows", "store_near", "rag_bm25_near", "--window", "32"], "not to rag_bm25_near"),
        (["--keep-initial", "-1"], "expected an integer >= 0"),
        (["--rows", "bare", "--keep-initial", "32"], "--keep-initial applies to the store rows"),
    ):
        with pytest.raises(SystemExit) as e:
            eval_ruler.main(bad)
        assert e.value.code == 2 and why in capsys.readouterr().err


def test_overview_lists_each_rows_average_by_length_with_bf16_filling_only_missing_cells():
    """The README's table: a complete row's average at each length; a ``+bf16`` row stands in
    for its float32 row only where that row was not run, and says so; running rows are out."""
    score = {
        ("store", 4096): [1.0, 0.0, 1.0],
        ("store+bf16", 4096): [0.0, 0.0, 0.0],  # the float32 run at 4K wins its cell
        ("store+bf16", 16384): [1.0, 1.0, 0.5],
        ("bare", 4096): [1.0, 1.0, 1.0],
    }
    records = [
        {"row": row, "task": "niah_single_1", "length": n, "sample": i, "score": v}
        for (row, n), vs in score.items()
        for i, v in enumerate(vs)
    ]
    records.append({"row": "store_near", "task": "niah_single_1", "length": 4096, "sample": 0, "score": 1.0})
    lines = eval_ruler.overview(eval_ruler.summarise(records)).splitlines()

    def cell(v):
        m = sum(v) / len(v)
        half = 1.96 * math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) / math.sqrt(len(v))
        lo, hi = max(0.0, m - half), min(1.0, m + half)
        return f"{100 * m:.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"

    assert lines[0] == "row | 4,096 tokens | 16,384 tokens"
    assert lines[2:] == [
        "bare | 100 [100, 100] | –",
        f"store | {cell(score[('store', 4096)])} | {cell(score[('store+bf16', 16384)])} (bf16)",
    ]
    assert eval_ruler.report(eval_ruler.summarise(records)).startswith(
        eval_ruler.OVERVIEW + "\n\n" + lines[0]
    )
