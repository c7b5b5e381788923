from pathlib import Path

import pytest

from memstack.config import CompressiveConfig, StackConfig
from memstack.fields import parse_layers


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
    with pytest.raises(ValueError, match="stack.compressive.layers"):
        parse_layers(spec, 4, name="stack.compressive.layers")


def test_parse_layers_rejects_missing_layer():
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        parse_layers("0,7", 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_len=0), "segment_len"),
        (dict(bptt_segments=0), "bptt_segments"),
        (dict(window=0), "window"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(compressive=False), "stack.compressive must be a CompressiveConfig or None"),
    ],
)
def test_stack_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StackConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(update_rule="hebbian"),
            "stack.compressive.update_rule must be one of linear, delta; got 'hebbian'",
        ),
        (dict(layers="every:"), "bad stack.compressive.layers 'every:'"),
        (dict(layers=3), "stack.compressive.layers must be a string such as 'all' or '0,3', got 3"),
        (dict(gate_init=float("nan")), "stack.compressive.gate_init must be a finite number, got nan"),
        (dict(gate_init=True), "stack.compressive.gate_init must be a finite number, got True"),
    ],
)
def test_compressive_config_validates(kwargs, message):
    with pytest.raises(ValueError) as e:
        CompressiveConfig(**kwargs)
    assert str(e.value).startswith(message)


