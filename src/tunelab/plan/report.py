"""Turn estimates into a plan: the side-by-side table, the recommendation and advice.

:func:`build_plan` runs the estimator for every method (full, lora, qlora), decides what fits
on the chosen GPU, and derives advice from the numbers (what gradient checkpointing or an 8-bit
optimizer would save, how many GPUs full fine-tuning needs, ...). :func:`format_plan` renders
it as text; :meth:`Plan.to_dict` as JSON-ready data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import ConfigError
from tunelab.licence import LicenceInfo, classify_licence, read_model_licence
from tunelab.plan.catalog import (
    GPU,
    GPUS,
    Arch,
    ResolvedModel,
    _hub_file,
    get_gpu,
    resolve_model,
)
from tunelab.plan.estimate import (
    CPU_HEAP_RETENTION,
    CUDA_CONTEXT_BYTES,
    DEFAULT_HEADROOM,
    DEFAULT_UTILIZATION,
    METHODS,
    OPTIMIZER_BYTES_PER_PARAM,
    QLORA_SLOWDOWN,
    FitStatus,
    MemoryEstimate,
    TimeEstimate,
    cpu_overhead_bytes,
    estimate_memory,
    estimate_time,
    fit_status,
    layer_activation_bytes,
    normalise_targets,
    quant_bits_per_weight,
    training_flops_per_token,
    usable_bytes,
)

GiB = 1024**3
MiB = 1024**2
MAX_GPUS_SEARCHED = 64  # "needs N GPUs" advice looks this far


# ================================================================================= formatting
def fmt_bytes(n: float) -> str:
    if n <= 0:
        return "-"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


def _signed_bytes(n: float) -> str:
    return f"-{fmt_bytes(-n)}" if n < 0 else fmt_bytes(n)


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if n / scale < 100 else f"{n / scale:.0f}{unit}"
    return f"{n:.0f}"


def fmt_duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


def fmt_pct(x: float) -> str:
    if x >= 0.995:
        return f"{x * 100:.0f}%"
    if x >= 0.01:
        return f"{x * 100:.2g}%" if x < 0.1 else f"{x * 100:.0f}%"
    return f"{x * 100:.2g}%"


# ================================================================================= plan
@dataclass(frozen=True)
class MethodPlan:
    """One method's estimates on the planned hardware."""

    method: str
    label: str  # e.g. "bf16, r=16"
    memory: MemoryEstimate  # per device; with gpus > 1 the preferred parallel mode
    fit: FitStatus
    parallel: str | None  # "ddp" / "fsdp" with gpus > 1
    by_parallel: dict[str, MemoryEstimate] = field(default_factory=dict)
    fit_by_parallel: dict[str, FitStatus] = field(default_factory=dict)
    min_gpus: int | None = None  # smallest FSDP world size that fits (None: > MAX or never)
    time: TimeEstimate | None = None

    @property
    def fits(self) -> bool:
        return self.fit != "no"


@dataclass
class Plan:
    arch: Arch
    source: str
    licence: LicenceInfo
    gpu: GPU
    gpus: int
    headroom: float
    settings: dict[str, Any]
    methods: dict[str, MethodPlan]  # every method, estimated
    shown: tuple[str, ...]  # methods the user asked to see
    tokens: int | None
    tokens_note: str
    utilization: float
    price_per_hour: float | None
    recommendation: str | None = None
    advice: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return usable_bytes(self.gpu, self.headroom)

    def to_dict(self) -> dict[str, Any]:
        a = self.arch
        return {
            "model": {"name": a.name, "key": a.key or None, "source": self.source,
                      "total_params": a.total_params, "layers": a.layers, "hidden": a.hidden,
                      "heads": a.heads, "kv_heads": a.kv_heads, "intermediate": a.intermediate,
                      "vocab": a.vocab, "tied_embeddings": a.tied_embeddings,
                      "experts": a.experts, "active_experts": a.active_experts},
            "licence": self.licence.to_dict() | {"warning": self.licence.warning},
            "gpu": {"key": self.gpu.key, "name": self.gpu.name,
                    "memory_bytes": self.gpu.memory_bytes, "usable_bytes": self.usable,
                    "headroom": self.headroom, "peak_tflops": self.gpu.peak_tflops,
                    "count": self.gpus},
            "settings": self.settings,
            "methods": {
                name: {
                    "label": mp.label,
                    "memory": mp.memory.to_dict(),
                    "fit": mp.fit,
                    "parallel": mp.parallel,
                    "by_parallel": {k: v.to_dict() | {"fit": mp.fit_by_parallel[k]}
                                    for k, v in mp.by_parallel.items()},
                    "min_gpus_fsdp": mp.min_gpus,
                    "time": mp.time.to_dict() if mp.time else None,
                }
                for name, mp in self.methods.items() if name in self.shown
            },
            "recommendation": self.recommendation,
            "advice": self.advice,
            "assumptions": self.assumptions,
            "tokens": self.tokens,
        }


