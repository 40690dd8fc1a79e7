"""Big models on a small machine: QLoRA (and LoRA) of published shapes, measured.

    python benchmarks/big_models.py                                 # 1B, 7B, 13B
    python benchmarks/big_models.py --shapes llama-3.2-1b --steps 4
    python benchmarks/big_models.py --shapes llama-2-7b --workflow  # + generate, merge
    python benchmarks/big_models.py --return-freed-memory            # glibc returns memory

Each shape is a randomly initialised checkpoint of the published architecture (bf16
safetensors shards, SmolLM2's 49,152-token tokenizer unless ``--vocab``), built once with
:func:`tunelab.random_checkpoint.build_random_checkpoint` (meta device, one shard at a
time) and cached under ``--cache``. Random weights allocate, load, quantize and multiply
like trained ones: right for memory and speed, meaningless for quality.

For every (shape, method) run, ``tunelab train`` runs in a fresh process exactly as a user
would start it: batch 1, sequence ``--seq`` (512) of real text (the Python reference manual's
longer topics, from the standard library's ``pydoc_data``), gradient checkpointing on, fp32
compute on CPU, LoRA r=16 on all linear layers. Recorded, from the run's own
``summary.json`` and ``metrics.jsonl``:

* load time and peak RSS while loading (``VmHWM`` just after the model is ready);
* peak RSS while training (``VmHWM`` reset after loading, read at the end);
* step time (median of the steps after the first) and tokens/s;
* the share of the fp32 matmul peak: the FLOPs the step must do
  (``train_throughput.step_flops``; the checkpointing recompute is not counted) over the step
  time, against the peak measured just before and just after the run;
* the plan: the run's own estimate (``summary.json``) and ``tunelab plan``'s for the same
  shape, side by side with the measured peak.

``--workflow`` adds, on the trained adapter: ``tunelab generate`` on the 4-bit base,
``tunelab merge --streaming`` into bf16 shards, ``tunelab export --to gguf`` of the merged
shards (written tensor by tensor) and ``tunelab serve`` with two adapters on one 4-bit base
(one chat request each), each with its peak RSS (``/usr/bin/time``).
Results go to ``benchmarks/results/big_models.json`` (``big_models_returning.json`` with
``--return-freed-memory``), merged with earlier shapes' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(1, str(ROOT / "src"))

DEFAULT_SHAPES = ("llama-3.2-1b", "llama-2-7b", "llama-2-13b")
RESULTS = ROOT / "benchmarks" / "results" / "big_models.json"
RESULTS_RETURNING = ROOT / "benchmarks" / "results" / "big_models_returning.json"
GiB = 2**30


def build_data(path: Path, n: int = 64) -> Path:
    """Real English prose: the reference manual topics of at least 3,000 characters."""
    from pydoc_data.topics import topics

    rows = [{"text": text} for _, text in sorted(topics.items()) if len(text) >= 3000][:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def checkpoint(shape: str, cache: Path, vocab: int | None) -> Path:
    from tunelab.models import load_tokenizer
    from tunelab.random_checkpoint import build_random_checkpoint

    folder = cache / (shape if vocab is None else f"{shape}-v{vocab}")
    return build_random_checkpoint(folder, shape, tokenizer=load_tokenizer("smollm2-135m"),
                                   vocab=vocab)


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), out.get("PYTHONPATH", "")])})
    return out


def timed(cmd: list[str], log: Path) -> tuple[float, int]:
    """Run ``cmd`` under ``/usr/bin/time -v``: (wall seconds, peak RSS bytes)."""
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                              env=env())
    wall = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}); see {log}:\n{text[-2000:]}")
    kib = next(int(line.split()[-1]) for line in text.splitlines()
               if "Maximum resident set size" in line)
    return wall, kib * 1024


def matmul_peak() -> float:
    from matmul_peak import matmul_peak as measure

    return measure(sizes=(2048, 3072), repeats=5, shapes=False)["peak_gflops"]


def cli_plan(model: Path, method: str, seq: int, target_fraction: float,
             returning: bool = False) -> int:
    cmd = [sys.executable, "-m", "tunelab", "plan", "--model", str(model), "--method", method,
           "--gpu", "cpu", "--seq", str(seq), "--batch", "1", "--grad-ckpt",
           "--target-fraction", f"{target_fraction:.6f}", "--json"]
    if returning:
        cmd.append("--return-freed-memory")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env(), check=True)
    plan = json.loads(out.stdout)
    return int(plan["methods"][method]["memory"]["total"])


def run_dir(model: Path, method: str, work: Path, args: argparse.Namespace) -> Path:
    return work / f"{model.name}-{method}{'-returning' if args.return_freed_memory else ''}"


def train_command(model: Path, method: str, data: Path, out: Path,
                  args: argparse.Namespace) -> list[str]:
    """``tunelab train`` as a user would type it for this benchmark's settings."""
    return [sys.executable, "-m", "tunelab", "train", "--model", str(model), "--data",
            str(data), "--method", method, "--out", str(out), "--max-steps", str(args.steps),
            "--batch-size", "1", "--max-length", str(args.seq), "--device", "cpu",
            "--no-progress", "val_fraction=0", "grad_ckpt=true", "lora_r=16", "lora_alpha=32",
            "format=text", f"return_freed_memory={'on' if args.return_freed_memory else 'off'}"]


