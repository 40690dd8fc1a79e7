"""Causal-LM loss computed only where it is needed.

For next-token prediction, position ``t`` predicts token ``t+1``; the loss is

    L = sum_{t in targets} -log softmax(W_out h_t)[y_{t+1}]

Completion-only training masks every prompt position, so the output layer (``W_out``, a
``vocab x hidden`` matmul: about a fifth of SmolLM2's forward FLOPs per token) is applied
only to the hidden states of target positions. The result is the same sum as the full
logits path, at a fraction of the cost and of the ``tokens x vocab`` memory.

The loss is returned as a *sum* with its token count, so the caller can normalise by the
number of target tokens across all micro-batches (and ranks) of an optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, REPLAY_KEY


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft / DDP wrapper."""
    inner = model
    while True:
        if hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            return inner


class TargetLoss(torch.nn.Module):
    """Wraps a causal LM; ``forward(batch) -> (loss_sum, n_targets)`` over target tokens.

    Being an ``nn.Module`` whose forward runs the whole model lets DDP/FSDP wrap it and see
    every parameter used in the step.
    """

    def __init__(self, model: torch.nn.Module, chunked: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunked = chunked  # ChunkedCrossEntropy where it applies
        inner = unwrap(model)
        self.backbone = getattr(inner, inner.base_model_prefix)
        self.head = inner.get_output_embeddings()
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **packing: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded batch has ``attention_mask``; a packed one (:mod:`tunelab.packing`)
        has ``position_ids`` and its sequence bounds instead."""
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **packing)
        return self.target_loss(hidden, labels)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, **packing: torch.Tensor
                      ) -> torch.Tensor:
        """The backbone's last hidden states ``[rows, T, hidden]`` (no output layer)."""
        packing.pop(REPLAY_KEY, None)  # which rows are replay: for the objective, not the model
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                  "use_cache": False, **packing}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        return self.backbone(**kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the output layer (soft-capped where the model does) for rows of
        hidden states."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def target_loss(self, hidden: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_t -log p(y_{t+1} | h_t), n_targets)`` over the target positions."""
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        picked = hidden[:, :-1][mask]
        weight = getattr(self.head, "weight", None)
        if (self.chunked and type(self.head) is torch.nn.Linear and self.head.bias is None
                and not self.softcap
                and torch.is_grad_enabled() and (picked.requires_grad or weight.requires_grad)):
            return ChunkedCrossEntropy.apply(picked, weight, targets[mask]), mask.sum()
        loss_sum = F.cross_entropy(self.logits(picked), targets[mask], reduction="sum")
        return loss_sum, mask.sum()


def _onednn_linear() -> Any:
    """oneDNN's ``x W^T`` kernel where this torch build has it (x86/ARM CPU builds do)."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, onednn: bool = True
                ) -> torch.Tensor:
    """``hidden W^T`` for a chunk of rows of the output layer.

    On CPU in fp32 this goes through oneDNN instead of the MKL GEMM behind ``@``: for the
    output layer's short, very wide product (128 x 576 @ 576 x 49152 for SmolLM2) MKL
    reaches ~0.6 of the machine's square-matmul peak and oneDNN ~0.85; the whole chunked
    cross-entropy runs 1.2x faster (``benchmarks/kernel_levers.py``). Everywhere else
    (CUDA, 16-bit, builds without oneDNN, a graph being recorded) it is the plain matmul.
    """
    if (onednn and _ONEDNN_LINEAR is not None and hidden.device.type == "cpu"
            and type(hidden) is torch.Tensor and type(weight) in (torch.Tensor, torch.nn.Parameter)
            and hidden.dtype == torch.float32 and weight.dtype == torch.float32
            # the oneDNN op has no autograd formula: only where no graph is being recorded
            and not (torch.is_grad_enabled()
                     and (hidden.requires_grad or weight.requires_grad))):
        return _ONEDNN_LINEAR(hidden.contiguous(), weight.contiguous(), None, "none", [], "")
    return hidden @ weight.t()


class ChunkedCrossEntropy(torch.autograd.Function):
    """``sum_i -log softmax(W h_i)[y_i]`` over ``CHUNK`` rows at a time, gradients included.

    The ``[targets, vocab]`` logits (137 MB in fp32 for 700 targets of SmolLM2) never
    exist whole: each chunk's logits go through one fused softmax, ``-log p[y]`` is the
    loss, and ``p - onehot(y)`` (the gradient of the sum with respect to the logits) is
    multiplied back while it is still in cache. Forward stores ``dL/dh``
    (``[targets, hidden]``) and, when the head trains, ``dL/dW``; backward scales them by
    the incoming gradient. Same matmuls as the plain path, fewer passes over the logits:
    one softmax instead of logsumexp's max, exp and sum plus another exp.
    """

    CHUNK = 128  # rows: 128 x 49152 fp32 logits = 25 MB, inside a 32 MB L3
    ONEDNN = True  # head_logits through oneDNN where it applies (off: to measure it)
    # below this, p[y] in fp32 has lost its digits: such rows take lse(z) - z[y] instead
    TINY = 1e-30

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, n, ChunkedCrossEntropy.CHUNK):
            h = hidden[start:start + ChunkedCrossEntropy.CHUNK]
            t = targets[start:start + ChunkedCrossEntropy.CHUNK]
            logits = head_logits(h, weight, ChunkedCrossEntropy.ONEDNN).float()
            probs = torch.softmax(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            p_target = probs[rows, t]
            row_loss = -p_target.log()
            tiny = p_target < ChunkedCrossEntropy.TINY
            if bool(tiny.any()):  # a very confident wrong guess: rare, recompute exactly
                row_loss[tiny] = (torch.logsumexp(logits[tiny], dim=-1)
                                  - logits[tiny].gather(1, t[tiny, None]).squeeze(1))
            loss += row_loss.sum()
            probs[rows, t] -= 1.0
            probs = probs.to(weight.dtype)
            grad_h[start:start + h.shape[0]] = probs @ weight
            if grad_w is not None:
                grad_w.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_h, *([grad_w] if grad_w is not None else []))
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        grad_w = saved[1] * grad if len(saved) > 1 else None
        return saved[0] * grad, grad_w, None


def full_logits_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path: full logits through the model's own forward. Used in tests."""
    extra = {k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **extra).logits.float()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[:, :-1][mask], targets[mask], reduction="sum")
    return loss, mask.sum()