def _label(method: str, dtype: str, quant: str, lora_r: int) -> str:
    if method == "full":
        return dtype
    if method == "lora":
        return f"{dtype}, r={lora_r}"
    return f"{quant.replace('-dq', '+dq')}, r={lora_r}"


def _resolve_licence(resolved: ResolvedModel) -> LicenceInfo:
    arch = resolved.arch
    if resolved.source in ("config.json", "gguf") and resolved.path is not None:
        info = read_model_licence(resolved.path)
        if info.category == "unknown" and arch.licence != "unknown":
            return classify_licence(arch.licence, source=resolved.source)
        return info
    if resolved.source == "hub":
        try:
            return read_model_licence(_hub_file(arch.name, "README.md").parent)
        except Exception:  # no card, or offline by now: fall back to config.json's key
            return classify_licence(arch.licence, source="config.json")
    return read_model_licence(arch)


def _estimate(arch: Arch, method: str, common: dict[str, Any], gpus: int = 1,
              parallel: str = "ddp", **overrides: Any) -> MemoryEstimate:
    return estimate_memory(arch, method=method, gpus=gpus, parallel=parallel,
                           **(common | overrides))


def _min_fsdp_gpus(arch: Arch, method: str, common: dict[str, Any], gpu: GPU,
                   headroom: float) -> int | None:
    for n in range(2, MAX_GPUS_SEARCHED + 1):
        est = _estimate(arch, method, common, gpus=n, parallel="fsdp")
        if fit_status(est, gpu, headroom) != "no":
            return n
        unshardable = est.activations + est.logits + est.overhead + est.workspace
        if unshardable > usable_bytes(gpu, headroom):
            return None  # activations alone do not fit: more GPUs never help
    return None


