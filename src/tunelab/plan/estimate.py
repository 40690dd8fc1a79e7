"""Peak training memory and training time for full fine-tuning, LoRA and QLoRA.

Everything is closed-form arithmetic on an :class:`~tunelab.plan.catalog.Arch`; nothing is
allocated. Memory is per device.

CUDA (``device="cuda"``): the sum of what is resident at the start of the backward pass of a
step after the first (when optimizer state exists)::

    peak = weights + adapters + gradients + optimizer state + activations + logits
           + workspace + overhead (CUDA context)

Summing gradients and activations is conservative (during backward, activations are freed
layer by layer while gradients are produced); it is kept on CUDA as a margin for the caching
allocator, and has not been calibrated there.

CPU (``device="cpu"``) is calibrated against peak RSS (``ru_maxrss``) of real
``tunelab train`` runs (tests/plan/test_calibration.py, docs/plan.md)::

    peak = overhead + weights + adapters + optimizer state
           + max(activations + logits + lm_head gradient,      start of backward
                 gradients + optimizer/embedding temporaries)   end of backward, optimizer step
           + retained

* **overhead**: the imports (torch + transformers, :data:`CPU_PROCESS_BASELINE_BYTES`; peft for
  lora/qlora, :data:`CPU_PEFT_IMPORT_BYTES`), the trainer's runtime
  (:data:`CPU_RUNTIME_BYTES`) and the tokenizer (:data:`CPU_TOKENIZER_BYTES_PER_TOKEN` per
  vocabulary entry).
* **weights**: every tensor as stored in memory (compute dtype, or quantized). tunelab reads
  checkpoints shard by shard with ``pread`` (:mod:`tunelab.loading`), so no mapped file page
  stays resident after the load: a qlora base costs its quantized bytes only.
* **the two ends of backward**: saved activations and logits are freed during backward while
  gradients are produced, so the peak is the larger end, not the sum (``overlap`` is the
  difference, <= 0). The start holds every saved tensor plus the lm_head weight gradient
  (computed first; full fine-tuning only). The end holds every gradient plus the largest
  transient: torch's single-tensor AdamW (the CPU default) allocates ``sqrt(v)`` and
  ``sqrt(v)/bc`` for one parameter at a time (2 x the largest parameter, in ``workspace``),
  and tied embeddings add the dense embedding gradient before it is summed into the shared
  ``.grad``.
* **retained**: glibc malloc keeps freed heap blocks resident; its mmap threshold rises to
  the largest block freed (up to :data:`GLIBC_MMAP_MAX`), so after the first step every
  tensor up to 32 MiB comes from the heap, and freed ones are reused only by requests they
  fit. After two steps the heap holds about one more step's worth of the heap-sized
  activations and logits as free chunks (:data:`CPU_HEAP_RETENTION`; measured 0.67-1.29 x);
  tensors over 32 MiB are unmapped when freed and never retained. Full fine-tuning levels
  off near the heap-sized gradients; gradient checkpointing retains
  :data:`CPU_HEAP_RETENTION_CKPT` of the non-checkpointed figure. Run with
  ``MALLOC_MMAP_THRESHOLD_=131072`` and glibc returns every freed tensor: RSS then drops by
  this term (the rest of the model matched such runs within 2.2%), at the cost of a page
  fault per fresh allocation (about 1 s per GB on the calibration machine, which roughly
  halved LoRA throughput), hence ``heap_retention=0`` for that case only.
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

# ---- CPU terms, measured on Linux x86-64, Python 3.11, torch 2.13 (CPU), transformers 5.24,
# peft 0.21, glibc malloc; SmolLM2-135M and a 2-layer tiny Llama (tests/plan/test_calibration.py)
# Peak RSS of `python -c 'import torch, transformers; from transformers import
# LlamaForCausalLM'` (/usr/bin/time -v): 340,140 kB, stable over runs. Overridable.
CPU_PROCESS_BASELINE_BYTES = 340_140 * 1024
# What importing peft (which pulls in bitsandbytes) adds: 397,036 - 340,140 kB. Full
# fine-tuning never imports it.
CPU_PEFT_IMPORT_BYTES = 56_896 * 1024
# The trainer's own runtime on top of the imports: tunelab's modules, tokenizer and model
# loading machinery, autograd/optimizer set-up, library code paged in by the first step.
# Peak RSS of 2-step runs of a 2-layer hidden-32 Llama (vocabulary 400, tensors < 1 MiB) minus
# the import baseline: 29.2 MiB (full), 27.6 (lora), 28.8 (qlora).
CPU_RUNTIME_BYTES = 29_000 * 1024
# A fast (Rust) BPE tokenizer: vocabulary and merge tables, about 0.9 KB per entry (RSS after
# loading, measured 800 B for 24k and 905 B for 49k entries).
CPU_TOKENIZER_BYTES_PER_TOKEN = 900
# glibc malloc serves blocks up to its mmap threshold from the heap; the threshold rises to
# the largest block freed so far, up to this cap (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit), so
# larger tensors are always mmap()ed and unmapped as soon as they are freed.
GLIBC_MMAP_MAX = 32 * 1024**2
# Freed heap memory glibc keeps resident, as a multiple of the step's heap-sized activations
# and logits (tensors <= GLIBC_MMAP_MAX). Freed chunks stay in the heap (RSS) and are reused
# only by requests they fit, so after a couple of steps the heap holds about one more step's
# worth of activations as free chunks. Measured as (peak RSS - the rest of this model) over
# the heap-sized activations + logits of 2-step SmolLM2 runs: 0.67-1.29 for lora/qlora
# (9 runs, mean 0.93; the same run repeated varies by up to 12%), see docs/plan.md.
# Overridable (heap_retention=), e.g. 0 for an allocator that returns freed memory.
CPU_HEAP_RETENTION = 1.0
# LoRA / QLoRA since tunelab's fused step (packed attention by split, fused LoRA update and
# RMSNorm, chunked cross-entropy): far fewer heap-sized temporaries are freed per step, and
# the retained heap measured 0.32-0.61 of the heap-sized activations (4 SmolLM2 runs,
# lora 1 x 532 / 4 x 152, qlora 1 x 152, lora + checkpointing 4 x 152 with the factor
# below), see docs/plan.md. Full fine-tuning keeps CPU_HEAP_RETENTION (its cap applies).
CPU_HEAP_RETENTION_LORA = 0.45
# With gradient checkpointing the retained heap is a share of what the same run holds without
# it: measured 0.56 (lora, 1 x 532 tokens), 0.75 (lora, 4 x 152), 0.69 (full, 1 x 532).
CPU_HEAP_RETENTION_CKPT = 2 / 3

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
def layer_saved_tensors(
    arch: Arch,
    *,
    dtype_bytes: int,
    method: str = "full",
    lora_r: int = 16,
    lora_targets: str | Iterable[str] | None = None,
    adapter_bytes: int = 4,
) -> list[int]:
    """The tensors autograd saves for backward in ONE block, as bytes per token (one entry per
    tensor; a tensor of ``w`` bytes per token holds ``w * batch * seq`` bytes).

    The sum is the per-token formula of :func:`layer_activation_bytes`; the individual sizes
    matter on CPU, where glibc hands tensors over 32 MiB back to the OS as soon as they are
    freed and keeps smaller ones in its heap (see :data:`CPU_HEAP_RETENTION`).
    """
    h, q, kv, i, b = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate, dtype_bytes
    moe = arch.experts > 1
    k = arch.active_experts if moe else 1
    # Internals every method keeps (they are needed for input gradients).
    out = [b * q, b * kv, b * kv, b * q, 4 * arch.heads]  # q, k, v after RoPE; SDPA out, lse
    out += [b * i] * (k if arch.mlp == "plain" else 3 * k)
    if moe:
        out.append(4 * arch.experts)
    out += [4 * h] * arch.norms_per_layer
    if arch.qk_norm:
        out += [4 * q, 4 * kv]
    if method == "full":
        out += [b * h] + [b * h, b * i] * k + [b * h] * arch.norms_per_layer
        return out
    wanted = normalise_targets(lora_targets)
    shared_inputs: set[str] = set()
    for lin in arch.linears():
        if not wanted.intersection(lin.covers):
            continue
        copies = k if lin.count > 1 else 1
        out += [adapter_bytes * lora_r] * copies
        if adapter_bytes != b:
            out += [adapter_bytes * lin.in_features] * copies
            continue
        # Same dtype: the input tensor itself is kept, once per distinct input.
        source = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in",
                  "gate": "mlp_in", "up": "mlp_in", "gate_up": "mlp_in"}.get(lin.name, lin.name)
        if source == "o" or source in shared_inputs:
            continue  # o_proj's input is the SDPA output, already kept
        shared_inputs.add(source)
        out += [b * lin.in_features] * copies
    return out


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

    Checked against the tensors autograd really saves (``saved_tensors_hooks``) for
    SmolLM2-135M in fp32: 44,759 bytes/token/layer measured vs 44,580 here for full
    fine-tuning, 40,445 vs 40,420 for LoRA r=16 on all linears (the bitsandbytes 4-bit
    base of qlora saves the same tensors as LoRA).

    Eager attention (``attention="eager"``, e.g. Gemma 2 with logit soft-capping) adds
    ``(2*b + 4) * n * seq^2`` per sample: the capped scores, the fp32 softmax output and its
    cast back to ``b``.
    """
    per_token = sum(layer_saved_tensors(arch, dtype_bytes=dtype_bytes, method=method,
                                        lora_r=lora_r, lora_targets=lora_targets,
                                        adapter_bytes=adapter_bytes))
    total = per_token * seq * batch
    if attention == "eager":
        total += (2 * dtype_bytes + 4) * arch.heads * seq * seq * batch
    return total


