from __future__ import annotations

import json
import shutil

import pytest
import torch

from tunelab import models
from tunelab.errors import ModelError


def test_alias_resolves_to_the_packaged_gguf():
    source = models.resolve_model("smollm2-135m")
    assert source.kind == "gguf" and source.path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.licence_hint == "apache-2.0"


def test_specs_resolve_by_kind(tiny_model_dir, tmp_path):
    assert models.resolve_model(str(tiny_model_dir)).kind == "folder"
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(ModelError, match="model path not found"):
        models.resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def _pickle_only_copy(src, dst):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src)
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    torch.save(model.state_dict(), dst / "pytorch_model.bin")


def test_pickle_only_checkpoint_needs_opt_in(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    _pickle_only_copy(tiny_model_dir, folder)
    with pytest.raises(ModelError, match=r"only pickle weights \(pytorch_model.bin\).*"
                                         r"allow_pickle: true"):
        models.load_model(str(folder), device="cpu")
    model, _ = models.load_model(str(folder), device="cpu", allow_pickle=True)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_remote_code_is_refused_unless_asked(tiny_model_dir, tmp_path):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config["model_type"] = "evil-unknown"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ModelError, match="trust-remote-code|cannot load"):
        models.load_model(str(folder), device="cpu")


def test_dtype_choice_is_fp32_on_cpu_and_overridable():
    cpu = torch.device("cpu")
    assert models.pick_dtype("auto", cpu) == torch.float32
    assert models.pick_dtype("bf16", cpu) == torch.bfloat16


def test_tokenizer_eos_is_the_end_of_turn_token(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token is not None
