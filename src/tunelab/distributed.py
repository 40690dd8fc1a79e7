"""Data parallelism through torch.distributed, launched by torchrun.

tunelab has no launcher of its own: ``tunelab train --nproc N`` runs torchrun, and
``torchrun ... -m tunelab train CONFIG`` works directly. Each process reads RANK/WORLD_SIZE
from the environment torchrun sets. One process (WORLD_SIZE unset) is the plain case and
costs nothing: every helper here is then a no-op.

Batch semantics: ``batch_size`` is per process, so a step of N processes at batch b sees the
same global batch of N*b examples (and the same losses) as one process at batch N*b.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device, timeout_s: int = 300) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A bounded timeout: a peer that died makes the others fail instead of hanging.
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    log.debug("process %d of %d joined (%s)", info.rank, info.world, dist.get_backend())
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process on a CUDA node takes the GPU of its local rank."""
    if device.type == "cuda" and info.enabled:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return device


def all_reduce_sum(value: float | int, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_pair(a: float, b: float, info: DistInfo, device: torch.device
                    ) -> tuple[float, float]:
    if not info.enabled:
        return a, b
    t = torch.tensor([a, b], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t[0]), float(t[1])


def all_gather_tensors(local: dict[str, torch.Tensor], info: DistInfo, device: torch.device
                       ) -> list[dict[str, torch.Tensor]]:
    """Every process's ``local`` (same keys, shapes and dtypes on each), indexed by rank."""
    if not info.enabled:
        return [local]
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(info.world)]
    for key in sorted(local):
        mine = local[key].to(device)
        parts = [torch.empty_like(mine) for _ in range(info.world)]
        dist.all_gather(parts, mine)
        for rank, part in enumerate(parts):
            out[rank][key] = part.cpu()
    return out


def broadcast_from_rank0(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Overwrite ``tensors`` on every process with rank 0's values, in place.

    What DDP does to every parameter when it wraps a model, for FSDP2, which does not:
    ``fully_shard`` keeps each process's own slice of whatever that process holds.
    """
    if not info.enabled:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, argv: list[str], passthrough: list[str]) -> list[str]:
    """The torchrun command line that runs ``tunelab <argv>`` in ``nproc`` processes."""
    import sys

    rendezvous = passthrough or ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            *rendezvous, "-m", "tunelab", *argv]
