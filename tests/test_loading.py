"""The streaming loader (tunelab.loading): the same model as from_pretrained, shard by shard,
quantized as it goes; and what ``train`` checks before it loads anything."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tunelab import loading, models
from tunelab.config import build_config
from tunelab.errors import ConfigError, DataError
from tunelab.random_checkpoint import build_random_checkpoint
from tunelab.train import train


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, tiny_model_dir):
    """A random 3-layer Llama written in several small shards, with the tiny tokenizer."""
    from transformers import AutoTokenizer

    from tunelab.plan.catalog import Arch

    arch = Arch("sharded test", hidden=64, layers=3, heads=4, kv_heads=2, intermediate=128,
                vocab=400, key="sharded-test")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path_factory.mktemp("sharded") / "model"
    build_random_checkpoint(folder, arch, tokenizer=tok, shard_bytes=60_000)
    return folder


def test_random_checkpoint_is_sharded_bf16_and_complete(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3
    assert len(loading.shard_files(sharded_dir)) == len(files)
    from safetensors import safe_open

    with safe_open(str(sharded_dir / sorted(files)[0]), "pt") as fh:
        assert all(fh.get_slice(k).get_dtype() == "BF16" for k in fh.keys())
    # a second call finds the finished checkpoint and leaves it alone
    mtime = (sharded_dir / "model.safetensors.index.json").stat().st_mtime_ns
    build_random_checkpoint(sharded_dir, "llama-2-7b")
    assert (sharded_dir / "model.safetensors.index.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("bits", [16, 4, 8])
def test_streaming_load_equals_from_pretrained(sharded_dir, bits):
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 2]])
    streamed, _ = models.load_model(str(sharded_dir), device="cpu", bits=bits)
    reference, _ = models.load_model(str(sharded_dir), device="cpu", bits=bits,
                                     streaming=False)
    assert not any(p.device.type == "meta" for p in streamed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, reference(ids).logits)
    if bits != 16:
        from tunelab.quant import is_quantized_linear

        n = sum(is_quantized_linear(m) for m in streamed.modules())
        assert n == sum(is_quantized_linear(m) for m in reference.modules()) == 3 * 7
        assert getattr(streamed, f"is_loaded_in_{bits}bit") is True
        assert streamed.lm_head.weight.dtype == torch.float32  # output layer unquantized


def test_quantized_layers_are_counted_once_under_lora(sharded_dir):
    from tunelab.adapters import attach_lora
    from tunelab.quant import quantized_layer_memory

    model, _ = models.load_model(str(sharded_dir), device="cpu", bits=4)
    before = quantized_layer_memory(model)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    after = quantized_layer_memory(model)
    assert after == before
    # 3 layers x (q 64x64 + k,v 64x32 + o 64x64 + gate, up, down 64x128)
    assert after["n_weights"] == 3 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_frozen_untied_embedding_stays_in_the_checkpoint_dtype(sharded_dir, tmp_path, method):
    """Under adapters the (untied) input embedding is stored in bf16, as in the checkpoint,
    while the step still computes in fp32: same logits, gradients still reach the adapters,
    and the plan counts the embedding at 2 bytes a weight."""
    from tunelab.plan.catalog import arch_from_hf_config
    from tunelab.plan.estimate import estimate_memory
    from tunelab.train import prepare_model

    cfg = build_config({"model": str(sharded_dir), "data": "unused.jsonl", "method": method,
                        "out": str(tmp_path / "out"), "device": "cpu", "grad_ckpt": True})
    model, _ = prepare_model(cfg, torch.device("cpu"))
    embedding = model.get_input_embeddings()
    assert embedding.weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.float32
    reference, _ = models.load_model(str(sharded_dir), device="cpu",
                                     bits=4 if method == "qlora" else 16)
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 2]])
    # an evaluation pass first: it must not change the layout training reads (see
    # quant.keep_trainable_layout), so the adapters' gradients below stay nonzero
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)

    arch = arch_from_hf_config(json.loads((sharded_dir / "config.json").read_text()))
    assert arch.weight_dtype == "bf16"
    kept = estimate_memory(arch, method=method, seq=8, batch=1, device="cpu")
    as_fp32 = estimate_memory(dataclasses.replace(arch, weight_dtype="fp32"), method=method,
                              seq=8, batch=1, device="cpu")
    assert as_fp32.weights - kept.weights == arch.vocab * arch.hidden * 2


def test_checkpoint_with_renamed_tensors_goes_through_transformers(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "renamed"
    folder.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    save_file({"extra." + k: v for k, v in tensors.items()}, str(folder / "model.safetensors"))
    from transformers import AutoConfig

    empty = loading.empty_model(AutoConfig.from_pretrained(folder), torch.float32)
    assert not loading.can_stream(folder, empty)
    assert loading.can_stream(tiny_model_dir, loading.empty_model(
        AutoConfig.from_pretrained(tiny_model_dir), torch.float32))


def _boom(*args, **kwargs):
    raise AssertionError("the model was loaded before the cheap checks")


def test_missing_data_is_reported_before_the_model_loads(tiny_model_dir, tmp_path,
                                                         monkeypatch):
    import tunelab.train as train_module

    monkeypatch.setattr(train_module, "prepare_model", _boom)
    cfg = build_config({"model": str(tiny_model_dir), "data": str(tmp_path / "nope.jsonl"),
                        "out": str(tmp_path / "out"), "device": "cpu"})
    with pytest.raises(DataError, match="nope.jsonl"):
        train(cfg, progress=False)


def test_unwritable_output_is_reported_before_the_model_loads(tiny_model_dir, qa_data,
                                                              tmp_path, monkeypatch):
    import tunelab.train as train_module

    monkeypatch.setattr(train_module, "prepare_model", _boom)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cfg = build_config({"model": str(tiny_model_dir), "data": str(qa_data),
                        "out": str(blocker / "out"), "device": "cpu"})
    with pytest.raises(ConfigError, match="not writable"):
        train(cfg, progress=False)


def test_refusal_names_the_figures_and_what_would_fit(tiny_model_dir, qa_data, tmp_path):
    from tunelab import preflight

    cfg = build_config({"model": str(tiny_model_dir), "data": str(qa_data),
                        "out": str(tmp_path / "out"), "device": "cpu", "method": "lora",
                        "max_length": 2048})
    tok = models.load_tokenizer(str(tiny_model_dir))
    from tunelab.train import load_datasets

    train_set, _, _ = load_datasets(cfg, tok)
    device = torch.device("cpu")
    planned = preflight._planned_bytes(preflight.model_arch(cfg.model), cfg, train_set, 4,
                                       device, 0, 1)[0]
    fits = preflight.plan_before_load(cfg, train_set, 4, device, budget=planned)
    assert fits == cfg  # exactly at the plan: goes ahead unchanged
    with pytest.raises(preflight.RunWontFit) as info:
        preflight.plan_before_load(cfg, train_set, 4, device, budget=planned // 100)
    assert "weights" in str(info.value) and "--force" in str(info.value)


def test_returning_freed_memory_is_switched_on_when_only_it_makes_the_run_fit(
        tiny_model_dir, qa_data, tmp_path):
    from tunelab import preflight
    from tunelab.train import load_datasets

    cfg = build_config({"model": str(tiny_model_dir), "data": str(qa_data), "device": "cpu",
                        "out": str(tmp_path / "out"), "grad_ckpt": True, "max_length": 2048})
    train_set, _, _ = load_datasets(cfg, models.load_tokenizer(str(tiny_model_dir)))
    device, arch = torch.device("cpu"), preflight.model_arch(cfg.model)
    keeping, est = preflight._planned_bytes(arch, cfg, train_set, 4, device, 0, 1)
    returning, est_on = preflight._planned_bytes(
        arch, dataclasses.replace(cfg, return_freed_memory="on"), train_set, 4, device, 0, 1)
    assert est.retained > 0 and est_on.retained == 0 and returning == keeping - est.retained
    between = (keeping + returning) // 2
    assert preflight.plan_before_load(cfg, train_set, 4, device,
                                      budget=between).return_freed_memory == "on"
    assert preflight.plan_before_load(cfg, train_set, 4, device, budget=keeping) == cfg
    with pytest.raises(preflight.RunWontFit):  # off: the plan keeps the retained heap
        preflight.plan_before_load(dataclasses.replace(cfg, return_freed_memory="off"),
                                   train_set, 4, device, budget=between)


@pytest.mark.parametrize("bits", [16, 4])
def test_streaming_merge_equals_base_plus_adapter(sharded_dir, tmp_path, bits):
    """Merged shards (written one at a time) compute what base + adapter computed."""
    from tunelab import adapters
    from tunelab.merge_streaming import merge_streaming

    torch.manual_seed(1)
    model, tok = models.load_model(str(sharded_dir), device="cpu", bits=bits)
    model = adapters.attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    adapters.save_adapter(model, tmp_path / "adapter", meta={"base_bits": bits,
                                                            "quant_type": "nf4",
                                                            "double_quant": True})
    ids = torch.tensor([[1, 5, 9, 30, 77, 120, 3, 2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = merge_streaming(sharded_dir, tmp_path / "adapter", tmp_path / "merged",
                             dtype=torch.float32, progress=False)
    assert report["merged_weights"] == 3 * 7
    assert report["shards"] == len(loading.shard_files(sharded_dir)) > 1
    merged, _ = models.load_model(str(tmp_path / "merged"), device="cpu")
    assert "quantization_config" not in json.loads(
        (tmp_path / "merged" / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=2e-4,
                                   rtol=1e-4)
