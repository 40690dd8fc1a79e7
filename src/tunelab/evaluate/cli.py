"""``tunelab eval`` and ``tunelab compare``; the main CLI registers them with
:func:`add_parsers`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError

EVAL_EPILOG = """\
examples:
  tunelab eval --model smollm2-135m --adapter runs/a --data heldout.jsonl --out runs/a-eval
  tunelab eval --data heldout.jsonl --few-shot 3 --shots-from train.jsonl \\
      --instruction "Reply with JSON only." --metric json_exact --metric json_fields
  tunelab eval --data qa.jsonl --metric contains --metric python:my_scorers.py:score
  tunelab eval --adapter runs/dpo --data pairs.jsonl   # + preference accuracy, reward margin

metrics: exact, normalized_exact, contains, json_valid, json_valid_extract, json_exact,
  json_fields, json_fields_extract, rouge_l, regex:<pattern>, regex_search:<pattern>,
  python:<module:function>. The first --metric is the headline; default: json_exact,
  json_fields, json_valid when every reference is a JSON object, else exact,
  normalized_exact, rouge_l.
"""

COMPARE_EPILOG = """\
examples:
  # the run's own held-out split and training split are used when --data is left out
  tunelab compare --adapter runs/a --few-shot 1 --few-shot 3 \\
      --instruction "Reply with a JSON object with keys country, capital, ..."
  tunelab compare --model smollm2-135m --data heldout.jsonl --shots-from train.jsonl \\
      --few-shot 3 --adapter lora=runs/a --adapter full=runs/b --out runs/compare
  # your own lm-evaluation-harness task (local files) measured before/after as well
  tunelab compare --adapter runs/a --probe-task my_tasks/trivia.yaml
