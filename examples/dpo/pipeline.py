"""SFT -> DPO -> compare on the countries task: does preference tuning help? Measured.

    python examples/dpo/pipeline.py                  # the README table (2 CPU cores)
    python examples/dpo/pipeline.py --quick          # every stage at toy size, a smoke run

Stages, everything under ``--out`` (default ``runs/dpo-example``):

1. ``sft/``: LoRA SFT on the training split (``examples/dpo/sft.yaml``), short on purpose so
   the model still gets some records wrong.
2. ``pairs/``: the SFT model's own answers, sampled (``--samples`` per sentence at
   ``--temperature``), to the training sentences (``train.jsonl``) and, the same way, to the
   held-out sentences (``heldout.jsonl``). Each distinct wrong answer (not ``json_exact``)
   is the rejected answer of a pair whose chosen answer is the right record; a sentence the
   model answered right gives no pair. ``stats.json`` counts them and the wrong fields.
3. ``dpo/``: DPO from the SFT adapter on ``train.jsonl`` (``examples/dpo/dpo.yaml``; the
   reference is the SFT adapter, frozen), validated on ``heldout.jsonl``.
4. ``compare/``: on the held-out sentences (the split SFT validated on, never trained on),
   few-shot k=3 (the base model with the schema instruction), SFT and SFT+DPO: exact JSON
   records with bootstrap intervals, per-field accuracy, and on the held-out pairs
   preference accuracy and reward margin. Then the paired differences SFT+DPO - SFT (exact
   records, each field, preference accuracy) with paired-bootstrap intervals go to
   ``summary.json`` and are printed as the markdown table the README carries.

Run it from the repository root (the configs' paths are relative to it); ``--model``,
``--sft-steps``, ``--dpo-steps``, ``--n-train``, ``--n-eval`` and ``--samples`` size it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "src"))  # a clean clone runs without installing

from tunelab import data  # noqa: E402
from tunelab.config import build_config, load_yaml  # noqa: E402
from tunelab.evaluate.metrics import json_exact, json_field_scores  # noqa: E402
from tunelab.evaluate.run import EvalExample  # noqa: E402

QUICK = {"sft_steps": 4, "dpo_steps": 4, "n_train": 24, "n_eval": 8}


def config(name: str, out: Path, **values: Any) -> dict[str, Any]:
    """A stage's YAML with its paths moved under ``out`` and ``values`` on top."""
    cfg = load_yaml(HERE / f"{name}.yaml")
    if name == "sft":
        cfg["data"] = str(HERE / cfg["data"])
    else:
        cfg.update(data=str(out / "pairs" / "train.jsonl"),
                   val_data=str(out / "pairs" / "heldout.jsonl"),
                   init_adapter=str(out / "sft" / "adapter"))
    cfg["out"] = str(out / name)
    cfg.update({k: v for k, v in values.items() if v is not None})
    return cfg


def sample_pairs(model: Any, tokenizer: Any, examples: list[EvalExample], *, samples: int,
                 temperature: float, max_new_tokens: int, seed: int, batch_size: int = 16,
                 progress: bool = True, desc: str = "sample") -> tuple[list[dict], dict]:
    """Preference pairs from the model's own sampled answers: each distinct wrong answer
    rejected, the example's right record chosen. Returns (pairs, counts)."""
    from tunelab.evaluate.run import PromptStyle, generate_batched
    from tunelab.generate import GenerationSettings, build_prompt

    style = PromptStyle("sft", "finetuned")  # prompted exactly as in training
    prompts = [build_prompt(tokenizer, style.messages(ex)) for ex in examples]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed)
    outs = generate_batched(model, tokenizer, prompts * samples, settings,
                            batch_size=batch_size, progress=progress, desc=desc)
    pairs: list[dict] = []
    wrong_fields: dict[str, int] = {}
    right = 0
    for i, ex in enumerate(examples):
        seen: set[str] = set()
        for s in range(samples):
            answer = outs[s * len(examples) + i]["text"].strip()
            if json_exact(answer, ex.reference) == 1.0:
                right += 1
                continue
            if not answer or answer in seen:
                continue
            seen.add(answer)
            for k, ok in json_field_scores(answer, ex.reference).fields.items():
                wrong_fields[k] = wrong_fields.get(k, 0) + int(ok == 0.0)
            pairs.append({"id": f"{ex.id}#{s}", "prompt": ex.question, "chosen": ex.reference,
                          "rejected": answer})
    counts = {"sentences": len(examples), "answers": len(examples) * samples,
              "right_answers": right, "pairs": len(pairs),
              "wrong_fields_in_rejected": wrong_fields}
    return pairs, counts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def paired(a: list[float], b: list[float], seed: int) -> dict[str, float]:
    from tunelab.evaluate.stats import paired_bootstrap_diff

    iv = paired_bootstrap_diff(a, b, seed=seed)
    return {"diff": iv.estimate, "ci_low": iv.low, "ci_high": iv.high}


