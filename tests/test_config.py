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
