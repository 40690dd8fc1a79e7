"""Peak memory of the current process: CUDA max-allocated, or peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _linux_peak_rss()
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)


def release_free_heap() -> None:
    """Hand glibc's free heap chunks back to the system (``malloc_trim(0)``; a no-op
    elsewhere). Loading converts and quantizes tensor after tensor; their 4-32 MiB
    temporaries come from the heap, and without a trim their freed chunks stay resident
    (a 200M-parameter QLoRA load measured ~300 MiB of them)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        pass


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA's max-allocated counter, or on Linux the process's ``VmHWM``
    (writing ``5`` to ``/proc/self/clear_refs`` resets it to the current RSS). False where
    the peak cannot be reset (then :func:`peak_memory_bytes` keeps the whole process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a Linux ``/proc`` status file, in bytes; ``None`` elsewhere."""
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _linux_peak_rss() -> int | None:
    """This process's own peak RSS (``VmHWM``). Not ``ru_maxrss``: Linux carries that over
    from the parent through fork + exec, so a run started by a 2 GB process (a test
    runner, a notebook) would report at least 2 GB whatever it used."""
    return _proc_bytes("/proc/self/status", "VmHWM")


def memory_budget_bytes(device: torch.device) -> int | None:
    """How large this process can grow: on CUDA the device's free memory plus what torch
    already holds, on Linux ``MemAvailable`` plus this process's RSS; ``None`` where that is
    not known (MPS, other systems)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    if device.type != "cpu":
        return None
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    rss = _proc_bytes("/proc/self/status", "VmRSS")
    return None if available is None or rss is None else available + rss


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
