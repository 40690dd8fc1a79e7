"""Adapters interoperate with plain peft both ways, and merge without changing the logits."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from tunelab import adapters, models
from tunelab.config import build_config
from tunelab.errors import ModelError
from tunelab.merge import merge_to_checkpoint
from tunelab.train import train

IDS = torch.tensor([[5, 17, 33, 60, 120, 7, 9, 250]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("adapter-run")
    data = write_jsonl(tmp / "d.jsonl", [{"prompt": f"q {i}", "completion": "Paris"}
                                         for i in range(16)])
    cfg = build_config({"model": str(tiny_model_dir), "data": str(data), "out": str(tmp / "run"),
                        "lr": 3e-2, "max_steps": 6, "batch_size": 4, "lora_r": 4,
                        "val_fraction": 0, "device": "cpu"})
    return train(cfg, progress=False)


def test_tunelab_adapter_loads_in_plain_peft_with_same_logits(tiny_model_dir, trained_run):
    ours, _ = models.load_model(str(tiny_model_dir), device="cpu")
    ours = adapters.load_adapter(ours, trained_run.out)  # a run directory resolves to adapter/
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, str(trained_run.weights_dir))
    torch.testing.assert_close(_logits(ours), _logits(plain), rtol=0, atol=0)
    # and the adapter really changes the model
    pristine = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert (_logits(pristine) - _logits(plain)).abs().max() > 1e-3


def test_plain_peft_adapter_loads_in_tunelab(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4,
                                                 target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path / "plain")
    ours, _ = models.load_model(str(tiny_model_dir), device="cpu")
    ours = adapters.load_adapter(ours, tmp_path / "plain")
    torch.testing.assert_close(_logits(ours), expected, rtol=1e-6, atol=1e-6)


def test_merge_writes_a_checkpoint_with_matching_logits(tiny_model_dir, trained_run, tmp_path):
    report = merge_to_checkpoint(str(tiny_model_dir), trained_run.weights_dir, tmp_path / "m")
    assert report["max_abs_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, str(trained_run.weights_dir))
    torch.testing.assert_close(_logits(merged), _logits(with_adapter), rtol=1e-4, atol=1e-5)


def test_unknown_target_modules_lists_the_real_ones(tiny_model_dir):
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(ModelError, match=r"\['qkv'\] do not exist.*down_proj, gate_proj, "
                                         r"k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        adapters.attach_lora(model, r=2, alpha=4, dropout=0, target_modules=["qkv"])


def test_adapter_for_another_base_is_refused(other_tiny_model_dir, trained_run):
    model, _ = models.load_model(str(other_tiny_model_dir), device="cpu")
    with pytest.raises(ModelError, match="trained for another base model"):
        adapters.load_adapter(model, trained_run.weights_dir)


def test_not_an_adapter(tmp_path):
    with pytest.raises(ModelError, match="adapter not found"):
        adapters.resolve_adapter_dir(tmp_path / "nothing")
    with pytest.raises(ModelError, match="holds no adapter_config.json"):
        adapters.resolve_adapter_dir(tmp_path)