def build_plan(
    model: str | Arch,
    *,
    methods: Sequence[str] = METHODS,
    gpu: str | GPU = "24GB",
    gpus: int = 1,
    seq: int = 2048,
    batch: int = 1,
    grad_ckpt: bool = False,
    optimizer: str = "adamw",
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    dtype: str | None = None,
    adapter_dtype: str = "fp32",
    quant: str = "nf4-dq",
    target_fraction: float = 1.0,
    attention: str = "sdpa",
    headroom: float = DEFAULT_HEADROOM,
    utilization: float = DEFAULT_UTILIZATION,
    tokens: int | None = None,
    examples: int | None = None,
    avg_len: float | None = None,
    epochs: float = 1.0,
    price_per_hour: float | None = None,
    overhead_bytes: int | None = None,
    objective: str = "sft",
    return_freed_memory: bool = False,
) -> Plan:
    """Estimate every method for ``model`` on ``gpus`` x ``gpu`` and derive the advice.

    ``model`` is anything :func:`~tunelab.plan.catalog.resolve_model` accepts, or an
    :class:`Arch`. Training tokens come from ``tokens`` or ``examples * avg_len``, times
    ``epochs``; without them the time table is per 1M tokens.

    ``objective: dpo`` accounts for the reference model: no second copy in memory (LoRA /
    QLoRA: the base with adapters off; full: reference log-probs precomputed once), and its
    forward passes in the time (see ``training_flops_per_token``). ``orpo`` has none.
    """
    if objective not in ("sft", "dpo", "orpo"):
        raise ConfigError(f"unknown objective {objective!r}: use sft, dpo or orpo")
    if isinstance(model, Arch):
        resolved = ResolvedModel(model, model.source)
    else:
        resolved = resolve_model(model)
    arch = resolved.arch
    licence = _resolve_licence(resolved)
    device = gpu if isinstance(gpu, GPU) else get_gpu(gpu)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method {unknown or methods}: use full, lora, qlora or all")
    if not 0 < headroom <= 1:
        raise ConfigError(f"headroom must be in (0, 1], got {headroom}")
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    quant_bits_per_weight(quant)  # validates
    dtype = dtype or device.default_dtype
    targets = normalise_targets(lora_targets)

    common: dict[str, Any] = dict(
        seq=seq, batch=batch, device=device.kind, dtype=dtype, grad_ckpt=grad_ckpt,
        optimizer=optimizer, lora_r=lora_r, lora_targets=targets, adapter_dtype=adapter_dtype,
        quant=quant, target_fraction=target_fraction, attention=attention,
        overhead_bytes=overhead_bytes)
    if device.kind == "cpu" and return_freed_memory:
        common["heap_retention"] = 0.0  # the run's return_freed_memory: on

    # Tokens for the time estimate.
    if tokens is not None and (examples is not None or avg_len is not None):
        raise ConfigError("give either --tokens or --examples with --avg-len, not both")
    if (examples is None) != (avg_len is None):
        raise ConfigError("--examples and --avg-len go together (tokens = examples x avg-len)")
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}")
    attn_seq = seq
    if examples is not None and avg_len is not None:
        if examples <= 0 or avg_len <= 0:
            raise ConfigError("--examples and --avg-len must be positive")
        dataset_tokens = int(examples * avg_len)
        attn_seq = int(min(avg_len, seq))
        tokens_note = (f"{fmt_count(examples)} examples x {avg_len:g} tokens x {epochs:g} "
                       f"epoch(s)")
    elif tokens is not None:
        if tokens <= 0:
            raise ConfigError(f"--tokens must be positive, got {tokens}")
        dataset_tokens = int(tokens)
        tokens_note = f"{fmt_count(tokens)} tokens x {epochs:g} epoch(s)"
    else:
        dataset_tokens = 0
        tokens_note = "per 1M training tokens (pass --tokens or --examples/--avg-len)"
    total_tokens = int(dataset_tokens * epochs) if dataset_tokens else 1_000_000

    plans: dict[str, MethodPlan] = {}
    for method in METHODS:
        by_parallel: dict[str, MemoryEstimate] = {}
        fit_by: dict[str, FitStatus] = {}
        if gpus == 1:
            est = _estimate(arch, method, common)
            by_parallel, fit_by = {}, {}
            chosen, fit, parallel = est, fit_status(est, device, headroom), None
        else:
            for mode in ("ddp", "fsdp"):
                by_parallel[mode] = _estimate(arch, method, common, gpus=gpus, parallel=mode)
                fit_by[mode] = fit_status(by_parallel[mode], device, headroom)
            parallel = next((m for m in ("ddp", "fsdp") if fit_by[m] == "yes"),
                            next((m for m in ("ddp", "fsdp") if fit_by[m] != "no"), "fsdp"))
            chosen, fit = by_parallel[parallel], fit_by[parallel]
        single = chosen if gpus == 1 else _estimate(arch, method, common)
        min_gpus = None
        if fit_status(single, device, headroom) == "no":
            min_gpus = _min_fsdp_gpus(arch, method, common, device, headroom)
        ref = 0.0
        if objective == "dpo":
            ref = 1.0 / epochs if method == "full" else 1.0
        time = estimate_time(
            arch, method, tokens=total_tokens, gpu=device, gpus=gpus, utilization=utilization,
            seq=attn_seq, grad_ckpt=grad_ckpt, lora_r=lora_r, lora_targets=targets,
            target_fraction=target_fraction, price_per_hour=price_per_hour,
            reference_passes=ref)
        plans[method] = MethodPlan(method, _label(method, dtype, quant, lora_r), chosen, fit,
                                   parallel, by_parallel, fit_by, min_gpus, time)

    shown = tuple(m for m in METHODS if m in methods)
    plan = Plan(
        arch=arch, source=resolved.source, licence=licence, gpu=device, gpus=gpus,
        headroom=headroom,
        settings={k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in common.items()}
        | {"methods": list(shown), "epochs": epochs, "objective": objective},
        methods=plans, shown=shown, tokens=dataset_tokens or None, tokens_note=tokens_note,
        utilization=utilization, price_per_hour=price_per_hour)
    plan.recommendation = next((m for m in shown if plans[m].fits), None)
    plan.advice = _advice(plan, common)
    plan.assumptions = _assumptions(plan, common)
    return plan


