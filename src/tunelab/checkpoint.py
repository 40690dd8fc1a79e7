"""Training checkpoints: everything needed to continue a run as if it never stopped.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` holding

* ``trainable.safetensors``: the trainable parameters (LoRA weights, or the whole model);
* ``optimizer.safetensors``: the optimizer's tensors and the RNG states;
* ``state.json``: step, counters, best validation loss, the optimizer's non-tensor state.

No pickle anywhere. The folder is written under a temporary name and renamed, and
``latest`` is updated by an atomic replace after that, so a crash (or a full disk) at any
moment leaves the previous checkpoint intact and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tunelab.adapters import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """The counters of a run; saved in ``state.json``."""

    step: int = 0
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state keyed by parameter name: tensors for safetensors, the rest for JSON.

    Nested dicts (bitsandbytes' 8-bit optimizers keep their quantized state under
    ``__bnb_optimizer_quant_state__``) become ``state/<param>/<key>/<subkey>``.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, dict):
            for sub, inner in value.items():
                put(f"{name}/{sub}", inner)
        elif isinstance(value, torch.Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:
            scalars[name] = value

    for param, slot in state_dict["state"].items():
        for key, value in slot.items():
            put(f"state/{param}/{key}", value)  # parameter names hold dots, never slashes
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if name.startswith("state/"):
            _, param, *keys = name.split("/")
            slot = state.setdefault(param, {})
            for key in keys[:-1]:
                slot = slot.setdefault(key, {})
            slot[keys[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _by_name(optim_sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's index-keyed optimizer state -> keyed by parameter name (as FSDP's is)."""
    return {"state": {names[i]: v for i, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                             for g in optim_sd["param_groups"]]}


def _by_index(optim_sd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in optim_sd["param_groups"]]}


def _trainable_names(model: torch.nn.Module) -> list[str]:
    # The optimizer was built over the trainable parameters in this order (tunelab.train).
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) trainable weights and optimizer state, keyed by parameter name.

    Sharded (FSDP) state is gathered with torch.distributed.checkpoint: a collective that
    every process must call; rank 0 receives the tensors on CPU.
    """
    if not sharded:
        names = _trainable_names(model)
        return trainable_state(model), _by_name(optimizer.state_dict(), names)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights, optim_sd = get_state_dict(model, optimizer, options=options)
    # The gathered dict lists tied weights (lm_head = embeddings) twice; keep the names
    # named_parameters uses, as the unsharded path does.
    names = {n for n, _ in model.named_parameters()}
    return {k: v.contiguous() for k, v in weights.items() if k in names}, optim_sd


def local_rng_state(device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """This process's generators: the CPU one, and its CUDA device's when it has one."""
    out = {"cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _rng_tensors(per_rank: list[dict[str, torch.Tensor]] | None) -> dict[str, torch.Tensor]:
    """RNG states to save: one set per process (``rng.rank{r}.cpu``/``.cuda``).

    Each process seeds its own generator (``seed + rank``: different dropout masks per
    process) and draws from it at its own pace, so restoring rank 0's state everywhere would
    give every other process the wrong masks after a resume. ``rng.cpu`` (and
    ``rng.cuda.{i}`` for a one-process run) stay for readers of older checkpoints.
    """
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and per_rank is None:
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    for rank, states in enumerate(per_rank or [local_rng_state()]):
        for kind, value in states.items():
            out[f"rng.rank{rank}.{kind}"] = value.detach().cpu().contiguous()
    if per_rank:
        out["rng.cpu"] = out["rng.rank0.cpu"].clone()  # safetensors refuses shared memory
    return out


def saved_rng_ranks(tensors: dict[str, torch.Tensor]) -> int:
    """How many processes' RNG states a checkpoint holds (0 for older checkpoints)."""
    return len({k.split(".")[1] for k in tensors if k.startswith("rng.rank")})


def _restore_rng(tensors: dict[str, torch.Tensor], rank: int,
                 device: torch.device | None) -> None:
    if f"rng.rank{rank}.cpu" in tensors:
        torch.set_rng_state(tensors[f"rng.rank{rank}.cpu"])
        cuda = tensors.get(f"rng.rank{rank}.cuda")
        if cuda is not None and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)
        return
    if saved_rng_ranks(tensors):
        # Resumed on more processes than wrote the checkpoint: this one has no saved stream
        # and keeps the fresh one seeded by the training loop.
        log.warning("the checkpoint holds the RNG state of %d process(es); process %d keeps "
                    "its freshly seeded generator (dropout masks differ from an "
                    "uninterrupted run)", saved_rng_ranks(tensors), rank)
        return
    if "rng.cpu" in tensors:  # an older checkpoint: one state for every process
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name. ``named_parameters`` lists tied weights once."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainState, keep: int, *, sharded: bool = False,
                    write: bool = True,
                    rng: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a checkpoint; with ``sharded`` every process calls this, only ``write`` writes.

    ``rng``: every process's generator states by rank (:func:`local_rng_state`, gathered by
    the caller); without it, this process's own.
    """
    root = checkpoint_root(out)
    final = root / f"step-{state.step:08d}"
    weights, optim_sd = _full_state(model, optimizer, sharded)
    if not write:
        return final
    tensors, meta = _flatten_optimizer(optim_sd)
    with atomic_dir(final) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file({**tensors, **_rng_tensors(rng)}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"train": asdict(state), "optimizer": meta},
                                                   indent=1))
    _write_latest(root, final.name)
    _prune(root, keep, protect={final.name})
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / ".latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def _prune(root: Path, keep: int, protect: set[str]) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run, or ``None``."""
    root = checkpoint_root(out)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "state.json").is_file():
            return candidate
    steps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())
    return steps[-1] if steps else None


def read_state(path: Path) -> TrainState:
    """A checkpoint's counters alone (``state.json``): cheap, before any model loads."""
    return TrainState(**json.loads((Path(path) / "state.json").read_text())["train"])


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    *, sharded: bool = False, rank: int = 0,
                    device: torch.device | None = None) -> TrainState:
    """Restore weights, optimizer and RNG from a checkpoint; return its counters.

    Process ``rank`` gets back the generator state that process ``rank`` saved.

    Checkpoints hold full tensors keyed by parameter name, so one written by N processes
    (replicated or sharded) loads into any number of processes.
    """
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match this model: {missing[:3]}")
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optim_sd = _unflatten_optimizer(tensors, meta["optimizer"])
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(_by_index(optim_sd, _trainable_names(model)))
    _restore_rng(tensors, rank, device)
    return TrainState(**meta["train"])
