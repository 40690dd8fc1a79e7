"""4-bit base layers that dequantize into one reused buffer.

A QLoRA base layer computes ``y = x W^T + b`` with ``W = dequant(W_4bit)``: block ``j`` of
64 weights is ``code[idx] * absmax_j`` (NF4 levels), and under double quantization
``absmax_j`` itself is ``code8[a_j] * absmax2_{j // 256} + offset``. The frozen weight needs
no gradient, so backward needs ``W`` only for the input gradient ``g_x = g W``.

bitsandbytes (``Linear4bit`` -> ``MatMul4Bit``) allocates a fresh weight-sized tensor for
every dequantization: three per layer and step with gradient checkpointing (forward,
recompute, backward). On a CPU those tensors of 4-32 MiB come from glibc's heap, whose
freed chunks stay resident: a 200M-parameter QLoRA step measured 1.16 GiB peak RSS against
605 MiB with the same run's allocations returned to the system, and a Llama-3.2-1B shape
3.17 GiB against 2.25 GiB planned (``benchmarks/big_models.py``).

:class:`Dequant4bitLinear` computes the same thing with **one** buffer of the largest base
weight, shared by every layer of the model (layers run one at a time, forward and backward
alike; nothing keeps ``W`` past its matmul): no allocation per use, so nothing for the heap
to keep. The NF4 decoding itself stays bitsandbytes' (its CPU kernel writes into our buffer;
elsewhere ``dequantize_4bit(..., out=)``), so the numbers are exactly bitsandbytes'.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F


class DequantBuffer:
    """One flat scratch tensor per (device, dtype), grown to the largest weight asked for."""

    def __init__(self) -> None:
        self._flat: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (device, dtype)
        n = math.prod(shape)
        flat = self._flat.get(key)
        if flat is None or flat.numel() < n:
            flat = self._flat[key] = torch.empty(n, dtype=dtype, device=device)
        return flat[:n].view(shape)


@functools.cache  # looked up once per (type, dtype), not per matmul
def _cpu_kernel(quant_type: str, dtype: torch.dtype) -> Any:
    """bitsandbytes' CPU dequantization kernel that writes into a given tensor, if present."""
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{name}", None) if name else None


@torch.no_grad()
def dequantize_into(weight: torch.Tensor, state: Any, out: torch.Tensor) -> torch.Tensor:
    """``out[:] = dequant(weight)`` (``out`` has the weight's shape and ``state.dtype``)."""
    import bitsandbytes.functional as bnbf

    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    kernel = _cpu_kernel(state.quant_type, out.dtype) if out.device.type == "cpu" else None
    rows, cols = (1, out.shape[0]) if out.dim() == 1 else (math.prod(out.shape[:-1]),
                                                           out.shape[-1])
    absmax = absmax.float().contiguous()  # kept alive: the kernel reads it by address
    if kernel is not None and cols % 2 == 0 and state.blocksize < 2048:
        import ctypes

        packed = weight.view(torch.uint8).reshape(rows, cols // 2)
        kernel(ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()),
               ctypes.c_void_p(out.data_ptr()), ctypes.c_longlong(state.blocksize),
               ctypes.c_longlong(rows), ctypes.c_longlong(cols))
        return out
    if out.device.type == "cpu":  # no writing kernel: bitsandbytes' own result, copied
        return out.copy_(bnbf.dequantize_4bit(weight, state))
    return bnbf.dequantize_4bit(weight, state, out=out)


class Dequant4bitLinear(torch.autograd.Function):
    """``y = x W^T + b`` for a frozen 4-bit ``W``, dequantized into ``buffer`` per use."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                state: Any, buffer: DequantBuffer) -> torch.Tensor:
        w = dequantize_into(weight, state, buffer.take(state.shape, state.dtype, x.device))
        ctx.state, ctx.buffer, ctx.weight = state, buffer, weight
        ctx.has_bias = bias is not None
        return F.linear(x.to(w.dtype), w, bias.to(w.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            state = ctx.state
            w = dequantize_into(ctx.weight, state,
                                ctx.buffer.take(state.shape, state.dtype, grad.device))
            grad_x = grad.to(w.dtype) @ w
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None, None


def quant_state_of(module: torch.nn.Module) -> Any:
    """The layer's bitsandbytes ``QuantState``: on its ``Params4bit`` weight, or, once FSDP2
    has replaced that weight by a plain (sharded, or gathered) parameter of the same packed
    bytes, on the module, where ``Params4bit(module=...)`` also put it."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _forward(module: torch.nn.Module, buffer: DequantBuffer, x: torch.Tensor) -> torch.Tensor:
    state = quant_state_of(module)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return type(module).forward(module, x)  # bitsandbytes' own layouts: its own path
    out = Dequant4bitLinear.apply(x, module.weight, module.bias, state, buffer)
    return out.to(x.dtype)


def fuse_4bit(model: torch.nn.Module) -> int:
    """Route every bitsandbytes ``Linear4bit`` of ``model`` through
    :class:`Dequant4bitLinear`, all sharing one :class:`DequantBuffer`; returns how many.
    Modules, parameters and saved files are untouched (``kernels.unfuse`` undoes it)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    buffer = DequantBuffer()
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and "forward" not in module.__dict__:
            module.forward = functools.partial(_forward, module, buffer)
            count += 1
    return count