# ================================================================================= advice
def _advice(plan: Plan, common: dict[str, Any]) -> list[str]:
    """Lines that follow from the numbers; each names the saving or the count it rests on."""
    arch, gpu, methods = plan.arch, plan.gpu, plan.methods
    shown = [methods[m] for m in plan.shown]
    out: list[str] = []
    where = f"{plan.gpus} x {gpu.label}" if plan.gpus > 1 else gpu.label

    # The method the advice is about: the recommended one, else the lightest shown.
    focus = methods[plan.recommendation] if plan.recommendation else min(
        shown, key=lambda mp: mp.memory.total)

    if plan.recommendation:
        extra = ""
        if len(plan.shown) > 1:
            extra = " (preference by quality: full > lora > qlora)"
        paged = " once paged optimizer state spills to CPU RAM" if focus.fit == "paged" else ""
        mode = f" with {focus.parallel.upper()}" if focus.parallel else ""
        out.append(f"Best choice: {focus.method} — the highest-quality method that fits on "
                   f"{where}{mode}{paged}{extra}.")
    else:
        out.append(f"Nothing shown fits on {where} at seq {common['seq']}, batch "
                   f"{common['batch']}.")

    # Gradient checkpointing.
    if not common["grad_ckpt"]:
        ckpt = {mp.method: _estimate(arch, mp.method, common, gpus=plan.gpus,
                                     parallel=mp.parallel or "ddp", grad_ckpt=True)
                for mp in shown}
        share = focus.memory.activations / focus.memory.total
        saved = focus.memory.total - ckpt[focus.method].total
        if share >= 0.2 and saved > 0:
            t = focus.time
            cost = ""
            if t is not None:
                with_ckpt = training_flops_per_token(
                    arch, focus.method, seq=common["seq"], grad_ckpt=True,
                    lora_r=common["lora_r"], lora_targets=common["lora_targets"],
                    target_fraction=common["target_fraction"])
                cost = (f" for {with_ckpt / t.flops_per_token - 1:.0%} more compute "
                        f"(one extra forward pass)")
            out.append(f"At seq {common['seq']} activations are {share * 100:.0f}% of the "
                       f"{focus.method} peak: --grad-ckpt saves {fmt_bytes(saved)}{cost}.")
        newly = [m for m, est in ckpt.items()
                 if not methods[m].fits and fit_status(est, gpu, plan.headroom) != "no"]
        if newly:
            out.append(f"With --grad-ckpt, {' and '.join(newly)} would fit on {where}.")

    # fp32 adapters on a 16-bit model: PEFT casts each adapted layer's input to fp32 and
    # lora_A keeps that copy.
    if focus.method != "full" and common["adapter_dtype"] != common["dtype"]:
        same = _estimate(arch, focus.method, common, gpus=plan.gpus,
                         parallel=focus.parallel or "ddp", adapter_dtype=common["dtype"])
        saved = focus.memory.total - same.total
        if saved >= 0.1 * focus.memory.total:
            out.append(f"{common['adapter_dtype']} LoRA weights make PEFT keep extra "
                       f"{common['adapter_dtype']} copies of every adapted layer's input: "
                       f"--adapter-dtype {common['dtype']} saves {fmt_bytes(saved)} for "
                       f"{focus.method}.")

    # 8-bit optimizer.
    if common["optimizer"] != "adamw8bit":
        for mp in shown:
            if mp.fits:
                continue
            est = _estimate(arch, mp.method, common, gpus=plan.gpus,
                            parallel=mp.parallel or "ddp", optimizer="adamw8bit")
            if fit_status(est, gpu, plan.headroom) != "no":
                mode = f" with {mp.parallel.upper()}" if mp.parallel else ""
                out.append(f"--optimizer adamw8bit cuts {mp.method}'s optimizer state from "
                           f"{fmt_bytes(mp.memory.optimizer)} to {fmt_bytes(est.optimizer)}: "
                           f"{mp.method} would fit{mode}.")

    # How many GPUs the better methods need: only where sharding is what is missing, i.e.
    # the unshardable part (activations, logits, overhead) leaves room on one device.
    usable = usable_bytes(gpu, plan.headroom)
    for mp in shown:
        if mp.fits or (plan.recommendation and METHODS.index(mp.method) >
                       METHODS.index(plan.recommendation)):
            continue
        name = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[mp.method]
        m = mp.memory
        if m.activations + m.logits + m.overhead > usable / 2:
            continue  # sharding is not the fix; the checkpointing / sequence advice is
        if mp.min_gpus:
            per = _estimate(arch, mp.method, common, gpus=mp.min_gpus, parallel="fsdp")
            tail = ""
            if plan.recommendation:
                tail = (f"; {plan.recommendation} fits on "
                        f"{'one' if plan.gpus == 1 else where}")
            out.append(f"{name} needs {mp.min_gpus} of these GPUs with FSDP "
                       f"({fmt_bytes(per.total)} each){tail}.")
        else:
            out.append(f"{name} does not fit on up to {MAX_GPUS_SEARCHED} x {gpu.label} with "
                       f"FSDP as configured.")

    if focus.fit == "paged":
        out.append(f"{focus.method} fits only by paging {fmt_bytes(focus.memory.pageable)} of "
                   f"optimizer state to CPU RAM: expect slower steps when it spills.")

    # Nothing fits even with checkpointing: the longest sequence and the smallest GPU where
    # the lightest method fits.
    lightest = min(shown, key=lambda mp: mp.memory.total).method
    ckpt_fits = fit_status(_estimate(arch, lightest, common, grad_ckpt=True), gpu,
                           plan.headroom) != "no"
    if not plan.recommendation and not ckpt_fits:
        s = common["seq"] // 2
        while s >= 128:
            est = _estimate(arch, lightest, common, seq=s, grad_ckpt=True)
            if fit_status(est, gpu, plan.headroom) != "no":
                out.append(f"{lightest} with --grad-ckpt fits on {gpu.label} up to about seq "
                           f"{s}.")
                break
            s //= 2
        light = _estimate(arch, lightest, common, grad_ckpt=True)
        if light.weights > usable:
            out.append(f"Even {lightest}'s base weights ({fmt_bytes(light.weights)}) exceed "
                       f"the usable memory of one {gpu.label}.")
        ckpt_common = common | {"grad_ckpt": True}
        n = _min_fsdp_gpus(arch, lightest, ckpt_common, gpu, plan.headroom)
        if n:
            out.append(f"{lightest} with --grad-ckpt needs {n} of these GPUs with FSDP.")
        bigger = [g for g in sorted(GPUS, key=lambda g: g.memory_bytes)
                  if g.memory_bytes > gpu.memory_bytes and fit_status(light, g, plan.headroom)
                  != "no"]
        if bigger:
            out.append(f"Smallest catalogue GPU where {lightest} with --grad-ckpt fits: "
                       f"{bigger[0].label} ({bigger[0].memory_gib:.0f} GiB).")

    # Logits: large vocabularies.
    logit_share = focus.memory.logits / focus.memory.total
    if logit_share >= 0.15:
        out.append(f"Logits are {logit_share * 100:.0f}% of the {focus.method} peak (vocab "
                   f"{arch.vocab}). The tunelab trainer computes logits only at target "
                   f"positions: --target-fraction (now {common['target_fraction']:g}) sets "
                   f"that share; shorter sequences also shrink them.")

    # Architecture notes.
    if arch.attn_softcap and common["attention"] == "sdpa":
        extra = layer_activation_bytes(arch, seq=common["seq"], batch=common["batch"],
                                       dtype_bytes=2, attention="eager") - \
            layer_activation_bytes(arch, seq=common["seq"], batch=common["batch"],
                                   dtype_bytes=2)
        layers = 1 if common["grad_ckpt"] else arch.layers
        out.append(f"{arch.name} uses attention logit soft-capping; if it trains with eager "
                   f"attention, add about {fmt_bytes(extra * layers)} of seq^2 attention "
                   f"scores (not included above).")
    if arch.experts > 1:
        out.append(f"{arch.name} holds all {arch.experts} experts in memory "
                   f"({fmt_count(arch.total_params)} params) but runs {arch.active_experts} per "
                   f"token; time uses the active parameters.")
    if arch.extra_note:
        out.append(f"{arch.name}: {arch.extra_note}.")
    if gpu.kind == "cuda" and not gpu.bf16 and common["dtype"] == "fp16":
        out.append(f"{gpu.name} has no bf16: estimates use fp16 (train with loss scaling).")
    if plan.licence.warning:
        out.append(plan.licence.warning)
    return out


