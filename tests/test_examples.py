"""Every example config validates and its data file reads in a single known format."""

from pathlib import Path

import pytest

from tunelab import data
from tunelab.config import build_config, load_yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_is_valid(path):
    values = load_yaml(path)
    values["data"] = str(path.parent / values["data"])
    cfg = build_config(values, source=str(path))
    records = data.read_records(cfg.data)
    assert data.resolve_format(records) in data.FORMATS


@pytest.mark.parametrize("name,fmt", [("chat", "chat"), ("alpaca", "instruction"),
                                      ("text", "text"), ("countries", "prompt_completion")])
def test_example_data_formats(name, fmt):
    assert data.resolve_format(data.read_records(EXAMPLES / "data" / f"{name}.jsonl")) == fmt