def saved_tensor_sizes(
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
) -> list[tuple[int, int]]:
    """Every activation tensor of one step as ``(bytes, count)`` pairs; their sum is
    :func:`activation_bytes` (logits excluded)."""
    tokens = seq * batch
    n_t = int(tokens * target_fraction)
    per_layer = layer_saved_tensors(arch, dtype_bytes=dtype_bytes, method=method,
                                    lora_r=lora_r, lora_targets=lora_targets,
                                    adapter_bytes=adapter_bytes)
    eager = (2 * dtype_bytes + 4) * arch.heads * seq * seq * batch if attention == "eager" else 0
    # Final norm's fp32 input copy, and the lm_head input at the target positions.
    out = [(tokens * 4 * arch.hidden, 1), (n_t * dtype_bytes * arch.hidden, 1)]
    if grad_ckpt:
        # Each block's input, plus one block's full set while it is recomputed in backward.
        out.append((tokens * dtype_bytes * arch.hidden, arch.layers))
        out += [(w * tokens, 1) for w in per_layer]
        if eager:
            out.append((eager, 1))
    else:
        out += [(w * tokens, arch.layers) for w in per_layer]
        if eager:
            out.append((eager, arch.layers))
    return out


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
    return sum(size * count for size, count in saved_tensor_sizes(
        arch, seq=seq, batch=batch, dtype_bytes=dtype_bytes, grad_ckpt=grad_ckpt,
        method=method, target_fraction=target_fraction, lora_r=lora_r,
        lora_targets=lora_targets, adapter_bytes=adapter_bytes, attention=attention))


