"""DPO throughput, side by side: tunelab vs TRL's DPOTrainer (defaults, and best on CPU).

    python benchmarks/dpo_throughput.py --json benchmarks/results/dpo_throughput.json

The work is the same for every system: DPO (sigmoid loss, beta 0.1) with LoRA r=16 (alpha 32,
no dropout) on all linear layers of SmolLM2-135M-Instruct, fp32, the reference being the base
with the adapters off, the same preference pairs, batch, steps, learning rate and linear
schedule. The pairs come from the countries task (``src/tunelab/assets/countries.jsonl``):
the prompt is the sentence, chosen the right JSON record, rejected the same record with one
field taken from another country. Systems:

* ``tunelab``: ``tunelab.train`` with ``objective: dpo`` at its defaults;
* ``trl-default``: TRL's ``DPOTrainer`` + PEFT at TRL's defaults (gradient checkpointing on);
* ``trl-best``: TRL with gradient checkpointing off and no padding to a multiple (its
  ``padding_free`` is disabled in TRL 1.16: it warns and pads).

Each run is a fresh process (its peak RSS is its own); the systems run interleaved, the order
rotating every round, and ratios are medians over rounds of each round's ratio. Tokens/s
counts, for every system, the same tokens per pair: ``len(prompt + chosen) +
len(prompt + rejected)`` (the two sequences a pair is made of; tunelab's shared-prompt row
does less work for them), over the training loop's wall time (no saving in it). The final
loss is the last step's training loss as each system logs it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT / "src"))

from common import LORA, peak_rss_bytes, timed_train  # noqa: E402

SYSTEMS = ["tunelab", "trl-default", "trl-best"]
FIELDS = ("capital", "region", "currency")


def build_pairs(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs from the countries task: the right record vs one wrong field."""
    rows = [json.loads(x) for x in
            (ROOT / "src/tunelab/assets/countries.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        row = rows[i % len(rows)]
        good = json.loads(row["completion"])
        other = json.loads(rows[(i * 7 + 3) % len(rows)]["completion"])
        field = FIELDS[i % len(FIELDS)]
        if other[field] == good[field]:
            other = json.loads(rows[(i * 7 + 4) % len(rows)]["completion"])
        bad = {**good, field: other[field]}
        pairs.append({"prompt": row["prompt"], "chosen": json.dumps(good),
                      "rejected": json.dumps(bad)})
    rng.shuffle(pairs)
    return pairs


def run_tunelab(args: argparse.Namespace, work: Path) -> dict:
    from tunelab.config import build_config
    from tunelab.train import train

    values = {"model": "smollm2-135m", "data": str(args.data), "val_fraction": 0.0,
              "objective": "dpo", "beta": args.beta, "method": "lora", "lora_r": LORA["r"],
              "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"], "lr": args.lr,
              "schedule": "linear", "warmup_steps": 0, "batch_size": args.batch,
              "max_steps": args.steps, "max_length": args.max_length, "out": str(work / "run"),
              "seed": 0, "device": "cpu", "dtype": "fp32"}
    result = train(build_config(values, source="benchmark"), progress=False)
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": result.train_seconds, "peak_rss": peak_rss_bytes(),
            "final_loss": rows[-1]["train_loss"],
            "final_accuracy": rows[-1]["rewards/accuracy"]}


def run_trl(args: argparse.Namespace, work: Path, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    # conversational form: the same chat template tunelab applies
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    extra = {"gradient_checkpointing": False, "pad_to_multiple_of": None} if best else {}
    config = DPOConfig(
        output_dir=str(work / "out"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0, use_cpu=True,
        bf16=False, fp16=False, report_to=[], save_strategy="no", eval_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, beta=args.beta,
        loss_type=["sigmoid"], max_length=args.max_length, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    peft = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=peft)
    seconds = timed_train(trainer)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "peak_rss": peak_rss_bytes(), "final_loss": logs[-1]["loss"],
            "final_accuracy": logs[-1].get("rewards/accuracies")}


def worker(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.worker == "tunelab":
            result = run_tunelab(args, work)
        else:
            result = run_trl(args, work, best=args.worker == "trl-best")
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def pair_tokens(data: Path, model_dir: Path, max_length: int, n: int) -> int:
    """Tokens of the first ``n`` pairs as two sequences each (see the module docstring)."""
    from transformers import AutoTokenizer

    from tunelab import data as tl_data
    from tunelab import preference

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples, _ = preference.encode_pairs(tl_data.read_records(data)[:n], tok,
                                          max_length=max_length)
    return sum(2 * len(e.prompt) + len(e.chosen) + len(e.rejected) for e in examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from tunelab.models import convert_gguf, resolve_model

    started = time.perf_counter()
    model_dir = convert_gguf(resolve_model("smollm2-135m").path)
    systems = args.systems.split(",")
    out: dict[str, Any] = {"settings": {k: getattr(args, k) for k in (
        "rounds", "steps", "batch", "lr", "beta", "max_length")}, "lora": LORA}
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        n = args.steps * args.batch
        data.write_text("".join(json.dumps(p) + "\n" for p in build_pairs(n)), encoding="utf-8")
        tokens = pair_tokens(data, model_dir, args.max_length, n)
        out["data"] = {"pairs": n, "pair_tokens": tokens}
        print(f"data: {n} pairs, {tokens} tokens as two sequences per pair", flush=True)
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[: r % len(systems)]
            for system in order:
                result_path = Path(tmp) / "result.json"
                cmd = [sys.executable, __file__, "--worker", system, "--data", str(data),
                       "--model-dir", str(model_dir), "--result", str(result_path),
                       "--steps", str(args.steps), "--batch", str(args.batch),
                       "--lr", str(args.lr), "--beta", str(args.beta),
                       "--max-length", str(args.max_length)]
                proc = subprocess.run(cmd, capture_output=True, text=True,
                                      env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM":
                                           "false", **__import__("os").environ})
                if proc.returncode != 0:
                    sys.exit(f"{system} failed:\n{proc.stderr[-4000:]}")
                res = json.loads(result_path.read_text())
                res["tokens_per_s"] = tokens / res["seconds"]
                runs[system].append(res)
                print(f"  [round {r + 1}] {system:12} {res['tokens_per_s']:7.1f} tok/s  loop "
                      f"{res['seconds']:6.1f}s  rss {res['peak_rss'] / 2**20:6.0f}Mi  final "
                      f"loss {res['final_loss']:.4f}", flush=True)
    rows = {s: {k: statistics.median(r[k] for r in rs)
                for k in ("tokens_per_s", "seconds", "peak_rss", "final_loss")} | {"runs": rs}
            for s, rs in runs.items()}
    ratios = {}
    if "tunelab" in runs:
        ratios = {p: statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                       for a, b in zip(runs["tunelab"], rs, strict=True))
                  for p, rs in runs.items() if p != "tunelab"}
    out.update(systems=rows, ratios=ratios, wall_seconds=time.perf_counter() - started)
    print(f"\n{'system':12} {'tokens/s':>9} {'peak RSS':>9} {'final loss':>11} {'loop s':>7}")
    for s, row in rows.items():
        print(f"{s:12} {row['tokens_per_s']:9.1f} {row['peak_rss'] / 2**20:7.0f}Mi "
              f"{row['final_loss']:11.4f} {row['seconds']:7.1f}")
    for peer, x in ratios.items():
        print(f"  tunelab / {peer}: {x:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
