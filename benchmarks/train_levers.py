"""Each throughput lever of tunelab's training step, measured on its own.

    python benchmarks/train_levers.py [--examples 24] [--rounds 3] [--json out.json]

One process, one SmolLM2-135M LoRA model (r=16, all linear layers, fp32), the same chat
records as ``benchmarks/train_throughput.py`` (Wikipedia summaries, varied lengths). Every
variant trains on the same examples in the same steps (batch 8); the variants run
interleaved, round after round, and the table shows the median tokens/s (non-padding tokens
over the steps' wall time), against the baseline and against the row above, and the share
of the fp32 matmul peak (necessary FLOPs counted as in ``train_throughput.py``; the peak
measured around every round). The process is warm after the first variant, so this is the
steady state, without a fresh process's first-touch page faults:

* ``baseline``: padded random batches, full logits (``model(...).logits``), AdamW for-loop;
* ``+ target-only logits``: the output layer only at target positions (:mod:`tunelab.loss`);
* ``+ chunked cross-entropy``: those logits 128 rows at a time (``ChunkedCrossEntropy``);
* ``+ length grouping``: padded batches of similar lengths (``group_by_length``);
* ``+ packing`` (instead of grouping): padding-free rows, attention per example
  (:mod:`tunelab.packing`);
* ``+ fused AdamW``: ``torch.optim.AdamW(fused=True)``;
* ``+ fused LoRA update``, ``+ fused RMSNorm``: :mod:`tunelab.kernels`, one after the other;
* ``+ oneDNN output layer``: the chunked loss's ``h W^T`` through oneDNN
  (:func:`tunelab.loss.head_logits`); every row above has it off.
* ``compiled layers`` (only with ``--compile``: minutes of compiling): the last row with
  every decoder layer under ``torch.compile`` (inductor, dynamic shapes) instead of the
  :mod:`tunelab.kernels` fusions, which inductor does itself. (With the fusions kept, each
  layer compiles on its own: their patched ``forward`` differs per module, so 30 compiles
  instead of one.) The compile time, from a cold cache, is printed apart from the rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

BATCH = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", default=None)
    parser.add_argument("--compile", action="store_true",
                        help="add a row with torch.compile'd decoder layers (compiles for minutes)")
    args = parser.parse_args()
    if args.compile:  # a cold cache, so the compile time printed is a first run's
        import os

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="levers-inductor-")

    from common import LORA
    from train_throughput import build_data, quick_peak, step_flops

    from tunelab import data
    from tunelab.config import build_config
    from tunelab.kernels import fuse_lora, fuse_rms_norm, unfuse
    from tunelab.loss import ChunkedCrossEntropy, TargetLoss, full_logits_loss, unwrap
    from tunelab.models import convert_gguf, resolve_model
    from tunelab.packing import collate_packed, use_packed_attention
    from tunelab.train import load_datasets, prepare_model

    model_dir = convert_gguf(resolve_model("smollm2-135m").path)
    with tempfile.TemporaryDirectory() as tmp:
        stats = build_data(Path(tmp), model_dir, args.examples, 1, args.max_length)
        cfg = build_config({"model": str(model_dir), "data": str(Path(tmp) / "train.jsonl"),
                            "val_fraction": 0.0, "max_length": args.max_length,
                            "device": "cpu", "dtype": "fp32"}, source="levers")
        model, tok = prepare_model(cfg, torch.device("cpu"))
        examples, _, _ = load_datasets(cfg, tok)
    use_packed_attention(model)  # falls back to SDPA for padded batches
    pad = tok.pad_token_id
    loss_fn = TargetLoss(model).train()
    unchunked = TargetLoss(model, chunked=False).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = len(examples)
    random_order = data.BatchSchedule(n, BATCH, seed=0)
    grouped = data.BatchSchedule(n, BATCH, seed=0, lengths=[len(e.input_ids) for e in examples])
    steps = random_order.batches_per_epoch

    def batches(schedule, packed):
        out = []
        for k in range(steps):
            exs = [examples[i] for i in schedule.indices(k)]
            out.append(collate_packed(exs) if packed else data.collate(exs, pad))
        return out

    def full_logits(**batch):
        return full_logits_loss(model, batch)

    variants = {
        "baseline": (full_logits, batches(random_order, False), {}),
        "+ target-only logits": (unchunked, batches(random_order, False), {}),
        "+ chunked cross-entropy": (loss_fn, batches(random_order, False), {}),
        "+ length grouping": (loss_fn, batches(grouped, False), {}),
        "+ packing (no grouping)": (loss_fn, batches(random_order, True), {}),
        "+ fused AdamW": (loss_fn, batches(random_order, True), {"fused": True}),
        "+ fused LoRA update": (loss_fn, batches(random_order, True), {"fused": True}),
        "+ fused RMSNorm": (loss_fn, batches(random_order, True), {"fused": True}),
        "+ oneDNN output layer": (loss_fn, batches(random_order, True), {"fused": True}),
    }
    if args.compile:
        variants["compiled layers"] = (loss_fn, batches(random_order, True), {"fused": True})
    # which tunelab.kernels fusions each variant runs with
    fusions = {"+ fused LoRA update": (fuse_lora,), "+ fused RMSNorm": (fuse_lora, fuse_rms_norm),
               "+ oneDNN output layer": (fuse_lora, fuse_rms_norm)}
    optimizers = {name: torch.optim.AdamW(trainable, lr=1e-5, foreach=False, **kw)
                  for name, (_, _, kw) in variants.items()}
    tokens = sum(len(e.input_ids) for e in examples)
    config = json.loads((model_dir / "config.json").read_text())
    flops = step_flops(config, [len(e.input_ids) for e in examples],
                       [e.n_targets for e in examples], LORA["r"])
    rates: dict[str, list[float]] = {name: [] for name in variants}

    def run_steps(name: str) -> float:
        """One pass over the variant's steps; returns its wall time."""
        fn, step_batches, _ = variants[name]
        opt = optimizers[name]
        unfuse(model)
        for fuse in fusions.get(name, ()):
            fuse(model)
        ChunkedCrossEntropy.ONEDNN = name in ("+ oneDNN output layer", "compiled layers")
        for layer, call in compiled.items():  # nn.Module.compile's switch: compiled or eager
            layer._compiled_call_impl = call if name == "compiled layers" else None
        start = time.perf_counter()
        for batch in step_batches:
            loss, count = fn(**batch)
            (loss / count).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    compiled: dict[torch.nn.Module, object] = {}
    compile_s = None
    if args.compile:
        for layer in unwrap(model).model.layers:
            layer.compile(dynamic=True)
            compiled[layer] = layer._compiled_call_impl
        eager_s = run_steps("+ oneDNN output layer")
        compile_s = run_steps("compiled layers") - eager_s  # the first pass compiles
        print(f"  compiling the decoder layers took {compile_s:.0f} s", flush=True)
    peaks = [quick_peak()]  # the fp32 matmul peak around each round, for "of peak"
    for r in range(args.rounds):
        for name in variants:
            rates[name].append(tokens / run_steps(name))
            print(f"  round {r + 1} {name:26} {rates[name][-1]:7.1f} tok/s", flush=True)
        peaks.append(quick_peak())
    peak = statistics.median(peaks)
    print(f"\n{n} examples ({stats['min_len']}-{stats['max_len']} tokens, median "
          f"{stats['median_len']}), {steps} steps of batch {BATCH}, medians of {args.rounds}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s (median of {len(peaks)}, around the rounds)")
    base = statistics.median(rates["baseline"])
    previous = base
    rows = {}
    for name, values in rates.items():
        med = statistics.median(values)
        of_peak = flops * med / tokens / (peak * 1e9)
        print(f"{name:26} {med:7.1f} tok/s   x{med / base:.2f} of baseline   "
              f"x{med / previous:.2f} of the row above   {of_peak:.2f} of peak")
        rows[name] = {"tokens_per_s": med, "runs": values, "flops_fraction": of_peak}
        previous = med
    if args.json:
        out = {"data": stats, "variants": rows, "matmul_peaks": peaks, "flops_per_epoch": flops,
               "compile_seconds": compile_s}
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
