"""``tunelab plan``: estimate memory, time and licence before fine-tuning.

The main CLI registers this with :func:`add_parser`; :func:`run` does the work. For a quick
manual check without the main CLI: ``python -m tunelab.plan.cli --model llama-2-7b``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tunelab.plan.catalog import catalog_names, gpu_names
from tunelab.plan.estimate import (
    DEFAULT_HEADROOM,
    DEFAULT_UTILIZATION,
    METHODS,
    OPTIMIZERS,
    QUANTS,
)
from tunelab.plan.report import build_plan, format_plan

EPILOG = """\
examples:
  tunelab plan --model llama-2-7b --gpu 24GB
  tunelab plan --model ./my-model --method qlora --seq 4096 --grad-ckpt
  tunelab plan --model model.gguf --gpu a100-80gb --gpus 4 --tokens 50000000 --price-per-hour 2
"""


def add_parser(subparsers: Any) -> None:
    """Register ``plan`` on an ``argparse`` subparsers object (``set_defaults(func=run)``)."""
    p = subparsers.add_parser(
        "plan",
        help="estimate training memory, time and licence for a model",
        description=(
            "Estimate peak training memory (full / LoRA / QLoRA side by side), training time "
            "and the model's licence from its configuration only: no weights are loaded. "
            f"Catalogue models: {', '.join(catalog_names())}."),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local HF folder (config.json), .gguf file, Hub id, or catalogue name")
    p.add_argument("--method", choices=[*METHODS, "all"], default="all",
                   help="method(s) to show (default: all, side by side)")
    p.add_argument("--gpu", default="24GB",
                   help=f"device to plan for (default 24GB): {', '.join(gpu_names())}")
    p.add_argument("--gpus", type=int, default=1,
                   help="number of GPUs: shows per-device memory for DDP and FSDP")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size per device")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-targets", default="all-linear",
                   help="LoRA targets: all-linear (default) or e.g. q,v / q_proj,v_proj")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights/compute dtype (default: bf16, fp16 on T4/V100, fp32 on cpu)")
    p.add_argument("--adapter-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="LoRA weight dtype (default fp32, PEFT's autocast default)")
    p.add_argument("--quant", choices=QUANTS, default="nf4-dq",
                   help="qlora base quantization (default nf4-dq: NF4 + double quant)")
    p.add_argument("--target-fraction", type=float, default=1.0,
                   help="share of positions with logits/loss (tunelab computes logits only "
                        "at targets; default 1.0)")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help=f"usable share of device memory (default {DEFAULT_HEADROOM})")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per epoch")
    p.add_argument("--examples", type=int, default=None, help="examples per epoch")
    p.add_argument("--avg-len", type=float, default=None, help="average tokens per example")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--utilization", type=float, default=DEFAULT_UTILIZATION,
                   help=f"achieved / peak FLOP/s (default {DEFAULT_UTILIZATION})")
    p.add_argument("--price-per-hour", type=float, default=None, help="price per GPU-hour")
    p.add_argument("--objective", choices=["sft", "dpo", "orpo"], default="sft",
                   help="training objective: dpo adds its reference model's forward passes")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="CPU: plan for return_freed_memory: on (no allocator-held memory)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """Build the plan from parsed arguments and print it. Bad input raises ConfigError /
    ModelError (the main CLI prints those without a traceback)."""
    methods = METHODS if args.method == "all" else (args.method,)
    plan = build_plan(
        args.model,
        methods=methods,
        gpu=args.gpu,
        gpus=args.gpus,
        seq=args.seq,
        batch=args.batch,
        grad_ckpt=args.grad_ckpt,
        optimizer=args.optimizer,
        lora_r=args.lora_r,
        lora_targets=args.lora_targets,
        dtype=args.dtype,
        adapter_dtype=args.adapter_dtype,
        quant=args.quant,
        target_fraction=args.target_fraction,
        attention=args.attention,
        headroom=args.headroom,
        utilization=args.utilization,
        tokens=args.tokens,
        examples=args.examples,
        avg_len=args.avg_len,
        epochs=args.epochs,
        price_per_hour=args.price_per_hour,
        objective=args.objective,
        return_freed_memory=args.return_freed_memory,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with only the ``plan`` subcommand (tests, manual runs)."""
    parser = argparse.ArgumentParser(prog="tunelab")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tunelab.errors import TunelabError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "plan":
        argv = ["plan", *argv]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TunelabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
