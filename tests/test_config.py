import pytest

from tunelab.config import build_config, load_yaml, parse_overrides
from tunelab.errors import ConfigError

BASE = {"data": "x.jsonl"}


def test_defaults_and_overrides_parse_types():
    overrides = ["lr=1e-4", "batch_size=2", "grad_ckpt=true", "target_modules=q_proj,v_proj"]
    cfg = build_config({**BASE, **parse_overrides(overrides)})
    assert cfg.lr == 1e-4 and cfg.batch_size == 2 and cfg.grad_ckpt is True
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.method == "lora"


@pytest.mark.parametrize("value,expected", [(True, "on"), ("on", "on"), (False, "off"),
                                            ("off", "off"), ("auto", "auto")])
def test_switches_read_yaml_booleans_as_on_and_off(value, expected):
    # YAML 1.1 (and so a config file) reads a bare `on` as true
    assert build_config({**BASE, "return_freed_memory": value}).return_freed_memory == expected


@pytest.mark.parametrize("values,message", [
    ({"lerning_rate": 1}, r"unknown config key 'lerning_rate'.*Known keys: model, data"),
    ({"batch_sise": 1}, r"did you mean 'batch_size'"),
    ({"batch_size": "two"}, r"'batch_size' must be an integer, got 'two'"),
    ({"batch_size": 0}, r"'batch_size' is 0; it must be >= 1"),
    ({"lora_dropout": 1.5}, r"'lora_dropout' is 1.5; it must be between 0.0 and 1.0"),
    ({"method": "prefix"}, r"'method' is 'prefix'; allowed: lora, full, qlora"),
    ({"grad_ckpt": "maybe"}, r"'grad_ckpt' must be true or false"),
    ({"target_modules": 3}, r"'target_modules' must be 'all-linear' or a list"),
    ({"method": "full", "base_bits": 4}, r"full fine-tuning cannot update a quantized base"),
    ({"data": ""}, r"no training data"),
    ({"return_freed_memory": "sometimes"}, r"'return_freed_memory' is 'sometimes'; allowed: auto"),
    ({"return_freed_memory": 1.5}, r"'return_freed_memory' must be auto, on or off"),
])
def test_bad_config_names_the_key_and_what_is_allowed(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, **values})


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_overrides(["lr"])


def test_qlora_implies_4bit_base():
    assert build_config({**BASE, "method": "qlora"}).base_bits == 4


def test_fsdp_shards_full_lora_and_qlora_but_not_an_8bit_base():
    for method in ("full", "lora", "qlora"):
        assert build_config({**BASE, "parallel": "fsdp", "method": method}).parallel == "fsdp"
    with pytest.raises(ConfigError, match="cannot shard an 8-bit base.*method: qlora"):
        build_config({**BASE, "parallel": "fsdp", "base_bits": 8})
    assert build_config({**BASE, "parallel": "ddp", "base_bits": 8}).base_bits == 8
