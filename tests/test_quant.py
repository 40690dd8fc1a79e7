"""QLoRA: NF4 against the paper's definition, 4/8-bit bases, adapters and merging."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import EXAMPLES
from tunelab import adapters, models, quant
from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.merge import merge_to_checkpoint
from tunelab.train import train

IDS = torch.tensor([[5, 17, 33, 60, 120, 7, 9, 250]])

# Table of NF4 values in the QLoRA paper (Dettmers et al. 2023, appendix E).
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def nf4_from_definition() -> torch.Tensor:
    """NF4 as the paper defines it: quantiles of N(0,1) with an exact zero, scaled to [-1, 1].

    Asymmetric: 8 positive levels from quantiles in [0.5, delta], 7 negative ones, and 0,
    with delta = 1/2 (1/32 + 1/30) ... the offset 0.9677 used by the reference code.
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return values / values.abs().max()


def _quantize(weight: torch.Tensor, double_quant: bool = True):
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                              compress_statistics=double_quant)


def test_nf4_code_matches_the_paper():
    ours = nf4_from_definition()
    torch.testing.assert_close(ours, torch.tensor(PAPER_NF4, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    _, state = _quantize(torch.randn(64, 64))
    torch.testing.assert_close(state.code.double(), torch.tensor(PAPER_NF4,
                                                                 dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_nf4_block_layout_and_dequantization_by_hand():
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    packed, state = _quantize(weight, double_quant=False)
    n = weight.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == n // 2  # two 4-bit codes a byte
    assert state.blocksize == 64 and state.absmax.numel() == n // 64
    flat = weight.flatten().view(-1, 64)
    torch.testing.assert_close(state.absmax, flat.abs().max(dim=1).values)
    codes = packed.flatten()
    idx = torch.stack([codes >> 4, codes & 0xF], dim=1).flatten().long()  # high nibble first
    by_hand = (state.code[idx].view(-1, 64) * state.absmax[:, None]).view_as(weight)
    import bitsandbytes.functional as bnbf

    torch.testing.assert_close(by_hand, bnbf.dequantize_4bit(packed, state))
    # each weight went to the nearest NF4 level of its block
    err = (by_hand - weight).abs().view(-1, 64) / state.absmax[:, None]
    assert float(err.max()) <= 0.5 * float(torch.diff(state.code).max()) + 1e-6


def test_double_quantization_stores_block_scales_in_8_bits():
    torch.manual_seed(0)
    weight = torch.randn(256, 1024)
    _, state = _quantize(weight, double_quant=True)
    n_blocks = weight.numel() // 64
    assert state.nested and state.absmax.dtype == torch.uint8
    assert state.absmax.numel() == n_blocks
    assert state.state2.absmax.numel() == -(-n_blocks // 256)  # one fp32 scale per 256 blocks
    single = _quantize(weight, double_quant=False)[1]
    bits = lambda s: 8 * s.absmax.numel() * s.absmax.element_size() / weight.numel()  # noqa
    assert bits(single) == 0.5 and bits(state) == 0.125


def test_defaults_are_nf4_with_double_quant_not_the_libraries_fp4():
    config = quant.bnb_config(4, torch.float32)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32


def test_incompatible_choices_say_what_to_use():
    with pytest.raises(ConfigError, match="use method: qlora, or lora with base_bits"):
        build_config({"data": "x", "method": "full", "base_bits": 4})
    with pytest.raises(ConfigError, match="for an 8-bit base use method: lora with base_bits: 8"):
        build_config({"data": "x", "method": "qlora", "base_bits": 8})
    with pytest.raises(ConfigError, match="'quant_type' is 'int3'; allowed: nf4, fp4"):
        build_config({"data": "x", "quant_type": "int3"})


def _logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _logits(model):
    return _logits_of(model, IDS)


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    from tests.conftest import write_jsonl

    tmp = tmp_path_factory.mktemp("qlora")
    data = write_jsonl(tmp / "d.jsonl", [{"prompt": f"question {i}: capital of France?",
                                          "completion": "Paris"} for i in range(32)])
    cfg = build_config({"model": str(tiny_model_dir), "data": str(data), "out": str(tmp / "q"),
                        "method": "qlora", "lr": 3e-2, "max_steps": 12, "batch_size": 4,
                        "lora_r": 4, "val_fraction": 0, "device": "cpu"})
    return train(cfg, progress=False)


def test_qlora_on_tiny_model_lowers_loss(qlora_run):
    lines = [json.loads(x) for x in (qlora_run.out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < 0.6 * lines[0]["train_loss"]
    meta = json.loads((qlora_run.weights_dir / "tunelab.json").read_text())
    assert meta["base_bits"] == 4 and meta["quant_type"] == "nf4" and meta["double_quant"]
    summary = json.loads((qlora_run.out / "summary.json").read_text())
    assert summary["quantized_layers"]["n_weights"] > 0


def test_qlora_adapter_in_plain_peft_on_a_4bit_base_gives_the_same_logits(tiny_model_dir,
                                                                          qlora_run):
    ours, _ = models.load_model(str(tiny_model_dir), device="cpu", bits=4)
    ours = adapters.load_adapter(ours, qlora_run.weights_dir)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quant.bnb_config(4, torch.float32),
        device_map={"": "cpu"})
    quant.keep_trainable_layout(base)  # as load_model does: bnb's CPU gemv layout differs
    plain = PeftModel.from_pretrained(base, str(qlora_run.weights_dir))
    torch.testing.assert_close(_logits(ours), _logits(plain), rtol=0, atol=0)


def test_merging_a_qlora_adapter_reports_each_path(tiny_model_dir, qlora_run, tmp_path):
    report = merge_to_checkpoint(str(tiny_model_dir), qlora_run.weights_dir, tmp_path / "m",
                                 requantize="nf4")
    paths = report["paths"]
    saved = paths["dequantized int4 base, merged in fp32 (saved)"]
    assert saved < 1e-3
    assert paths["original fp32 base, merged"] > 10 * saved  # quantization error is real
    assert set(paths) == {"dequantized int4 base, merged in fp32 (saved)",
                          "original fp32 base, merged", "merged, re-quantized to nf4"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert getattr(merged.config, "quantization_config", None) is None
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_8bit_base_lora_trains(tiny_model_dir, tmp_path):
    from tests.conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "capital of France is Paris"}] * 8)
    result = train(build_config({"model": str(tiny_model_dir), "data": str(data),
                                 "out": str(tmp_path / "r8"), "method": "lora", "base_bits": 8,
                                 "lr": 1e-2, "max_steps": 2, "batch_size": 4, "lora_r": 4,
                                 "val_fraction": 0, "device": "cpu"}), progress=False)
    assert result.steps == 2 and result.final_train_loss is not None
    summary = json.loads((tmp_path / "r8/summary.json").read_text())
    assert 7.9 < summary["quantized_layers"]["bits_per_weight"] < 10


@pytest.mark.slow
def test_qlora_on_smollm2_trains_and_holds_quantized_weights_small(tmp_path):
    cfg = build_config({"model": "smollm2-135m", "data": str(EXAMPLES / "data/countries.jsonl"),
                        "out": str(tmp_path / "q"), "method": "qlora", "max_steps": 3,
                        "batch_size": 2, "lr": 1e-3, "val_fraction": 0, "max_length": 128,
                        "device": "cpu"})
    result = train(cfg, progress=False)
    lines = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    layers = json.loads((result.out / "summary.json").read_text())["quantized_layers"]
    # measured on the loaded model: packed NF4 + double-quantized scales vs the same in bf16
    assert layers["ratio_to_bf16"] <= 0.30, layers
    # the adapter round-trips through plain peft + transformers on a 4-bit base
    folder = models.local_folder(models.resolve_model("smollm2-135m"))
    base = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant.bnb_config(4, torch.float32), device_map={"": "cpu"})
    quant.keep_trainable_layout(base)  # as load_model does: bnb's CPU gemv layout differs
    plain = PeftModel.from_pretrained(base, str(result.weights_dir))
    ours = adapters.load_adapter(models.load_model("smollm2-135m", device="cpu", bits=4)[0],
                                 result.weights_dir)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    torch.testing.assert_close(_logits_of(ours, ids), _logits_of(plain, ids), rtol=0, atol=0)


def test_quantize_saves_loadable_checkpoints_and_measures_each_format(tiny_model_dir, tmp_path):
    from tunelab.quantize import format_table, quantize

    # no double quantization: its 256-entry fp32 codebook per layer outweighs tiny layers
    rows = quantize(str(tiny_model_dir), ["nf4", "int8"], tmp_path, device="cpu",
                    double_quant=False)
    assert [r.format for r in rows] == ["fp32", "bf16", "nf4", "int8"]
    by = {r.format: r for r in rows}
    assert by["fp32"].bits_per_param == pytest.approx(32, rel=0.01)
    assert by["bf16"].bits_per_param == pytest.approx(16, rel=0.01)
    # (on a tiny model the fp32 embeddings dominate, so int8 need not beat bf16 here)
    assert by["nf4"].weight_bytes < by["int8"].weight_bytes < by["fp32"].weight_bytes
    assert by["fp32"].perplexity_delta == 0 and all(r.perplexity > 1 for r in rows)
    for fmt in ("nf4", "int8"):
        reloaded = AutoModelForCausalLM.from_pretrained(by[fmt].path, device_map={"": "cpu"})
        assert any(quant.is_quantized_linear(m) for m in reloaded.modules())
    table = format_table(rows, double_quant=True)
    assert "bits/param" in table and "saved nf4" in table


def test_generation_only_loads_take_bnbs_cpu_layout_where_it_can(tmp_path):
    """generate/chat/serve let bitsandbytes repack the layers its fused CPU gemv can take
    (out features a multiple of 32, in features of 64); k/v projections of 16 outputs, and
    every layer of a model loaded for training, stay in the trainable layout."""
    from bitsandbytes.functional import has_avx512bf16
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2)).save_pretrained(tmp_path)
    trainable, _ = models.load_model(str(tmp_path), device="cpu", bits=4)
    generating, _ = models.load_model(str(tmp_path), device="cpu", bits=4, generation_only=True)

    def fast(model):
        return {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                if getattr(m, "support_avx512bf16_for_cpu", False)}

    assert fast(trainable) == set()
    expected = {"q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} if has_avx512bf16() \
        else set()
    assert fast(generating) == expected
    ids = torch.tensor([[5, 17, 33, 60, 12, 7]])
    with torch.no_grad():
        a = trainable.eval()(input_ids=ids).logits
        b = generating.eval()(input_ids=ids).logits
    repacked = [m for m in generating.modules()
                if getattr(getattr(m, "weight", None), "quant_state", None) is not None
                and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert len(repacked) == (10 if expected else 0)  # 5 projections x 2 layers
    # the same model up to the bf16 rounding of the block scales
    torch.testing.assert_close(b, a, rtol=0, atol=0.05 * float(a.abs().max()))
