"""Peak memory of the current process: CUDA max-allocated, or peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def tensor_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def model_memory_parts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                       ) -> dict[str, int]:
    """The parts of training memory we can measure exactly: weights, trainable, optimizer."""
    params = list(model.parameters())
    buffers = list(model.buffers())
    parts = {
        "weights": tensor_bytes(params) + tensor_bytes(buffers),
        "trainable": tensor_bytes(p for p in params if p.requires_grad),
    }
    if optimizer is not None:
        parts["optimizer_state"] = tensor_bytes(
            v for s in optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor))
    return parts


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