def _assumptions(plan: Plan, common: dict[str, Any]) -> list[str]:
    gpu = plan.gpu
    overhead = common.get("overhead_bytes")
    if overhead is None:
        overhead = (cpu_overhead_bytes(plan.arch, plan.recommendation or plan.shown[-1])
                    if gpu.kind == "cpu" else CUDA_CONTEXT_BYTES)
    what = ("CPU process baseline (imports of python + torch + transformers [+ peft], trainer "
            "runtime, tokenizer; measured RSS)" if gpu.kind == "cpu" else "CUDA context")
    opt = common["optimizer"]
    objective = plan.settings.get("objective", "sft")
    lines = [
        f"usable memory = {plan.headroom:.0%} of {gpu.memory_gib:.1f} GiB = "
        f"{plan.usable / GiB:.1f} GiB per device; overhead = {what} {fmt_bytes(overhead)}",
        f"optimizer {opt}: {OPTIMIZER_BYTES_PER_PARAM[opt]} bytes per trainable param"
        + (" (paged: can spill to CPU RAM)" if opt == "paged" else "")
        + f"; full FT weights and gradients in {common['dtype']}; LoRA adapters in "
        f"{common['adapter_dtype']}, on {','.join(sorted(common['lora_targets']))}",
        f"qlora base: {common['quant']} = {quant_bits_per_weight(common['quant']):.3f} bits "
        f"per block-linear weight; embeddings, lm_head and norms in {common['dtype']}",
        f"activations: {common['attention'].upper()} attention, "
        f"{'gradient checkpointing' if common['grad_ckpt'] else 'no checkpointing'}, batch "
        f"{common['batch']} x seq {common['seq']}, logits at "
        f"{common['target_fraction']:.0%} of positions",
        f"time: {gpu.peak_tflops:g} TFLOP/s "
        f"{'assumed CPU peak (' + gpu.note + ')' if gpu.kind == 'cpu' else 'peak dense 16-bit'}"
        f" x {plan.utilization:.2f} "
        f"utilization (assumed) x {plan.gpus} GPU(s); full = 6N FLOPs/token, LoRA = 4N "
        f"(+attention; +1 forward with checkpointing); qlora x{QLORA_SLOWDOWN:g} for "
        f"dequantization (assumed)",
    ]
    if objective == "dpo":
        lines.append(
            "objective dpo: no second model in memory (LoRA/QLoRA: the reference is the base "
            "with adapters off, a no-gradient forward whose activations are freed before the "
            "training forward; full: reference log-probs precomputed once); time adds that "
            "forward: +1 forward per token for LoRA/QLoRA, +1/epochs for full; seq is the pair "
            "row prompt + chosen + rejected")
    elif objective == "orpo":
        lines.append("objective orpo: no reference model; seq is the pair row prompt + chosen "
                     "+ rejected")
    if gpu.kind == "cpu":
        lines.append(
            "cpu: peak RSS = the larger of the two ends of backward (saved activations + "
            "logits, or all gradients + the optimizer's temporaries), not their sum; "
            f"'allocator-held' = freed heap memory glibc keeps, {CPU_HEAP_RETENTION:g} x the "
            "heap-sized activations (measured; 0 with return_freed_memory: on, "
            "--return-freed-memory here)")
    if plan.gpus > 1:
        lines.append(f"{plan.gpus} GPUs: DDP replicates everything (+ gradient buckets); FSDP "
                     f"shards weights, gradients and optimizer state 1/{plan.gpus}, not "
                     f"activations")
    return lines


