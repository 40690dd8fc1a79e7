"""The training recipe: one explicit loop, top to bottom.

    load model + tokenizer -> read, split, tokenize data -> attach LoRA (or unfreeze all)
    -> AdamW -> for each step: lr(step); accumulate micro-batches; clip; step
    -> validate / checkpoint every N steps -> save the adapter (or full model) + model card

Loss normalisation: an optimizer step sees micro-batches ``b_1..b_k`` holding ``n_1..n_k``
target tokens. Each micro-batch contributes ``sum_t loss_t / N`` with ``N = n_1 + ... + n_k``,
so the gradient is that of the mean over all target tokens of the step, whatever the split
into micro-batches (one micro-batch of 8 equals four of 2).

Everything the run writes lives under ``cfg.out``:

    adapter/ or model/      final weights (PEFT adapter or full HF checkpoint) + README.md
    best/                   the weights with the best validation loss (when validating)
    checkpoints/step-N/     resumable state (see tunelab.checkpoint)
    metrics.jsonl           one line per step: loss, val loss, lr, tokens, tokens/s, memory
    summary.json            final figures of the run
    run_config.json         the validated config
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from tunelab import adapters, checkpoint, data, models, preference, preflight, replay, trackers
from tunelab import distributed as dist
from tunelab.config import TrainConfig, save_config
from tunelab.data import mixture
from tunelab.errors import ConfigError, TunelabError
from tunelab.loss import TargetLoss, unwrap
from tunelab.memory import (
    fmt_bytes,
    memory_budget_bytes,
    model_memory_parts,
    peak_memory_bytes,
    reset_peak_memory,
    return_freed_memory,
)
from tunelab.objectives import PREFERENCE, build_objective
from tunelab.objectives.pairs import collate_pairs
from tunelab.packing import HOST_KEYS, collate_packed, supports_packing, use_packed_attention

log = logging.getLogger(__name__)


class TrainingDiverged(TunelabError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    out: Path
    weights_dir: Path
    steps: int
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    train_seconds: float
    tokens_per_second: float
    peak_memory_bytes: int
    data_stats: dict[str, int]
    interrupted: bool = False


# --------------------------------------------------------------------------- pieces


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then decay."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - progress)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    micro_per_epoch = max(1, -(-n_train // cfg.batch_size))
    return max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb  # only the 8-bit / paged variants need it

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw": bnb.optim.PagedAdamW}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# non-reentrant checkpointing: works with frozen inputs and with DDP/FSDP
CKPT_KWARGS = {"use_reentrant": False}


def enable_grad_ckpt(model: torch.nn.Module) -> None:
    """Gradient checkpointing on ``model`` (the transformers model under any wrapper)."""
    unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs=CKPT_KWARGS)


def prepare_model(cfg: TrainConfig, device: torch.device | None = None
                  ) -> tuple[torch.nn.Module, Any]:
    """Load the base and make the right parameters trainable for ``cfg.method``."""
    model, tokenizer = models.load_model(cfg.model, device=str(device or cfg.device),
                                         dtype=cfg.dtype,
                                         allow_pickle=cfg.allow_pickle,
                                         trust_remote_code=cfg.trust_remote_code,
                                         bits=cfg.base_bits, quant_type=cfg.quant_type,
                                         double_quant=cfg.double_quant)
    if cfg.base_bits != 16:
        from peft import prepare_model_for_kbit_training

        # Norms to fp32 and input gradients on, so checkpointing works through the frozen base.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.grad_ckpt,
            gradient_checkpointing_kwargs=CKPT_KWARGS)
    elif cfg.grad_ckpt:
        enable_grad_ckpt(model)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, tokenizer
    storage = getattr(model, "tunelab_checkpoint_dtype", None)
    if storage is not None:
        for p in model.parameters():
            p.requires_grad_(False)  # the base is frozen under adapters
        models.store_frozen_input_embedding(model, storage)
    if cfg.init_adapter:  # continue training an (SFT) adapter: its rank and targets hold
        return adapters.load_adapter(model, cfg.init_adapter, trainable=True), tokenizer
    model = adapters.attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha,
                                 dropout=cfg.lora_dropout, target_modules=cfg.target_modules,
                                 use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    return model, tokenizer


def load_datasets(cfg: TrainConfig, tokenizer: Any
                  ) -> tuple[list[Any], list[Any], data.DataStats]:
    """Train and validation examples: ``data.Example`` for SFT, ``PreferenceExample`` for
    the preference objectives."""
    kw = {"fmt": cfg.format, "max_length": cfg.max_length, "overlength": cfg.overlength,
          "train_on": cfg.train_on}
    if data.sources.is_source(cfg.data) and cfg.objective not in PREFERENCE:
        # `datasets` folders and hub ids stream
        train_set, val_set, stats = data.encode_source(
            cfg.data, tokenizer, split=cfg.split, columns=cfg.columns,
            val_fraction=0.0 if cfg.val_data else cfg.val_fraction, seed=cfg.seed, **kw)
        if cfg.val_data:
            val_set = data.encode_records(
                data.read_records(cfg.val_data, split=cfg.split, columns=cfg.columns),
                tokenizer, **kw)[0]
        return train_set, val_set, stats
    records = data.read_records(cfg.data, columns=cfg.columns)
    pairs = preference.is_preference(records)
    if pairs and cfg.objective not in PREFERENCE:
        raise ConfigError(f"{cfg.data} holds preference pairs (chosen/rejected); train on them "
                          "with objective: dpo or orpo (--objective dpo)")
    if cfg.objective in PREFERENCE and not pairs:
        raise data.DataError(f"objective: {cfg.objective} needs preference records "
                             "{\"prompt\", \"chosen\", \"rejected\"} (or chosen/rejected "
                             "conversations); the first record has the fields "
                             f"{', '.join(sorted(records[0].data)) or 'none'}",
                             path=cfg.data, line=records[0].line)
    if cfg.val_data:
        train_records, val_records = records, data.read_records(
            cfg.val_data, split=cfg.split, columns=cfg.columns)
    else:
        train_records, val_records = data.split_records(records, cfg.val_fraction, cfg.seed)
    if pairs:
        pkw = {"max_length": cfg.max_length, "overlength": cfg.overlength}
        train_set, stats = preference.encode_pairs(train_records, tokenizer, **pkw)
        val_set = (preference.encode_pairs(val_records, tokenizer, **pkw)[0]
                   if val_records else [])
        return train_set, val_set, stats
    train_set, stats = data.encode_records(train_records, tokenizer, **kw)
    val_set = data.encode_records(val_records, tokenizer, **kw)[0] if val_records else []
    return train_set, val_set, stats


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # packing bounds stay on the host: attention slices by them in every layer
    return {k: v if k in HOST_KEYS else v.to(device, non_blocking=True)
            for k, v in batch.items()}


@torch.no_grad()
def loss_sums(loss_fn: TargetLoss, examples: list[data.Example], batch_size: int,
              pad_id: int, device: torch.device) -> tuple[float, int]:
    """Summed loss and number of target tokens over a dataset (eval mode, no gradients)."""
    was_training = loss_fn.training
    loss_fn.eval()
    total, count = 0.0, 0
    for batch in data.iter_batches(examples, batch_size, pad_id):
        loss_sum, n = loss_fn(**to_device(batch, device))
        total += float(loss_sum)
        count += int(n)
    loss_fn.train(was_training)
    return total, count


def evaluate_loss(loss_fn: TargetLoss, examples: list[data.Example], batch_size: int,
                  pad_id: int, device: torch.device) -> float:
    """Mean loss per target token over a whole dataset."""
    total, count = loss_sums(loss_fn, examples, batch_size, pad_id, device)
    return total / max(1, count)


class MetricsLog:
    """Append-only JSONL of per-step metrics; on resume, lines past the checkpoint are cut."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line from a kill: everything before it is good
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def model_licence(model: torch.nn.Module) -> Any:
    """The base model's licence (alias table, GGUF metadata, model card, LICENSE file)."""
    from tunelab.licence import licence_for_model_source

    return licence_for_model_source(getattr(unwrap(model), "tunelab_source", None))


