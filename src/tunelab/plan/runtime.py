"""The plan next to a real run: what ``tunelab train`` prints when it finishes.

:func:`run_estimate` rebuilds the estimator's inputs from the trained model, the run's config
and the micro-batches the run actually processed; :func:`compare_to_run` puts that estimate
next to the measured peak in one line. torch is only imported inside the functions, so
importing :mod:`tunelab.plan` stays light.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.errors import ConfigError
from tunelab.plan.catalog import Arch, arch_from_hf_config
from tunelab.plan.estimate import MemoryEstimate, estimate_memory, normalise_targets

CALIBRATED_WITHIN = 0.15  # the tolerance tests/plan/test_calibration.py holds the CPU model to

_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "paged_adamw8bit": "adamw8bit",
               "paged_adamw": "paged"}
_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def dtype_name(dtype: Any) -> str:
    """The plan's name for a torch dtype (fp32, bf16, fp16); fp32 for anything else."""
    return _DTYPES.get(str(dtype), "fp32")


@dataclass(frozen=True)
class RunShape:
    """The largest micro-batch a run processed (padding included) and its target count."""

    batch: int
    width: int
    targets: int

    @property
    def tokens(self) -> int:
        return self.batch * self.width


def run_shape(examples: Sequence[Any], batch_size: int, seed: int, micro_batches: int, *,
              rank: int = 0, world: int = 1, packed: bool = False,
              group_by_length: bool = False) -> RunShape:
    """Replay the trainer's :class:`tunelab.data.BatchSchedule` for the first
    ``micro_batches`` micro-batches and return the largest one this rank saw.

    Micro-batches are right-padded to their longest example, so the tokens of a micro-batch
    are ``len(batch) x longest``; targets are label positions after the first one (the loss
    predicts token t+1 from position t). The largest token count and the largest target count
    are taken separately (an upper bound when they come from different micro-batches).
    A packed micro-batch (``packed``) is one row of ``sum(lengths)`` tokens, no padding.
    """
    from tunelab.data import IGNORE_INDEX, BatchSchedule

    if not examples:
        raise ConfigError("no training examples to size the run from")
    lengths = [len(e.input_ids) for e in examples]
    targets = [sum(1 for t in e.labels[1:] if t != IGNORE_INDEX) for e in examples]
    schedule = BatchSchedule(len(examples), batch_size * world, seed,
                             lengths if group_by_length else None)
    best_tokens, best = 0, RunShape(1, max(lengths), max(targets))
    best_targets = 0
    for k in range(max(1, micro_batches)):
        indices = schedule.indices(k)
        mine = indices[rank * batch_size:(rank + 1) * batch_size] or indices[-1:]
        rows, width = len(mine), max(lengths[i] for i in mine)
        if packed:
            rows, width = 1, sum(lengths[i] for i in mine)
        if rows * width > best_tokens:
            best_tokens, best = rows * width, RunShape(rows, width, 0)
        best_targets = max(best_targets, sum(targets[i] for i in mine))
    return RunShape(best.batch, best.width, best_targets)


def returns_freed_memory(cfg: Any) -> bool:
    """Whether the run hands freed tensors back to the system (then the CPU heap-retention
    term does not apply): ``return_freed_memory: on``, or glibc told so by environment."""
    from tunelab.memory import allocator_returns_memory

    return getattr(cfg, "return_freed_memory", "auto") == "on" or allocator_returns_memory()