# ================================================================================= text
def _table(rows: list[list[str]]) -> list[str]:
    cells_rows = [r for r in rows if r[0] != "---"]
    widths = [max(len(r[i]) for r in cells_rows) for i in range(len(cells_rows[0]))]
    lines = []
    for row in rows:
        if row[0] == "---":
            lines.append("  ".join("-" * w for w in widths))
            continue
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return lines


_ROW_NAMES = {
    "weights": "weights",
    "adapters": "LoRA adapters",
    "gradients": "gradients",
    "optimizer": "optimizer state",
    "activations": "activations",
    "logits": "logits",
    "workspace": "workspace",
    "retained": "allocator-held",
    "overlap": "not resident at once",
    "overhead": "overhead",
}

_FIT_TEXT = {"yes": "yes", "paged": "yes (paged)", "no": "NO"}


def _memory_table(plan: Plan, estimates: dict[str, MemoryEstimate],
                  fits: dict[str, FitStatus], fit_label: str) -> list[str]:
    names = list(estimates)
    rows: list[list[str]] = [["", *names],
                             ["", *(plan.methods[m].label for m in names)], ["---"]]
    for comp, label in _ROW_NAMES.items():
        values = [getattr(estimates[m], comp) for m in names]
        if comp in ("adapters", "workspace", "retained", "overlap") and not any(values):
            continue
        rows.append([label, *(_signed_bytes(v) for v in values)])
    rows.append(["---"])
    rows.append(["total peak", *(fmt_bytes(estimates[m].total) for m in names)])
    rows.append(["trainable params", *(
        f"{fmt_count(estimates[m].trainable_params)} ({fmt_pct(estimates[m].trainable_share)})"
        for m in names)])
    rows.append([fit_label, *(_FIT_TEXT[fits[m]] for m in names)])
    return _table(rows)


