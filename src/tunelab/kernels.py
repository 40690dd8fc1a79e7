"""Fewer passes over memory in the LoRA training step, same math.

On a CPU (and for small models on a GPU) a LoRA step is bound by its matmuls *and* by
the elementwise passes around them: every ``[tokens, features]`` intermediate is written
and read again. Two of those are pure overhead and are removed here; the module structure,
parameter names and saved adapters stay exactly peft's and transformers'.

* **LoRA update** (:func:`fuse_lora`). peft computes ``y = base(x) + B(A(x)) * s`` as
  three full-width passes (``B`` output, the scaling, the addition). :class:`LoraDelta`
  computes ``y = base(x) + (s * x A^T) B^T`` with the scale on the rank-``r`` product and
  the addition inside the GEMM (``addmm``); backward is written out:

      g_x = (s * g B) A        g_A = (s * g B)^T x        g_B = g^T (s * x A^T)

  so the only full-width tensors are ``y`` and ``g``. The base layer runs as before (a
  4-bit bitsandbytes layer included), and autograd adds its input gradient to ``g_x``.
  (Doing the whole layer in one function, so both input gradients share one buffer, was
  measured too: no faster, so not kept.)
* **RMSNorm** (:func:`fuse_rms_norm`). ``w * x * rsqrt(mean(x^2) + eps)`` is six kernels
  in transformers' Llama/Mistral/Qwen2 norms; ``torch.nn.functional.rms_norm`` is one fused
  kernel each way. Only classes whose math is exactly that are switched (Gemma's
  ``(1 + w)`` norm, for one, is not).

``benchmarks/train_levers.py`` measures each on its own; ``tests/test_kernels.py`` checks
outputs and gradients against the unfused modules.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# transformers norm classes computing w * x * rsqrt(mean(x^2) + eps) in fp32
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm",
                              "Qwen3RMSNorm", "Phi3RMSNorm", "MixtralRMSNorm"})


class LoraDelta(torch.autograd.Function):
    """``out = y + (s * x A^T) B^T`` for ``x [..., in]``, ``A [r, in]``, ``B [out, r]``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        u = (x2 @ a.t()).mul_(scale)  # [N, r]: the scale costs r, not out, per token
        ctx.save_for_backward(x, u, a, b)
        ctx.scale = scale
        if y.is_contiguous() and not y.is_leaf:
            # The base layer's fresh output, which its own backward does not keep: add into
            # it inside the GEMM (beta = 1) instead of writing a third full-width tensor.
            y.view(-1, y.shape[-1]).addmm_(u, b.t())
            ctx.mark_dirty(y)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), u, b.t()).view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, u, a, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        gb = (g2 @ b).mul_(ctx.scale)  # [N, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = (gb @ a).view(x.shape)
        if ctx.needs_input_grad[2]:
            grad_a = gb.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_b = g2.t() @ u
        return grad, grad_x, grad_a, grad_b, None


def _fused_lora_forward(module: torch.nn.Module, original: Any, x: torch.Tensor,
                        *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward`` for the plain case; anything else goes to peft."""
    adapters = module.active_adapters
    if (args or kwargs or torch.is_autocast_enabled() or module.disable_adapters
            or module.merged or len(adapters) != 1
            or adapters[0] in module.lora_variant or adapters[0] not in module.lora_A):
        return original(x, *args, **kwargs)
    name = adapters[0]
    dropout = module.lora_dropout[name]
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if (not isinstance(dropout, torch.nn.Identity) or a.dtype != x.dtype
            or module.lora_B[name].bias is not None):  # peft's lora_bias option
        return original(x, *args, **kwargs)
    y = module.base_layer(x)
    if y.dtype != a.dtype:
        return original(x, *args, **kwargs)
    return LoraDelta.apply(y, x, a, b, float(module.scaling[name]))


def _lora_linear_classes() -> tuple[type, ...]:
    """peft's LoRA linear layers whose plain forward is ``base(x) + B(A(x)) * s``: on a
    16-bit base, and on bitsandbytes 4-bit / 8-bit bases (QLoRA)."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # no peft: nothing to fuse
        return ()
    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora import bnb

        classes += [getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt")
                    if hasattr(bnb, name)]
    except ImportError:  # peft without bitsandbytes support
        pass
    return tuple(classes)


def fuse_lora(model: torch.nn.Module) -> int:
    """Route every peft LoRA ``Linear`` of ``model`` through :class:`LoraDelta`; returns how
    many. Modules keep their parameters and peft methods (merge, save, unload)."""
    classes = _lora_linear_classes()
    count = 0
    for module in model.modules():
        if type(module) in classes and "forward" not in module.__dict__:
            original = module.forward
            module.forward = functools.partial(_fused_lora_forward, module, original)
            count += 1
    return count


def _fused_rms_norm_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    eps = module.variance_epsilon
    if x.dtype == torch.float32 and module.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, eps)
    # lower precision: normalise in fp32 as transformers does, weight in the input dtype
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
    return module.weight * normed


def fuse_rms_norm(model: torch.nn.Module) -> int:
    """Switch known RMSNorm modules to the fused kernel; returns how many."""
    count = 0
    for module in model.modules():
        if (type(module).__name__ in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon")
                and "forward" not in module.__dict__):
            module.forward = functools.partial(_fused_rms_norm_forward, module)
            count += 1
    return count


def unfuse(model: torch.nn.Module) -> int:
    """Undo :func:`fuse_lora` / :func:`fuse_rms_norm` / :func:`tunelab.dequant.fuse_4bit`:
    modules get their own forward back."""
    from tunelab.dequant import _forward as dequant_forward

    count = 0
    for module in model.modules():
        patched = module.__dict__.get("forward")
        if isinstance(patched, functools.partial) and patched.func in (
                _fused_lora_forward, _fused_rms_norm_forward, dequant_forward):
            del module.__dict__["forward"]
            count += 1
    return count