def differences(sft: Any, dpo: Any, seed: int) -> dict[str, Any]:
    """SFT+DPO minus SFT on the same examples / pairs, paired bootstrap."""
    out: dict[str, Any] = {"json_exact": paired(dpo.scores["json_exact"],
                                                sft.scores["json_exact"], seed)}
    fields = list(sft.outputs[0].get("fields") or {})
    out["fields"] = {k: paired([r["fields"][k] for r in dpo.outputs],
                               [r["fields"][k] for r in sft.outputs], seed) for k in fields}
    if sft.preference is not None and dpo.preference is not None:
        out["preference_accuracy"] = paired(dpo.preference.correct, sft.preference.correct, seed)
    return out


def _ci(m: dict[str, float], key: str = "mean") -> str:
    return f"{m[key]:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def markdown(summary: dict[str, Any]) -> str:
    """The README table: one row per system, then the paired differences."""
    fields = list(summary["rows"][0]["fields"] or {})
    head = ["system", "exact records [95% CI]", *fields, "pref. accuracy [95% CI]",
            "reward margin [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        pref = r.get("preference")
        star = "" if not pref or pref["reference"] else "*"
        cells = [r["name"], _ci(r["json_exact"]),
                 *(f"{r['fields'][k]:.2f}" for k in fields),
                 _ci(pref["preference_accuracy"]) if pref else "-",
                 _ci(pref["reward_margin"]) + star if pref else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    d = summary["dpo_minus_sft"]
    cells = ["SFT+DPO − SFT (paired)", _ci(d["json_exact"], "diff"),
             *(_ci(d["fields"][k], "diff") for k in fields),
             _ci(d["preference_accuracy"], "diff") if "preference_accuracy" in d else "-", ""]
    lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nReward margin: beta x the chosen answer's log-prob gain over the base model "
                 "(adapter off) minus the rejected one's; * no adapter, so no reference: beta x "
                 "(log p(chosen) - log p(rejected)).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/dpo-example")
    p.add_argument("--model", default=None, help="base model (default: the configs')")
    p.add_argument("--sft-steps", type=int, default=None, help="default: sft.yaml's")
    p.add_argument("--dpo-steps", type=int, default=None, help="default: dpo.yaml's")
    p.add_argument("--dpo-lr", type=float, default=None, help="default: dpo.yaml's")
    p.add_argument("--beta", type=float, default=None, help="DPO beta (default: dpo.yaml's)")
    p.add_argument("--n-train", type=int, default=None,
                   help="training sentences to sample answers to (default: all)")
    p.add_argument("--n-eval", type=int, default=None,
                   help="held-out sentences (default: all of the split)")
    p.add_argument("--samples", type=int, default=1, help="sampled answers per sentence")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=60)
    p.add_argument("--few-shot", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="toy sizes for a smoke run: " + ", ".join(f"{k}={v}"
                                                                  for k, v in QUICK.items()))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) in (None, p.get_default(k)):
                setattr(args, k, v)
    return run(args)