def step_times(out: Path) -> tuple[list[dict[str, Any]], int, float]:
    """The run's steps (``metrics.jsonl``), tokens per step, and the median step time after
    the first (the first includes warm-up)."""
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [(r["tokens"] - (steps[i - 1]["tokens"] if i else 0)) / r["tokens_per_s"]
              for i, r in enumerate(steps)]
    return steps, steps[-1]["tokens"] // len(steps), statistics.median(
        step_s[1:] if len(step_s) > 1 else step_s)


def train_run(model: Path, method: str, data: Path, work: Path, args: argparse.Namespace
              ) -> dict[str, Any]:
    """Train once in a fresh process, between two matmul-peak measurements; one JSON row."""
    from train_throughput import step_flops

    out = run_dir(model, method, work, args)
    reuse = args.reuse and (out / "summary.json").is_file()
    if not reuse:
        shutil.rmtree(out, ignore_errors=True)
    peak_before = matmul_peak()
    # --reuse: the figures of a finished run in --work (its matmul peak is measured now)
    wall = None if reuse else timed(train_command(model, method, data, out, args),
                                    out.parent / f"{out.name}.log")[0]
    peak_after = matmul_peak()
    summary = json.loads((out / "summary.json").read_text())
    steps, tokens, steady = step_times(out)
    flops = step_flops(json.loads((model / "config.json").read_text()), [tokens],
                       [tokens - 1], 16)
    measured = summary["peak_memory_bytes"]
    planned = summary.get("planned_peak_memory_bytes")
    return {
        "shape": model.name, "method": method, "seq": args.seq, "steps": len(steps),
        "return_freed_memory": bool(args.return_freed_memory), "reused_run": reuse,
        "wall_seconds": wall, "load_seconds": summary["load_seconds"],
        "load_peak_rss": summary["load_peak_memory_bytes"],
        "train_peak_rss": summary["train_peak_memory_bytes"], "peak_rss": measured,
        "step_seconds": steady, "tokens_per_step": tokens, "tokens_per_s": tokens / steady,
        "step_flops": flops, "achieved_gflops": flops / steady / 1e9,
        "matmul_peak_gflops": [peak_before, peak_after],
        "share_of_matmul_peak": flops / steady / 1e9 / ((peak_before + peak_after) / 2),
        "planned_peak_rss": planned,
        "plan_error": planned / measured - 1 if planned else None,
        "cli_plan_peak_rss": cli_plan(model, method, tokens, (tokens - 1) / tokens,
                                      bool(args.return_freed_memory)),
        "largest_shard_bytes": _largest_shard(model),
        "quantized_layers": summary.get("quantized_layers"),
        "train_loss": [r["train_loss"] for r in steps],
        "resident_weights_bytes": summary["memory_parts"]["weights"],
    }


