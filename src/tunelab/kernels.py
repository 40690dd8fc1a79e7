"""Fewer passes over memory in the LoRA training step, same math.

On a CPU (and for small models on a GPU) a LoRA step is bound by its matmuls *and* by
the elementwise passes around them: every ``[tokens, features]`` intermediate is written
and read again. Two of those are pure overhead and are removed here; the module structure,
parameter names and saved adapters stay exactly peft's and transformers'.

* **LoRA update** (:func:`fuse_lora`). peft computes ``y = base(x) + B(A(x)) * s`` as
  three full-width passes (``B`` output, the scaling, the addition). Here the down
  projection ``u = x A^T`` is an ordinary ``linear`` and :class:`LoraUp` computes
  ``y + s u B^T`` with the scale and the addition inside the GEMM (``addmm``, ``beta = 1``,
  ``alpha = s``); its backward is written out:

      g_u = s g B        g_B = s g^T u        (g_y = g)

  so the only full-width tensors are ``y`` and ``g``. The base layer runs as before (a
  4-bit bitsandbytes layer included), and autograd adds its input gradient to ``x``'s.
* **Shared down projections** (:class:`SharedDown`). ``q/k/v_proj`` read the same input,
  and so do ``gate/up_proj``; their rank-``r`` down projections are one matmul
  ``x [A_q; A_k; A_v]^T`` instead of three, and so are their two backward products
  (``g_U [A_q; A_k; A_v]`` and ``g_U^T x``), which also sums the three input gradients
  inside the GEMM. Rank-16 products are far from the machine's peak (about 0.3 of it on
  a 2-core CPU); grouped, the LoRA matmuls of a SmolLM2 layer take 1.5x less time. Only
  calls that really share the input tensor (same object, same version) share the product;
  anything else computes its own.
  (Doing the whole layer in one function, so base and LoRA input gradients share one
  buffer, was measured too: no faster, so not kept.)
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


class LoraUp(torch.autograd.Function):
    """``out = y + s u B^T`` for ``y [..., out]``, ``u [..., r]``, ``B [out, r]``."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, u: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        u2 = u.reshape(-1, u.shape[-1])
        ctx.save_for_backward(u2, b)
        ctx.scale = scale
        if y.is_contiguous() and not y.is_leaf:
            # The base layer's fresh output, which its own backward does not keep: add into
            # it inside the GEMM instead of writing a third full-width tensor.
            y.view(-1, y.shape[-1]).addmm_(u2, b.t(), alpha=scale)
            ctx.mark_dirty(y)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), u2, b.t(), alpha=scale).view(y.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u2, b = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_u = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_u = (g2 @ b).mul_(ctx.scale).view(*grad.shape[:-1], b.shape[1])
        if ctx.needs_input_grad[2]:
            grad_b = (g2.t() @ u2).mul_(ctx.scale)
        return grad, grad_u, grad_b, None


# Sibling projections reading one input, in the transformers models' own names. Models
# that fuse them already (Phi-3's qkv_proj / gate_up_proj) have nothing to group.
SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedDown:
    """One ``x [A_1; ...; A_k]^T`` for sibling LoRA layers called on the same ``x``.

    The first member called on a new input computes every member's ``u_i = x A_i^T`` in one
    matmul (through autograd: ``cat`` and ``linear`` give each ``A_i`` its gradient and
    ``x`` the sum of theirs in one product); the others take their columns from it while
    the input is the same tensor at the same version. The product is dropped once every
    member has taken its share, and recomputed on a miss (another input, a member called
    twice, an adapter name that differs), so a result never depends on call order.
    """

    def __init__(self, members: list[torch.nn.Module]) -> None:
        self.members = members
        self._cached: tuple[torch.Tensor, int, str, torch.Tensor, set[int]] | None = None

    def down(self, module: torch.nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        index = next(i for i, m in enumerate(self.members) if m is module)
        cached = self._cached
        if (cached is not None and cached[0] is x and cached[1] == x._version
                and cached[2] == name and index not in cached[4]):
            cached[4].add(index)
            if len(cached[4]) == len(self.members):
                self._cached = None  # everyone has theirs: don't keep the product alive
            return self._columns(cached[3], index, name)
        weights = [_plain_lora_weights(m, x, name) for m in self.members]
        if any(w is None for w in weights):  # a sibling not on the plain path: no sharing
            self._cached = None
            return F.linear(x, module.lora_A[name].weight)
        u = F.linear(x, torch.cat([a for a, _ in weights]))
        self._cached = (x, x._version, name, u, {index})
        return self._columns(u, index, name)

    def _columns(self, u: torch.Tensor, index: int, name: str) -> torch.Tensor:
        ranks = [m.lora_A[name].weight.shape[0] for m in self.members]
        start = sum(ranks[:index])
        return u[..., start:start + ranks[index]]


def _plain_lora_weights(module: torch.nn.Module, x: torch.Tensor, name: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)`` of the one active adapter when ``module`` computes ``base(x) + s B A x``
    plainly (no dropout, merge, bias, variant such as DoRA, or dtype cast); else None."""
    adapters = module.active_adapters
    if (torch.is_autocast_enabled() or module.disable_adapters or module.merged
            or len(adapters) != 1 or adapters[0] in module.lora_variant
            or adapters[0] not in module.lora_A or (name is not None and adapters[0] != name)):
        return None
    name = adapters[0]
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if (not isinstance(module.lora_dropout[name], torch.nn.Identity) or a.dtype != x.dtype
            or module.lora_B[name].bias is not None):  # peft's lora_bias option
        return None
    return a, b


def _fused_lora_forward(module: torch.nn.Module, original: Any, group: SharedDown | None,
                        x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft ``lora.Linear.forward`` for the plain case; anything else goes to peft."""
    weights = None if args or kwargs else _plain_lora_weights(module, x)
    if weights is None:
        return original(x, *args, **kwargs)
    a, b = weights
    y = module.base_layer(x)
    if y.dtype != a.dtype:
        return original(x, *args, **kwargs)
    name = module.active_adapters[0]
    u = group.down(module, x, name) if group is not None else F.linear(x, a)
    return LoraUp.apply(y, u, b, float(module.scaling[name]))


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


def fuse_lora(model: torch.nn.Module, share_down: bool = True) -> int:
    """Route every peft LoRA ``Linear`` of ``model`` through :class:`LoraUp`, siblings
    sharing one :class:`SharedDown` (unless ``share_down`` is off); returns how many.
    Modules keep their parameters and peft methods (merge, save, unload)."""
    classes = _lora_linear_classes()
    fusable = {name: module for name, module in model.named_modules()
               if type(module) in classes and "forward" not in module.__dict__}
    shared: dict[str, SharedDown] = {}  # module name -> its siblings' shared projection
    for name in fusable:
        parent, _, leaf = name.rpartition(".")
        prefix = f"{parent}." if parent else ""
        for siblings in SIBLING_GROUPS:
            names = [prefix + sibling for sibling in siblings]
            if share_down and leaf == siblings[0] and all(n in fusable for n in names):
                group = SharedDown([fusable[n] for n in names])
                shared.update(dict.fromkeys(names, group))
    for name, module in fusable.items():
        module.forward = functools.partial(_fused_lora_forward, module, module.forward,
                                           shared.get(name))
    return len(fusable)


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
    """Undo :func:`fuse_lora` / :func:`fuse_rms_norm`: modules get their own forward back."""
    count = 0
    for module in model.modules():
        patched = module.__dict__.get("forward")
        if isinstance(patched, functools.partial) and patched.func in (
                _fused_lora_forward, _fused_rms_norm_forward):
            del module.__dict__["forward"]
            count += 1
    return count