def test_stack_config_dict_round_trip_and_unknown_keys():
    cfg = StackConfig(
        segment_len=64, compressive=CompressiveConfig(update_rule="delta", layers="every:2"), bptt_segments=3
    )
    assert StackConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown config keys \['stack.segmnt'\]; valid: \[.*'segment_len'"):
        StackConfig.from_dict({"segment_len": 8, "segmnt": 3})


def test_optional_store_section_round_trips_and_is_overridable():
    from memstack.config import StoreConfig
    from memstack.train.config import Config, apply_overrides

    cfg = StackConfig(store=StoreConfig(top_k=8, layers="1"))
    assert StackConfig.from_dict(cfg.to_dict()) == cfg
    assert StackConfig.from_dict({"store": None}).store is None
    base = Config()
    assert base.stack.store is None
    on = apply_overrides(base, ["stack.store.top_k=6"])  # a field of a None section switches it on
    assert on.stack.store == StoreConfig(top_k=6)
    assert apply_overrides(base, ["stack.store=on"]).stack.store == StoreConfig()
    assert apply_overrides(on, ["stack.store=none"]).stack.store is None
    assert apply_overrides(on, ["stack.store=on"]).stack.store.top_k == 6  # on keeps what is set
    assert Config.from_dict(on.to_dict()) == on  # JSON round trip builds a StoreConfig, not a dict
    with pytest.raises(ValueError, match=r"stack.store: expected none/off or on, got 'maybe'"):
        apply_overrides(base, ["stack.store=maybe"])
    with pytest.raises(ValueError, match=r"did you mean stack.store.top_k"):
        apply_overrides(base, ["stack.store.topk=3"])
    with pytest.raises(
        ValueError, match=r"stack.store.readout must be one of kv, kv_gated, tokens; got 'kvv'"
    ):
        StoreConfig(readout="kvv")
    with pytest.raises(ValueError, match=r"stack.store.top_k must be an int, got True"):
        StoreConfig(top_k=True)


def test_optional_compressive_section_round_trips_and_is_overridable():
    from memstack.train.config import Config, apply_overrides

    assert StackConfig().compressive == CompressiveConfig()  # on by default
    cfg = StackConfig(compressive=CompressiveConfig(layers="0,3", update_rule="delta", gate_init=-3.0))
    assert StackConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["compressive"] == {"layers": "0,3", "update_rule": "delta", "gate_init": -3.0}
    assert StackConfig.from_dict({"compressive": None}).compressive is None
    base = Config()
    for off in ("none", "off", "false", "None"):
        assert apply_overrides(base, [f"stack.compressive={off}"]).stack.compressive is None
    off = apply_overrides(base, ["stack.compressive=off"])
    for on in ("on", "true"):
        assert apply_overrides(off, [f"stack.compressive={on}"]).stack.compressive == CompressiveConfig()
    # a field of a switched-off section switches it on, with the defaults for the rest
    layers = apply_overrides(off, ["stack.compressive.layers=0,3"])
    assert layers.stack.compressive == CompressiveConfig(layers="0,3")
    set_all = apply_overrides(
        base,
        ["stack.compressive.update_rule=delta", "stack.compressive.gate_init=-3", "stack.compressive=on"],
    )
    assert set_all.stack.compressive == CompressiveConfig(
        update_rule="delta", gate_init=-3.0
    )  # on keeps them
    assert isinstance(set_all.stack.compressive.gate_init, float)
    assert Config.from_dict(set_all.to_dict()) == set_all  # builds a CompressiveConfig, not a dict


OLD_FLAT_STACK = {
    "segment_len": 64,
    "compressive": True,
    "memory_layers": "every:2",
    "update_rule": "delta",
    "gate_init": -3.0,
    "bptt_segments": None,
    "checkpoint_segments": False,
    "window": None,
    "sink_tokens": 0,
    "store": None,
}
"""A stack section as memstack saved it before layer 2 became a section."""


def test_old_flat_stack_dicts_are_read():
    from memstack.train.config import Config

    expected = CompressiveConfig(layers="every:2", update_rule="delta", gate_init=-3.0)
    cfg = StackConfig.from_dict(OLD_FLAT_STACK)
    assert cfg.compressive == expected and cfg.segment_len == 64
    assert StackConfig.from_dict(cfg.to_dict()) == cfg
    # compressive: false was layer 2 off; the flat fields had no effect and are dropped
    assert StackConfig.from_dict({**OLD_FLAT_STACK, "compressive": False}).compressive is None
    # an old dict that never mentioned compressive had it on (the old default)
    no_switch = {k: v for k, v in OLD_FLAT_STACK.items() if k != "compressive"}
    assert StackConfig.from_dict(no_switch).compressive == expected
    assert StackConfig.from_dict({"compressive": True}).compressive == CompressiveConfig()
    # an old run's config.json (Config.from_dict reads the stack section the same way)
    run = Config().to_dict()
    run["stack"] = OLD_FLAT_STACK
    assert Config.from_dict(run).stack.compressive == expected
    run["stack"] = {**OLD_FLAT_STACK, "compressive": False}
    assert Config.from_dict(run).stack.compressive is None
    # old values are validated under their new names
    with pytest.raises(ValueError, match="stack.compressive.update_rule must be one of linear, delta"):
        StackConfig.from_dict({**OLD_FLAT_STACK, "update_rule": "hebbian"})
    # a section next to old flat keys is ambiguous
    with pytest.raises(ValueError, match=r"move them: stack.update_rule -> stack.compressive.update_rule"):
        StackConfig.from_dict({"compressive": {"layers": "all"}, "update_rule": "delta"})


def test_old_override_keys_still_work_and_name_the_new_key():
    from memstack.train.config import Config, apply_overrides

    with pytest.warns(FutureWarning, match="stack.update_rule is now stack.compressive.update_rule"):
        cfg = apply_overrides(Config(), ["stack.update_rule=delta"])
    assert cfg.stack.compressive.update_rule == "delta"
    with pytest.warns(FutureWarning, match="stack.memory_layers is now stack.compressive.layers"):
        cfg = apply_overrides(Config(), ["stack.memory_layers=0,3", "stack.gate_init=-3"])
    assert cfg.stack.compressive == CompressiveConfig(layers="0,3", gate_init=-3.0)
    assert apply_overrides(Config(), ["stack.compressive=false"]).stack.compressive is None
    # as before the section, a flat field does not switch layer 2 back on
    with pytest.warns(FutureWarning, match="ignored: stack.compressive is off"):
        cfg = apply_overrides(Config(), ["stack.compressive=false", "stack.update_rule=delta"])
    assert cfg.stack.compressive is None
    with pytest.raises(ValueError, match="stack.compressive.update_rule must be one of linear, delta"):
        apply_overrides(Config(), ["stack.update_rule=hebbian"])


# ---------------------------------------------------------------------- training configs


from memstack.train.config import (  # noqa: E402
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
    load_config,
    valid_keys,
)


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
        ("optim.lrr=1", r"unknown config key 'optim.lrr'; did you mean optim.lr\?$"),
        (
            "stack.segment_length=8",
            r"unknown config key 'stack.segment_length'; did you mean stack.segment_len\?$",
        ),
        # nothing close: the section's keys, and no other section's
        ("optim.learning_rate=1", r"'optim.learning_rate'; valid optim keys: optim.lr, .*optim.grad_accum$"),
        (
            "trainer.lr=1",
            r"unknown config key 'trainer.lr'; keys start with a section: data, eval, lora, model,",
        ),
        ("stack.segment_len=abc", "expected int"),
        ("run.resume=maybe", "expected a bool"),
        ("optim.lr", "must look like key.sub=value"),
        # the dataclass's own validation still runs
        ("stack.compressive.update_rule=hebbian", "stack.compressive.update_rule must be one of"),
        ("stack.compressive=maybe", "stack.compressive: expected none/off or on, got 'maybe'"),
        ("stack.compressive.layer=0", r"did you mean stack.compressive.layers\?"),
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
        "from memstack.train.config import Config, StackConfig\n"
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


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=nan", "optim.lr must be a finite number > 0, got nan"),
        ("optim.lr=0", "optim.lr must be a finite number > 0, got 0.0"),
        ("optim.lr=-1e-3", "optim.lr must be a finite number > 0, got -0.001"),
        ("optim.grad_accum=0", "optim.grad_accum must be an int >= 1, got 0"),
        ("optim.betas=0.9", "optim.betas must be two numbers in [0, 1), such as 0.9,0.95; got (0.9,)"),
        ("optim.betas=0.9,0.95,0.99", "optim.betas must be two numbers in [0, 1)"),
        (
            "optim.betas=0.9,1.0",
            "optim.betas must be two numbers in [0, 1), such as 0.9,0.95; got (0.9, 1.0)",
        ),
        ("schedule.max_steps=0", "schedule.max_steps must be an int >= 1, got 0"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps must be an int >= 0, got -1"),
        ("run.ckpt_every=-5", "run.ckpt_every must be an int >= 0, got -5"),
        ("run.log_every=0", "run.log_every must be an int >= 1, got 0"),
        ("run.batch_size=0", "run.batch_size must be an int >= 1, got 0"),
        ("data.seq_len=0", "data.seq_len must be an int >= 1, got 0"),
        ("data.task=summarise", "data.task must be one of passkey, text; got 'summarise'"),
        ("model.dtype=int8", "model.dtype must be one of float32, bfloat16, float16; got 'int8'"),
    ],
)
def test_training_values_are_validated_with_key_value_and_what_is_accepted(override, message):
    with pytest.raises(ValueError) as e:
        apply_overrides(Config(), [override])
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: OptimConfig(grad_accum=True), "optim.grad_accum must be an int, got True"),
        (lambda: RunConfig(batch_size=True), "run.batch_size must be an int, got True"),
        (lambda: ScheduleConfig(max_steps=False), "schedule.max_steps must be an int >= 1, got False"),
        (lambda: DataConfig(seq_len=True), "data.seq_len must be an int, got True"),
        (lambda: ModelConfig(num_layers=True), "model.num_layers must be an int, got True"),
        (lambda: OptimConfig(lr=True), "optim.lr must be a finite number > 0, got True"),
        (lambda: OptimConfig(betas=(True, 0.9)), "optim.betas must be two numbers in [0, 1)"),
        (lambda: OptimConfig(lr=float("inf")), "optim.lr must be a finite number > 0, got inf"),
    ],
)
def test_bools_are_not_ints(build, message):
    with pytest.raises(ValueError) as e:
        build()
    assert str(e.value).startswith(message)


def test_betas_given_as_a_list_become_a_tuple():
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_filler_is_validated():
    assert DataConfig(filler="mix").filler == "mix"
    with pytest.raises(ValueError) as e:
        DataConfig(filler="lorem")
    assert str(e.value) == "data.filler must be one of synthetic, text, mix; got 'lorem'"


def test_a_bad_value_in_a_config_file_fails_at_load(tmp_path):
    path = tmp_path / "c.py"
    path.write_text(
        "from memstack.train.config import Config, OptimConfig\n"
        "config = Config(optim=OptimConfig(grad_accum=0))\n"
    )
    with pytest.raises(ValueError) as e:
        load_config(str(path))
    assert str(e.value) == "optim.grad_accum must be an int >= 1, got 0"
    path.write_text("from memstack.train.config import Config\nconfig = Config()\nconfig.run.log_every = 0\n")
    with pytest.raises(ValueError) as e:  # set after construction: caught when overrides rebuild it
        load_config(str(path))
    assert str(e.value) == "run.log_every must be an int >= 1, got 0"
