"""What ``tunelab train`` checks before it loads the model (seconds, not minutes).

A 7B base takes minutes to load; a run that fails afterwards on a missing data file, an
unwritable output folder or memory it never had wastes them. So, before loading:

1. the output folder is created and written to (a probe file, removed again);
2. the data is read, validated and tokenized (the caller does it with the tokenizer alone);
3. the plan (:func:`tunelab.plan.plan_run`, the same computation as ``tunelab plan`` and the
   line ``train`` prints at the end) sizes the run from ``config.json`` and the tokenized
   data. Over what the device can give this process: gradient checkpointing goes on when it
   brings the run within reach (``grad_ckpt_auto``); if the run still does not fit it is
   refused with the plan's figures and the changes that would fit, unless ``force``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tunelab.config import TrainConfig
from tunelab.errors import ConfigError
from tunelab.memory import fmt_bytes

log = logging.getLogger(__name__)

SHORTER_LENGTHS = (1024, 512, 256, 128)


class RunWontFit(ConfigError):
    """The plan says the run needs more memory than the device has."""


def check_output_writable(out: Path) -> None:
    """Create ``out`` and prove a file can be written there, or say why not."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out} is not writable ({exc.strerror or exc}); "
                          "choose another with --out") from None


def model_arch(spec: str, *, trust_remote_code: bool = False) -> Any | None:
    """The planner's :class:`~tunelab.plan.Arch` for a model spec, from its config alone
    (``None`` where it cannot be sized: the run then goes ahead unplanned)."""
    from tunelab import models
    from tunelab.plan import arch_from_hf_config

    try:
        source = models.resolve_model(spec)
        folder = Path(models.local_folder(source))
        if folder.is_dir():
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(
                str(folder), trust_remote_code=trust_remote_code).to_dict()
        return arch_from_hf_config(config)
    except Exception as exc:  # an unknown layout: leave the decision to the run itself
        log.debug("no plan before loading %s: %s", spec, exc)
        return None


@dataclass(frozen=True)
class _Truncated:
    """An example cut to ``max_length`` tokens, for sizing a shorter-sequence alternative."""

    input_ids: list[int]
    labels: list[int]


def check_processes(cfg: TrainConfig, world: int, out: Path) -> None:
    """What a run's process count must agree with, checked before anything loads.

    ``parallel: fsdp`` needs at least two processes to shard over. A resumed run must see
    the checkpoint's global batch, ``world x batch_size`` examples per micro-batch: the data
    order and every loss depend on it (the checkpoint itself holds full tensors and loads
    into any number of processes).
    """
    if cfg.parallel == "fsdp" and world < 2:
        raise ConfigError("parallel: fsdp shards the model over processes and this run has "
                          "one; add --nproc 2 (or more, or launch with torchrun), or set "
                          "parallel: auto")
    if not cfg.resume:
        return
    from tunelab import checkpoint

    latest = checkpoint.latest_checkpoint(out)
    if latest is None:
        return
    saved = checkpoint.read_state(latest).extra.get("global_batch")
    check_resume_batch(saved, world, cfg.batch_size, latest)


def check_resume_batch(saved: int | None, world: int, batch_size: int, path: Path) -> None:
    """Refuse to resume checkpoint ``path`` (global batch ``saved``) with ``world``
    processes of ``batch_size`` examples, naming the setting that would match."""
    if saved is None or saved == world * batch_size:
        return
    where = f"the checkpoint {path} was trained with a global batch of {saved} examples"
    if saved % world:
        splits = ", ".join(f"{n} (batch_size {saved // n})" for n in range(1, saved + 1)
                           if saved % n == 0)
        raise ConfigError(f"{where}, which {world} processes cannot share equally; resume on "
                          f"{splits} processes")
    raise ConfigError(f"{where} per micro-batch; {world} process(es) x batch_size "
                      f"{batch_size} gives {world * batch_size}. Set batch_size to "
                      f"{saved // world} to resume on this number of processes.")


