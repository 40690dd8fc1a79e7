"""Peak memory of the current process: CUDA max-allocated, or peak RSS on CPU."""

from __future__ import annotations

import os
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


# glibc's mallopt parameter number and the threshold tunelab sets (the value the planner's
# calibration runs used through MALLOC_MMAP_THRESHOLD_)
_M_MMAP_THRESHOLD = -3
RETURN_FREED_THRESHOLD = 128 * 1024


def allocator_returns_memory() -> bool:
    """True when glibc was told, by environment, to return freed blocks (a fixed mmap
    threshold): then freed tensors do not stay resident."""
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) or \
        "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")


def return_freed_memory() -> bool:
    """Make glibc serve every block over 128 KiB by ``mmap`` from now on, so a freed tensor
    goes back to the system at once instead of staying in the heap as a free chunk
    (``mallopt(M_MMAP_THRESHOLD, 131072)``, the same as ``MALLOC_MMAP_THRESHOLD_=131072``
    at start-up; it also stops glibc raising the threshold as large blocks are freed).

    Why: glibc's dynamic threshold rises to 32 MiB after the first large free, and from then
    on each step's 4-32 MiB activations come from the heap and are kept: about one step's
    worth of them (1.4 GiB for Llama-2-7B QLoRA at 512 tokens). The cost is a page fault
    per fresh allocation (measured about 1 s per GB; it roughly halved a 135M LoRA step,
    and is a small share of a 7B step). Returns False where it cannot be set (not glibc).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, RETURN_FREED_THRESHOLD))
    except (OSError, AttributeError):
        return False


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
