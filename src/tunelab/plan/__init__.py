"""``tunelab plan``: training memory, time and licence estimates from a model's config alone.

Library entry points::

    from tunelab.plan import get_arch, estimate_memory
    est = estimate_memory(get_arch("llama-2-7b"), method="qlora", seq=2048, grad_ckpt=True)
    est.total, est.components()

After a run, ``compare_to_run(model, cfg, peak, train_set, steps)`` puts the estimate for
the micro-batches the run really processed next to its measured peak.
"""

from tunelab.plan.catalog import (
    CATALOG,
    GPU,
    GPUS,
    Arch,
    ResolvedModel,
    arch_from_gguf,
    arch_from_hf_config,
    catalog_names,
    cpu_device,
    find_arch,
    get_arch,
    get_gpu,
    gpu_names,
    resolve_model,
)
from tunelab.plan.estimate import (
    CPU_HEAP_RETENTION,
    CPU_PEFT_IMPORT_BYTES,
    CPU_PROCESS_BASELINE_BYTES,
    CPU_RUNTIME_BYTES,
    CPU_TOKENIZER_BYTES_PER_TOKEN,
    CUDA_CONTEXT_BYTES,
    DEFAULT_HEADROOM,
    DEFAULT_UTILIZATION,
    METHODS,
    MemoryEstimate,
    TimeEstimate,
    activation_bytes,
    cpu_overhead_bytes,
    estimate_memory,
    estimate_time,
    fit_status,
    layer_activation_bytes,
    logits_bytes,
    lora_params,
    quant_bits_per_weight,
    training_flops_per_token,
)
from tunelab.plan.report import MethodPlan, Plan, build_plan, format_plan
from tunelab.plan.runtime import RunShape, compare_to_run, plan_run, run_estimate, run_shape

__all__ = [
    "CATALOG", "GPUS", "GPU", "Arch", "ResolvedModel", "arch_from_gguf", "arch_from_hf_config",
    "catalog_names", "cpu_device", "find_arch", "get_arch", "get_gpu", "gpu_names",
    "resolve_model", "CPU_PROCESS_BASELINE_BYTES", "CUDA_CONTEXT_BYTES", "DEFAULT_HEADROOM",
    "DEFAULT_UTILIZATION", "METHODS", "MemoryEstimate", "TimeEstimate", "activation_bytes",
    "estimate_memory", "estimate_time", "fit_status", "layer_activation_bytes", "logits_bytes",
    "lora_params", "quant_bits_per_weight", "training_flops_per_token", "MethodPlan", "Plan",
    "build_plan", "format_plan", "CPU_HEAP_RETENTION", "CPU_PEFT_IMPORT_BYTES",
    "CPU_RUNTIME_BYTES", "CPU_TOKENIZER_BYTES_PER_TOKEN", "cpu_overhead_bytes", "RunShape",
    "compare_to_run", "plan_run", "run_estimate", "run_shape",
]