def plan_run(arch: Arch, cfg: Any, examples: Sequence[Any], steps: int, *, device: str,
             dtype: str, adapter_dtype: str = "fp32", rank: int = 0, world: int = 1,
             sharded: bool = False) -> tuple[MemoryEstimate, RunShape]:
    """The plan's estimate for a run of ``cfg`` over ``examples`` (the tokenized training
    set) for ``steps`` optimizer steps, on ``device`` (``cpu``/``cuda``) computing in ``dtype``.

    This is the one computation behind the check ``tunelab train`` makes before it loads the
    model (refuse a run that will not fit, switch gradient checkpointing on), the line it
    prints at the end, and ``tunelab plan`` for a config (``tunelab plan CONFIG.yaml``).
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"the plan has no memory model for device '{device}'")
    shape = run_shape(examples, cfg.batch_size, cfg.seed, steps * cfg.grad_accum,
                      rank=rank, world=world, packed=getattr(cfg, "packing", False),
                      group_by_length=getattr(cfg, "group_by_length", False))
    method = cfg.method
    quant = "nf4-dq"
    bits = getattr(cfg, "base_bits", 16)
    if method != "full" and bits == 4:
        method = "qlora"
        quant = "nf4-dq" if getattr(cfg, "double_quant", True) else "nf4"
    elif method != "full" and bits == 8:
        method, quant = "qlora", "int8"
    try:
        targets = normalise_targets(cfg.target_modules)
    except ConfigError:
        targets = None  # module names the planner does not know: size as all-linear
    est = estimate_memory(
        arch, method=method, seq=shape.width, batch=shape.batch, device=device, dtype=dtype,
        grad_ckpt=bool(cfg.grad_ckpt), optimizer=_OPTIMIZERS.get(cfg.optimizer, "adamw"),
        lora_r=cfg.lora_r, lora_targets=targets, adapter_dtype=adapter_dtype, quant=quant,
        target_fraction=min(1.0, max(shape.targets, 1) / shape.tokens),
        gpus=world if device == "cuda" else 1, parallel="fsdp" if sharded else "ddp",
        heap_retention=0.0 if returns_freed_memory(cfg) else None)
    return est, shape


def run_estimate(model: Any, cfg: Any, examples: Sequence[Any], steps: int, *,
                 rank: int = 0, world: int = 1, sharded: bool = False
                 ) -> tuple[MemoryEstimate, RunShape]:
    """:func:`plan_run` for a run that trained ``model``: its shape, device and dtypes read
    from the model itself."""
    from tunelab.loss import unwrap

    inner = unwrap(model)
    arch = arch_from_hf_config(inner.config.to_dict())
    stored = getattr(inner, "tunelab_checkpoint_dtype", None)  # the config now says fp32
    if stored is not None:
        arch = dataclasses.replace(arch, weight_dtype=str(stored).removeprefix("torch."))
    from tunelab.models import pick_dtype

    params = list(model.parameters())
    device = params[0].device.type if params else "cpu"
    # the run's compute dtype, not the embeddings' (k-bit preparation keeps those in fp32)
    dtype = dtype_name(pick_dtype(cfg.dtype, params[0].device)) if params \
        else "fp32"
    trainable = [p for p in params if p.requires_grad]
    adapter_dtype = dtype_name(trainable[0].dtype) if trainable else "fp32"
    return plan_run(arch, cfg, examples, steps, device=device, dtype=dtype,
                    adapter_dtype=adapter_dtype, rank=rank, world=world, sharded=sharded)


def compare_to_run(model: Any, cfg: Any, measured_peak_bytes: int, examples: Sequence[Any],
                   steps: int, *, rank: int = 0, world: int = 1, sharded: bool = False) -> str:
    """One line: the measured peak next to the plan's estimate for the same run.

    On CPU the measured peak is the process's peak RSS, compared with the whole estimate; on
    CUDA it is ``torch.cuda.max_memory_allocated``, which leaves out the CUDA context, so the
    estimate's overhead term is left out too. Never raises: a run that cannot be sized says
    so instead.
    """
    from tunelab.plan.report import fmt_bytes

    try:
        est, shape = run_estimate(model, cfg, examples, steps, rank=rank, world=world,
                                  sharded=sharded)
    except Exception as exc:  # the comparison must never fail a finished run
        return f"plan: no memory estimate for this run ({exc})"
    device = est.settings["device"]
    planned = est.total - (est.overhead if device == "cuda" else 0)
    what = "peak RSS" if device == "cpu" else "peak allocated"
    err = planned / measured_peak_bytes - 1 if measured_peak_bytes > 0 else float("nan")
    line = (f"memory: {what} {fmt_bytes(measured_peak_bytes)} measured, "
            f"{fmt_bytes(planned)} planned ({err:+.0%}) for {est.method}, batch {shape.batch}"
            f" x {shape.width} tokens, {shape.targets} target tokens, {device} "
            f"{est.settings['dtype']}")
    if device == "cpu" and abs(err) > CALIBRATED_WITHIN:
        line += (f" - further off than the {CALIBRATED_WITHIN:.0%} the CPU model is "
                 f"calibrated to")
    return line


__all__ = ["CALIBRATED_WITHIN", "RunShape", "compare_to_run", "dtype_name", "plan_run",
           "run_estimate", "run_shape"]
