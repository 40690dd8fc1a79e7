"""LoRA on the fp32 base vs QLoRA on the NF4 base, side by side on SmolLM2.

Same data, steps, batch and seed; each run in a fresh process so its peak RSS is its own.

    python benchmarks/qlora_memory.py [--steps 8] [--batch-size 4] [--json out.json]

Prints per method: peak memory (CPU: peak RSS; CUDA: max allocated), weight memory of the
loaded model, the quantized layers' bytes against the same layers in bf16, median step time,
and the final validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "tunelab" / "assets" / "countries.jsonl"


def run(method: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "tunelab", "train", "--model", args.model, "--data", str(DATA),
           "--method", method, "--out", str(out), "--max-steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", "256",
           "--eval-every", str(args.steps), "--seed", "0", "--lr", "1e-3", "--no-progress",
           "val_fraction=0.1"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["tokens"] - p["tokens"] for p, r in zip(lines, lines[1:], strict=False)]
    tokens_per_step = statistics.median(step_s) if step_s else lines[0]["tokens"]
    median_tps = statistics.median(r["tokens_per_s"] for r in lines[1:] or lines)
    return {
        "method": method,
        "peak_memory_mib": summary["peak_memory_bytes"] / 2**20,
        "weight_memory_mib": summary["memory_parts"]["weights"] / 2**20,
        "quantized_vs_bf16": summary.get("quantized_layers", {}).get("ratio_to_bf16"),
        "median_step_s": tokens_per_step / median_tps,
        "tokens_per_s": summary["tokens_per_second"],
        "final_val_loss": summary["final_val_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(m, Path(tmp) / m, args) for m in ("lora", "qlora")]
    head = (f"{'method':8} {'peak MiB':>9} {'weights MiB':>12} {'quant/bf16':>11} "
            f"{'step s':>7} {'tok/s':>6} {'val loss':>9}")
    print(f"{args.model}, {args.steps} steps of batch {args.batch_size}, same data and seed")
    print(head)
    for r in rows:
        ratio = f"{r['quantized_vs_bf16']:.3f}" if r["quantized_vs_bf16"] else "-"
        print(f"{r['method']:8} {r['peak_memory_mib']:9.0f} {r['weight_memory_mib']:12.0f} "
              f"{ratio:>11} {r['median_step_s']:7.2f} {r['tokens_per_s']:6.0f} "
              f"{r['final_val_loss']:9.4f}")
    lora, qlora = rows
    print(f"QLoRA/LoRA: peak memory x{qlora['peak_memory_mib'] / lora['peak_memory_mib']:.2f}, "
          f"weight memory x{qlora['weight_memory_mib'] / lora['weight_memory_mib']:.2f}, "
          f"step time x{qlora['median_step_s'] / lora['median_step_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
