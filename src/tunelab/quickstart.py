"""``tunelab quickstart``: prompt engineering or fine-tuning? The whole story, on a laptop CPU.

The task: turn a sentence about a country into a strict JSON record (data built from the
``countryinfo`` package, MIT, shipped in ``tunelab/assets/countries.jsonl``). The model is
the embedded SmolLM2-135M-Instruct (Apache-2.0).

1. LoRA-train on the training split (the run writes its own report with loss curves and
   the overfitting check).
2. On the held-out split -- exactly the split training validated on (``split_records``
   with the run's ``val_fraction`` and ``seed``) -- evaluate side by side: the base model
   zero-shot with a schema instruction, the base model few-shot with k=3 solved training
   examples, and the LoRA adapter. The headline is exact match of the parsed JSON record
   (``json_exact``); per-field accuracy is in the report.
3. The forgetting check: general-text perplexity and a general-knowledge probe, base vs
   adapter (:mod:`tunelab.evaluate.forgetting`).
4. Print the table and the verdict; write ``report.html`` + ``report.json``.

Sized for under 10 minutes on 2 CPU cores: 30 training steps, ``N_EVAL`` held-out
sentences, greedy generation of at most ``MAX_NEW_TOKENS`` tokens in batches of
``GEN_BATCH``. The reference loss is skipped here (it would re-run the long few-shot
prompts); ``tunelab eval`` / ``compare`` compute it by default.
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from pathlib import Path

from tunelab.config import build_config

log = logging.getLogger(__name__)

QUICKSTART = {
    "model": "smollm2-135m",
    "method": "lora",
    "lora_r": 16,
    "lora_alpha": 32,
    "lr": 1e-3,
    "batch_size": 8,
    "max_steps": 30,
    "warmup_steps": 2,
    "max_length": 256,
    "val_fraction": 0.25,
    "eval_every": 10,
    "save_every": 10,
    "seed": 0,
}
N_EVAL = 48
MAX_NEW_TOKENS = 60
GEN_BATCH = 16
FEW_SHOT = 3
METRICS = ["json_exact", "json_fields", "json_valid"]
SCHEMA_INSTRUCTION = (
    'Convert the sentence into one line of JSON with exactly these keys: "country", '
    '"capital", "region" (one of Africa, Americas, Asia, Europe, Oceania), "population" '
    '(an integer without commas) and "currency" (the three-letter code). Reply with the JSON '
    "only.")


def dataset_path() -> Path:
    return Path(str(importlib.resources.files("tunelab") / "assets" / "countries.jsonl"))


def run_quickstart(out: str = "runs/quickstart", *, max_steps: int | None = None,
                   n_eval: int = N_EVAL, progress: bool = True, n_show: int = 2) -> Path:
    """Train, compare, print; returns the path of the comparison's report.html."""
    from tunelab import data
    from tunelab.evaluate.compare import FinetunedSystem, print_result, run_compare
    from tunelab.evaluate.run import EvalSettings, examples_from_records, resolve_finetuned
    from tunelab.train import train

    start = time.perf_counter()
    values = {**QUICKSTART, "data": str(dataset_path()), "out": out}
    if max_steps is not None:
        values["max_steps"] = max_steps
    cfg = build_config(values, source="quickstart")
    print(f"[1/2] LoRA fine-tuning {cfg.model} on {Path(cfg.data).name} "
          f"({cfg.max_steps} steps of {cfg.batch_size})", flush=True)
    result = train(cfg, progress=progress)
    if result.interrupted:
        print(f"training interrupted at step {result.steps}; run `tunelab quickstart --out "
              f"{out}` again later (or `tunelab train` with --resume) to finish")
        return Path(out) / "report.html"
    val = f"{result.final_val_loss:.3f}" if result.final_val_loss is not None else "n/a"
    print(f"      train loss {result.final_train_loss:.3f}, validation loss {val}, "
          f"{result.tokens_per_second:.0f} tokens/s; run report {Path(out) / 'report.html'}")

    # The held-out sentences are the validation split training used: same file, same
    # val_fraction, same seed. Few-shot examples come from the training split only.
    records = data.read_records(cfg.data)
    train_records, held_out = data.split_records(records, cfg.val_fraction, cfg.seed)
    examples = examples_from_records(held_out[:n_eval])
    pool = examples_from_records(train_records)
    print(f"[2/2] {len(examples)} held-out sentences: base model zero-shot (schema "
          f"instruction) and few-shot (k={FEW_SHOT}) vs the LoRA adapter, then the "
          "forgetting check", flush=True)
    settings = EvalSettings(metrics=list(METRICS), batch_size=GEN_BATCH,
                            max_new_tokens=MAX_NEW_TOKENS, compute_loss=False)
    lora = FinetunedSystem(f"LoRA ({result.steps} steps)", resolve_finetuned(out))
    compare = run_compare(
        examples, settings=settings, out=Path(out) / "compare", model_spec=cfg.model,
        shots_pool=pool, few_shot=[FEW_SHOT], instruction=SCHEMA_INSTRUCTION,
        finetuned=[lora], progress=progress, seed=cfg.seed,
        title="Quickstart: prompt engineering or fine-tuning?",
        description=("Task: turn a sentence about a country into a strict JSON record "
                     "(country, capital, region, population, currency)."),
        data_label=f"{Path(cfg.data).name} (the run's validation split)",
        shots_label=f"the run's training split ({len(pool)} sentences)")

    for i in range(min(n_show, len(examples))):
        print(f"\n  input:    {examples[i].question}")
        print(f"  expected: {examples[i].reference}")
        for e in compare.evals:
            mark = "ok " if e.outputs[i]["scores"][e.headline] == 1.0 else "   "
            text = " ".join(e.outputs[i]["prediction"].split())
            print(f"  {mark}{e.name + ':':<17} {text[:150]}")
    print_result(compare)
    print(f"\nadapter saved to {result.weights_dir}")
    print(f"try it: tunelab generate --model {cfg.model} --adapter {result.weights_dir} "
          f"\"<a sentence about a country>\"")
    print(f"quickstart took {time.perf_counter() - start:.0f} s")
    return compare.html_path