def _largest_shard(model: Path) -> int:
    from tunelab.loading import largest_shard_bytes

    return largest_shard_bytes(model)


def workflow(model: Path, run: Path, work: Path) -> dict[str, Any]:
    """The rest of the workflow with the run's adapter, each step in a fresh process with its
    peak RSS: generate on the 4-bit base, merge shard by shard into bf16 shards, write the
    merged model as GGUF tensor by tensor, serve two adapters on one 4-bit base."""
    adapter = run / "adapter"
    tl = [sys.executable, "-m", "tunelab"]
    gen_wall, gen_peak = timed([*tl, "generate", "--model", str(model), "--adapter",
                                str(adapter), "--max-new-tokens", "8", "--device", "cpu",
                                "Write one sentence about the sea."],
                               work / f"{model.name}-generate.log")
    merged = work / f"{model.name}-merged"
    shutil.rmtree(merged, ignore_errors=True)
    merge_wall, merge_peak = timed([*tl, "merge", "--model", str(model), "--adapter",
                                    str(adapter), "--out", str(merged), "--streaming"],
                                   work / f"{model.name}-merge.log")
    merged_bytes = sum(f.stat().st_size for f in merged.glob("*.safetensors"))
    # `export --adapter --to gguf` is this merge followed by this writer
    gguf_file = work / f"{model.name}-merged-f16.gguf"
    gguf_wall, gguf_peak = timed([*tl, "export", "--model", str(merged), "--to", "gguf",
                                  "--quant", "f16", "--out", str(gguf_file)],
                                 work / f"{model.name}-export.log")
    gguf_bytes = gguf_file.stat().st_size
    shutil.rmtree(merged, ignore_errors=True)  # 13-26 GB each: the disk is needed next
    gguf_file.unlink()
    return {"generate": {"seconds": gen_wall, "peak_rss": gen_peak},
            "merge": {"seconds": merge_wall, "peak_rss": merge_peak,
                      "merged_bytes": merged_bytes},
            "export_gguf": {"seconds": gguf_wall, "peak_rss": gguf_peak, "quant": "f16",
                            "gguf_bytes": gguf_bytes},
            "serve_two_adapters": serve_two_adapters(model, adapter, work)}


def second_adapter(adapter: Path, out: Path) -> Path:
    """A second adapter of the same shape: ``adapter`` with its B matrices drawn again (random
    weights are right for memory; the first adapter's were trained from zero for 2 steps)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, out)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for key, value in weights.items():
        if "lora_B" in key:
            weights[key] = torch.randn(value.shape, generator=gen).to(value.dtype) * 0.01
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def serve_two_adapters(model: Path, adapter: Path, work: Path, timeout_s: float = 1800
                       ) -> dict[str, Any]:
    """``tunelab serve`` with two adapters on one 4-bit base: one chat request to each, then
    Ctrl-C; the server's peak RSS from ``/usr/bin/time``."""
    import signal
    import socket
    import urllib.request

    other = second_adapter(adapter, work / f"{model.name}-adapter-b")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = work / f"{model.name}-serve.log"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "tunelab", "serve", "--model",
           str(model), "--base-bits", "4", "--device", "cpu", "--port", str(port),
           "--adapter", f"a={adapter}", "--adapter", f"b={other}"]
    start = time.perf_counter()
    url = f"http://127.0.0.1:{port}"
    answers: dict[str, Any] = {}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(),
                                start_new_session=True)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited ({proc.returncode}); see {log}")
                if time.perf_counter() - start > timeout_s:
                    raise RuntimeError(f"serve not up after {timeout_s:.0f} s; see {log}")
                try:
                    urllib.request.urlopen(f"{url}/health", timeout=5).read()
                    break
                except OSError:
                    time.sleep(2)
            ready = time.perf_counter() - start
            for name in ("a", "b"):
                body = json.dumps({"model": name, "max_tokens": 8, "messages": [
                    {"role": "user", "content": "Write one sentence about the sea."}]})
                req = urllib.request.Request(f"{url}/v1/chat/completions", body.encode(),
                                             {"Content-Type": "application/json"})
                t0 = time.perf_counter()
                reply = json.loads(urllib.request.urlopen(req, timeout=900).read())
                answers[name] = {"seconds": time.perf_counter() - t0,
                                 "completion_tokens": reply["usage"]["completion_tokens"]}
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=120)
    text = log.read_text(errors="replace")
    kib = next(int(line.split()[-1]) for line in text.splitlines()
               if "Maximum resident set size" in line)
    shutil.rmtree(other, ignore_errors=True)
    return {"ready_seconds": ready, "requests": answers, "peak_rss": kib * 1024}


