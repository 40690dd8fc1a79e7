"""Peak training memory and training time for full fine-tuning, LoRA and QLoRA.

Everything is closed-form arithmetic on an :class:`~tunelab.plan.catalog.Arch`; nothing is
allocated. The peak is modelled as the sum of what is resident at the start of the backward
pass of a step after the first (when optimizer state exists):

    peak = weights + adapters + gradients + optimizer state + activations + logits
           + workspace + overhead

Summing gradients and activations is slightly conservative: during backward, activations are
freed layer by layer while gradients are produced. Memory is per device.

Calibration: ``estimate_memory(..., device="cpu", dtype="fp32")`` describes a CPU run, with
the measured baseline RSS of a process that imported torch + transformers + peft as the
overhead term (:data:`CPU_PROCESS_BASELINE_BYTES`, overridable with ``overhead_bytes``), so
the figure can be compared with a run's peak RSS.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tunelab.errors import ConfigError
from tunelab.plan.catalog import GPU, LINEAR_NAMES, Arch

Method = Literal["full", "lora", "qlora"]
# Preference by expected quality of the fine-tune: full > lora > qlora.
METHODS: tuple[str, ...] = ("full", "lora", "qlora")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "paged")
QUANTS: tuple[str, ...] = ("nf4-dq", "nf4", "int8")
PARALLEL: tuple[str, ...] = ("ddp", "fsdp")

DTYPE_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16"}

# Optimizer state bytes per trainable parameter.
#   adamw:     exp_avg + exp_avg_sq in fp32 = 2 x 4 bytes (as with fp32 or fp32-master
#              params; torch's AdamW on pure-bf16 params keeps bf16 state, i.e. half of this)
#   adamw8bit: bitsandbytes blockwise 8-bit states = 2 x 1 byte (block absmax ignored)
#   paged:     bitsandbytes paged AdamW (32-bit): same bytes as adamw, but in unified memory
#              that the driver can evict to CPU RAM under pressure instead of failing
OPTIMIZER_BYTES_PER_PARAM: dict[str, int] = {"adamw": 8, "adamw8bit": 2, "paged": 8}

# CUDA context + cuBLAS/cuDNN workspaces + allocator slack of a fresh PyTorch process: 0.5-1 GiB
# depending on GPU, driver and libraries loaded. A stated constant, overridable.
CUDA_CONTEXT_BYTES = 768 * 1024**2

# Peak RSS of `python -c 'import torch, transformers, peft'` measured with /usr/bin/time -v
# (Python 3.11, torch 2.13 CPU, transformers 5.24, peft 0.21): 396,440 kB, stable over runs.
# On CPU this replaces the CUDA context as the overhead term. Overridable (overhead_bytes).
CPU_PROCESS_BASELINE_BYTES = 396_440 * 1024

DEFAULT_HEADROOM = 0.95  # plan against 95% of device memory (fragmentation, spikes)
DEFAULT_UTILIZATION = 0.4  # achieved / peak dense FLOP/s: typical for single-node fine-tuning
# Wall-clock factor for 4-bit bitsandbytes base weights (dequantized on every matmul): QLoRA
# took ~39% longer than LoRA in S. Raschka's 2023 LoRA experiments. Stated assumption.
QLORA_SLOWDOWN = 1.4

NF4_BLOCKSIZE = 64  # bitsandbytes 4-bit: one absmax per 64 weights
DQ_BLOCKSIZE = 256  # double quant: one fp32 constant per 256 first-level absmax values


def quant_bits_per_weight(quant: str) -> float:
    """Storage bits per quantized weight, including quantization constants.

    * ``nf4``: 4 bits + one fp32 absmax per block of 64 = 4 + 32/64 = 4.5 bits.
    * ``nf4-dq`` (double quant): the absmax values are themselves quantized to 8 bits, with
      one fp32 constant per 256 of them: 4 + 8/64 + 32/(64*256) = 4.127 bits
      (overhead 0.127 bit/param instead of 0.5).
    * ``int8`` (LLM.int8): 8 bits; the per-row fp32 scales are added per linear by
      :func:`quantized_linear_bytes`.
    """
    if quant == "nf4":
        return 4 + 32 / NF4_BLOCKSIZE
    if quant == "nf4-dq":
        return 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * DQ_BLOCKSIZE)
    if quant == "int8":
        return 8.0
    raise ConfigError(f"unknown quantization '{quant}': use one of {', '.join(QUANTS)}")


def normalise_dtype(dtype: str) -> str:
    d = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if d not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_BYTES)}")
    return d


_TARGET_ALIASES = {"fc1": "up", "c_fc": "up", "fc_in": "up", "w1": "gate", "w3": "up",
                   "fc2": "down", "c_proj": "down", "fc_out": "down", "w2": "down",
                   "qkv": "q,k,v", "gate_up": "gate,up", "query": "q", "key": "k", "value": "v",
                   "dense": "o", "out": "o"}


def normalise_targets(targets: str | Iterable[str] | None) -> frozenset[str]:
    """LoRA target names as canonical linear names (q, k, v, o, gate, up, down).

    Accepts ``"all-linear"`` (default: every block linear, not the lm_head), a comma
    separated string, or names with the Hugging Face ``_proj`` suffix.
    """
    if targets is None:
        return frozenset(LINEAR_NAMES)
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: set[str] = set()
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name in ("all-linear", "all_linear", "all"):
            out.update(LINEAR_NAMES)
            continue
        name = name.removesuffix("_proj")
        for part in _TARGET_ALIASES.get(name, name).split(","):
            if part not in LINEAR_NAMES:
                raise ConfigError(f"unknown LoRA target '{raw}': use all-linear or any of "
                                  f"{', '.join(LINEAR_NAMES)} (q_proj style names work too)")
            out.add(part)
    if not out:
        raise ConfigError("LoRA targets are empty: use all-linear or names like q,v")
    return frozenset(out)


def lora_params(arch: Arch, r: int, targets: str | Iterable[str] | None = None) -> int:
    """Trainable LoRA parameters: for each adapted ``in x out`` linear, ``r * (in + out)``
    (A is ``r x in``, B is ``out x r``), over every layer and every expert copy."""
    if r <= 0:
        raise ConfigError(f"LoRA rank must be positive, got {r}")
    wanted = normalise_targets(targets)
    per_layer = sum(lin.count * r * (lin.in_features + lin.out_features)
                    for lin in arch.linears() if wanted.intersection(lin.covers))
    return arch.layers * per_layer


def quantized_linear_bytes(arch: Arch, quant: str) -> float:
    """Bytes of all block linear weights after quantization (biases excluded: they stay in
    the compute dtype)."""
    total = arch.linear_weight_params * quant_bits_per_weight(quant) / 8
    if quant == "int8":
        # One fp32 scale per output row of every matrix.
        total += arch.layers * sum(lin.count * lin.out_features * 4 for lin in arch.linears())
    return total


# ================================================================================= activations
def layer_activation_bytes(
    arch: Arch,
    *,
    seq: int,
    batch: int,
    dtype_bytes: int,
    method: str = "full",
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    adapter_bytes: int = 4,
    attention: str = "sdpa",
) -> int:
    """Bytes autograd saves for backward in ONE Llama-style block, for ``batch x seq`` tokens.

    Per token, with ``h`` hidden, ``q = heads * d_head``, ``kv = kv_heads * d_head``,
    ``i`` MLP width, ``b`` bytes of the compute dtype, ``n`` heads, ``P`` norms per block
    (2; 4 in Gemma 2/3)::

        attention, SDPA (flash / memory-efficient kernel: no seq^2 term)
            b*(q + 2*kv)   q, k, v after RoPE, saved by SDPA
            b*q            SDPA output (also the o_proj input)
            4*n            log-sum-exp per head (fp32)
        MLP, SwiGLU: down(silu(gate(x)) * up(x))
            3*b*i          gate(x) (the SiLU input), up(x) and silu(gate(x)) (product inputs)
          plain GELU MLP: b*i (the GELU input)
          MoE, k of E experts per token: k * 3*b*i + 4*E (fp32 router logits)
        norms (Hugging Face RMSNorm upcasts to fp32), per norm
            4*h            fp32 copy of the input (the variance backward needs it)
          q/k norms (Gemma 3): 4*(q + kv)
        linear inputs, kept for weight gradients
          full fine-tuning: every linear's input once, in b bytes:
            b*h (q/k/v input) + b*h (gate/up input) + b*i (down input; plain MLP: b*i after
            GELU) [o_proj's input is the SDPA output above], and each norm's normalised
            input b*h (for the norm weight's gradient): + P*b*h
          lora / qlora (frozen base: a frozen linear keeps nothing), per adapted linear with
          input width d, adapter dtype of a bytes:
            a*d            PEFT casts x to the adapter dtype when it differs from the compute
                           dtype, and lora_A keeps that copy (one per adapted linear); when
                           a == b the input tensor is kept once and shared (b*d per distinct
                           input, none extra for o_proj)
            a*r            lora_A output, kept for lora_B's weight gradient
          MoE experts: per token, k copies (one per chosen expert).

    Eager attention (``attention="eager"``, e.g. Gemma 2 with logit soft-capping) adds
    ``(2*b + 4) * n * seq^2`` per sample: the capped scores, the fp32 softmax output and its
    cast back to ``b``.
    """
    h, q, kv, i, b = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate, dtype_bytes
    moe = arch.experts > 1
    k = arch.active_experts if moe else 1
    # Internals every method keeps (they are needed for input gradients).
    per_token = b * (q + 2 * kv) + b * q + 4 * arch.heads
    per_token += k * (b * i if arch.mlp == "plain" else 3 * b * i)
    if moe:
        per_token += 4 * arch.experts
    per_token += arch.norms_per_layer * 4 * h
    if arch.qk_norm:
        per_token += 4 * (q + kv)
    if method == "full":
        down_in = b * i
        per_token += b * h + k * (b * h + down_in) + arch.norms_per_layer * b * h
    else:
        wanted = normalise_targets(lora_targets)
        shared_inputs: set[str] = set()
        for lin in arch.linears():
            if not wanted.intersection(lin.covers):
                continue
            copies = k if lin.count > 1 else 1
            per_token += copies * adapter_bytes * lora_r
            if adapter_bytes != b:
                per_token += copies * adapter_bytes * lin.in_features
                continue
            # Same dtype: the input tensor itself is kept, once per distinct input.
            source = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in",
                      "gate": "mlp_in", "up": "mlp_in", "gate_up": "mlp_in"}.get(lin.name,
                                                                                  lin.name)
            if source == "o" or source in shared_inputs:
                continue  # o_proj's input is the SDPA output, already kept
            shared_inputs.add(source)
            per_token += copies * b * lin.in_features
    total = per_token * seq * batch
    if attention == "eager":
        total += (2 * b + 4) * arch.heads * seq * seq * batch
    return total


def activation_bytes(
    arch: Arch,
    *,
    seq: int,
    batch: int,
    dtype_bytes: int,
    grad_ckpt: bool,
    method: str = "full",
    target_fraction: float = 1.0,
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    adapter_bytes: int = 4,
    attention: str = "sdpa",
) -> int:
    """Activation memory of the whole model (logits excluded, see :func:`logits_bytes`).

    Without checkpointing: ``layers x layer_activation_bytes``. With gradient checkpointing
    only each block's input is kept (``layers * b * h`` per token) plus one block's full
    activations while it is recomputed in backward. Both add the final norm's fp32 input copy
    (``4*h`` per token) and the lm_head input (``b*h`` per target token).
    """
    one_layer = layer_activation_bytes(
        arch, seq=seq, batch=batch, dtype_bytes=dtype_bytes, method=method, lora_r=lora_r,
        lora_targets=lora_targets, adapter_bytes=adapter_bytes, attention=attention)
    tokens = seq * batch
    head = tokens * 4 * arch.hidden + int(tokens * target_fraction) * dtype_bytes * arch.hidden
    if grad_ckpt:
        return arch.layers * tokens * dtype_bytes * arch.hidden + one_layer + head
    return arch.layers * one_layer + head


def logits_bytes(arch: Arch, *, seq: int, batch: int, dtype_bytes: int,
                 target_fraction: float = 1.0) -> int:
    """Logits at the target positions: ``n_t * vocab * (4 + 4 [+ b])`` bytes, with
    ``n_t = batch * seq * target_fraction``: the fp32 logits used by the loss (4), their
    gradient (4) and, when the compute dtype is not fp32, the lm_head's own output (b).

    The tunelab trainer computes logits only at target positions, hence ``target_fraction``
    (1.0 = every position, as a plain Hugging Face forward does).
    """
    n_t = int(batch * seq * target_fraction)
    per = 8 + (dtype_bytes if dtype_bytes != 4 else 0)
    return n_t * arch.vocab * per


# ================================================================================= memory
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory per device, broken down in bytes. ``total`` is the sum."""

    method: str
    weights: int  # base model weights as stored (dtype or quantized + kept-16-bit parts)
    adapters: int  # LoRA A/B matrices
    gradients: int
    optimizer: int
    activations: int
    logits: int
    workspace: int  # dequantization buffer, DDP buckets, FSDP all-gather
    overhead: int  # CUDA context, or the CPU process baseline
    total_params: int
    trainable_params: int
    pageable: int = 0  # bytes a paged optimizer may evict to CPU RAM
    settings: dict[str, Any] = field(default_factory=dict)

    COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits",
                  "workspace", "overhead")

    @property
    def total(self) -> int:
        return sum(self.components().values())

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def components(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in self.COMPONENTS}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total"] = self.total
        out["trainable_share"] = self.trainable_share
        return out


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")


def estimate_memory(
    arch: Arch,
    *,
    method: str = "lora",
    seq: int = 2048,
    batch: int = 1,
    device: str = "cuda",
    dtype: str | None = None,
    grad_ckpt: bool = False,
    optimizer: str = "adamw",
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    adapter_dtype: str = "fp32",
    quant: str = "nf4-dq",
    target_fraction: float = 1.0,
    attention: str = "sdpa",
    gpus: int = 1,
    parallel: str = "ddp",
    overhead_bytes: int | None = None,
) -> MemoryEstimate:
    """Estimate peak training memory per device.

    Args:
        method: ``full`` (every weight trained), ``lora`` (16-bit frozen base + adapters) or
            ``qlora`` (quantized frozen base, ``quant``, + adapters).
        device: ``cuda`` or ``cpu``; picks the overhead term and the default dtype.
        dtype: weights / compute dtype (``bf16``, ``fp16``, ``fp32``); default bf16 on CUDA,
            fp32 on CPU.
        grad_ckpt: gradient checkpointing per block.
        optimizer: ``adamw`` (2 x fp32 states), ``adamw8bit`` (2 x 1 byte), ``paged`` (as
            adamw, evictable to CPU RAM).
        lora_r, lora_targets: LoRA rank and adapted linears (default: all block linears).
        adapter_dtype: dtype of the LoRA weights (PEFT autocasts adapters to fp32 by default).
        quant: ``nf4-dq`` (NF4 + double quant), ``nf4`` or ``int8``; qlora only.
        target_fraction: share of positions where logits are computed (loss targets).
        attention: ``sdpa`` (no seq^2 memory) or ``eager``.
        gpus, parallel: data parallel over ``gpus`` devices, ``ddp`` (everything replicated,
            plus gradient buckets) or ``fsdp`` (weights, adapters, gradients and optimizer
            state sharded ``1/gpus``; activations are not).
        overhead_bytes: replaces :data:`CUDA_CONTEXT_BYTES` / :data:`CPU_PROCESS_BASELINE_BYTES`.

    Parts kept in the compute dtype under qlora: token embedding, lm_head, norms, biases and
    ``arch.extra_params``. Full fine-tuning keeps weights and gradients in ``dtype``.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{optimizer}': use one of {', '.join(OPTIMIZERS)}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"unknown device '{device}': use cuda or cpu")
    if parallel not in PARALLEL:
        raise ConfigError(f"unknown parallel mode '{parallel}': use ddp or fsdp")
    if attention not in ("sdpa", "eager"):
        raise ConfigError(f"unknown attention '{attention}': use sdpa or eager")
    for name, value in (("seq", seq), ("batch", batch), ("gpus", gpus)):
        _check_positive(name, value)
    if not 0 < target_fraction <= 1:
        raise ConfigError(f"target_fraction must be in (0, 1], got {target_fraction}")
    dtype = normalise_dtype(dtype or ("fp32" if device == "cpu" else "bf16"))
    b = DTYPE_BYTES[dtype]
    a = DTYPE_BYTES[normalise_dtype(adapter_dtype)]
    targets = normalise_targets(lora_targets)
    total_params = arch.total_params

    if method == "full":
        weights = total_params * b
        adapters = 0
        trainable = total_params
        grads = trainable * b
    else:
        trainable = lora_params(arch, lora_r, targets)
        adapters = trainable * a
        grads = trainable * a
        if method == "lora":
            weights = total_params * b
        else:
            kept_16bit = total_params - arch.linear_weight_params
            weights = int(quantized_linear_bytes(arch, quant)) + kept_16bit * b
    optimizer_bytes = trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer]

    activations = activation_bytes(
        arch, seq=seq, batch=batch, dtype_bytes=b, grad_ckpt=grad_ckpt, method=method,
        target_fraction=target_fraction, lora_r=lora_r, lora_targets=targets, adapter_bytes=a,
        attention=attention)
    logits = logits_bytes(arch, seq=seq, batch=batch, dtype_bytes=b,
                          target_fraction=target_fraction)

    workspace = 0
    if method == "qlora":
        # bitsandbytes dequantizes one weight matrix to the compute dtype per matmul.
        workspace += arch.largest_linear_params * b
    if gpus > 1 and parallel == "ddp":
        # DDP's reducer copies gradients into flat communication buckets
        # (gradient_as_bucket_view=False by default): one more gradient-sized buffer.
        workspace += grads
    if gpus > 1 and parallel == "fsdp":
        layer_weight_bytes = weights / max(arch.layers, 1)
        # Two blocks unsharded at a time (current + prefetched), plus, when base weights
        # train, one block's full gradient before its reduce-scatter.
        workspace += int(2 * layer_weight_bytes)
        if method == "full":
            workspace += int(layer_weight_bytes)
        weights //= gpus
        adapters //= gpus
        grads //= gpus
        optimizer_bytes //= gpus

    if overhead_bytes is None:
        overhead_bytes = CPU_PROCESS_BASELINE_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES

    settings = {
        "seq": seq, "batch": batch, "device": device, "dtype": dtype, "grad_ckpt": grad_ckpt,
        "optimizer": optimizer, "lora_r": lora_r if method != "full" else None,
        "lora_targets": sorted(targets) if method != "full" else None,
        "adapter_dtype": normalise_dtype(adapter_dtype) if method != "full" else None,
        "quant": quant if method == "qlora" else None, "target_fraction": target_fraction,
        "attention": attention, "gpus": gpus, "parallel": parallel if gpus > 1 else None,
    }
    return MemoryEstimate(
        method=method,
        weights=int(weights),
        adapters=int(adapters),
        gradients=int(grads),
        optimizer=int(optimizer_bytes),
        activations=int(activations),
        logits=int(logits),
        workspace=int(workspace),
        overhead=int(overhead_bytes),
        total_params=total_params,
        trainable_params=trainable,
        pageable=int(optimizer_bytes) if optimizer == "paged" else 0,
        settings=settings,
    )


FitStatus = Literal["yes", "paged", "no"]


def usable_bytes(gpu: GPU, headroom: float = DEFAULT_HEADROOM) -> int:
    """Memory planned against: ``headroom`` x device memory."""
    return int(gpu.memory_bytes * headroom)


def fit_status(estimate: MemoryEstimate, gpu: GPU, headroom: float = DEFAULT_HEADROOM
               ) -> FitStatus:
    """``yes`` if the peak fits in the usable memory; ``paged`` if it only fits once a paged
    optimizer's state is evicted to CPU RAM (slower steps, no crash); else ``no``."""
    usable = usable_bytes(gpu, headroom)
    if estimate.total <= usable:
        return "yes"
    if estimate.pageable and estimate.total - estimate.pageable <= usable:
        return "paged"
    return "no"


# ================================================================================= time
def training_flops_per_token(
    arch: Arch,
    method: str,
    *,
    seq: int,
    grad_ckpt: bool = False,
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    target_fraction: float = 1.0,
) -> float:
    """Training FLOPs per token.

    With ``N`` = matmul parameters a token passes through (block linears, MoE: active experts
    only, plus the lm_head at the ``target_fraction`` of positions where logits are computed)
    and attention ``A = 2 * layers * seq * q_dim`` (QK^T and AV, 2 FLOPs per multiply-add,
    halved by the causal mask), the forward pass costs ``F = 2N + A``.

    * full: ``3F`` (forward + backward for input gradients + backward for weight gradients),
      i.e. the usual ``6N`` per token plus attention.
    * lora / qlora: ``2F + 6 N_lora``: forward ``2N``, backward for input gradients ``2N``
      (frozen weights need no weight gradients), and forward + both backward passes of the
      small adapters, so ``~4N`` per token.
    * gradient checkpointing adds one more forward: ``+F``.
    """
    n = arch.active_linear_weight_params + arch.vocab * arch.hidden * target_fraction
    forward = 2 * n + 2 * arch.layers * seq * arch.q_dim
    if method == "full":
        flops = 3 * forward
    elif method in ("lora", "qlora"):
        flops = 2 * forward + 6 * lora_params(arch, lora_r, lora_targets)
    else:
        raise ConfigError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    if grad_ckpt:
        flops += forward
    return float(flops)


@dataclass(frozen=True)
class TimeEstimate:
    """Training time: ``tokens * flops_per_token / (peak * utilization * gpus) * slowdown``."""

    method: str
    tokens: int
    flops_per_token: float
    peak_tflops: float
    utilization: float
    gpus: int
    slowdown: float
    price_per_hour: float | None = None  # per GPU-hour

    @property
    def total_flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def tokens_per_second(self) -> float:
        achieved = self.peak_tflops * 1e12 * self.utilization * self.gpus
        return achieved / self.flops_per_token / self.slowdown

    @property
    def seconds(self) -> float:
        return self.tokens / self.tokens_per_second

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def cost(self) -> float | None:
        if self.price_per_hour is None:
            return None
        return self.hours * self.gpus * self.price_per_hour

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(total_flops=self.total_flops, tokens_per_second=self.tokens_per_second,
                   hours=self.hours, cost=self.cost)
        return out


def estimate_time(
    arch: Arch,
    method: str,
    *,
    tokens: int,
    gpu: GPU,
    gpus: int = 1,
    utilization: float = DEFAULT_UTILIZATION,
    seq: int = 2048,
    grad_ckpt: bool = False,
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    target_fraction: float = 1.0,
    price_per_hour: float | None = None,
) -> TimeEstimate:
    """Training time for ``tokens`` training tokens (all epochs) on ``gpus`` x ``gpu``.

    Throughput is the GPU's peak dense 16-bit FLOP/s times ``utilization`` (a stated
    assumption) times ``gpus`` (linear scaling assumed); qlora is slowed by
    :data:`QLORA_SLOWDOWN` for dequantization.
    """
    _check_positive("tokens", tokens)
    _check_positive("gpus", gpus)
    if not 0 < utilization <= 1:
        raise ConfigError(f"utilization must be in (0, 1], got {utilization}")
    flops = training_flops_per_token(arch, method, seq=seq, grad_ckpt=grad_ckpt, lora_r=lora_r,
                                     lora_targets=lora_targets, target_fraction=target_fraction)
    return TimeEstimate(
        method=method,
        tokens=int(tokens),
        flops_per_token=flops,
        peak_tflops=gpu.peak_tflops,
        utilization=utilization,
        gpus=gpus,
        slowdown=QLORA_SLOWDOWN if method == "qlora" else 1.0,
        price_per_hour=price_per_hour,
    )
