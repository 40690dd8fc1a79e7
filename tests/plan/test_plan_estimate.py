"""Memory and time arithmetic, and the published figures it must reproduce."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import ConfigError
from tunelab.plan.catalog import Arch, get_arch, get_gpu
from tunelab.plan.estimate import (
    CPU_HEAP_RETENTION_LORA,
    CPU_PEFT_IMPORT_BYTES,
    CPU_PROCESS_BASELINE_BYTES,
    CPU_RUNTIME_BYTES,
    CPU_TOKENIZER_BYTES_PER_TOKEN,
    CUDA_CONTEXT_BYTES,
    GLIBC_MMAP_MAX,
    activation_bytes,
    cpu_overhead_bytes,
    estimate_memory,
    estimate_time,
    fit_status,
    layer_activation_bytes,
    layer_saved_tensors,
    logits_bytes,
    lora_params,
    quant_bits_per_weight,
    saved_tensor_sizes,
    training_flops_per_token,
)

GB = 10**9
GiB = 1024**3

TINY = Arch("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=100,
            tied_embeddings=True, key="tiny", licence="mit")


# ----------------------------------------------------------------------- published figures
def test_qlora_65b_fits_one_48gb_gpu() -> None:
    """QLoRA (Dettmers et al. 2023): a 65B model fine-tunes on a single 48 GB GPU."""
    gpu = get_gpu("48gb")
    arch = get_arch("llama-65b")
    # tunelab defaults (r=16 on all linear layers), gradient checkpointing, seq 512.
    est = estimate_memory(arch, method="qlora", seq=512, grad_ckpt=True)
    assert fit_status(est, gpu) == "yes"
    # The paper's setup: r=64 on all linear layers, bf16 adapters, paged AdamW.
    paper = estimate_memory(arch, method="qlora", seq=512, grad_ckpt=True, lora_r=64,
                            adapter_dtype="bf16", optimizer="paged")
    assert fit_status(paper, gpu) == "yes"
    # 16-bit LoRA and full fine-tuning of the same model do not.
    assert fit_status(estimate_memory(arch, method="lora", seq=512, grad_ckpt=True),
                      gpu) == "no"


@pytest.mark.parametrize("key", ["llama-2-7b", "llama-2-13b", "llama-7b", "llama-13b"])
def test_qlora_7b_and_13b_fit_24gb(key: str) -> None:
    est = estimate_memory(get_arch(key), method="qlora", seq=2048, grad_ckpt=True)
    assert fit_status(est, get_gpu("24gb")) == "yes"
    assert est.total < 16 * GiB  # with room to spare


def test_full_16bit_13b_needs_far_more_than_64gb() -> None:
    arch = get_arch("llama-2-13b")
    est = estimate_memory(arch, method="full", dtype="bf16", seq=512, batch=1, grad_ckpt=True)
    assert est.total > 2 * 64 * GB
    # Weights + gradients alone already exceed 48 GB; an 8-bit optimizer does not rescue it.
    assert est.weights + est.gradients > 48 * GB
    eight_bit = estimate_memory(arch, method="full", seq=512, grad_ckpt=True,
                                optimizer="adamw8bit")
    assert eight_bit.total > 64 * GB


def test_lora_on_gpt3_cuts_trainable_params_by_four_orders_of_magnitude() -> None:
    """LoRA paper (Hu et al. 2021): on GPT-3 175B, r=4 on W_q and W_v is the 18M budget of
    section 7.1 (~10,000x fewer trainable parameters); the 4.7M row of Table 4 is r=1 on
    W_q and W_v, and 37.7M is r=8 on both."""
    arch = get_arch("gpt-3-175b")
    assert arch.total_params / 1e9 == pytest.approx(175, rel=0.01)
    assert lora_params(arch, 1, "q,v") == 96 * 2 * 1 * (12288 + 12288) == 4_718_592
    assert lora_params(arch, 8, ["q_proj", "v_proj"]) / 1e6 == pytest.approx(37.7, abs=0.05)
    budget = lora_params(arch, 4, "q,v")
    assert budget / 1e6 == pytest.approx(18.9, abs=0.05)
    reduction = arch.total_params / budget
    assert 3.5 < math.log10(reduction) < 4.5  # ~9,300x: "about 10,000 times"
    est = estimate_memory(arch, method="lora", lora_r=4, lora_targets="q,v", seq=2048)
    assert est.trainable_params == budget


# ----------------------------------------------------------------------- quantization
def test_quant_bits() -> None:
    assert quant_bits_per_weight("nf4") == pytest.approx(4.5)  # + fp32 absmax per 64
    dq_overhead = quant_bits_per_weight("nf4-dq") - 4
    assert dq_overhead == pytest.approx(8 / 64 + 32 / (64 * 256))
    assert dq_overhead == pytest.approx(0.127, abs=0.001)
    assert quant_bits_per_weight("int8") == 8
    with pytest.raises(ConfigError, match="nf4"):
        quant_bits_per_weight("fp4")


def test_qlora_weights_keep_embeddings_and_norms_in_16_bit() -> None:
    arch = get_arch("llama-2-7b")
    kept = arch.total_params - arch.linear_weight_params
    assert kept == 2 * 32000 * 4096 + 65 * 4096  # embedding + lm_head + 65 RMSNorms
    nf4dq = estimate_memory(arch, method="qlora", quant="nf4-dq")
    expected = int(arch.linear_weight_params * quant_bits_per_weight("nf4-dq") / 8) + kept * 2
    assert nf4dq.weights == expected
    nf4 = estimate_memory(arch, method="qlora", quant="nf4").weights
    int8 = estimate_memory(arch, method="qlora", quant="int8").weights
    bf16 = estimate_memory(arch, method="lora").weights
    assert nf4dq.weights < nf4 < int8 < bf16
    # int8 adds one fp32 scale per output row of every matrix.
    rows = arch.layers * sum(lin.out_features for lin in arch.linears())
    assert int8 == arch.linear_weight_params + rows * 4 + kept * 2


# ----------------------------------------------------------------------- breakdown
def test_full_finetune_breakdown_bytes_per_param() -> None:
    arch = get_arch("llama-2-7b")
    est = estimate_memory(arch, method="full", dtype="bf16", optimizer="adamw")
    n = arch.total_params
    assert est.trainable_params == n and est.trainable_share == 1.0
    assert (est.weights, est.gradients, est.optimizer, est.adapters) == (2 * n, 2 * n, 8 * n, 0)
    assert est.overhead == CUDA_CONTEXT_BYTES
    assert est.total == sum(est.components().values())
    assert estimate_memory(arch, method="full", optimizer="adamw8bit").optimizer == 2 * n


def test_lora_trainable_count_all_linear() -> None:
    arch = get_arch("llama-2-7b")
    r = 16
    per_layer = r * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert lora_params(arch, r) == 32 * per_layer == 39_976_960
    est = estimate_memory(arch, method="lora", lora_r=r)
    assert est.trainable_params == 39_976_960
    assert est.trainable_share == pytest.approx(0.0059, abs=0.0001)
    # fp32 adapters (PEFT default): 4 bytes each for weights and gradients, 8 for AdamW.
    assert (est.adapters, est.gradients, est.optimizer) == (4 * per_layer * 32,
                                                            4 * per_layer * 32,
                                                            8 * per_layer * 32)


def test_lora_counts_fused_and_expert_linears() -> None:
    phi = get_arch("phi-3-mini")  # fused qkv_proj and gate_up_proj
    h, i = 3072, 8192
    assert lora_params(phi, 8) == 32 * 8 * ((h + 3 * h) + (h + h) + (h + 2 * i) + (i + h))
    mixtral = get_arch("mixtral-8x7b")
    attn = 4096 + 4096 + 2 * (4096 + 1024) + 4096 + 4096
    experts = 8 * 3 * (4096 + 14336)
    assert lora_params(mixtral, 1) == 32 * (attn + experts)  # router is not a target


def test_unknown_lora_target() -> None:
    with pytest.raises(ConfigError, match="q, k, v"):
        lora_params(get_arch("llama-2-7b"), 8, "q,w_foo")


def test_layer_activation_formula_by_hand() -> None:
    h, q, kv, i, n, b, tokens = 64, 64, 32, 160, 4, 2, 3 * 5
    # full fine-tuning, SDPA: internals + every linear input once + norm outputs
    internals = b * (q + 2 * kv) + b * q + 4 * n + 3 * b * i + 2 * 4 * h
    inputs = b * h + b * h + b * i + 2 * b * h
    got = layer_activation_bytes(TINY, seq=5, batch=3, dtype_bytes=b, method="full")
    assert got == (internals + inputs) * tokens
    # LoRA with fp32 adapters on bf16: each adapted linear keeps an fp32 copy of its input.
    r, a = 8, 4
    lora_inputs = a * (h * 3 + q + h * 2 + i) + 7 * a * r
    got = layer_activation_bytes(TINY, seq=5, batch=3, dtype_bytes=b, method="lora",
                                 lora_r=r, adapter_bytes=a)
    assert got == (internals + lora_inputs) * tokens
    # Same dtype: inputs shared (q/k/v once, gate/up once, o_proj's is the SDPA output).
    got = layer_activation_bytes(TINY, seq=5, batch=3, dtype_bytes=b, method="lora",
                                 lora_r=r, adapter_bytes=b)
    assert got == (internals + b * (h + h + i) + 7 * b * r) * tokens
    # Eager attention adds (2b + 4) * heads * seq^2 per sample.
    eager = layer_activation_bytes(TINY, seq=5, batch=3, dtype_bytes=b, attention="eager")
    sdpa = layer_activation_bytes(TINY, seq=5, batch=3, dtype_bytes=b)
    assert eager - sdpa == (2 * b + 4) * n * 25 * 3


def test_gradient_checkpointing_keeps_only_layer_inputs() -> None:
    arch = get_arch("llama-2-7b")
    kw = dict(seq=4096, batch=1, dtype_bytes=2, method="full")
    one = layer_activation_bytes(arch, **kw)
    head = 4096 * (4 * 4096 + 2 * 4096)
    full = activation_bytes(arch, grad_ckpt=False, **kw)
    ckpt = activation_bytes(arch, grad_ckpt=True, **kw)
    assert full == 32 * one + head
    assert ckpt == 32 * 4096 * 2 * 4096 + one + head
    assert ckpt < full / 10


def test_activations_scale_with_tokens_and_logits_with_target_fraction() -> None:
    arch = get_arch("llama-3-8b")
    a1 = estimate_memory(arch, method="lora", seq=1024, batch=1).activations
    a2 = estimate_memory(arch, method="lora", seq=1024, batch=2).activations
    a3 = estimate_memory(arch, method="lora", seq=2048, batch=1).activations
    assert a2 == pytest.approx(2 * a1, rel=0.01) and a3 == pytest.approx(2 * a1, rel=0.01)
    full_logits = logits_bytes(arch, seq=1024, batch=2, dtype_bytes=2)
    assert full_logits == 2048 * 128256 * (4 + 4 + 2)  # fp32 logits, fp32 grad, bf16 copy
    quarter = estimate_memory(arch, method="lora", seq=1024, batch=2, target_fraction=0.25)
    assert quarter.logits == full_logits // 4
    assert logits_bytes(arch, seq=1024, batch=2, dtype_bytes=4) == 2048 * 128256 * 8


def test_cpu_calibration_api() -> None:
    arch = get_arch("smollm2-135m")
    est = estimate_memory(arch, method="lora", seq=256, batch=2, device="cpu", dtype="fp32",
                          grad_ckpt=False, optimizer="adamw", lora_r=8, target_fraction=0.5)
    from tunelab.plan.estimate import scipy_import_bytes

    assert est.overhead == cpu_overhead_bytes(arch, "lora") == (
        CPU_PROCESS_BASELINE_BYTES + CPU_PEFT_IMPORT_BYTES + CPU_RUNTIME_BYTES
        + scipy_import_bytes() + CPU_TOKENIZER_BYTES_PER_TOKEN * arch.vocab)
    assert 300 * 2**20 < CPU_PROCESS_BASELINE_BYTES < 600 * 2**20
    # full fine-tuning never imports peft
    assert cpu_overhead_bytes(arch, "full") == est.overhead - CPU_PEFT_IMPORT_BYTES
    assert est.weights == arch.total_params * 4
    assert est.settings["dtype"] == "fp32" and est.settings["device"] == "cpu"
    assert est.total == sum(est.components().values())
    custom = estimate_memory(arch, method="lora", device="cpu", overhead_bytes=123)
    assert custom.overhead == 123
    assert estimate_memory(arch, device="cpu").settings["dtype"] == "fp32"  # CPU default
    d = est.to_dict()
    assert d["total"] == est.total and d["method"] == "lora"


def test_multi_gpu_ddp_replicates_fsdp_shards() -> None:
    arch = get_arch("llama-2-7b")
    one = estimate_memory(arch, method="full", grad_ckpt=True)
    ddp = estimate_memory(arch, method="full", grad_ckpt=True, gpus=4, parallel="ddp")
    fsdp = estimate_memory(arch, method="full", grad_ckpt=True, gpus=4, parallel="fsdp")
    assert ddp.weights == one.weights and ddp.optimizer == one.optimizer
    assert ddp.workspace == one.gradients  # gradient buckets
    assert fsdp.weights == one.weights // 4 and fsdp.optimizer == one.optimizer // 4
    assert fsdp.gradients == one.gradients // 4
    assert fsdp.activations == one.activations and fsdp.logits == one.logits
    assert fsdp.total < one.total / 3


def test_paged_optimizer_can_spill() -> None:
    arch = get_arch("llama-65b")
    est = estimate_memory(arch, method="qlora", seq=512, grad_ckpt=True, lora_r=64,
                          optimizer="paged")
    assert est.pageable == est.optimizer > 0
    assert fit_status(est, get_gpu("48gb")) == "paged"  # fp32 adapters: only with paging
    adamw = estimate_memory(arch, method="qlora", seq=512, grad_ckpt=True, lora_r=64)
    assert adamw.total == est.total and fit_status(adamw, get_gpu("48gb")) == "no"


def test_moe_memory_holds_all_experts() -> None:
    arch = get_arch("mixtral-8x7b")
    est = estimate_memory(arch, method="lora")
    assert est.weights == arch.total_params * 2 > 90 * GB


@pytest.mark.parametrize("kw,match", [
    ({"method": "prefix"}, "full, lora, qlora"), ({"optimizer": "sgd"}, "adamw8bit"),
    ({"dtype": "int4"}, "bf16"), ({"seq": 0}, "seq"), ({"target_fraction": 0}, "target"),
    ({"parallel": "tp", "gpus": 2}, "fsdp"), ({"device": "tpu"}, "cuda or cpu"),
])
def test_bad_input_raises_config_error(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        estimate_memory(get_arch("llama-2-7b"), **kw)


# ----------------------------------------------------------------------- time
def test_training_flops_6n_full_4n_lora() -> None:
    arch = get_arch("llama-2-7b")
    n = arch.active_linear_weight_params + arch.vocab * arch.hidden
    attn = 2 * 32 * 2048 * 4096
    full = training_flops_per_token(arch, "full", seq=2048)
    lora = training_flops_per_token(arch, "lora", seq=2048, lora_r=16)
    assert full == 3 * (2 * n + attn)
    assert lora == 2 * (2 * n + attn) + 6 * lora_params(arch, 16)
    assert full / (6 * n) == pytest.approx(1.0, abs=0.1)
    assert lora / (4 * n) == pytest.approx(1.0, abs=0.12)
    ckpt = training_flops_per_token(arch, "full", seq=2048, grad_ckpt=True)
    assert ckpt == full + (2 * n + attn)
    # MoE: FLOPs use the active experts only.
    mix = get_arch("mixtral-8x7b")
    assert training_flops_per_token(mix, "full", seq=1) < 6 * 14e9


def test_estimate_time_hours_and_cost() -> None:
    arch = get_arch("llama-2-7b")
    gpu = get_gpu("a100-80gb")
    t = estimate_time(arch, "lora", tokens=10_000_000, gpu=gpu, gpus=2, utilization=0.4,
                      price_per_hour=2.0)
    flops = training_flops_per_token(arch, "lora", seq=2048)
    assert t.hours == pytest.approx(1e7 * flops / (312e12 * 0.4 * 2) / 3600)
    assert t.cost == pytest.approx(t.hours * 2 * 2.0)
    q = estimate_time(arch, "qlora", tokens=10_000_000, gpu=gpu, gpus=2)
    assert q.hours > t.hours  # dequantization slowdown
    with pytest.raises(ConfigError, match="utilization"):
        estimate_time(arch, "lora", tokens=1, gpu=gpu, utilization=1.5)


# ----------------------------------------------------------------------- the CPU model
def test_cpu_peak_is_the_larger_end_of_backward_not_the_sum() -> None:
    arch = get_arch("smollm2-135m")
    kw = dict(seq=512, batch=1, device="cpu", heap_retention=0.0, target_fraction=0.2)
    full = estimate_memory(arch, method="full", **kw)
    head_grad = arch.vocab * arch.hidden * 4
    start = full.activations + full.logits + head_grad  # saved tensors + lm_head gradient
    end = full.gradients + full.workspace  # every gradient + AdamW / embedding temporaries
    assert full.overlap == max(start, end) - (full.activations + full.logits + full.gradients
                                              + full.workspace) < 0
    assert full.total == (full.weights + full.optimizer + full.overhead + max(start, end))
    # AdamW's single-tensor step holds sqrt(v) and sqrt(v)/bc of the largest parameter.
    assert full.workspace == 2 * arch.vocab * arch.hidden * 4
    # On CUDA the parts are summed (conservative) and there is no CPU term.
    gpu = estimate_memory(arch, method="full", seq=512, target_fraction=0.2)
    assert gpu.overlap == 0 and gpu.retained == 0


def test_cpu_heap_retention_counts_only_heap_sized_tensors() -> None:
    arch = get_arch("smollm2-135m")
    small = estimate_memory(arch, method="lora", seq=256, device="cpu", target_fraction=0.2)
    assert small.retained == int(CPU_HEAP_RETENTION_LORA * (small.activations + small.logits))
    assert estimate_memory(arch, method="lora", seq=256, device="cpu", target_fraction=0.2,
                           heap_retention=0).retained == 0
    # At 8192 tokens the MLP tensors (8192 x 1536 x 4 B = 48 MiB) and the logits are
    # mmap()ed by glibc and returned when freed: they are not retained.
    big = estimate_memory(arch, method="lora", seq=8192, device="cpu", heap_retention=1.0)
    sizes = saved_tensor_sizes(arch, seq=8192, batch=1, dtype_bytes=4, grad_ckpt=False,
                               method="lora")
    assert big.retained == sum(s * n for s, n in sizes if s <= GLIBC_MMAP_MAX) < big.activations
    # Full fine-tuning: capped at the heap-sized gradients (all but the 113 MiB embedding).
    full = estimate_memory(arch, method="full", seq=2048, device="cpu", heap_retention=1.0)
    heap_grads = (arch.total_params - arch.embedding_params) * 4
    assert full.retained == heap_grads


def test_cpu_qlora_weights_are_the_quantized_base_only() -> None:
    """The streaming loader keeps no mapped checkpoint pages: CPU and CUDA weights agree."""
    arch = get_arch("smollm2-135m")
    cpu = estimate_memory(arch, method="qlora", seq=256, device="cpu")
    gpu = estimate_memory(arch, method="qlora", seq=256, device="cuda", dtype="fp32")
    assert cpu.weights == gpu.weights


def test_saved_tensor_list_sums_to_the_formula() -> None:
    for method in ("full", "lora"):
        per = layer_saved_tensors(TINY, dtype_bytes=2, method=method)
        assert sum(per) * 64 * 3 == layer_activation_bytes(TINY, seq=64, batch=3,
                                                           dtype_bytes=2, method=method)
    with pytest.raises(ConfigError, match="heap_retention"):
        estimate_memory(TINY, device="cpu", heap_retention=-1)