def print_rows(rows: list[dict[str, Any]]) -> None:
    head = (f"{'shape':14} {'method':6} {'freed':>5} {'load s':>7} {'load GiB':>9} "
            f"{'train GiB':>10} {'plan GiB':>9} {'plan err':>9} {'step s':>8} {'tok/s':>7} "
            f"{'peak share':>10}")
    print(head)
    for r in rows:
        print(f"{r['shape']:14} {r['method']:6} "
              f"{'back' if r.get('return_freed_memory') else 'kept':>5} "
              f"{r['load_seconds']:7.0f} "
              f"{r['load_peak_rss'] / GiB:9.2f} {r['train_peak_rss'] / GiB:10.2f} "
              f"{(r['planned_peak_rss'] or 0) / GiB:9.2f} {r['plan_error'] or 0:+9.1%} "
              f"{r['step_seconds']:8.1f} {r['tokens_per_s']:7.1f} "
              f"{r['share_of_matmul_peak']:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    parser.add_argument("--methods", default="qlora",
                        help="comma list; lora is run for shapes of at most 2B parameters")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=None,
                        help="embedding rows (default: the tokenizer's 49,152)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get(
        "TUNELAB_BIG_CACHE", Path.home() / ".cache" / "tunelab" / "random")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tunelab-big"))
    parser.add_argument("--workflow", action="store_true",
                        help="also generate, merge, export and serve each QLoRA adapter")
    parser.add_argument("--json", type=Path, default=None,
                        help="results file (default: big_models.json, or "
                             "big_models_returning.json with --return-freed-memory)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="train with return_freed_memory: on (glibc returns freed tensors)")
    parser.add_argument("--reuse", action="store_true",
                        help="take a finished run in --work instead of training again")
    args = parser.parse_args()
    if args.json is None:
        args.json = RESULTS_RETURNING if args.return_freed_memory else RESULTS
    from tunelab.plan import get_arch

    args.work.mkdir(parents=True, exist_ok=True)
    data = build_data(args.work / "data" / "text.jsonl")
    results = json.loads(args.json.read_text()) if args.json.is_file() else {"runs": []}
    for shape in args.shapes.split(","):
        model = checkpoint(shape, args.cache, args.vocab)
        for method in args.methods.split(","):
            if method != "qlora" and get_arch(shape).total_params > 2e9:
                continue
            row = train_run(model, method, data, args.work, args)
            if args.workflow and method == "qlora":
                row["workflow"] = workflow(model, run_dir(model, method, args.work, args),
                                           args.work)
            key = (row["shape"], method, row["return_freed_memory"])
            results["runs"] = [r for r in results["runs"] if (
                r["shape"], r["method"], r.get("return_freed_memory", False)) != key] + [row]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2) + "\n")
            tmp.replace(args.json)
            print_rows([row])
    print_rows(results["runs"])


if __name__ == "__main__":
    main()
