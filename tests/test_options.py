"""Every documented training option runs here on the tiny Llama, and each test checks that the
option took effect (the optimizer and its state, the adapter's scaling and weights, the step
a run stopped at, the batches it drew), not only that nothing crashed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tunelab import models
from tunelab import train as train_mod
from tunelab.config import build_config
from tunelab.errors import ModelError
from tunelab.train import train


def _cfg(tiny_model_dir, data_path, out, **kw):
    values = {"model": str(tiny_model_dir), "data": str(data_path), "out": str(out),
              "lr": 3e-2, "batch_size": 4, "max_steps": 3, "device": "cpu",
              "val_fraction": 0, "lora_r": 4, "schedule": "constant"}
    values.update(kw)
    return build_config(values)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("name,cls", [("adamw8bit", "AdamW8bit"),
                                      ("paged_adamw8bit", "PagedAdamW8bit")])
def test_8bit_optimizers_keep_8bit_state(tiny_model_dir, qa_data, tmp_path, name, cls):
    # Full fine-tuning: bitsandbytes keeps 32-bit state for tensors under 4,096 elements, so
    # the tiny model's LoRA matrices would not show it; the 400x32 embedding does.
    out = tmp_path / name
    train(_cfg(tiny_model_dir, qa_data, out, method="full", lr=1e-3, optimizer=name,
               save_every=3), progress=False)
    assert _summary(out)["optimizer"] == cls
    state = load_file(str(out / "checkpoints/step-00000003/optimizer.safetensors"))
    quant = "state/model.embed_tokens.weight/__bnb_optimizer_quant_state__"
    assert state[f"{quant}/state1"].dtype == torch.uint8  # 8-bit first moment
    assert state[f"{quant}/state2"].dtype == torch.uint8
    assert f"{quant}/absmax1" in state  # block-wise scales of the quantized state
    # and the quantized state comes back on resume: the losses continue the same run
    train(_cfg(tiny_model_dir, qa_data, out, method="full", lr=1e-3, optimizer=name,
               max_steps=5, resume=True), progress=False)
    ref = tmp_path / f"{name}-ref"
    train(_cfg(tiny_model_dir, qa_data, ref, method="full", lr=1e-3, optimizer=name,
               max_steps=5), progress=False)
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(_losses(ref)))
    adamw = tmp_path / "adamw"
    train(_cfg(tiny_model_dir, qa_data, adamw, method="full", lr=1e-3, save_every=3),
          progress=False)
    plain = load_file(str(adamw / "checkpoints/step-00000003/optimizer.safetensors"))
    assert _summary(adamw)["optimizer"] == "AdamW"
    assert plain["state/model.embed_tokens.weight/exp_avg"].dtype == torch.float32


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model_dir, qa_data, tmp_path):
    for rs, expected in ((True, 8 / 4 ** 0.5), (False, 8 / 4)):
        out = tmp_path / f"rs-{rs}"
        result = train(_cfg(tiny_model_dir, qa_data, out, lora_alpha=8, use_rslora=rs,
                            max_steps=1), progress=False)
        from tunelab.adapters import load_adapter

        base, _ = models.load_model(str(tiny_model_dir), device="cpu")
        model = load_adapter(base, result.weights_dir)
        scalings = [m.scaling["default"] for m in model.modules() if hasattr(m, "scaling")
                    and isinstance(m.scaling, dict) and "default" in m.scaling]
        assert scalings and all(s == pytest.approx(expected) for s in scalings), scalings


def test_dora_trains_a_magnitude_and_serve_refuses_it(tiny_model_dir, qa_data, tmp_path):
    result = train(_cfg(tiny_model_dir, qa_data, tmp_path / "dora", use_dora=True),
                   progress=False)
    config = json.loads((result.weights_dir / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    weights = load_file(str(result.weights_dir / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in weights.items() if "lora_magnitude_vector" in k}
    assert magnitudes, sorted(weights)[:4]
    # DoRA starts each magnitude at the row norms of the frozen weight; training moved it
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    key = next(k for k in magnitudes if "q_proj" in k)
    layer = key.split("base_model.model.")[1].split(".lora_magnitude_vector")[0]
    start = base[f"{layer}.weight"].norm(dim=1)
    assert not torch.allclose(magnitudes[key], start, atol=1e-4)

    from tunelab.serve.engine import Engine

    model, tokenizer = models.load_model(str(tiny_model_dir), device="cpu")
    engine = Engine(model, tokenizer, base_name="tiny")
    with pytest.raises(ModelError, match="DoRA adapters cannot share a batch"):
        engine.load_adapter("d", result.weights_dir)
    assert engine.adapters == {}


def test_early_stopping_stops_after_patience_evals(tiny_model_dir, qa_data, tmp_path):
    # lr 0: the validation loss never improves after the first evaluation, so with one
    # evaluation per step and patience 2 the run stops at step 1 + 2 = 3 of 20.
    out = tmp_path / "early"
    result = train(_cfg(tiny_model_dir, qa_data, out, lr=0.0, max_steps=20, val_fraction=0.25,
                        eval_every=1, early_stopping_patience=2), progress=False)
    assert result.steps == 3 and result.best_step == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_group_by_length_draws_batches_of_similar_lengths(tiny_model_dir, tmp_path,
                                                          monkeypatch):
    rows = [{"prompt": "word " * (1 + (7 * i) % 29), "completion": "ok"} for i in range(32)]
    path = write_jsonl(tmp_path / "varied.jsonl", rows)
    seen: list[list[int]] = []
    real = train_mod.step_batches

    def spy(*args, **kwargs):
        micro = real(*args, **kwargs)
        seen.append([int(m) for b in micro for m in b["attention_mask"].sum(dim=1)])
        return micro

    monkeypatch.setattr(train_mod, "step_batches", spy)
    spreads = {}
    for grouped in (True, False):
        seen.clear()
        train(_cfg(tiny_model_dir, path,
                   tmp_path / f"g-{grouped}", packing=False, group_by_length=grouped,
                   max_steps=8, lr=1e-3), progress=False)
        assert len(seen) == 8
        spreads[grouped] = sum(max(b) - min(b) for b in seen) / len(seen)
    # sorted windows of 64 batches hold the whole epoch here: neighbours in length share a
    # batch (mean spread a few tokens) where random batches span most of the 1-29 range
    assert spreads[True] < 0.3 * spreads[False], spreads
