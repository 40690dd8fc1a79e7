"""Quantized bases through bitsandbytes: NF4/FP4 4-bit (QLoRA) and int8.

QLoRA (Dettmers et al. 2023) freezes the base in **NF4**: each block of 64 weights is stored
as 4-bit indices into the 16 NormalFloat levels (quantiles of N(0, 1), rescaled to [-1, 1])
times the block's absmax. **Double quantization** stores those absmax constants themselves in
8 bits (blocks of 256, one fp32 scale each), cutting their cost from 32/64 = 0.5 to about
8/64 + 32/(64*256) = 0.127 bits per weight. Gradients flow through the dequantized weights
into LoRA adapters kept in the compute dtype.

bitsandbytes' and transformers' own default quant type is fp4 without double quantization;
tunelab's is nf4 with double quantization, as in the paper.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4")


def bnb_config(bits: int, compute_dtype: torch.dtype, *, quant_type: str = "nf4",
               double_quant: bool = True) -> Any:
    """A transformers ``BitsAndBytesConfig`` for a 4- or 8-bit frozen base.

    The output layer and embeddings stay unquantized (transformers skips the output
    embedding; embeddings are not linear layers).
    """
    from transformers import BitsAndBytesConfig

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # int8 on CPU logs every call
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=torch.uint8)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits must be 4 or 8, got {bits}")


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A bitsandbytes 4- or 8-bit linear layer itself. Not peft's LoRA wrapper around one,
    whose class has the same name (counting both would count every weight twice)."""
    if type(module).__name__ not in ("Linear4bit", "Linear8bitLt"):
        return False  # cheap test first: most modules are neither, and bnb imports slowly
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def keep_trainable_layout(model: torch.nn.Module, *, generation_only: bool = False) -> int:
    """Stop bitsandbytes repacking 4-bit weights into its CPU inference layout; returns how
    many layers were pinned.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode on an input without
    gradient (any evaluation, or DPO's reference pass) converts the weight, once and in
    place, to a layout only ``gemv_4bit`` reads; that op has no backward, so every later
    training step silently gets a zero input gradient through each 4-bit layer and only
    the adapters next to the residual stream (o_proj, down_proj) learn (bitsandbytes
    0.50). The conversion also fails on layers narrower than one 64-weight block, and it
    rounds the block scales to bf16, so an evaluation would not compute what training did.
    ``models.load_model`` pins every 4-bit model it loads for training and evaluation: one
    layout everywhere.

    ``generation_only`` (generate, chat, serve: nothing is trained, merged or compared
    against training afterwards) pins only the layers the conversion cannot take (out
    features not a multiple of 32, in features not a multiple of 64), so the rest use
    bitsandbytes' fused ``gemv``: measured 6x faster per generated token on a 1B shape
    (``benchmarks/generate_4bit_layout.py``), where the pinned layout dequantizes every
    weight for every token.
    """
    count = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            convertible = module.out_features % 32 == 0 and module.in_features % 64 == 0
            if generation_only and convertible:
                continue
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantized_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes a quantized linear really holds in this process: packed weights (under FSDP2
    this process's shard of them) plus quantization constants (replicated)."""
    from tunelab.dequant import quant_state_of

    weight = module.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    total = local.numel() * local.element_size()
    state = quant_state_of(module)
    if state is not None:  # 4-bit: absmax (uint8 if nested) + nested fp32 absmax + codebooks
        total += state.absmax.numel() * state.absmax.element_size()
        total += state.code.numel() * state.code.element_size()
        if state.nested:
            s2 = state.state2
            total += s2.absmax.numel() * s2.absmax.element_size()
            total += s2.code.numel() * s2.code.element_size()
    scb = getattr(weight, "SCB", None)
    if scb is not None:  # int8: one fp32 scale per output row
        total += scb.numel() * scb.element_size()
    return int(total)


def quantized_layer_memory(model: torch.nn.Module) -> dict[str, float]:
    """Weight memory of the quantized layers vs the same layers in bf16 (2 bytes/weight)."""
    actual = n_weights = 0
    for module in model.modules():
        if is_quantized_linear(module):
            actual += quantized_weight_bytes(module)
            n_weights += module.in_features * module.out_features
    bf16 = 2 * n_weights
    return {"quantized_bytes": actual, "bf16_bytes": bf16, "n_weights": n_weights,
            "ratio_to_bf16": actual / bf16 if bf16 else float("nan"),
            "bits_per_weight": 8 * actual / n_weights if n_weights else float("nan")}


@torch.no_grad()
def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized linear computes with."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    scb = weight.SCB  # int8 row-wise: W = q * scale / 127
    return (weight.data.float() * scb.float().unsqueeze(1) / 127.0)


@torch.no_grad()
def dequantize_model(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every quantized linear by an fp32 ``nn.Linear`` holding its dequantized weight.

    The result computes what the quantized model computes (up to matmul rounding), in full
    precision, so an adapter trained on the quantized base can be merged exactly.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not is_quantized_linear(child):
                continue
            linear = torch.nn.Linear(child.in_features, child.out_features,
                                     bias=child.bias is not None, device="cpu",
                                     dtype=torch.float32)
            linear.weight.copy_(dequantized_weight(child).cpu())
            if child.bias is not None:
                linear.bias.copy_(child.bias.float().cpu())
            setattr(parent, name, linear.to(child.weight.device))
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model
