"""The pages under docs/ run as written, say what their code does, and quote their JSON correctly.

- Every ```python block of a docs page runs: a page's blocks run in order in one namespace (as one
  script: later blocks use what earlier ones built), from the repository root, with tiny random
  models built from configs (nothing is downloaded). Then the page's check below tests what its
  comments and text claim about the results.
- The tables of results.md and benchmarks.md are compared with the JSON files they cite, so a
  figure that drifts from its JSON fails here.
- Every relative link of README.md and docs/*.md points at a file that exists, and every
  ``#anchor`` at a heading of that file.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
PENDING: set[str] = set()  # pages linked before they are written (none now)


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def run_page(page: Path) -> dict:
    """Execute the page's python blocks in order in one namespace (cwd: the repository root)."""
    module = types.ModuleType(f"docs_{page.stem}")  # a real module: dataclasses look their class up there
    sys.modules[module.__name__] = module
    ns = module.__dict__
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ROOT)
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and never oversubscribes
    torch.manual_seed(0)
    try:
        for i, code in enumerate(python_blocks(page)):
            exec(compile(code, f"{page.relative_to(ROOT)} (python block {i + 1})", "exec"), ns)
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
        sys.modules.pop(module.__name__, None)
    return ns


# ------------------------------------------------------------------------- what each page claims


def check_memory(ns: dict, out: str) -> None:
    memory = ns["memory"]  # layer 2: (batch, KV heads, d_k, d_v), float32, constant size
    assert tuple(memory.M.shape) == (1, 2, 16, 16) and memory.M.dtype == torch.float32
    assert "torch.Size([1, 2, 16, 16]) torch.float32" in out
    assert len(ns["store"]) == 4  # the store built by hand: 4 chunks of 32 in a 128-token segment
    assert ns["record_ids"].shape == (1, 2) and set(ns["record_ids"][0].tolist()) <= {0, 1, 2, 3}
    assert "\n16\n" in out  # 512 tokens in chunks of 32, and the same after save/load of the stream
    assert len(ns["restored"].memories["store"][1].stores[0]) == 16
    assert "[3, 7]" in out  # every:4 over 8 segments reads at segments 3 and 7
    found = ns["found"]
    assert all(r.queries[0] <= 200 < r.queries[1] and r.layer == 3 for r in found.for_block(3, 200))
    assert [r.rank for r in found.for_block(3, 200)] == list(range(len(found.for_block(3, 200))))
    for layer, shares in found.shares.items():
        kinds = {"local", "compressive"} | ({"store"} if layer in (1, 3) else set())
        assert set(shares) == kinds
        for head in zip(*shares.values(), strict=True):
            assert math.isclose(sum(head), 1.0, abs_tol=1e-4)
    stack, report = ns["stack"], ns["report"]  # layer 4
    assert report.adapter == "sleep-0001" and report.steps == 4 and report.forgetting is not None
    assert stack.adapters.names() == ["sleep-0001"] and stack.adapters.active() == ["sleep-0001"]
    assert "['sleep-0001'] ['sleep-0001']" in out
    for layer in stack.state.memories["store"].values():  # the night's records are consolidated
        assert all(len(s.ids(consolidated=False)) == 0 and len(s) > 0 for s in layer.stores)
    before, changed = ns["before"], []
    for name, param in stack.model.named_parameters():  # only the new adapter trained
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(param, before[original]), name
        changed.append(original)
    assert len(changed) == len(before)
    assert ns["answer"].shape == (1, 45)


def check_models(ns: dict, out: str) -> None:
    assert ns["arch"].summary() == "2 attention layers, rotary half"
    assert "\n4 4 16\n" in out
    assert "BloomForCausalLM: no module calls the attention function" in out
    assert ns["verdict"].status == "supported" and "supported 2 attention layers, rotary half" in out
    assert out.rstrip().endswith("refused")