def _time_table(plan: Plan) -> list[str]:
    names = list(plan.shown)
    times = {m: plan.methods[m].time for m in names}
    rows: list[list[str]] = [["", *names], ["---"]]
    rows.append(["FLOPs per token", *(fmt_count(times[m].flops_per_token) for m in names)])
    rows.append(["tokens/s", *(f"{times[m].tokens_per_second:,.0f}" for m in names)])
    rows.append(["time", *(fmt_duration(times[m].hours) for m in names)])
    if plan.price_per_hour is not None:
        rows.append(["cost", *(f"${times[m].cost:,.2f}" for m in names)])
    return _table(rows)


def format_plan(plan: Plan) -> str:
    """The plan as text: header, licence, memory table(s), time table, advice, assumptions."""
    a, gpu = plan.arch, plan.gpu
    key = f" ({a.key})" if a.key and a.key != a.name else ""
    lines = [
        f"tunelab plan: {a.name}{key}, {fmt_count(a.total_params)} params [{plan.source}]",
        f"  {a.describe()}",
        f"licence: {plan.licence.id} ({plan.licence.category}) - {plan.licence.summary}",
    ]
    if plan.licence.warning:
        lines.append(plan.licence.warning)
    s = plan.settings
    lines.append(
        f"device: {plan.gpus} x {gpu.name}, {gpu.memory_gib:.1f} GiB, usable "
        f"{plan.usable / GiB:.1f} GiB ({plan.headroom:.0%}) | seq {s['seq']} x batch "
        f"{s['batch']} | grad-ckpt {'on' if s['grad_ckpt'] else 'off'} | {s['optimizer']}")
    lines.append("")
    fit_label = f"fits {gpu.label} ({plan.usable / GiB:.1f} GiB)"
    if plan.gpus == 1:
        lines.append("Peak training memory")
        lines += _memory_table(plan, {m: plan.methods[m].memory for m in plan.shown},
                               {m: plan.methods[m].fit for m in plan.shown}, fit_label)
    else:
        for mode, title in (("ddp", "DDP: everything replicated"),
                            ("fsdp", "FSDP: weights/grads/optimizer sharded, activations not")):
            lines.append(f"Peak memory per device, {plan.gpus} GPUs, {title}")
            lines += _memory_table(
                plan, {m: plan.methods[m].by_parallel[mode] for m in plan.shown},
                {m: plan.methods[m].fit_by_parallel[mode] for m in plan.shown}, fit_label)
            lines.append("")
    lines.append("")
    lines.append(f"Training time on {plan.gpus} x {gpu.label}: {plan.tokens_note}")
    lines.append(f"  assumes {gpu.peak_tflops:g} TFLOP/s peak x {plan.utilization:.2f} "
                 f"utilization" + (f", ${plan.price_per_hour:g} per GPU-hour"
                                   if plan.price_per_hour is not None else ""))
    lines += _time_table(plan)
    lines.append("")
    lines += plan.advice
    lines.append("")
    lines.append("Assumptions:")
    lines += [f"  - {x}" for x in plan.assumptions]
    return "\n".join(lines)


__all__ = ["MethodPlan", "Plan", "build_plan", "format_plan", "fmt_bytes", "fmt_count",
           "fmt_duration"]