def logits_tensor_sizes(arch: Arch, *, seq: int, batch: int, dtype_bytes: int,
                        target_fraction: float = 1.0) -> list[int]:
    """The logits tensors of one step: fp32 logits, their gradient, and the lm_head's own
    output when the compute dtype is not fp32."""
    n_t = int(batch * seq * target_fraction)
    out = [n_t * arch.vocab * 4, n_t * arch.vocab * 4]
    if dtype_bytes != 4:
        out.append(n_t * arch.vocab * dtype_bytes)
    return out


def logits_bytes(arch: Arch, *, seq: int, batch: int, dtype_bytes: int,
                 target_fraction: float = 1.0) -> int:
    """Logits at the target positions: ``n_t * vocab * (4 + 4 [+ b])`` bytes, with
    ``n_t = batch * seq * target_fraction``: the fp32 logits used by the loss (4), their
    gradient (4) and, when the compute dtype is not fp32, the lm_head's own output (b).

    The tunelab trainer computes logits only at target positions, hence ``target_fraction``
    (1.0 = every position, as a plain Hugging Face forward does).
    """
    return sum(logits_tensor_sizes(arch, seq=seq, batch=batch, dtype_bytes=dtype_bytes,
                                   target_fraction=target_fraction))


def frozen_embedding_saving(arch: Arch, dtype_bytes: int) -> int:
    """Bytes saved by keeping a frozen, untied input embedding in the checkpoint's 16-bit
    dtype while computing in fp32 (LoRA/QLoRA: it is only indexed, never multiplied; see
    ``models.store_frozen_input_embedding``)."""
    stored = DTYPE_BYTES[normalise_dtype(arch.weight_dtype)]
    if arch.tied_embeddings or stored >= dtype_bytes:
        return 0
    return arch.embedding_params * (dtype_bytes - stored)