def shard_over_processes(cfg: TrainConfig, train_set: list[Any], steps: int,
                         device: torch.device, *, budget: int | None, rank: int = 0,
                         world: int = 1) -> bool:
    """Whether the run wraps its model in FSDP2 (sharded) rather than DDP (replicated): the
    one decision ``tunelab train``, its preflight plan and its closing plan line share.

    ``parallel: fsdp`` / ``ddp`` decide themselves. ``auto``: full fine-tuning shards (its
    gradients and AdamW state, 3x the weights in fp32, dominate); LoRA and QLoRA replicate
    (one all-reduce of the small adapter gradients per step, no all-gathers) unless the
    plan says the replicated run needs more than ``budget`` and the sharded one less. Each
    process decides on its own plan; the caller makes them agree.
    """
    if world < 2 or cfg.parallel == "ddp":
        return False
    if cfg.parallel == "fsdp" or cfg.method == "full":
        return True
    if budget is None or not train_set:
        return False
    arch = model_arch(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if arch is None:
        return False
    replicated = _planned_bytes(arch, cfg, train_set, steps, device, rank, world)[0]
    if replicated <= budget:
        return False
    sharded = _planned_bytes(arch, cfg, train_set, steps, device, rank, world, sharded=True)[0]
    if sharded >= replicated:  # the plan sees no saving (it sizes FSDP per GPU only)
        return False
    log.info("parallel: auto chose FSDP: the plan puts a replicated base at %s per process, "
             "more than the %s available; sharded over %d processes, %s", fmt_bytes(replicated),
             fmt_bytes(budget), world, fmt_bytes(sharded))
    return True


def _planned_bytes(arch: Any, cfg: TrainConfig, examples: list[Any], steps: int,
                   device: torch.device, rank: int, world: int, sharded: bool = False
                   ) -> tuple[int, Any]:
    from tunelab.models import pick_dtype
    from tunelab.plan import plan_run
    from tunelab.plan.runtime import dtype_name

    dtype = dtype_name(pick_dtype(cfg.dtype, device))
    est, _ = plan_run(arch, cfg, examples, steps, device=device.type, dtype=dtype,
                      rank=rank, world=world, sharded=sharded)
    # on CUDA the context is outside what the budget counts
    return est.total - (est.overhead if device.type == "cuda" else 0), est


def _alternatives(arch: Any, cfg: TrainConfig, examples: list[Any], steps: int,
                  device: torch.device, rank: int, world: int, budget: int,
                  sharded: bool = False) -> list[str]:
    """Changes to the run that the plan says would fit, cheapest in quality first."""
    def size(c: TrainConfig, ex: list[Any] = examples) -> int:
        return _planned_bytes(arch, c, ex, steps, device, rank, world, sharded)[0]

    found = []
    if not cfg.grad_ckpt:
        n = size(replace(cfg, grad_ckpt=True))
        if n <= budget:
            found.append(f"grad_ckpt: true ({fmt_bytes(n)})")
    if cfg.method != "qlora" and cfg.base_bits == 16:
        q = replace(cfg, method="qlora", base_bits=4)
        for ckpt in (cfg.grad_ckpt, True):
            n = size(replace(q, grad_ckpt=ckpt))
            if n <= budget:
                found.append(f"--method qlora{' with grad_ckpt: true' if ckpt else ''} "
                             f"({fmt_bytes(n)})")
                break
    if cfg.batch_size > 1:
        n = size(replace(cfg, batch_size=1, grad_ckpt=True))
        if n <= budget:
            found.append(f"--batch-size 1 with grad_ckpt: true ({fmt_bytes(n)})")
    for length in SHORTER_LENGTHS:
        if length >= cfg.max_length:
            continue
        short = [_Truncated(list(e.input_ids[:length]), list(e.labels[:length]))
                 for e in examples]
        n = size(replace(cfg, max_length=length, grad_ckpt=True), short)
        if n <= budget:
            found.append(f"--max-length {length} with grad_ckpt: true ({fmt_bytes(n)})")
            break
    return found


def plan_before_load(cfg: TrainConfig, train_set: list[Any], steps: int,
                     device: torch.device, *, budget: int | None, rank: int = 0,
                     world: int = 1, sharded: bool = False) -> TrainConfig:
    """Size the run before loading; returns ``cfg`` (checkpointing switched on where that
    makes it fit) or raises :class:`RunWontFit`. ``budget`` is what the device can give
    this process (:func:`tunelab.memory.memory_budget_bytes`; ``None``: unknown, no check).
    ``sharded``: the run wraps in FSDP2 (:func:`shard_over_processes`).
    """
    if budget is None or not train_set:
        return cfg
    arch = model_arch(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if arch is None:
        return cfg
    planned, est = _planned_bytes(arch, cfg, train_set, steps, device, rank, world,
                                 sharded)
    if planned > budget and not cfg.grad_ckpt and cfg.grad_ckpt_auto:
        with_ckpt, est_ckpt = _planned_bytes(arch, replace(cfg, grad_ckpt=True), train_set,
                                             steps, device, rank, world, sharded)
        log.warning("gradient checkpointing on: the plan puts this run at %s without it, more "
                    "than the %s this %s has available (%s with it). Set grad_ckpt_auto: false "
                    "to keep it off.", fmt_bytes(planned), fmt_bytes(budget), device.type,
                    fmt_bytes(with_ckpt))
        cfg, planned, est = replace(cfg, grad_ckpt=True), with_ckpt, est_ckpt
    if planned > budget and device.type == "cpu" and cfg.return_freed_memory == "auto":
        returning, est_returning = _planned_bytes(
            arch, replace(cfg, return_freed_memory="on"), train_set, steps, device, rank, world,
            sharded)
        if returning < planned:
            log.warning("returning freed memory to the system: the plan puts this run at %s "
                        "with glibc keeping freed tensors, more than the %s available (%s "
                        "without; steps get slower). Set return_freed_memory: off to keep it.",
                        fmt_bytes(planned), fmt_bytes(budget), fmt_bytes(returning))
            cfg, planned, est = replace(cfg, return_freed_memory="on"), returning, est_returning
    if planned <= budget:
        log.info("plan: %s of the %s available on %s (%s)", fmt_bytes(planned),
                 fmt_bytes(budget), device.type, cfg.method)
        return cfg
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in est.components().items() if v != 0)
    alternatives = _alternatives(arch, cfg, train_set, steps, device, rank, world, budget,
                                 sharded)
    advice = ("What the plan says would fit: " + "; ".join(alternatives) + "."
              if alternatives else "Nothing the plan tried fits (qlora, checkpointing, "
              "batch 1, shorter sequences): use a smaller model or a larger device.")
    message = (f"this run needs about {fmt_bytes(planned)} and this {device.type} has "
               f"{fmt_bytes(budget)} available (plan: {parts}). {advice} "
               "Pass --force (force: true) to try anyway.")
    if cfg.force:
        log.warning("%s (--force: trying anyway)", message)
        return cfg
    raise RunWontFit(message)