def check_training(ns: dict, out: str) -> None:
    assert "64 [256, 512] None" in out
    assert "did you mean stack.segment_len?" in out
    sample = ns["sample"]
    assert len(sample.prompt_ids) == 960 and len(sample.passkey) == 5 and sample.passkey.isdigit()
    assert f"The pass key is {sample.passkey}" in out
    assert "55% [34-74]" in out
    assert "['decay', 'no_decay', 'gates'] 10.0" in out  # the gates' own learning rate under Trainer
    losses = [r["loss"] for r in ns["trainer"].state.log_history if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert "True" in out.split("10.0", 1)[1]  # the checkpoint's gates, loaded back


def check_guarantees(ns: dict, out: str) -> None:
    errors = ns["errors"]
    assert len(errors) == 2 and "300" in errors[0] and "input_ids" in errors[0] and "input_ids" in errors[1]
    assert "segment_len" in out and "True" in out
    assert ns["path"] in out and "(8,)" in out  # the failed load names the path and the shape it needs
    assert "cannot hold" in out and "save_stream" in out


def check_design(ns: dict, out: str) -> None:
    from memstack import KINDS
    from memstack.memory.store.keys import STRATEGIES

    # the toy kind's state: the mean value of the last segment, (batch, kv_heads, head_dim)
    state = ns["out"].state.memories["last_segment"][0]
    assert tuple(state.value.shape) == (1, 2, 16) and "torch.Size([1, 2, 16])" in out
    assert "last_key" in out
    assert "last_segment" not in KINDS and "last_key" not in STRATEGIES  # unregistered again


CHECKS = {
    "design": check_design,
    "memory": check_memory,
    "models": check_models,
    "training": check_training,
    "guarantees": check_guarantees,
}


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_docs_python_blocks_run_and_do_what_they_say(page, capsys):
    ns = run_page(page)
    out = capsys.readouterr().out
    assert page.stem in CHECKS, f"{page.name} has python blocks but no check of what they claim"
    CHECKS[page.stem](ns, out)


def test_every_page_with_code_is_checked():
    assert {p.stem for p in PAGES if python_blocks(p)} == set(CHECKS)


# ------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        rel = path.relative_to(ROOT).as_posix()
        if rel in PENDING and not path.exists():
            continue
        assert path.exists(), f"{page.name}: link to {target} ({rel} does not exist)"
        if anchor:
            assert anchor in _anchors(path), f"{page.name}: no heading #{anchor} in {rel}"


def test_readme_points_at_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in [*PAGES, DOCS / "design.md"]:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    assert "the design document the project grew from" not in readme


# ------------------------------------------------------------------------- tables against their JSON


def _table(page: str, header: str) -> list[list[str]]:
    """The rows (cells stripped) of the markdown table whose header row starts with ``header``."""
    lines = (DOCS / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip().startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _rate(r: dict) -> str:
    low, high = r["ci95"]
    return f"{r['mean' if 'mean' in r else 'accuracy']:.0%} [{100 * low:.0f}-{100 * high:.0f}]"


def test_results_passkey_tables_match_their_json():
    text = (DOCS / "results.md").read_text()
    blocks = [b for b in text.split("\n\n") if b.startswith("| length | depth 0 |")]
    assert len(blocks) == 3  # MemoryStack, full attention, linear: in that order on the page
    for name, block in zip(["memstack.json", "full_attention.json", "linear.json"], blocks, strict=True):
        rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
        run = _load(f"results/tiny_passkey/{name}")["memory_on"]
        assert len(rows) == len(run["lengths"])
        for row, length, acc in zip(rows, run["lengths"], run["accuracy"], strict=True):
            assert row[0] == str(length)
            assert row[1:] == [f"{a:.0%}" for a in acc] + [f"{sum(acc) / len(acc):.0%}"]


def test_results_store_table_matches_its_json():
    rows = _table("results.md", "| weights | memory at evaluation |")
    order = ["mix_compressive", "mix_store_trainingfree", "store_off", "store_on"]
    for i, row in enumerate(rows):
        run = _load(f"results/tiny_passkey_store/{order[i // 2]}/passkey_eval.json")
        key = "synthetic_memory_on" if row[2] == "synthetic" else "text_memory_on"
        assert row[3:] == [_rate(r) for r in run[key]["by_length"]], row


def test_results_policy_table_matches_its_json():
    rows = _table("results.md", "| prompt | policy |")
    runs = [
        r
        for f in ("retrieval_policy_4k", "retrieval_policy", "retrieval_policy_1m")
        for r in _load(f"results/{f}.json")["rows"]
    ]
    assert len(rows) == len(runs)
    for row, r in zip(rows, runs, strict=True):
        assert row[0] == f"{r['length']:,}" and row[1].startswith(r["policy"])
        assert row[2] == (_rate(r) if r["n"] > 1 else f"{int(r['accuracy'])} of 1")
        assert row[3] == f"{r['tokens_per_s']:,.0f}" and row[4] == f"{r['consulted_share']:.0%}"


def _sleep_cell(night: dict) -> str:
    c, u = night["completion"], night["unseen_templates"]
    recall = f"{c['mean']:.0%} [{100 * c['low']:.0f}-{100 * c['high']:.0f}]"
    return f"{recall} / {u['mean']:.0%} / {100 * night['held_out_change']:+.1f}%"


def test_results_sleep_tables_match_their_json():
    names = {"`lm` + replay 0.2": "lm + replay", "`lm` + replay 0.2 + KL 1.0": "lm + replay + KL"}
    for header, path in (
        ("| variant | after night 1", "results/tiny_sleep/sleep_eval.json"),
        ("| variant | night 1 |", "results/tiny_sleep_800/sleep_eval.json"),
    ):
        variants = _load(path)["variants"]
        rows = _table("results.md", header)
        assert len(rows) == len(variants)
        for row in rows:
            name = names.get(row[0], row[0].replace("`", ""))
            assert row[1:] == [_sleep_cell(n) for n in variants[name]], row


def test_results_smollm2_sleep_tables_are_the_scripts_own():
    """Every table row of the SmolLM2 sleep runs' sleep.md (written by eval_sleep_smollm2.py from
    its jsonl) stands in results.md as written, and the levers table matches its jsonl."""
    text = (DOCS / "results.md").read_text()
    for run in ("smollm2_sleep", "smollm2_sleep_120", "smollm2_sleep_self_90_rb2", "smollm2_sleep_packed"):
        rows = [r for r in (ROOT / "results" / run / "sleep.md").read_text().splitlines() if " | " in r]
        assert rows and all(r in text for r in rows), run
    levers = [json.loads(x) for x in (ROOT / "results/smollm2_sleep_120/levers_night1.jsonl").open()]
    labels = ["40 steps (the recipe above)", "120 steps", "120 steps + paraphrases"]
    for lever, label in zip(levers, labels, strict=True):
        line = f"| {label} | {lever['nolead']}/30 | {lever['unseen']}/60 | {lever['kjv']:.2f} |"
        assert line in text, line


def test_results_ruler_tables_are_the_scripts_own():
    """Every row of eval_ruler.py's ruler.md (written from its jsonl) stands in results.md as written."""
    text = (DOCS / "results.md").read_text()
    rows = [r for r in (ROOT / "results/smollm2_ruler/ruler.md").read_text().splitlines() if " | " in r]
    assert len(rows) >= 3 and all(r in text for r in rows), [r for r in rows if r not in text]


def test_readme_ruler_table_is_the_scripts_overview():
    """The README's RULER table is eval_ruler.py's averages by length, line for line, the header
    included, and nothing else: the table ends where the overview ends."""
    md = (ROOT / "results/smollm2_ruler/ruler.md").read_text()
    overview = md.split("\n\n")[1].splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(overview[0])
    assert readme[start : start + len(overview)] == overview
    assert not readme[start + len(overview)].strip(), "the README's table has lines the overview has not"


def test_results_loss_by_segment_matches_its_json():
    run = _load("results/tiny_text/ppl_by_segment.json")
    on, off = run["memory_on"], run["memory_off"]
    text = (DOCS / "results.md").read_text()
    assert f"({on[0]:.3f} nats/byte)" in text and on[0] == off[0]
    assert f"mean loss is {sum(on[1:]) / 63:.3f} with memory on and {sum(off[1:]) / 63:.3f}" in text
    assert f"lower in {sum(a < b for a, b in zip(on[1:], off[1:], strict=True))} of 63" in text


def test_benchmark_tables_match_their_json():
    text = (DOCS / "benchmarks.md").read_text()
    memory = _load("results/bench/memory.json")
    assert memory["table"].strip() in text  # the script's own markdown, verbatim
    goal = {r[0]: r for r in _table("benchmarks.md", "| | memstack | goal |")}
    train, infer = memory["ratios"]["train_time"], memory["ratios"]["inference_speed"]
    assert goal["training step time, 2K"][1] == f"**{train['memstack/bare_segments@2048']:.2f}x**"
    assert goal["training step time, 8K"][1] == f"**{train['memstack/bare_segments@8192']:.2f}x**"
    assert goal["inference tokens/s, 64K"][1] == f"{infer['memstack/bare_segments@65536']:.2f}x"

    longterm = _load("results/bench/longterm.json")["rows"]
    base = {r["length"]: r["tokens_per_s"] for r in longterm if r["system"] == "compressive"}
    rows = _table("benchmarks.md", "| length | system | tokens/s |")
    assert len(rows) == len(longterm)
    for row, r in zip(rows, longterm, strict=True):
        assert row[0] == f"{r['length']:,}" and row[2] == f"{r['tokens_per_s']:,.0f}"
        assert row[3] == f"{r['tokens_per_s'] / base[r['length']]:.2f}x"

    def search_rows(path: str) -> dict:
        found = {}
        for r in _load(path)["rows"]:
            for s in r["search"]:
                found.setdefault((r["keys"], r["dim"], r["factory"]), []).append(s)
        return found

    store = search_rows("results/bench/store.json")
    for row in _table("benchmarks.md", "| keys x dim | search |"):
        n, dim = row[0].split(" x ")
        keys = {"10K": 10_000, "100K": 100_000, "1M": 1_000_000}[n]
        factory = {"matmul": "matmul", "FAISS Flat": "Flat"}.get(row[1], row[1].split(",")[0].split(" ")[0])
        factory = "IVF128,PQ16" if factory == "IVF-PQ" else factory
        assert any(
            row[3] == f"{s['ms_per_query']:.2f}" and row[4] == f"{s['recall@10']:.3f}"
            for s in store[(keys, int(dim), factory)]
        ), row

    for row in _table("benchmarks.md", "| data x dim | search |"):
        data, dim = row[0].split(" x ")
        sweep = search_rows(f"results/bench/store_1m_{data}.json")
        factory = "matmul" if row[1].startswith("matmul") else row[1].split(", ")[0].split(",PQ")[0]
        matches = [
            s
            for (_, d, f), ss in sweep.items()
            for s in ss
            if d == int(dim)
            and f.startswith(factory)
            and row[3] == f"{s['ms_per_query']:.2f}"
            and row[5] == f"{s['recall@10']:.3f}"
        ]
        assert matches, row


@pytest.mark.parametrize(
    "path, order, min_rows, keep",
    [
        (
            "results/retrieval_bench.json",
            ["facts", "passkey_32K", "passkey_128K", "passkey_1024K", "kv_32K"],
            40,
            "",
        ),
        (
            "results/smollm2_retrieval/retrieval_bench.json",
            ["facts", "passkey_32K", "passkey_128K", "passkey_1024K", "kv_32K"],
            21,
            "",
        ),
        # the store's own search: its rows only (the others repeat the run above, figure for figure)
        (
            "results/smollm2_retrieval/store_heads/retrieval_bench.json",
            ["facts", "passkey_32K", "passkey_128K", "kv_32K"],
            4,
            "store_heads",
        ),
        (
            "results/smollm2_retrieval/store_heads/context512.json",
            ["facts", "passkey_32K", "kv_32K"],
            3,
            "store_heads",
        ),
        # each segment's attention sink kept out of the keys (--segment-prefix): every row
        (
            "results/smollm2_retrieval/store_heads_prefix/retrieval_bench.json",
            ["facts", "passkey_32K", "passkey_128K", "kv_32K"],
            20,
            "",
        ),
        (
            "results/smollm2_retrieval/store_heads_prefix/other_prefix.json",
            ["facts", "passkey_32K", "kv_32K"],
            12,
            "",
        ),
        (
            "results/smollm2_retrieval/store_heads_prefix_seg8192/retrieval_bench.json",
            ["facts", "passkey_32K", "kv_32K"],
            12,
            "",
        ),
        # heads chosen by their own search (eval_smollm2.py --calibrate-by search): their rows
        *(
            (
                f"results/smollm2_search_heads/{name}.json",
                ["facts", "passkey_32K", "kv_32K"],
                2,
                "(`fused/store_heads`)",
            )
            for name in ("bench_prefix", "bench_other_prefix", "bench_seg8192")
        ),
        (
            "results/smollm2_search_heads/bench_prefix_128K.json",
            ["facts", "passkey_128K", "kv_32K"],
            2,
            "(`fused/store_heads`)",
        ),
    ],
)
def test_retrieval_tables_match_their_json(path, order, min_rows, keep):
    """What ``scripts/bench_retrieval.py --replot --markdown`` prints from the JSON is on the page
    (``keep``: only the rows that name it)."""
    from memstack.evals.retrieval import headline, markdown

    saved = _load(path)
    assert sorted(t for t in saved["results"] if t != "facts_dev") == sorted(order)
    printed = markdown(headline(saved["results"]), order, saved["results"]["facts_dev"])
    text = (DOCS / "benchmarks.md").read_text()
    rows = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    rows = [line for line in rows if keep in line]
    assert len(rows) > min_rows
    for line in rows:
        assert line in text, line


def test_models_page_and_readme_quote_the_compat_matrix():
    compat = _load("results/compat.json")
    status = [v["status"] for v in compat["verdicts"]]
    rows = {r[0]: r[1].strip("*") for r in _table("models.md", "| verdict | types |")}
    assert rows["supported: every invariant holds"] == str(status.count("supported"))
    assert rows["refused with a reason (`UnsupportedModelError`)"] == str(status.count("refused"))
    assert rows["fails an invariant"] == str(status.count("fails"))
    assert rows["transformers cannot build or run it tiny here"] == str(status.count("no tiny build"))
    assert rows["all causal-LM types"] == str(len(status))
    readme = (ROOT / "README.md").read_text()
    assert f"{status.count('supported')} of the {len(status)} causal-LM types" in readme
    assert f"transformers {compat['transformers']}" in readme


def test_readme_quickstart_line_matches_the_shipped_cells():
    run = _load("results/tiny_passkey_store/store_on/passkey_eval.json")["text_memory_on"]["by_length"]
    on = " / ".join(f"{r['mean']:.0%}" for r in run[:2])
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"pass key found at 960, 4032 bytes: memory on {on}, memory off 0% / 0%" in readme


def test_readme_first_command_line_matches_the_shipped_quickstart_run():
    """The README quotes what scripts/quickstart.py printed (results/smollm2/quickstart.json)."""
    run = _load("results/smollm2/quickstart.json")
    r, n = run["rows"], run["rows"]["bare"]["n"]
    line = (
        f"pass key found: bare model at {run['window_length']:,} tokens {r['bare']['hits']}/{n}; at "
        f"{run['length']:,} tokens memory on {r['store']['hits']}/{n}, memory off {r['off']['hits']}/{n}"
    )
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert line in readme
    # and the 20-prompt tables of docs/results.md are those the evaluation wrote
    table = (ROOT / "results" / "smollm2" / "passkey.md").read_text().strip().splitlines()
    results = (ROOT / "docs" / "results.md").read_text()
    assert all(row in results for row in table if row)