"""


def _add_common(p: argparse.ArgumentParser, *, out: str) -> None:
    p.add_argument("--model", default=None,
                   help="base model: alias, folder, GGUF or hub id (default: the base the "
                        "adapter was trained on, else smollm2-135m)")
    p.add_argument("--data", default=None, help="evaluation file (any tunelab data format)")
    p.add_argument("--format", default="auto",
                   choices=("auto", "prompt_completion", "instruction", "chat"))
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="metric (repeatable; the first is the headline)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling, shots and bootstrap seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--instruction", default=None,
                   help="text put before the first user turn of prompting rows")
    p.add_argument("--system", default=None, help="system message for prompting rows")
    p.add_argument("--shots-from", default=None,
                   help="training data to take few-shot examples from")
    p.add_argument("--no-loss", action="store_true",
                   help="skip the reference loss / perplexity")
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--preference-data", default=None, metavar="FILE",
                   help="preference pairs (prompt/chosen/rejected) to score beside --data; a "
                        "preference file given as --data is scored on both already")
    p.add_argument("--beta", type=float, default=0.1,
                   help="preference pairs: beta of the reward margin (default 0.1)")


def add_parsers(subparsers: Any) -> None:
    """Register ``eval`` and ``compare`` on an argparse subparsers object."""
    e = subparsers.add_parser(
        "eval", help="score a model (or adapter) on held-out data, save its outputs",
        description="Generate for every example of a held-out file, score the outputs, "
                    "compute the reference loss, and write outputs.jsonl, results.json and "
                    "report.html to --out.",
        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(e, out="runs/eval")
    e.add_argument("--adapter", default=None,
                   help="LoRA/QLoRA adapter folder, full model folder, or run directory")
    e.add_argument("--few-shot", type=int, default=0, metavar="K",
                   help="prompt with K solved examples from --shots-from")
    e.add_argument("--name", default=None, help="name of this system in the report")
    e.set_defaults(func=cmd_eval)

    c = subparsers.add_parser(
        "compare", help="prompt engineering vs fine-tuning on the same held-out set",
        description="Evaluate zero-shot and few-shot prompting of the base model and one or "
                    "more fine-tuned models on the same examples; print a table with "
                    "intervals and costs, a verdict, the forgetting and overfitting checks, "
                    "and write report.html + report.json to --out.",
        epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(c, out="runs/compare")
    c.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="fine-tuned row: adapter, model folder or run directory (repeatable)")
    c.add_argument("--few-shot", action="append", type=int, default=[], metavar="K",
                   help="few-shot row with K examples (repeatable: --few-shot 1 --few-shot 3)")
    c.add_argument("--no-zero-shot", action="store_true", help="leave out the zero-shot row")
    c.add_argument("--no-forgetting", action="store_true",
                   help="skip the before/after general-ability check")
    c.add_argument("--probe-task", action="append", default=[], metavar="TASK.yaml",
                   help="an lm-evaluation-harness task (local YAML, or a registered name) "
                        "measured before/after beside tunelab's probe (repeatable; needs "
                        "pip install 'tunelab[eval]')")
    c.add_argument("--min-gain", type=float, default=0.0,
                   help="smallest score gain worth a training run (default 0)")
    c.set_defaults(func=cmd_compare)


# ---------------------------------------------------------------------------- helpers


def _settings(args: argparse.Namespace) -> Any:
    from tunelab.evaluate.run import EvalSettings

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.beta <= 0:
        raise ConfigError(f"--beta must be > 0, got {args.beta}")
    return EvalSettings(metrics=list(args.metric), batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed, stop=tuple(args.stop),
                        compute_loss=not args.no_loss, beta=args.beta)


def _options(args: argparse.Namespace) -> Any:
    from tunelab.evaluate.run import ModelOptions

    return ModelOptions(device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                        trust_remote_code=args.trust_remote_code)


def _examples(args: argparse.Namespace, run_dirs: list[Path]) -> tuple[list[Any], str, Any]:
    """(evaluation examples, label of their source, few-shot pool or None)."""
    from tunelab.evaluate.run import examples_from_records, load_eval_examples, run_splits

    pool = None
    pool_label = None
    if args.shots_from:
        pool = load_eval_examples(args.shots_from)
        pool_label = args.shots_from
    if args.data:
        examples = load_eval_examples(args.data, fmt=args.format, limit=args.limit)
        label = args.data
    elif run_dirs:
        train, val, fmt = run_splits(run_dirs[0])
        if args.limit is not None:
            if args.limit < 1:
                raise DataError(f"--limit must be at least 1, got {args.limit}")
            val = val[:args.limit]
        examples = examples_from_records(val, fmt if args.format == "auto" else args.format)
        label = f"the validation split of {run_dirs[0]}"
        if pool is None:
            pool = examples_from_records(train, fmt if args.format == "auto" else args.format)
            pool_label = f"the training split of {run_dirs[0]}"
    else:
        raise ConfigError("--data FILE is required (or pass a run directory as --adapter to "
                          "evaluate on its held-out split)")
    return examples, label, (pool, pool_label)


def _split_adapter(item: str) -> tuple[str | None, str]:
    name, sep, path = item.partition("=")
    if sep and name and not Path(item).exists():
        return name, path
    return None, item


def _pairs(args: argparse.Namespace) -> list[Any] | None:
    """``--preference-data``: pairs scored beside a task set (None: the task set's own)."""
    from tunelab.evaluate.run import load_eval_examples, preference_pairs

    if not args.preference_data:
        return None
    pairs = preference_pairs(load_eval_examples(args.preference_data, limit=args.limit))
    if not pairs:
        raise DataError("--preference-data needs prompt/chosen/rejected records (preference "
                        "pairs)", path=args.preference_data)
    return pairs


# ---------------------------------------------------------------------------- commands


def cmd_eval(args: argparse.Namespace) -> int:
    from tunelab.evaluate.run import PromptStyle, choose_shots, resolve_finetuned, run_eval

    source = resolve_finetuned(args.adapter) if args.adapter else None
    run_dirs = [source.run_dir] if source is not None and source.run_dir else []
    examples, label, (pool, _) = _examples(args, run_dirs)
    settings = _settings(args)
    shots = []
    if args.few_shot:
        if not pool:
            raise ConfigError("--few-shot needs --shots-from FILE (the training data; shots "
                              "must not come from the evaluation set)")
        shots = choose_shots(pool, args.few_shot, seed=args.seed, exclude=examples)
    if source is not None:
        kind, default = "finetuned", "fine-tuned"
    elif shots:
        kind, default = "few_shot", f"few-shot k={args.few_shot}"
    else:
        kind, default = "zero_shot", "zero-shot"
    style = PromptStyle(args.name or default, kind, args.instruction, args.system, shots)
    out = Path(args.out)
    result = run_eval(model_spec=args.model, adapter=args.adapter, examples=examples,
                      settings=settings, out=out, style=style, options=_options(args),
                      progress=not args.no_progress, pairs=_pairs(args))
    summary = result.summary(seed=args.seed)
    print(f"{result.name}: {len(result.example_ids)} examples from {label}")
    for name, m in summary["metrics"].items():
        print(f"  {name:<20} {m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]")
    if "reference_perplexity" in summary:
        ppl = summary["reference_perplexity"]
        print(f"  {'reference loss':<20} {summary['reference_loss']:.4f} (perplexity "
              f"{ppl['mean']:.3f} [{ppl['ci_low']:.3f}, {ppl['ci_high']:.3f}])")
    if result.field_scores:
        fields = ", ".join(f"{k} {v:.2f}" for k, v in result.field_scores.items())
        print(f"  {'per field':<20} {fields}")
    if "preference" in summary:
        pref = summary["preference"]
        acc, margin = pref["preference_accuracy"], pref["reward_margin"]
        ref = f"vs {pref['reference']}" if pref["reference"] else "no reference"
        print(f"  {'preference accuracy':<20} {acc['mean']:.3f} [{acc['ci_low']:.3f}, "
              f"{acc['ci_high']:.3f}] ({pref['n_pairs']} pairs)")
        print(f"  {'reward margin':<20} {margin['mean']:.3f} [{margin['ci_low']:.3f}, "
              f"{margin['ci_high']:.3f}] (beta {pref['beta']}, {ref})")
    print(f"  {'prompt tokens/req':<20} {result.prompt_tokens:.0f}")
    print(f"  {'latency/req':<20} {result.latency_s:.3f} s (batch size {settings.batch_size})")
    print(f"outputs: {out / 'outputs.jsonl'}")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from tunelab.evaluate.compare import finetuned_system, print_result, run_compare
    from tunelab.evaluate.run import resolve_finetuned

    finetuned = []
    for item in args.adapter:
        name, path = _split_adapter(item)
        finetuned.append(finetuned_system(resolve_finetuned(path), name))
    run_dirs = [f.source.run_dir for f in finetuned if f.source.run_dir is not None]
    examples, label, (pool, pool_label) = _examples(args, run_dirs)
    if any(k < 1 for k in args.few_shot):
        raise ConfigError("--few-shot K must be at least 1 (the zero-shot row is included "
                          "unless --no-zero-shot)")
    result = run_compare(
        examples, settings=_settings(args), out=args.out, model_spec=args.model,
        shots_pool=pool, zero_shot=not args.no_zero_shot, few_shot=args.few_shot,
        instruction=args.instruction, system=args.system, finetuned=finetuned,
        forgetting=not args.no_forgetting, options=_options(args),
        progress=not args.no_progress, shot_seed=args.seed, min_gain=args.min_gain,
        seed=args.seed, data_label=label, shots_label=pool_label, pairs=_pairs(args),
        probe_tasks=args.probe_task)
    print_result(result)
    return 0
