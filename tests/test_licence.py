"""Licence reading and classification (tunelab.licence)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import ModelError
from tunelab.licence import LicenceInfo, classify_licence, read_model_licence
from tunelab.plan.catalog import get_arch

APACHE_HEAD = """
                                 Apache License
                           Version 2.0, January 2004
                        http://www.apache.org/licenses/

   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION
"""
MIT_TEXT = """MIT License

Copyright (c) 2024 Someone

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
"""
LLAMA2_TEXT = """LLAMA 2 COMMUNITY LICENSE AGREEMENT
Llama 2 Version Release Date: July 18, 2023

"Agreement" means the terms and conditions for use, reproduction, distribution and
modification of the Llama Materials set forth herein. ... commercial terms ...
"""
CC_NC_TEXT = """Attribution-NonCommercial 4.0 International

Creative Commons Corporation ("Creative Commons") is not a law firm and
does not provide legal services or legal advice.
"""
BSD3_TEXT = """Copyright (c) 2020, Someone
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:
3. Neither the name of the copyright holder nor the names of its contributors
"""


@pytest.mark.parametrize("text,licence_id,category", [
    ("apache-2.0", "apache-2.0", "permissive"),
    ("Apache 2.0", "apache-2.0", "permissive"),
    ("MIT", "mit", "permissive"),
    ("BSD-3-Clause", "bsd-3-clause", "permissive"),
    ("llama2", "llama2", "conditions"),
    ("llama3.1", "llama3.1", "conditions"),
    ("gemma", "gemma", "conditions"),
    ("openrail", "openrail", "conditions"),
    ("bigscience-openrail-m", "bigscience-openrail-m", "conditions"),
    ("qwen", "qwen", "conditions"),
    ("cc-by-nc-4.0", "cc-by-nc-4.0", "non-commercial"),
    ("CC-BY-NC-SA-4.0", "cc-by-nc-sa-4.0", "non-commercial"),
    ("qwen-research", "qwen-research", "non-commercial"),
    ("llama1", "llama1", "non-commercial"),
    ("other", "other", "unknown"),
    ("", "unknown", "unknown"),
    (None, "unknown", "unknown"),
    ("my-custom-licence-v9", "my-custom-licence-v9", "unknown"),
    (APACHE_HEAD, "apache-2.0", "permissive"),
    (MIT_TEXT, "mit", "permissive"),
    (BSD3_TEXT, "bsd-3-clause", "permissive"),
    (LLAMA2_TEXT, "llama2", "conditions"),
    (CC_NC_TEXT, "cc-by-nc-4.0", "non-commercial"),
    ("For research use only. Not for commercial use.", "research-only", "non-commercial"),
    ("Gemma Terms of Use", "gemma", "conditions"),
])
def test_classify(text: str | None, licence_id: str, category: str) -> None:
    info = classify_licence(text)
    assert (info.id, info.category) == (licence_id, category)
    assert info.summary


def test_warning_lines() -> None:
    assert classify_licence("apache-2.0").warning is None
    assert classify_licence("llama2").warning is None
    nc = classify_licence("cc-by-nc-4.0").warning
    assert nc is not None and nc.startswith("WARNING") and "commercial" in nc
    unknown = classify_licence("").warning
    assert unknown is not None and "unknown" in unknown


def test_model_card_front_matter(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# Card\n")
    info = read_model_licence(tmp_path)
    assert info == LicenceInfo("apache-2.0", "permissive", info.summary,
                               "README.md front matter")


def test_model_card_other_with_license_name(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: llama3\nlicense_link: LICENSE\n---\ntext\n")
    info = read_model_licence(tmp_path)
    assert (info.id, info.category) == ("llama3", "conditions")


def test_model_card_custom_name_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: acme-model-license\nlicense_link: https://x\n---\n")
    info = read_model_licence(tmp_path)
    assert info.category == "unknown" and "acme-model-license" in info.summary


def test_config_json_then_licence_file(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("# no front matter\n")
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert read_model_licence(tmp_path).source == "config.json"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "LICENSE").write_text(LLAMA2_TEXT)
    info = read_model_licence(tmp_path)
    assert (info.id, info.source) == ("llama2", "LICENSE")


def test_nothing_found_is_unknown(tmp_path: Path) -> None:
    info = read_model_licence(tmp_path)
    assert info.category == "unknown" and info.warning


def test_catalogue_entries_and_names() -> None:
    assert read_model_licence(get_arch("llama-2-7b")).id == "llama2"
    assert read_model_licence("mistral-7b").category == "permissive"
    assert read_model_licence("gemma-2-9b").category == "conditions"
    assert read_model_licence("llama-65b").category == "non-commercial"
    with pytest.raises(ModelError, match="catalogue"):
        read_model_licence("no-such-model-anywhere")


def test_gguf_general_license(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_license("other")
    writer.add_license_name("gemma")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    info = read_model_licence(path)
    assert (info.id, info.category) == ("gemma", "conditions")
    assert info.source == "GGUF general.license.name"