def save_weights(model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig, folder: Path,
                 metrics: dict[str, Any], *, info: dist.DistInfo | None = None,
                 sharded: bool = False) -> Path:
    """The final (or best) weights: a PEFT adapter, or a full HF checkpoint.

    Under FSDP every process takes part in gathering the full weights; rank 0 writes.
    """
    state_dict = None
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=cfg.is_lora))
    if info is not None and not info.is_main:
        return folder
    card = adapters.model_card(
        base_model=cfg.model, licence=model_licence(model).id,
        data=cfg.data, method=cfg.method,
        hyperparameters={k: cfg.to_dict()[k] for k in (
            "method", "base_bits", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr",
            "batch_size", "grad_accum", "max_length", "seed", "schedule", "train_on")},
        metrics=metrics)
    if cfg.is_lora:
        meta = {"base_model": cfg.model, "method": cfg.method, "base_bits": cfg.base_bits,
                "quant_type": cfg.quant_type, "double_quant": cfg.double_quant}
        return adapters.save_adapter(model, folder, card=card, meta=meta, state_dict=state_dict)
    with adapters.atomic_dir(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return folder


# --------------------------------------------------------------------------- the loop


@dataclass
class StepResult:
    loss: float  # the objective's mean loss over the whole step (all micro-batches, ranks)
    tokens: int  # non-padding tokens this process saw
    targets: int  # units of the step the metrics average over (target tokens, or pairs)
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, step means


def _step_totals(objective: torch.nn.Module, micro: list[dict[str, torch.Tensor]],
                 info: dist.DistInfo, device: torch.device) -> dict[str, float]:
    """Each loss unit's count over the step: every micro-batch, every process."""
    local: dict[str, int] = {}
    for batch in micro:
        for unit, n in objective.counts(batch).items():
            local[unit] = local.get(unit, 0) + n
    return {unit: max(1.0, dist.all_reduce_sum(n, info, device)) for unit, n in local.items()}


def train_step(step_fn: torch.nn.Module, micro: list[dict[str, torch.Tensor]],
               device: torch.device, info: dist.DistInfo,
               objective: torch.nn.Module | None = None) -> StepResult:
    """Forward and backward over one optimizer step's micro-batches (gradients accumulate).

    The objective returns each micro-batch's loss as sums per unit (target tokens, pairs);
    each sum is divided by N_unit, that unit's count over the step on all processes, so the
    accumulated gradient is that of the step's mean, however it is split. DDP averages
    gradients over the W processes, hence the factor W.
    """
    objective = objective if objective is not None else step_fn
    totals = _step_totals(objective, micro, info, device)
    loss_total = 0.0
    metric_sums: dict[str, float] = {}
    for i, batch in enumerate(micro):
        # DDP syncs gradients on the last micro-batch only.
        last = i == len(micro) - 1
        sync = step_fn.no_sync() if hasattr(step_fn, "no_sync") and not last else nullcontext()
        with sync:
            parts, metrics = step_fn(**to_device(batch, device))
            loss = sum(parts[unit] / totals[unit] for unit in parts)
            (loss * info.world).backward()
        loss_total += float(loss.detach())
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
    loss_total = dist.all_reduce_sum(loss_total, info, device)
    unit = objective.metric_unit
    units = getattr(objective, "metric_units", {})  # a metric averaged over another unit
    means = {name: dist.all_reduce_sum(value, info, device) / totals[units.get(name, unit)]
             for name, value in sorted(metric_sums.items())}
    tokens = sum(data.batch_tokens(b) for b in micro)
    return StepResult(loss_total, tokens, int(totals[unit]), means)


def collate_for(cfg: TrainConfig, examples: list[Any], pad_id: int
                ) -> dict[str, torch.Tensor]:
    """The micro-batch layout of the run: pair rows, one packed row, or padded rows."""
    if cfg.objective in PREFERENCE:
        return collate_pairs(examples)
    return collate_packed(examples) if cfg.packing else data.collate(examples, pad_id)


def step_batches(train_set: list[Any], schedule: data.BatchSchedule, step: int,
                 cfg: TrainConfig, pad_id: int, info: dist.DistInfo
                 ) -> list[dict[str, torch.Tensor]]:
    """This process's share of step ``step``: its slice of each global micro-batch."""
    out = []
    for j in range(cfg.grad_accum):
        indices = schedule.indices(step * cfg.grad_accum + j)
        mine = indices[info.rank * cfg.batch_size:(info.rank + 1) * cfg.batch_size]
        examples = [train_set[i] for i in mine or indices[-1:]]
        batch = collate_for(cfg, examples, pad_id)
        if not mine:  # an epoch's short last batch left this process nothing: no targets
            if "labels" not in batch:
                raise TunelabError("preference objectives run on one process (or a data set "
                                   "that fills every process's micro-batch)")
            batch["labels"].fill_(data.IGNORE_INDEX)
        out.append(batch)
    return out


@torch.no_grad()
def objective_eval(objective: torch.nn.Module, batches: Any, device: torch.device,
                   info: dist.DistInfo) -> tuple[float, dict[str, float]]:
    """The objective's mean loss and metrics over whole data (eval mode, no gradients)."""
    was_training = objective.training
    objective.eval()
    parts: dict[str, float] = {}
    counts: dict[str, float] = {}
    metric_sums: dict[str, float] = {}
    for batch in batches:
        for unit, n in objective.counts(batch).items():
            counts[unit] = counts.get(unit, 0) + n
        got, metrics = objective(**to_device(batch, device))
        for unit, value in got.items():
            parts[unit] = parts.get(unit, 0.0) + float(value)
        for name, value in metrics.items():
            metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
    objective.train(was_training)
    totals = {u: dist.all_reduce_sum(counts.get(u, 0), info, device) for u in sorted(counts)}
    loss = sum(dist.all_reduce_sum(parts.get(u, 0.0), info, device) / max(1.0, totals[u])
               for u in sorted(counts))
    n = max(1.0, totals.get(objective.metric_unit, 1.0))
    return loss, {k: dist.all_reduce_sum(v, info, device) / n
                  for k, v in sorted(metric_sums.items())}


def precompute_reference(objective: torch.nn.Module, examples: list[Any], cfg: TrainConfig,
                         device: torch.device) -> None:
    """Store the reference's log-probs on each pair, from the model as it is now (before the
    first update): the reference of full fine-tuning and of a run from ``init_adapter``."""
    was_training = objective.training
    objective.eval()
    with torch.no_grad():
        for start in range(0, len(examples), cfg.eval_batch_size):
            chunk = examples[start:start + cfg.eval_batch_size]
            logps, _ = objective.logps(**to_device(collate_pairs(chunk), device))
            values = logps.float().cpu().tolist()
            for i, ex in enumerate(chunk):
                ex.ref_logps = (values[2 * i], values[2 * i + 1])
    objective.train(was_training)


def validate(objective: torch.nn.Module, val_set: list[Any], cfg: TrainConfig, pad_id: int,
             device: torch.device, info: dist.DistInfo) -> tuple[float, dict[str, float]]:
    """Validation loss (the objective's mean) and metrics; each process takes every W-th
    example."""
    mine = val_set[info.rank::info.world]
    if cfg.objective in PREFERENCE:
        batches = (collate_pairs(mine[i:i + cfg.eval_batch_size])
                   for i in range(0, len(mine), cfg.eval_batch_size))
    else:
        batches = data.iter_batches(mine, cfg.eval_batch_size, pad_id)
    return objective_eval(objective, batches, device, info)


def train(cfg: TrainConfig, *, progress: bool = True) -> RunResult:
    """Run one training job described by ``cfg``; see the module docstring."""
    from tqdm.auto import tqdm

    info = dist.init_distributed(models.pick_device(cfg.device))
    device = dist.local_device(models.pick_device(cfg.device), info)
    out = Path(cfg.out)
    # Everything cheap first (tunelab.preflight): a 7B takes minutes to load.
    preflight.check_processes(cfg, info.world, out)
    if info.is_main:
        preflight.check_output_writable(out)
    tokenizer = models.load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    replayed = replay.plan(cfg, tokenizer)  # a replay source is one more mixture source
    mix = (mixture.load_mixture(cfg, tokenizer)
           if mixture.is_mixture(cfg.data) or replayed else None)
    if replayed and not replayed.pending:
        mix.add_replay(replayed.path, cfg, tokenizer, replayed.fmt)
    train_set, val_set, stats = mix.datasets() if mix else load_datasets(cfg, tokenizer)
    log.info("data: %d train / %d validation examples; %d truncated, %d dropped (max_length %d)",
             len(train_set), len(val_set), stats.n_truncated, stats.n_dropped, cfg.max_length)
    # a mixture's epoch can differ from its concatenation (replay adds rows to it)
    steps = total_steps(cfg, (mix.epoch_rows if mix else len(train_set)) // info.world)
    budget = memory_budget_bytes(device)
    sharded = preflight.shard_over_processes(cfg, train_set, steps, device, budget=budget,
                                             rank=info.rank, world=info.world)
    # every process must wrap the same way; one that needs FSDP decides for all
    sharded = dist.all_reduce_sum(int(sharded), info, device) > 0
    if sharded and cfg.replay_kl:
        # the base forward runs only on micro-batches holding a replay row: under FSDP the
        # processes would gather layers a different number of times and hang
        raise ConfigError("replay_kl does not run under parallel: fsdp; use parallel: ddp "
                          "(or replay_kl: 0)")
    cfg = preflight.plan_before_load(cfg, train_set, steps, device, budget=budget,
                                     rank=info.rank, world=info.world, sharded=sharded)
    if device.type == "cpu" and cfg.return_freed_memory == "on" and not return_freed_memory():
        log.warning("return_freed_memory: on has no effect here (not glibc)")
    # dropout differs per process, data order does not; so does LoRA's random init, which
    # DDP and wrap_data_parallel replace by rank 0's
    torch.manual_seed(cfg.seed + info.rank)
    load_start = time.perf_counter()
    model, tokenizer = prepare_model(cfg, device)
    load_seconds = time.perf_counter() - load_start
    load_peak = peak_memory_bytes(device)
    if replayed and replayed.pending:  # the base answers the general prompts, once
        if info.is_main:
            replay.answer_prompts(replayed, model, tokenizer)
        dist.barrier(info)
        mix.add_replay(replayed.path, cfg, tokenizer, replayed.fmt)
        train_set, val_set, stats = mix.datasets()
    # the training phase's own peak from here (the whole run's is the larger of the two)
    train_peak_known = reset_peak_memory(device)
    if cfg.objective in PREFERENCE:  # pair rows: always the packed attention function
        if not supports_packing(model):
            raise ConfigError(f"objective: {cfg.objective} needs a model whose attention goes "
                              "through transformers' attention interface (Llama, Qwen, "
                              f"Mistral, ...); {type(unwrap(model)).__name__} does not")
        use_packed_attention(model)
    elif cfg.packing:
        if supports_packing(model):
            use_packed_attention(model)
        else:
            log.info("packing off: %s does not use transformers' attention interface; "
                     "micro-batches are padded", type(unwrap(model)).__name__)
            cfg = replace(cfg, packing=False)
    if cfg.fused_kernels:
        from tunelab.dequant import fuse_4bit
        from tunelab.kernels import fuse_lora, fuse_rms_norm

        log.debug("fused kernels: %d LoRA layers, %d norms, %d 4-bit layers", fuse_lora(model),
                  fuse_rms_norm(model), fuse_4bit(model))

    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.3f%%)", f"{n_trainable:,}", f"{n_total:,}",
             100 * n_trainable / n_total)
    licence = model_licence(model)
    log.info("base model licence: %s (%s)", licence.id, licence.category)
    if licence.category in ("non-commercial", "unknown"):
        log.warning("licence %s is %s: %s. Check the terms before you use or share this "
                    "model.", licence.id, licence.category, licence.summary)
    loss_fn = build_objective(cfg, model).train()
    if cfg.objective == "dpo" and (cfg.precompute_ref or cfg.method == "full"
                                   or cfg.init_adapter):
        log.info("reference log-probs: computed once for %d train and %d validation pairs",
                 len(train_set), len(val_set))
        precompute_reference(loss_fn, train_set + val_set, cfg, device)
    step_fn = wrap_data_parallel(loss_fn, info, device, sharded,
                                 random_init=trainable if cfg.is_lora else None)
    # after sharding: FSDP replaces parameters by sharded DTensors the optimizer must own
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    global_batch = cfg.batch_size * info.world
    lengths = [len(e.input_ids) for e in train_set] if cfg.group_by_length else None
    schedule = (mix.schedule(global_batch, cfg.seed, cfg.group_by_length) if mix else
                data.BatchSchedule(len(train_set), global_batch, cfg.seed, lengths))

    state = checkpoint.TrainState(extra={"global_batch": global_batch})
    resume_from = checkpoint.latest_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, model, optimizer, sharded=sharded,
                                           rank=info.rank, device=device)
        preflight.check_resume_batch(state.extra.get("global_batch"), info.world,
                                     cfg.batch_size, resume_from)
        state.extra["global_batch"] = global_batch
        log.info("resumed from %s (step %d)", resume_from, state.step)
    elif cfg.resume:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    dist.barrier(info)  # nobody writes before every process has read the checkpoint
    metrics_log = None
    tracker = trackers.Trackers([], out, {})
    if info.is_main:
        save_config(cfg, out / "run_config.json")
        metrics_log = MetricsLog(out / "metrics.jsonl", state.step if resume_from else 0)
        tracker = trackers.Trackers(trackers.parse_report_to(cfg.report_to), out, asdict(cfg))

    stop_requested = {"flag": False}

    def request_stop(signum: int, frame: Any) -> None:  # Ctrl-C / SIGTERM: finish the step
        stop_requested["flag"] = True

    # Under torchrun a SIGTERM means a peer failed: die at once rather than wait in a
    # collective for a process that is gone.
    signals = (signal.SIGINT,) if info.enabled else (signal.SIGINT, signal.SIGTERM)
    old_handlers = {s: signal.signal(s, request_stop) for s in signals}
    bar = tqdm(total=steps, initial=state.step, disable=not (progress and info.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    last_train_loss = last_val_loss = None
    window_tokens, window_start = 0, time.perf_counter()
    last_saved = state.step if resume_from else -1
    try:
        while state.step < steps and not _should_stop(stop_requested, info, device):
            step_start = time.perf_counter()
            lr = lr_at(state.step, cfg, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = step_batches(train_set, schedule, state.step, cfg, pad_id, info)
            result = train_step(step_fn, micro, device, info, loss_fn)
            if not math.isfinite(result.loss):
                raise TrainingDiverged(
                    f"loss is {result.loss} at step {state.step + 1}; stopping. The last good "
                    f"checkpoint is kept in {checkpoint.checkpoint_root(out)}. Lower lr "
                    f"(now {cfg.lr}) or check the data.")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            state.step += 1
            state.tokens_seen += result.tokens * info.world
            state.target_tokens_seen += result.targets
            step_seconds = time.perf_counter() - step_start
            state.train_seconds += step_seconds
            window_tokens += result.tokens * info.world
            last_train_loss = result.loss
            record: dict[str, Any] = {
                "step": state.step,
                "epoch": round(schedule.epoch_of(state.step * cfg.grad_accum), 4),
                "train_loss": result.loss, "lr": lr, "tokens": state.tokens_seen,
                "target_tokens": state.target_tokens_seen,
                "tokens_per_s": result.tokens * info.world / max(1e-9, step_seconds),
                "peak_memory": peak_memory_bytes(device),
                **result.metrics,
            }
            if val_set and cfg.eval_every and (state.step % cfg.eval_every == 0
                                               or state.step == steps):
                if mix is not None:  # per source too: val_loss/<source name>
                    last_val_loss, val_metrics = mix.validate(lambda part: validate(
                        loss_fn, part, cfg, pad_id, device, info)[0], info.world)
                else:
                    last_val_loss, val_metrics = validate(loss_fn, val_set, cfg, pad_id,
                                                          device, info)
                record["val_loss"] = last_val_loss
                record.update({f"val_{k}": v for k, v in val_metrics.items()})
                if state.best_val_loss is None or last_val_loss < state.best_val_loss:
                    state.best_val_loss, state.best_step = last_val_loss, state.step
                    state.evals_without_improvement = 0
                    save_weights(model, tokenizer, cfg, out / "best",
                                 {"step": state.step, "val_loss": round(last_val_loss, 4)},
                                 info=info, sharded=sharded)
                else:
                    state.evals_without_improvement += 1
            if metrics_log is not None:
                metrics_log.write(record)
            tracker.log(state.step, record)
            elapsed = time.perf_counter() - window_start
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{window_tokens / elapsed:.0f}",
                            **({"val": f"{last_val_loss:.4f}"} if last_val_loss else {}))
            bar.update(1)
            if cfg.save_every and state.step % cfg.save_every == 0:
                _save_checkpoint(out, model, optimizer, state, cfg, trainable, info, sharded)
                last_saved = state.step
            if (cfg.early_stopping_patience
                    and state.evals_without_improvement >= cfg.early_stopping_patience):
                log.info("early stopping at step %d: no validation improvement in %d evals",
                         state.step, cfg.early_stopping_patience)
                break
    except BaseException as exc:  # the tracker runs close as failed, not left open
        tracker.fail(exc)
        raise
    finally:
        bar.close()
        if metrics_log is not None:
            metrics_log.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    interrupted = stop_requested["flag"] and state.step < steps
    if last_saved != state.step and (interrupted or cfg.save_every):
        _save_checkpoint(out, model, optimizer, state, cfg, trainable, info, sharded)
    if interrupted:
        log.warning("interrupted at step %d; checkpoint saved. Continue with --resume.",
                    state.step)
    _check_finite(trainable, state.step, out, info, device)
    train_peak = peak_memory_bytes(device)
    peak = max(load_peak, train_peak) if train_peak_known else train_peak
    final_metrics = {"steps": state.step, "train_loss": _round(last_train_loss),
                     "val_loss": _round(last_val_loss), "best_val_loss":
                     _round(state.best_val_loss), "best_step": state.best_step}
    weights_dir = out / ("adapter" if cfg.is_lora else "model")
    save_weights(model, tokenizer, cfg, weights_dir, final_metrics, info=info, sharded=sharded)
    tokens_per_s = state.tokens_seen / max(1e-9, state.train_seconds)
    result = RunResult(out=out, weights_dir=weights_dir, steps=state.step,
                       final_train_loss=last_train_loss, final_val_loss=last_val_loss,
                       best_val_loss=state.best_val_loss, best_step=state.best_step,
                       train_seconds=state.train_seconds, tokens_per_second=tokens_per_s,
                       peak_memory_bytes=peak, data_stats=stats.as_dict(),
                       interrupted=interrupted)
    if info.is_main:
        summary = {**asdict(result), "out": str(out), "weights_dir": str(weights_dir),
                   "trainable_parameters": n_trainable, "total_parameters": n_total,
                   "processes": info.world, "optimizer": type(optimizer).__name__,
                   "memory_parts": model_memory_parts(model, optimizer),
                   "load_seconds": load_seconds, "load_peak_memory_bytes": load_peak,
                   "train_peak_memory_bytes": train_peak if train_peak_known else None,
                   "licence": {"id": licence.id, "category": licence.category,
                               "summary": licence.summary, "source": licence.source}}
        if mix is not None:
            summary["sources"] = mix.summary(schedule, state.step * cfg.grad_accum)
        if cfg.base_bits != 16:
            from tunelab.quant import quantized_layer_memory

            summary["quantized_layers"] = quantized_layer_memory(model)
        _write_json(out / "summary.json", summary)
        log.info("peak memory %s; %.0f tokens/s; weights in %s", fmt_bytes(peak), tokens_per_s,
                 weights_dir)
        from tunelab.plan import compare_to_run, run_estimate

        try:
            planned = run_estimate(model, cfg, train_set, state.step, rank=info.rank,
                                   world=info.world, sharded=sharded)[0]
            summary["planned_peak_memory_bytes"] = planned.total
            _write_json(out / "summary.json", summary)
        except Exception as exc:  # a model the planner cannot size: the run still stands
            log.debug("no plan for the summary: %s", exc)
        log.info("%s", compare_to_run(model, cfg, peak, train_set, state.step, rank=info.rank,
                                      world=info.world, sharded=sharded))
    dist.barrier(info)
    dist.shutdown(info)
    from tunelab.report.run import write_run_report
    report = write_run_report(out)
    if info.is_main:
        tracker.finish(summary, [p for p in (report, out / "report.json", out / "summary.json")
                                 if p is not None])
    return result


def _should_stop(flag: dict[str, bool], info: dist.DistInfo, device: torch.device) -> bool:
    """Every process stops at the same step, whichever of them was interrupted."""
    if not info.enabled:
        return flag["flag"]
    flag["flag"] = dist.all_reduce_sum(int(flag["flag"]), info, device) > 0
    return flag["flag"]


def _save_checkpoint(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: checkpoint.TrainState, cfg: TrainConfig,
                     trainable: list[torch.nn.Parameter], info: dist.DistInfo,
                     sharded: bool) -> None:
    """Rank 0 writes; sharded state is gathered by everyone first. Nobody runs ahead."""
    device = trainable[0].device
    _check_finite(trainable, state.step, Path(cfg.out), info, device)
    # every process's generators, so each gets its own dropout stream back on resume
    rng = dist.all_gather_tensors(checkpoint.local_rng_state(device), info, device)
    if sharded or info.is_main:
        try:
            checkpoint.save_checkpoint(out, model, optimizer, state, cfg.keep_checkpoints,
                                       sharded=sharded, write=info.is_main, rng=rng)
        except (OSError, SafetensorError) as exc:  # safetensors wraps ENOSPC in its own type
            previous = checkpoint.latest_checkpoint(out)
            kept = f"{previous} is intact" if previous else "no earlier checkpoint exists"
            raise TunelabError(
                f"could not write the checkpoint of step {state.step} to "
                f"{checkpoint.checkpoint_root(out)}: {getattr(exc, 'strerror', None) or exc}. "
                f"{kept}. Free "
                "space (or lower keep_checkpoints) and continue with --resume.") from None
    dist.barrier(info)


def wrap_data_parallel(loss_fn: TargetLoss, info: dist.DistInfo, device: torch.device,
                       sharded: bool, random_init: list[torch.nn.Parameter] | None = None
                       ) -> torch.nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (weights, gradients and
    optimizer state sharded over processes, each decoder layer gathered when it runs).

    ``random_init``: parameters each process initialised from its own generator (LoRA's),
    which FSDP2 must first take from rank 0; everything read from the checkpoint files is
    the same on every process already."""
    if not info.enabled:
        return loss_fn
    if sharded:
        from torch.distributed.fsdp import fully_shard

        # Every process seeds its generator with seed + rank (its own dropout masks), so
        # each drew different random LoRA A matrices when the adapters were attached. DDP
        # hides this by broadcasting rank 0's parameters when it wraps the model; FSDP2
        # does not, and would keep rank 0's rows of A in one shard and rank 1's in the
        # other: a model neither process nor a one-process run has. B starts at zero, so
        # the first loss agrees and the losses drift from step 2 on (the drift that kept
        # LoRA off FSDP). Adapters are small; the base is not broadcast.
        dist.broadcast_from_rank0(list(random_init or []), info)
        for layer in getattr(loss_fn.backbone, "layers", []):
            fully_shard(layer)
        fully_shard(loss_fn)
        return loss_fn
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(loss_fn,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def _check_finite(params: list[torch.nn.Parameter], step: int, out: Path,
                  info: dist.DistInfo | None = None, device: torch.device | None = None) -> None:
    """Refuse to save weights an update has made inf/NaN: the last good checkpoint stays."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]  # FSDP shards
    bad = sum(0 if bool(torch.isfinite(p).all()) else 1 for p in local)
    if info is not None and device is not None:
        bad = dist.all_reduce_sum(bad, info, device)
    if bad:
        raise TrainingDiverged(
            f"weights became NaN or infinite at step {step}; stopping without saving them. "
            f"The last good checkpoint is kept in {checkpoint.checkpoint_root(out)}. "
            "Lower lr or check the data.")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
