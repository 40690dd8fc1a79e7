"""``tunelab quickstart``: tunelab's main job on its embedded default, start to finish.

The task: turn a sentence about a country into a strict JSON record (data built from the
``countryinfo`` package, shipped in ``tunelab/assets/countries.jsonl``). The model is the
embedded SmolLM2-135M-Instruct. It trains a LoRA adapter, then shows what the base model and
the adapter answer on held-out sentences, and where the adapter is.
"""

from __future__ import annotations

import importlib.resources
import logging
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


def dataset_path() -> Path:
    return Path(str(importlib.resources.files("tunelab") / "assets" / "countries.jsonl"))


def run_quickstart(out: str = "runs/quickstart", *, max_steps: int | None = None,
                   n_show: int = 3) -> Path:
    from tunelab import adapters, data, models
    from tunelab.generate import GenerationSettings, build_prompt, generate
    from tunelab.train import train

    values = {**QUICKSTART, "data": str(dataset_path()), "out": out}
    if max_steps is not None:
        values["max_steps"] = max_steps
    cfg = build_config(values, source="quickstart")
    print(f"[1/2] LoRA fine-tuning {cfg.model} on {cfg.data} ({cfg.max_steps} steps)")
    result = train(cfg)
    print(f"      train loss {result.final_train_loss:.3f}, validation loss "
          f"{result.final_val_loss:.3f}, {result.tokens_per_second:.0f} tokens/s")

    print("[2/2] held-out sentences: base model vs the adapter")
    records = data.read_records(cfg.data)
    _, held_out = data.split_records(records, cfg.val_fraction, cfg.seed)
    model, tokenizer = models.load_model(cfg.model)
    prompts = [build_prompt(tokenizer, r.data["prompt"]) for r in held_out[:n_show]]
    settings = GenerationSettings(max_new_tokens=64)
    base_out = generate(model, tokenizer, prompts, settings)
    tuned = adapters.load_adapter(model, result.weights_dir)
    tuned_out = generate(tuned, tokenizer, prompts, settings)
    for record, b, t in zip(held_out, base_out, tuned_out, strict=False):
        print(f"\n  input:    {record.data['prompt']}")
        print(f"  expected: {record.data['completion']}")
        print(f"  base:     {b['text'].strip()[:200]}")
        print(f"  adapter:  {t['text'].strip()[:200]}")
    print(f"\nadapter saved to {result.weights_dir}")
    print(f"try it: tunelab generate --model {cfg.model} --adapter {result.weights_dir} "
          f"\"<a sentence about a country>\"")
    return result.weights_dir
