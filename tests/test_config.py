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


# ------------------------------------------------------------------------- data mixtures


@pytest.fixture
def two_files(tmp_path):
    a, b = tmp_path / "task.jsonl", tmp_path / "general.jsonl"
    a.write_text('{"text": "a"}\n')
    b.write_text('{"text": "b"}\n')
    return a, b


def test_a_mixture_is_a_list_of_sources_with_names_and_weights(two_files):
    a, b = two_files
    cfg = build_config({"data": [{"path": str(a), "weight": 0.8},
                                 {"path": str(b), "weight": 0.2, "format": "text"}]})
    assert cfg.data == [{"path": str(a), "weight": 0.8, "name": "task"},
                        {"path": str(b), "weight": 0.2, "format": "text", "name": "general"}]
    # the command-line form FILE:WEIGHT, weight 1 when left out; same stems get -2
    cfg = build_config({"data": [f"{a}:3", str(a)]})
    assert [(s["weight"], s["name"]) for s in cfg.data] == [(3.0, "task"), (1.0, "task-2")]


E = r"^config: data\[1\] \(.*general.jsonl\): "  # the source's index and path lead


@pytest.mark.parametrize("source,message", [
    ({"weight": 0}, E + r"weight is 0; it must be a number > 0"),
    ({"weight": -0.5}, E + r"weight is -0.5; it must be a number > 0"),
    ({"weight": "lots"}, E + r"weight is 'lots'; it must be a number > 0"),
    ({"weight": float("nan")}, r"weight is nan; it must be a number > 0"),
    ({"weight": True}, r"weight is True; it must be a number > 0"),
    ({"path": "missing.jsonl"},
     r"^config: data\[1\] \(missing.jsonl\): file not found: missing.jsonl$"),
    ({"path": ""}, r"^config: data\[1\]: no 'path'"),
    ({"wieght": 2}, E + r"unknown key 'wieght'; a source takes path, weight"),
    ({"format": "xml"}, E + r"format is 'xml'; allowed: auto, text"),
    ({"columns": "prompt"}, E + r"columns: 'prompt' is not FIELD=COLUMN"),
    ({"name": "task"}, r"two sources are named 'task'"),
])
def test_a_bad_source_gives_one_error_naming_the_source_and_field(two_files, source, message):
    a, b = two_files
    good = {"path": str(a), "weight": 0.8, "name": "task"}
    with pytest.raises(ConfigError, match=message) as err:
        build_config({"data": [good, {"path": str(b), **source}]})
    assert "\n" not in str(err.value)


def test_bad_mixture_shapes(two_files):
    with pytest.raises(ConfigError, match="'data' is an empty list"):
        build_config({"data": []})
    with pytest.raises(ConfigError, match=r"data\[0\] must be a mapping"):
        build_config({"data": [3]})
    with pytest.raises(ConfigError, match="'data' must be a file .* or a list of sources"):
        build_config({"data": {"path": "x"}})
    with pytest.raises(ConfigError, match=r"data\[0\] \(.*task.jsonl\): weight is -1.0"):
        build_config({"data": [f"{two_files[0]}:-1"]})
    with pytest.raises(ConfigError, match="a data mixture .* trains with objective: sft"):
        build_config({"data": [str(two_files[0])], "objective": "dpo"})


def test_split_weight_leaves_paths_and_hub_ids_alone(tmp_path):
    from tunelab.config import split_weight

    assert split_weight("a.jsonl:0.8") == ("a.jsonl", 0.8)
    assert split_weight("a.jsonl") == ("a.jsonl", None)
    assert split_weight("hf:tatsu-lab/alpaca") == ("hf:tatsu-lab/alpaca", None)
    assert split_weight("hf:tatsu-lab/alpaca:2") == ("hf:tatsu-lab/alpaca", 2.0)
    odd = tmp_path / "v:2"  # a file whose name ends in :2 is a file, not a weight
    odd.write_text("{}\n")
    assert split_weight(str(odd)) == (str(odd), None)


def test_cli_data_flag_and_config_relative_paths(two_files, tmp_path):
    from tunelab.cli import _config_file, _data_flag

    a, b = two_files
    assert _data_flag([str(a)]) == str(a)  # one --data without a weight: one source
    assert _data_flag([f"{a}:0.8", f"{b}:0.2"]) == [f"{a}:0.8", f"{b}:0.2"]
    assert _data_flag([f"{a}:0.8"]) == [f"{a}:0.8"]
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  - {path: task.jsonl, weight: 0.8}\n  - {path: general.jsonl}\n")
    values = _config_file(str(config))
    assert [s["path"] for s in values["data"]] == [str(a), str(b)]
    assert build_config(values).data[1]["weight"] == 1.0


def test_qlora_implies_4bit_base():
    assert build_config({**BASE, "method": "qlora"}).base_bits == 4


def test_fsdp_shards_full_lora_and_qlora_but_not_an_8bit_base():
    for method in ("full", "lora", "qlora"):
        assert build_config({**BASE, "parallel": "fsdp", "method": method}).parallel == "fsdp"
    with pytest.raises(ConfigError, match="cannot shard an 8-bit base.*method: qlora"):
        build_config({**BASE, "parallel": "fsdp", "base_bits": 8})
    assert build_config({**BASE, "parallel": "ddp", "base_bits": 8}).base_bits == 8


def test_an_empty_replay_in_a_config_file_stays_off(tmp_path):
    """A config written back from run_config.json has ``replay: ''``: it must not become the
    config file's folder (which a resumed run then tried to read as data)."""
    from tunelab.config import resolve_data_paths

    values = {"replay": "", "data": "d.jsonl"}
    (tmp_path / "d.jsonl").write_text("{}\n")
    resolve_data_paths(values, tmp_path / "c.yaml")
    assert values == {"replay": "", "data": str(tmp_path / "d.jsonl")}
