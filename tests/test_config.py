from pathlib import Path

import pytest

from memstack.config import StackConfig, parse_layers


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("all", 4, [0, 1, 2, 3]),
        ("none", 4, []),
        ("every:2", 5, [0, 2, 4]),
        ("3,1", 4, [1, 3]),
        (" 0 ", 2, [0]),
    ],
)
def test_parse_layers(spec, n, expected):
    assert parse_layers(spec, n) == expected


@pytest.mark.parametrize("spec", ["every:0", "every:x", "a,b", ",", "some"])
def test_parse_layers_rejects_bad_syntax(spec):
    with pytest.raises(ValueError, match="memory_layers"):
        parse_layers(spec, 4)


def test_parse_layers_rejects_missing_layer():
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        parse_layers("0,7", 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_len=0), "segment_len"),
        (dict(update_rule="hebbian"), "update_rule"),
        (dict(bptt_segments=0), "bptt_segments"),
        (dict(window=0), "window"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(memory_layers="every:"), "memory_layers"),
    ],
)
def test_stack_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StackConfig(**kwargs)


def test_stack_config_dict_round_trip_and_unknown_keys():
    cfg = StackConfig(segment_len=64, update_rule="delta", memory_layers="every:2", bptt_segments=3)
    assert StackConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="valid keys"):
        StackConfig.from_dict({"segment_len": 8, "segmnt": 3})


# ---------------------------------------------------------------------- training configs

from memstack.config import Config, apply_overrides, load_config, valid_keys  # noqa: E402


def test_overrides_parse_to_the_field_type():
    cfg = apply_overrides(
        Config(),
        [
            "optim.lr=3e-4",
            "stack.bptt_segments=4",
            "stack.window=none",
            "eval.passkey_lengths=[512,2048]",
            "optim.betas=0.8,0.99",
            "run.resume=false",
            "model.path=/models/x",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.stack.bptt_segments == 4 and cfg.stack.window is None
    assert cfg.eval.passkey_lengths == [512, 2048]
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.run.resume is False and cfg.model.path == "/models/x"


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'; valid keys: .*optim.lr"),
        ("stack.segment_len=abc", "expected int"),
        ("run.resume=maybe", "expected a bool"),
        ("optim.lr", "must look like key.sub=value"),
        ("stack.update_rule=hebbian", "update_rule"),  # the dataclass's own validation still runs
    ],
)
def test_bad_overrides_are_rejected(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(Config(), [override])


def test_config_dict_round_trip():
    cfg = apply_overrides(Config(), ["optim.betas=0.8,0.9", "stack.segment_len=64"])
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert "stack.segment_len" in valid_keys(cfg)


def test_load_config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "from memstack.config import Config, StackConfig\n"
        "config = Config(stack=StackConfig(segment_len=32))\n"
    )
    cfg = load_config(str(path), ["run.seed=7"])
    assert cfg.stack.segment_len == 32 and cfg.run.seed == 7
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define `config"):
        load_config(str(path))


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.py")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.data.task in ("passkey", "text")
    if cfg.model.path is None:  # tiny configs: built from a config, byte tokenizer, nothing downloaded
        assert cfg.data.tokenizer == "bytes" and cfg.model.vocab_size == 256
