"""The ``tunelab`` command line: one subcommand per workflow.

Every subcommand validates its input at the edge and raises ``TunelabError`` for anything the
user can fix; ``main`` prints those as one clear line (no traceback) and exits with 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

log = logging.getLogger("tunelab")

# torchrun options passed through by `tunelab train --nproc N` (multi-node rendezvous).
TORCHRUN_OPTIONS = ("--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint",
                    "--rdzv-id", "--master-addr", "--master-port", "--max-restarts")

# CLI flag -> config key, for the common case (`tunelab train --model ... --data ...`).
TRAIN_FLAGS: dict[str, tuple[str, type]] = {
    "--model": ("model", str), "--data": ("data", str), "--val-data": ("val_data", str),
    "--method": ("method", str), "--out": ("out", str), "--max-steps": ("max_steps", int),
    "--epochs": ("epochs", float), "--lr": ("lr", float), "--batch-size": ("batch_size", int),
    "--grad-accum": ("grad_accum", int), "--max-length": ("max_length", int),
    "--save-every": ("save_every", int), "--eval-every": ("eval_every", int),
    "--seed": ("seed", int), "--lora-r": ("lora_r", int), "--format": ("format", str),
    "--device": ("device", str), "--dtype": ("dtype", str), "--base-bits": ("base_bits", int),
    "--split": ("split", str), "--columns": ("columns", str), "--report-to": ("report_to", str),
    "--objective": ("objective", str), "--beta": ("beta", float),
    "--init-adapter": ("init_adapter", str),
}


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _setup_logging(verbose: bool) -> None:
    # Under torchrun only rank 0 talks; the others report warnings and errors.
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level if _is_main_process() else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("bitsandbytes", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------ train


def _launch_torchrun(args: argparse.Namespace, argv: list[str], cfg: Any) -> int:
    """`tunelab train --nproc N ...`: run the same command under torchrun, N processes."""
    import subprocess

    from tunelab.distributed import torchrun_command

    passthrough, rest, skip = [], [], False
    for i, item in enumerate(argv):
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name == "--nproc":
            skip = "=" not in item
            continue
        if name in TORCHRUN_OPTIONS:
            passthrough.append(item if "=" in item else f"{item}={argv[i + 1]}")
            skip = "=" not in item
            continue
        rest.append(item)
    cmd = torchrun_command(args.nproc, rest, passthrough)
    nodes = next((item.split("=", 1)[1] for item in passthrough
                  if item.startswith("--nnodes=")), "1")
    if nodes.isdigit():  # an elastic range (1:4) leaves the count to the processes
        from tunelab.preflight import check_processes

        # here, not in every process: one error line instead of one per rank
        check_processes(cfg, args.nproc * int(nodes), Path(cfg.out))
    log.info("launching: %s", " ".join(cmd))
    code = subprocess.call(cmd)
    if code != 0:
        raise TunelabError(
            f"distributed training failed: a process exited with code {code} and torchrun "
            "stopped the others (its log above names the rank). Checkpoints written so far "
            "are kept; continue with --resume.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tunelab.config import build_config, parse_overrides

    values: dict[str, Any] = {}
    overrides = []
    for item in args.config_and_overrides:
        if "=" in item:
            overrides.append(item)
        elif values:
            raise TunelabError(f"more than one config file given ('{item}')")
        else:
            values = _config_file(item)
    values.update(parse_overrides(overrides))
    for flag, (key, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            values[key] = _data_flag(value) if flag == "--data" else value
    if args.resume:
        values["resume"] = True
    if args.force:
        values["force"] = True
    cfg = build_config(values, source=args.config_and_overrides[0]
                       if values and args.config_and_overrides else "command line")
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_torchrun(args, args.raw_argv, cfg)
    from tunelab.memory import fmt_bytes
    from tunelab.train import train

    result = train(cfg, progress=not args.no_progress)
    if not _is_main_process():
        return 0
    print(f"trained {result.steps} steps in {result.train_seconds:.0f} s "
          f"({result.tokens_per_second:.0f} tokens/s), peak memory "
          f"{fmt_bytes(result.peak_memory_bytes)}")
    if result.final_train_loss is not None:
        val = f", val loss {result.final_val_loss:.4f}" if result.final_val_loss else ""
        print(f"final train loss {result.final_train_loss:.4f}{val}")
    stats = result.data_stats
    if stats["truncated"] or stats["dropped"]:
        print(f"data: {stats['truncated']} examples truncated and {stats['dropped']} dropped "
              f"at max_length {stats['max_length']}")
    kind = "adapter" if cfg.is_lora else "model"
    print(f"{kind} saved to {result.weights_dir}")
    return 130 if result.interrupted else 0


def _config_file(path: str) -> dict[str, Any]:
    """A config file's settings, its data paths taken relative to the file (so examples run
    from anywhere)."""
    from tunelab.config import load_yaml, resolve_data_paths

    values = load_yaml(path)
    resolve_data_paths(values, path)
    return values


def _data_flag(values: list[str]) -> str | list[str]:
    """``--data`` given once without a weight is one source; otherwise each ``FILE[:WEIGHT]``
    is a source of a mixture (checked by tunelab.config)."""
    from tunelab.config import split_weight

    if len(values) == 1 and split_weight(values[0])[1] is None:
        return values[0]
    return list(values)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fine-tune a model (LoRA, QLoRA or full)",
                       description="tunelab train [CONFIG.yaml] [key=value ...] [flags]")
    p.add_argument("config_and_overrides", nargs="*", metavar="CONFIG.yaml | key=value")
    for flag, (_, typ) in TRAIN_FLAGS.items():
        if flag == "--data":  # repeated: a weighted mixture, --data a.jsonl:0.8 --data b.jsonl:0.2
            p.add_argument(flag, type=typ, default=None, action="append",
                           help="training data; repeat as FILE:WEIGHT for a mixture")
        else:
            p.add_argument(flag, type=typ, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="train even where the plan says the run will not fit in memory")
    p.add_argument("--nproc", type=int, default=None,
                   help="data-parallel processes on this node (runs torchrun)")
    for option in TORCHRUN_OPTIONS:
        p.add_argument(option, default=None, help="passed to torchrun")
    p.set_defaults(func=cmd_train)


# --------------------------------------------------------------------------- generate


def _load_for_inference(args: argparse.Namespace) -> tuple[Any, Any]:
    from tunelab import adapters, models

    # An adapter trained on a quantized base runs on the same quantized base by default.
    meta = adapters.adapter_meta(args.adapter) if args.adapter else {}
    bits = args.base_bits or meta.get("base_bits", 16)
    args.model = adapters.base_model_for(args.model, args.adapter)
    if bits == 4:
        from tunelab.memory import return_freed_memory

        return_freed_memory()  # the repack's freed bytes go back (tunelab.models.repack_now)
    model, tokenizer = models.load_model(args.model, device=args.device, dtype=args.dtype,
                                         allow_pickle=args.allow_pickle,
                                         trust_remote_code=args.trust_remote_code, bits=bits,
                                         quant_type=meta.get("quant_type", "nf4"),
                                         double_quant=meta.get("double_quant", True),
                                         generation_only=True)
    if args.adapter:
        model = adapters.load_adapter(model, args.adapter)
    return model, tokenizer


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="alias, folder, GGUF file or hub id (default: "
                   "the adapter's base as recorded in training, else smollm2-135m)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (or a run directory)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--base-bits", type=int, choices=(4, 8, 16), default=None,
                   help="load the base quantized (default: as the adapter was trained)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message")


def _settings(args: argparse.Namespace) -> Any:
    from tunelab.generate import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))


def cmd_generate(args: argparse.Namespace) -> int:
    from tunelab.generate import build_prompt, generate

    model, tokenizer = _load_for_inference(args)
    prompts = [build_prompt(tokenizer, p, raw=args.raw, system=args.system) for p in args.prompt]
    for result in generate(model, tokenizer, prompts, _settings(args)):
        print(result["text"])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tunelab.generate import build_prompt, generate

    model, tokenizer = _load_for_inference(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; empty line or Ctrl-D to quit, /reset to clear history")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [build_prompt(tokenizer, history)],
                         _settings(args))[0]["text"]
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}" if interactive else reply, flush=True)
    return 0


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate a reply to one or more prompts")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat (stdin), with or without an adapter")
    _add_model_args(c)
    _add_sampling_args(c)
    c.set_defaults(func=cmd_chat)


# ------------------------------------------------------------------------------ merge


def models_folder(spec: str) -> str:
    from tunelab import models

    return models.local_folder(models.resolve_model(spec))


def cmd_merge(args: argparse.Namespace) -> int:
    from tunelab.adapters import base_model_for
    from tunelab.merge import merge_to_checkpoint, wants_streaming

    args.model = base_model_for(args.model, args.adapter)
    if args.streaming or (args.streaming is None and wants_streaming(args.model)):
        from tunelab.merge_streaming import merge_streaming

        report = merge_streaming(models_folder(args.model), args.adapter, Path(args.out))
        print(f"merged checkpoint saved to {report['out']} ({report['merged_weights']} "
              f"weights merged, {report['shards']} bf16 shards, streamed shard by shard; "
              "no logit check: that would need the whole model in memory)")
        return 0
    report = merge_to_checkpoint(args.model, args.adapter, Path(args.out),
                                 allow_pickle=args.allow_pickle, device=args.device,
                                 requantize=args.requantize)
    print(f"merged checkpoint saved to {report['out']}")
    print("max |logit difference| against base+adapter"
          + (f" (the int{report['base_bits']} base it was trained on):"
             if report["base_bits"] != 16 else ":"))
    for path, diff in report["paths"].items():
        print(f"  {diff:10.2e}  {path}")
    return 0


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base, save an HF checkpoint")
    p.add_argument("--model", default=None,
                   help="the base (default: the adapter's base as recorded in training)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--requantize", choices=("nf4", "fp4", "int8"), default=None,
                   help="also measure the merged model re-quantized")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="merge shard by shard into bf16 shards (default: when the model "
                        "in fp32 would not fit in memory)")
    p.set_defaults(func=cmd_merge)


# --------------------------------------------------------------------------- quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    from tunelab.quantize import format_table, quantize, write_json

    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows = quantize(args.model, args.to or ["nf4", "int8"], out,
                    double_quant=not args.no_double_quant, device=args.device)
    print(format_table(rows, double_quant=not args.no_double_quant))
    json_path = Path(args.json) if args.json else (out / "quantize.json" if out else None)
    if json_path is not None:
        write_json(rows, json_path)
        print(f"table written to {json_path}")
    return 0


def _add_quantize(sub: Any) -> None:
    p = sub.add_parser("quantize", help="quantized checkpoints and their trade-offs measured")
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--to", action="append", choices=("nf4", "fp4", "int8"),
                   help="format (repeatable; default nf4 and int8)")
    p.add_argument("--no-double-quant", action="store_true")
    p.add_argument("--out", default=None, help="folder for the quantized checkpoints")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_quantize)


# ------------------------------------------------------------------------- quickstart


def cmd_quickstart(args: argparse.Namespace) -> int:
    from tunelab.quickstart import run_quickstart

    run_quickstart(args.out, max_steps=args.max_steps)
    return 0


def _add_quickstart(sub: Any) -> None:
    p = sub.add_parser("quickstart", help="the whole story on the embedded default model")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--max-steps", type=int, default=None)
    p.set_defaults(func=cmd_quickstart)


# ------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunelab", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_generate(sub)
    _add_merge(sub)
    _add_quickstart(sub)
    _add_quantize(sub)
    try:
        from tunelab.plan import cli as plan_cli
    except ImportError:  # planner not installed in this build
        plan_cli = None
    if plan_cli is not None:
        plan_cli.add_parser(sub)
    from tunelab.evaluate import cli as evaluate_cli

    evaluate_cli.add_parsers(sub)
    from tunelab import export, sweep
    from tunelab.serve import cli as serve_cli

    serve_cli.add_parser(sub)
    export.add_parser(sub)
    sweep.add_parser(sub)
    from tunelab.ui import cli as ui_cli

    ui_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # key=value overrides may come after flags (`train cfg.yaml --nproc 2 lr=1e-4`), which
    # argparse's positional matching does not allow: collect them from the leftovers.
    args, unknown = parser.parse_known_args(argv)
    overrides = [u for u in unknown if "=" in u and not u.startswith("-")]
    if args.command == "train":
        args.config_and_overrides += overrides
    rest = [u for u in unknown if args.command != "train" or u not in overrides]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.raw_argv = argv
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except TunelabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