def _heap_gradient_bytes(arch: Arch, dtype_bytes: int) -> int:
    """Full fine-tuning: bytes of the gradient tensors small enough for glibc's heap
    (<= :data:`GLIBC_MMAP_MAX` each)."""
    b = dtype_bytes
    sizes = [(lin.in_features * lin.out_features * b, lin.count * arch.layers)
             for lin in arch.linears()]
    sizes.append((arch.embedding_params * b, 1))
    if not arch.tied_embeddings:
        sizes.append((arch.lm_head_params * b, 1))
    small = sum(size * n for size, n in sizes if size <= GLIBC_MMAP_MAX)
    return small + (arch.norm_params + arch.extra_params) * b


def cpu_overhead_bytes(arch: Arch, method: str) -> int:
    """What a CPU training process holds besides tensors (see the module docstring):
    the imports (:data:`CPU_PROCESS_BASELINE_BYTES`, + :data:`CPU_PEFT_IMPORT_BYTES` for
    lora/qlora), the trainer's runtime (:data:`CPU_RUNTIME_BYTES`) and the tokenizer
    (:data:`CPU_TOKENIZER_BYTES_PER_TOKEN` per vocabulary entry)."""
    total = CPU_PROCESS_BASELINE_BYTES + CPU_RUNTIME_BYTES + scipy_import_bytes()
    if method != "full":
        total += CPU_PEFT_IMPORT_BYTES
    return total + CPU_TOKENIZER_BYTES_PER_TOKEN * arch.vocab


# transformers imports scipy.optimize (for its object-detection losses) whenever scipy is
# installed, as it is beside lm-evaluation-harness: measured +61 MB of RSS after torch +
# transformers. Not a fit to a training run: one import, measured on its own.
SCIPY_IMPORT_BYTES = 64 * 2**20


def scipy_import_bytes() -> int:
    import importlib.util

    return SCIPY_IMPORT_BYTES if importlib.util.find_spec("scipy") is not None else 0