def run(args: argparse.Namespace) -> int:
    from tunelab.evaluate.compare import FinetunedSystem, print_result, run_compare
    from tunelab.evaluate.run import (
        EvalSettings,
        ModelOptions,
        examples_from_records,
        load_finetuned,
        resolve_finetuned,
    )
    from tunelab.quickstart import METRICS, SCHEMA_INSTRUCTION
    from tunelab.train import train

    start = time.perf_counter()
    clock = {"start": start}
    seconds: dict[str, float] = {}

    def lap(stage: str) -> None:  # wall time per stage, for the "under 15 minutes" claim
        now = time.perf_counter()
        seconds[stage] = round(now - clock["start"], 1)
        clock["start"] = now

    out = Path(args.out)
    progress = not args.no_progress
    sft_cfg = build_config(config("sft", out, model=args.model, max_steps=args.sft_steps),
                           source=str(HERE / "sft.yaml"))
    print(f"[1/4] SFT: LoRA on {Path(sft_cfg.data).name}, {sft_cfg.max_steps} steps of "
          f"{sft_cfg.batch_size}", flush=True)
    sft_run = train(sft_cfg, progress=progress)
    lap("sft")

    records = data.read_records(sft_cfg.data)
    train_recs, held_recs = data.split_records(records, sft_cfg.val_fraction, sft_cfg.seed)
    train_ex = examples_from_records(train_recs)[:args.n_train]
    held_ex = examples_from_records(held_recs)[:args.n_eval]

    print(f"[2/4] pairs: {args.samples} sampled SFT answer(s) (temperature "
          f"{args.temperature}) to {len(train_ex)} training and {len(held_ex)} held-out "
          "sentences; wrong answers rejected, the right record chosen", flush=True)
    options = ModelOptions(device=sft_cfg.device, dtype=sft_cfg.dtype)
    model, tokenizer = load_finetuned(resolve_finetuned(out / "sft"), sft_cfg.model, options)
    stats = {}
    for split, examples, seed in (("train", train_ex, sft_cfg.seed),
                                  ("heldout", held_ex, sft_cfg.seed + 1000)):
        pairs, stats[split] = sample_pairs(
            model, tokenizer, examples, samples=args.samples, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, seed=seed, progress=progress,
            desc=f"sample {split}")
        write_jsonl(out / "pairs" / f"{split}.jsonl", pairs)
        print(f"      {split}: {stats[split]['right_answers']} of {stats[split]['answers']} "
              f"answers right, {len(pairs)} pairs; wrong fields in the rejected: "
              f"{stats[split]['wrong_fields_in_rejected']}", flush=True)
    (out / "pairs" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    del model
    lap("pairs")
    if not stats["train"]["pairs"]:
        print("the SFT model answered every training sentence right: no pair to train DPO "
              "on (train SFT for fewer steps, or sample at a higher --temperature)")
        return 1
    has_val = stats["heldout"]["pairs"] > 0

    dpo_values = config("dpo", out, model=args.model, max_steps=args.dpo_steps,
                        lr=args.dpo_lr, beta=args.beta)
    if not has_val:
        dpo_values.pop("val_data")
        dpo_values["val_fraction"] = 0.0
    dpo_cfg = build_config(dpo_values, source=str(HERE / "dpo.yaml"))
    print(f"[3/4] DPO from the SFT adapter: {stats['train']['pairs']} pairs, "
          f"{dpo_cfg.max_steps} steps of {dpo_cfg.batch_size}, beta {dpo_cfg.beta}, "
          f"lr {dpo_cfg.lr}", flush=True)
    dpo_run = train(dpo_cfg, progress=progress)
    lap("dpo")

    pairs_ex = (examples_from_records(data.read_records(out / "pairs" / "heldout.jsonl"))
                if has_val else None)
    print(f"[4/4] compare on {len(held_ex)} held-out sentences"
          + (f" and {len(pairs_ex)} held-out pairs" if pairs_ex else "")
          + f": few-shot k={args.few_shot} vs SFT vs SFT+DPO", flush=True)
    settings = EvalSettings(metrics=list(METRICS), max_new_tokens=args.max_new_tokens,
                            compute_loss=False, beta=dpo_cfg.beta)
    sft_name = f"SFT ({sft_run.steps} steps)"
    dpo_name = f"SFT+DPO ({dpo_run.steps} steps)"
    result = run_compare(
        held_ex, settings=settings, out=out / "compare", model_spec=sft_cfg.model,
        shots_pool=examples_from_records(train_recs), zero_shot=False,
        few_shot=[args.few_shot], instruction=SCHEMA_INSTRUCTION,
        finetuned=[FinetunedSystem(sft_name, resolve_finetuned(out / "sft")),
                   FinetunedSystem(dpo_name, resolve_finetuned(out / "dpo"))],
        forgetting=False, progress=progress, seed=sft_cfg.seed, pairs=pairs_ex,
        title="SFT -> DPO on the countries task",
        description=("DPO pairs are the SFT model's own sampled answers: wrong records "
                     "rejected, the right record chosen."),
        data_label=f"{Path(sft_cfg.data).name} (the SFT run's validation split)")
    print_result(result)
    lap("compare")

    by_name = {e.name: e for e in result.evals}
    summary: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items()},
        "pairs": stats, "rows": [],
        "dpo_minus_sft": differences(by_name[sft_name], by_name[dpo_name], sft_cfg.seed),
        "seconds": round(time.perf_counter() - start, 1), "stage_seconds": seconds}
    for e in result.evals:
        s = e.summary(seed=sft_cfg.seed)
        summary["rows"].append({"name": e.name, "json_exact": s["metrics"]["json_exact"],
                                "fields": e.field_scores, "preference": s.get("preference")})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown(summary)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"\npipeline took {summary['seconds']:.0f} s ({stages}); summary: "
          f"{out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
