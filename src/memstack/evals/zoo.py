"""Tiny random instances of every causal-LM type of the installed transformers, built offline.

A compatibility matrix needs each architecture's *code paths*, not its weights: the type's default
config is shrunk to a few layers of width 64 so that building and running it takes well under a
second on a CPU. Types that cannot be built that way raise :class:`DoesNotBuildTiny` with a reason.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging as hf_logging

__all__ = ["DoesNotBuildTiny", "build_tiny", "causal_lm_types", "tiny_config"]


class DoesNotBuildTiny(Exception):
    """The model type cannot be built tiny from its default config here (reason in the message)."""


def causal_lm_types() -> list[str]:
    """Every model_type in transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# Attribute names by role; configs spell the same size in many ways, so all spellings are tried.
_VOCAB = ("vocab_size",)
_HIDDEN = (
    "hidden_size",
    "n_embd",
    "d_model",
    "embed_dim",
    "dim",
    "n_embed",
    "adapter_in_dim",
    "adapter_input_size",
)
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
_HEADS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "decoder_attention_heads",
    "encoder_attention_heads",
)
_KV_HEADS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "kv_n_heads", "multi_query_group_num")
_FFN = (
    "intermediate_size",
    "ffn_dim",
    "n_inner",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
    "ffn_hidden_size",
    "d_ff",
    "dff",
)
_POSITIONS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_MOE_FFN = (
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "expert_intermediate_size",
    "expert_ffn_hidden_size",
)
# DeepSeek-style multi-head latent attention: small and mutually consistent (qk = nope + rope).
_MLA = {"kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 24}  # v != q/k size
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


_GLOBAL_KINDS = ("full_attention", "attention", "hybrid", "global", "full", "indexed_attention")
_LAYER_KIND_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_layer_types")
_DERIVED = ("per_layer_config",)  # rebuilt from the new sizes at init
_LAYER_INDEX_LISTS = ("attn_layer_indices", "hybrid_layer_ids", "full_attn_idxs", "attn_layer_ids")


def _kinds(types: list, layers: int) -> list:
    # A hybrid model cut to its first layers may lose its only attention (or MoE) layer, and with
    # it the code path under test: keep every kind, a global-attention kind last if there is one,
    # else the kinds in order of first appearance (dense MLP layers before MoE ones).
    kinds = list(dict.fromkeys(types))
    if kinds == ["linear_attention"]:
        kinds.append("full_attention")  # all-linear hybrids' cache code needs one attention layer
    if len(kinds) < 2:
        return [kinds[0]] * layers if kinds else []
    last = next((k for k in kinds if k in _GLOBAL_KINDS), None)
    if last is None:
        rest, last = kinds[:-1], kinds[-1]
    else:
        rest = sorted((k for k in kinds if k != last), key=types.count, reverse=True)
    rest = rest[: layers - 1]
    return rest + [rest[0]] * (layers - 1 - len(rest)) + [last]


def _overrides(fields: dict, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> dict:
    """The changed fields of a config (given as its ``vars``) that make it tiny."""
    new: dict = {}

    def put(names: tuple[str, ...], value: object, *, none_too: bool = False) -> None:
        for name in names:
            old = fields.get(name, False)
            if (isinstance(old, int) and not isinstance(old, bool)) or (none_too and old is None):
                new[name] = value

    old_layers = next((fields[n] for n in _LAYERS if isinstance(fields.get(n), int)), None)
    old_heads = next((fields[n] for n in _HEADS if isinstance(fields.get(n), int)), None)
    old_kv = next((fields[n] for n in _KV_HEADS if n in fields), None)
    put(_VOCAB, vocab)
    put(_HIDDEN, hidden)
    put(_LAYERS, layers)
    put(_HEADS, heads)
    # MHA models must stay MHA: some have no separate key/value width at all.
    put(_KV_HEADS, heads if old_kv is None or old_kv == old_heads else kv_heads, none_too=True)
    mla = "qk_rope_head_dim" in fields
    # MLA rotates only the rope part of each head, and its rotary embedding is sized by head_dim.
    put(
        ("head_dim", "attention_head_dim"),
        _MLA["qk_rope_head_dim"] if mla else hidden // heads,
        none_too=True,
    )
    put(("rotary_dim",), min(fields.get("rotary_dim") or 0, hidden // heads))
    put(_FFN, 2 * hidden)
    put(("n_inner",), 2 * hidden, none_too=True)  # GPT-2's None means 4 x hidden
    if isinstance(fields.get("intermediate_size"), list):
        new["intermediate_size"] = [2 * hidden] * layers
    put(_POSITIONS, 1024)
    # DeepSeek-style configs may leave the expert count unset (None) while being MoE models.
    deepseek = "first_k_dense_replace" in fields
    moe = deepseek or any(isinstance(fields.get(n), int) for n in _EXPERTS)
    put(_EXPERTS, 4, none_too=deepseek)
    put(("zero_expert_num",), 2)  # LongCat's identity experts, counted into the expert tables
    top_k = ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "moe_k", "moe_topk")
    put(top_k, min([fields[n] for n in top_k if isinstance(fields.get(n), int)] + [2]), none_too=moe)
    put(_MOE_FFN, hidden // 2)
    put(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1, none_too=deepseek)
    put(
        ("n_group", "num_expert_group", "topk_group"), 1
    )  # expert groups (DeepSeek-V3 routing) must divide the 4 experts
    # One dense layer first when the type has dense prefix layers, so both layer kinds run.
    put(("first_k_dense_replace", "first_k_dense", "num_dense_layers"), 1)
    put(("max_window_layers",), layers)
    # Mamba-2 mixers: heads x head width must equal expand (2) x hidden; the scan runs in chunks.
    put(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 8)
    put(("mamba_d_head", "mamba_head_dim", "mamba_headdim"), 2 * hidden // 8)
    put(("mamba_d_ssm",), 2 * hidden)
    put(("mamba_d_state", "ssm_state_size", "state_size"), 16)
    put(("mamba_chunk_size", "chunk_size"), 16)
    put(("n_groups", "mamba_n_groups"), 1)
    put(("mamba_dt_rank", "time_step_rank"), 8)
    # Linear-attention (gated delta net, KDA) heads; value heads stay a multiple of key heads.
    put(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), hidden // heads)
    put(("linear_num_heads", "linear_num_value_heads"), heads)
    lin_k, lin_v = fields.get("linear_num_key_heads"), fields.get("linear_num_value_heads")
    put(("linear_num_key_heads",), heads if lin_k == lin_v else kv_heads)
    put(("index_n_heads",), heads)
    put(("index_head_dim",), hidden // heads)
    put(("index_topk",), 4)  # sparse attention (DeepSeek-V3.2) that bites inside an 8-token segment
    put(("num_codebooks",), 1)  # MusicGen: a (batch, length) batch is one codebook's stream
    if fields.get("is_decoder") is False:
        new["is_decoder"] = True  # BERT-likes' causal-LM heads attend causally only as decoders
    put(("attention_chunk_size",), 6)  # like the sliding window: crossed inside one 8-token segment
    put(("num_kv_shared_layers",), 0)  # cache sharing needs an earlier layer of each kind
    for name, value in _MLA.items():
        put((name,), value)
    put(("q_lora_rank",), 32)
    put(("qk_head_dim",), _MLA["qk_rope_head_dim"] + _MLA["qk_nope_head_dim"])
    put(("sliding_window",), 6)  # shorter than an 8-token segment, so local attention must honour it
    if isinstance(fields.get("initializer_range"), float):
        # At the usual 0.02 a tiny model's attention is nearly uniform and its logits hardly depend
        # on it, so a wrong attention would pass the invariants unseen.
        new["initializer_range"] = 0.1
    if isinstance(fields.get("attn_logit_softcapping"), float):
        new["attn_logit_softcapping"] = 0.05  # at 50 (Gemma 2) a tiny model's small logits pass unchanged
    if fields.get("languages") and fields.get("default_language", "") is None:
        new["default_language"] = fields["languages"][0]  # X-MOD routes by language; a forward needs one
    for name, value in fields.items():
        if name in new:
            continue
        elif name.endswith("_period") and isinstance(value, int) and value > layers:
            new[name] = layers  # e.g. Jamba/Zamba attention every `period` layers, at `offset`
            offset = name[: -len("period")] + "offset"
            if isinstance(fields.get(offset), int):
                new[offset] = layers - 1
        elif name in _LAYER_KIND_LISTS and isinstance(value, list | tuple) and value:
            new[name] = _kinds(list(value), layers)
        elif name in _LAYER_INDEX_LISTS and (value is None or isinstance(value, list | tuple)):
            # None means no attention layer at all, which the hybrid cache code cannot handle.
            new[name] = [i for i in value or () if i < layers - 1] + [layers - 1]
        elif isinstance(value, list | tuple) and old_layers and len(value) == old_layers != layers:
            new[name] = list(value[:layers])  # per-layer settings
        elif "vocab" in name and isinstance(value, int) and value > vocab:
            new[name] = vocab  # per-layer-input and hashed-n-gram embedding tables
        elif ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
            new[name] = 0.0
        elif name in _TOKEN_IDS and isinstance(value, int) and value >= vocab:
            new[name] = 0 if name == "pad_token_id" else vocab - 1
        elif name in _TOKEN_IDS and isinstance(value, list):
            new[name] = [min(v, vocab - 1) for v in value]
        elif isinstance(value, PretrainedConfig):
            sub = _overrides(vars(value), layers, hidden, heads, kv_heads, vocab)
            # Its own fields, not its class defaults (a composite may set them), less derived tables.
            full = {k: v for k, v in value.to_dict().items() if k not in _DERIVED}
            new[name] = {**full, **sub}
    return new


def tiny_config(
    model_type: str, *, layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, vocab: int = 256
) -> PretrainedConfig:
    """The type's default config (AutoConfig.for_model(model_type)) shrunk: every size-like attribute
    it has (vocabulary, width, depth, heads, MLP and expert sizes, positions, sliding window, latent
    attention ranks, per-layer lists) set tiny, dropouts zeroed, token ids kept inside the vocabulary;
    nested sub-configs are shrunk too."""
    with _quiet():
        fields = vars(AutoConfig.for_model(model_type))
        # Rebuilt rather than edited, so that fields derived at init (per-layer tables, rope
        # parameters, layer kinds from attention periods) follow the new sizes.
        return AutoConfig.for_model(model_type, **_overrides(fields, layers, hidden, heads, kv_heads, vocab))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Default configs and random inits are noisy (unused-arg and init notices); none matter here.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)
        hf_logging.set_verbosity(verbosity)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    # Wrapping errors (strict dataclass validation) say what failed only in their cause.
    return f"{reason} <- {_reason(exc.__cause__)}" if exc.__cause__ is not None else reason


def build_tiny(model_type: str, seed: int = 0, **sizes: int) -> torch.nn.Module:
    """AutoModelForCausalLM.from_config(tiny_config(...)) with SDPA attention (eager where the type
    has no SDPA path, as Gemma 2 and GPT-OSS), in eval mode, float32; raises DoesNotBuildTiny with a
    specific reason (the exception type and first line of the message) when it fails to build or its
    forward on a (2, 24) byte batch fails."""
    try:
        config = tiny_config(model_type, **sizes)
    except Exception as exc:
        raise DoesNotBuildTiny(f"{model_type}: config: {_reason(exc)}") from exc
    vocab = sizes.get("vocab", 256)
    with _quiet():
        try:
            torch.manual_seed(seed)
            cls = AutoModelForCausalLM._model_mapping[type(config)]
            if not isinstance(config, cls.config_class):
                # e.g. MusicGen: the type's config is the composite, its causal LM takes the decoder's.
                subs = (v for v in vars(config).values() if isinstance(v, cls.config_class))
                config = next(subs, config)
            try:
                model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
            except ValueError as exc:
                if "scaled_dot_product_attention" not in str(exc):
                    raise
                model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
            model = model.float().eval()
        except Exception as exc:
            raise DoesNotBuildTiny(f"{model_type}: build: {_reason(exc)}") from exc
        try:
            ids = torch.randint(0, min(vocab, 256), (2, 24), generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                out = model(input_ids=ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
        except Exception as exc:
            raise DoesNotBuildTiny(f"{model_type}: forward: {_reason(exc)}") from exc
    if not torch.isfinite(logits).all():
        raise DoesNotBuildTiny(f"{model_type}: forward: non-finite logits")
    return model