# ================================================================================= memory
@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory per device, broken down in bytes. ``total`` is the sum.

    ``retained`` and ``overlap`` are CPU terms (0 on CUDA): the freed memory glibc's heap
    keeps resident, and (negative) what is counted in gradients/activations/logits/workspace
    but is never resident at the same moment (the peak is the larger of the two phases of a
    step, see :func:`estimate_memory`).
    """

    method: str
    weights: int  # base model weights as stored (dtype or quantized + kept-16-bit parts)
    adapters: int  # LoRA A/B matrices
    gradients: int
    optimizer: int
    activations: int
    logits: int
    workspace: int  # dequantization buffer, DDP buckets, FSDP all-gather, CPU step transients
    overhead: int  # CUDA context, or the CPU process (imports, runtime, tokenizer)
    total_params: int
    trainable_params: int
    pageable: int = 0  # bytes a paged optimizer may evict to CPU RAM
    settings: dict[str, Any] = field(default_factory=dict)
    retained: int = 0  # CPU: freed heap memory glibc keeps (CPU_HEAP_RETENTION)
    overlap: int = 0  # CPU: <= 0, parts of the step that are never resident together

    COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "logits",
                  "workspace", "retained", "overlap", "overhead")

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
    heap_retention: float | None = None,
) -> MemoryEstimate:
    """Estimate peak training memory per device.

    Args:
        method: ``full`` (every weight trained), ``lora`` (16-bit frozen base + adapters) or
            ``qlora`` (quantized frozen base, ``quant``, + adapters).
        device: ``cuda`` or ``cpu``; picks the overhead term, the default dtype and, on CPU,
            the phase model and heap retention described in the module docstring.
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
        overhead_bytes: replaces :data:`CUDA_CONTEXT_BYTES` / :func:`cpu_overhead_bytes`.
        heap_retention: CPU only; replaces :data:`CPU_HEAP_RETENTION` (0 for an allocator
            that returns freed memory, e.g. ``MALLOC_MMAP_THRESHOLD_=131072``).

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
    if heap_retention is not None and heap_retention < 0:
        raise ConfigError(f"heap_retention must be >= 0, got {heap_retention}")
    cpu = device == "cpu"
    dtype = normalise_dtype(dtype or ("fp32" if cpu else "bf16"))
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
        weights -= frozen_embedding_saving(arch, b)
    optimizer_bytes = trainable * OPTIMIZER_BYTES_PER_PARAM[optimizer]

    act_kw: dict[str, Any] = dict(
        seq=seq, batch=batch, dtype_bytes=b, grad_ckpt=grad_ckpt, method=method,
        target_fraction=target_fraction, lora_r=lora_r, lora_targets=targets, adapter_bytes=a,
        attention=attention)
    tensors = saved_tensor_sizes(arch, **act_kw)
    activations = sum(size * count for size, count in tensors)
    logit_tensors = logits_tensor_sizes(arch, seq=seq, batch=batch, dtype_bytes=b,
                                        target_fraction=target_fraction)
    logits = sum(logit_tensors)

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

    retained = overlap = 0
    if cpu:
        # Phase model: the forward's saved tensors and the logits are freed during backward
        # while gradients fill in, so the peak is the larger of the two ends of backward.
        head_grad = arch.vocab * arch.hidden * b if method == "full" else 0
        largest = (max(arch.vocab * arch.hidden, arch.largest_linear_params)
                   if method == "full" else lora_r * max(
                       max(lin.in_features, lin.out_features) for lin in arch.linears()))
        transient = 0
        if optimizer in ("adamw", "paged"):
            transient = 2 * largest * 4  # AdamW's sqrt(v) and sqrt(v)/bc temporaries
        if method == "full" and arch.tied_embeddings:
            transient = max(transient, arch.vocab * arch.hidden * b)  # dense embedding grad
        workspace += transient
        backward_start = activations + logits + head_grad
        backward_end = grads + transient
        overlap = max(backward_start, backward_end) - (activations + logits + grads + transient)
        # glibc keeps freed chunks up to its 32 MiB mmap threshold in the heap.
        if heap_retention is None:
            heap_retention = CPU_HEAP_RETENTION if method == "full" else CPU_HEAP_RETENTION_LORA
        ratio = heap_retention
        if grad_ckpt:
            # Checkpointing still runs every block's tensors through the heap (computed and
            # dropped in forward, recomputed in backward), one block at a time.
            ratio *= CPU_HEAP_RETENTION_CKPT
            tensors = saved_tensor_sizes(arch, **(act_kw | {"grad_ckpt": False}))
        eligible = sum(size * count for size, count in tensors if size <= GLIBC_MMAP_MAX)
        eligible += sum(size for size in logit_tensors if size <= GLIBC_MMAP_MAX)
        if method == "full":
            # Measured: with every weight training, the retained space levels off at about
            # the step's heap-sized gradients (the space they free at zero_grad() is what
            # the next forward's activations partly land in).
            eligible = min(eligible, _heap_gradient_bytes(arch, b))
        retained = int(ratio * eligible)

    if overhead_bytes is None:
        overhead_bytes = cpu_overhead_bytes(arch, method) if cpu else CUDA_CONTEXT_BYTES

    settings = {
        "seq": seq, "batch": batch, "device": device, "dtype": dtype, "grad_ckpt": grad_ckpt,
        "optimizer": optimizer, "lora_r": lora_r if method != "full" else None,
        "lora_targets": sorted(targets) if method != "full" else None,
        "adapter_dtype": normalise_dtype(adapter_dtype) if method != "full" else None,
        "quant": quant if method == "qlora" else None, "target_fraction": target_fraction,
        "attention": attention, "gpus": gpus, "parallel": parallel if gpus > 1 else None,
    }
    if cpu:
        settings["heap_retention"] = heap_retention
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
        retained=retained,
        overlap=int(overlap),
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
    reference_passes: float = 0.0,
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
    * a DPO reference adds ``reference_passes`` forwards without gradients: ``+F`` per
      token with LoRA (adapters switched off on every step), ``+F / epochs`` for full
      fine-tuning (log-probs precomputed once).
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
    flops += reference_passes * forward
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
    reference_passes: float = 0.0,
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
                                     lora_targets=lora_targets, target_fraction=target_fraction,
                                     reference_passes=reference_passes)
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
