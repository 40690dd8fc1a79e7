"""Data-parallel training with torchrun on CPU (gloo, 2 processes)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import write_jsonl

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}


def _train(tiny_model_dir, data, out, *extra, nproc=1, batch=4, steps=4, check=True):
    cmd = [sys.executable, "-m", "tunelab", "train", "--model", str(tiny_model_dir), "--data",
           str(data), "--out", str(out), "--max-steps", str(steps), "--batch-size", str(batch),
           "--lr", "3e-2", "--no-progress", "val_fraction=0", "lora_r=4", "device=cpu",
           "schedule=constant", *extra]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--master-port", str(29500 + os.getpid() % 1000)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=check,
                          timeout=300)


@pytest.fixture
def qa_data(tmp_path) -> Path:
    """Answers of 1 to 4 words, so micro-batches hold different numbers of target tokens."""
    rows = [{"prompt": f"question {i}: capital of France?",
             "completion": " ".join(["Paris"] * (1 + i % 4))} for i in range(32)]
    return write_jsonl(tmp_path / "varied.jsonl", rows)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_at_batch_b_equal_one_at_2b(tiny_model_dir, qa_data, tmp_path):
    _train(tiny_model_dir, qa_data, tmp_path / "one", batch=4, steps=5, nproc=1)
    two = _train(tiny_model_dir, qa_data, tmp_path / "two", batch=2, steps=5, nproc=2)
    assert two.stdout.count("adapter saved to") == 1  # rank 0 speaks, once
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "two").glob("adapter/adapter_model.safetensors"))) == 1


def test_gradient_accumulation_across_ranks_is_token_normalised(tiny_model_dir, qa_data,
                                                                 tmp_path):
    # Examples differ in length, so ranks hold different numbers of target tokens: only a
    # loss normalised by the global token count makes the two runs agree.
    _train(tiny_model_dir, qa_data, tmp_path / "one", "--grad-accum", "2", batch=4, steps=3)
    _train(tiny_model_dir, qa_data, tmp_path / "acc", "--grad-accum", "2", batch=2, steps=3,
           nproc=2)
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "acc")),
                               torch.tensor(_losses(tmp_path / "one")), rtol=1e-5, atol=1e-6)


def test_checkpoint_from_two_processes_resumes_in_one(tiny_model_dir, qa_data, tmp_path):
    out = tmp_path / "run"
    _train(tiny_model_dir, qa_data, out, "--save-every", "3", batch=2, steps=3, nproc=2)
    _train(tiny_model_dir, qa_data, out, "--resume", batch=4, steps=6, nproc=1)
    _train(tiny_model_dir, qa_data, tmp_path / "ref", batch=4, steps=6, nproc=1)
    # Two packed rows of 2 vs one of 4 sum in a different order; three more steps at lr 3e-2
    # grow that rounding to ~1e-5. A wrong resume (data position, optimizer state) is 1e-2.
    torch.testing.assert_close(torch.tensor(_losses(out)),
                               torch.tensor(_losses(tmp_path / "ref")), rtol=1e-4, atol=1e-6)
    # a batch size that changes the global batch is refused with the fix in the message
    bad = _train(tiny_model_dir, qa_data, out, "--resume", batch=3, steps=8, check=False)
    assert bad.returncode == 2 and "Set batch_size to 4" in bad.stderr


def test_two_process_resume_restores_each_ranks_rng_with_dropout(tiny_model_dir, qa_data,
                                                                 tmp_path):
    """Dropout on: each process draws its own masks (seed + rank). A resume that gave every
    process rank 0's generator would change rank 1's masks and so the losses after it."""
    from safetensors.torch import load_file

    drop = ["lora_dropout=0.5"]
    out = tmp_path / "run"
    _train(tiny_model_dir, qa_data, out, *drop, "--save-every", "3", batch=2, steps=3, nproc=2)
    saved = load_file(str(out / "checkpoints/step-00000003/optimizer.safetensors"))
    assert not torch.equal(saved["rng.rank0.cpu"], saved["rng.rank1.cpu"])
    _train(tiny_model_dir, qa_data, out, *drop, "--resume", batch=2, steps=6, nproc=2)
    _train(tiny_model_dir, qa_data, tmp_path / "ref", *drop, batch=2, steps=6, nproc=2)
    resumed, ref = torch.tensor(_losses(out)), torch.tensor(_losses(tmp_path / "ref"))
    assert len(resumed) == len(ref) == 6
    # (checked: with rank 0's state restored on both processes, steps 4-6 differ by up to 0.4)
    torch.testing.assert_close(resumed, ref, rtol=1e-6, atol=1e-7)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def test_a_process_that_dies_fails_the_run_fast(tiny_model_dir, qa_data, tmp_path):
    out = tmp_path / "dies"
    cmd = [sys.executable, "-m", "tunelab", "train", "--model", str(tiny_model_dir), "--data",
           str(qa_data), "--out", str(out), "--max-steps", "100000", "--batch-size", "2",
           "--no-progress", "val_fraction=0", "lora_r=4", "device=cpu", "--nproc", "2",
           "--master-port", str(30500 + os.getpid() % 1000)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    while time.time() < deadline and (out / "metrics.jsonl").stat().st_size == 0:
        time.sleep(0.2)
    workers = [p for p in _children(proc.pid)
               if "tunelab" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
               and "torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_text(
                   errors="ignore")]
    assert len(workers) == 2, workers
    killed_at = time.time()
    os.kill(workers[-1], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - killed_at < 90
    assert proc.returncode == 2
    assert "distributed training failed" in err and "--resume" in err


def test_fsdp_full_finetuning_matches_one_process_and_resumes_in_one(tiny_model_dir, qa_data,
                                                                     tmp_path):
    full = ["method=full", "--lr", "1e-2"]
    sharded = tmp_path / "fsdp"
    _train(tiny_model_dir, qa_data, sharded, *full, "--save-every", "3", batch=2, steps=3,
           nproc=2)  # parallel: auto shards full fine-tuning with FSDP2
    assert (sharded / "model/model.safetensors").is_file()
    _train(tiny_model_dir, qa_data, sharded, *full, "--resume", batch=4, steps=5)
    _train(tiny_model_dir, qa_data, tmp_path / "ref", *full, batch=4, steps=5)
    torch.testing.assert_close(torch.tensor(_losses(sharded)),
                               torch.tensor(_losses(tmp_path / "ref")), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- FSDP2 for LoRA and QLoRA

FSDP_STEPS = 5
# lr 1e-2, not the 3e-2 above: Adam's first update is about lr * sign(g), so elements whose
# gradient is near zero turn summation-order rounding (two packed rows of 2 vs one of 4)
# into lr-sized steps; at 3e-2 DDP itself drifts 1.5e-5 from one process over 5 steps.
FSDP_ARGS = ("--grad-accum", "2", "--lr", "1e-2")


@pytest.fixture(scope="module", params=["lora", "qlora"])
def fsdp_runs(request, tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """One process at batch 4 for 5 steps; 2 FSDP processes at batch 2 for 3 steps (a
    checkpoint at step 3), resumed to step 5 in 2 FSDP processes. A copy of the step-3 run
    is kept aside for :func:`fsdp_in_one`."""
    import shutil

    root = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    rows = [{"prompt": f"question {i}: capital of France?",
             "completion": " ".join(["Paris"] * (1 + i % 4))} for i in range(32)]
    data = write_jsonl(root / "varied.jsonl", rows)
    args = (*FSDP_ARGS, "--method", request.param)
    runs = {"one": root / "one", "two": root / "two", "at_step_3": root / "at-step-3"}
    _train(tiny_model_dir, data, runs["one"], *args, batch=4, steps=FSDP_STEPS)
    _train(tiny_model_dir, data, runs["two"], *args, "parallel=fsdp", "--save-every", "3",
           batch=2, steps=3, nproc=2)
    shutil.copytree(runs["two"], runs["at_step_3"])
    _train(tiny_model_dir, data, runs["two"], *args, "parallel=fsdp", "--resume", batch=2,
           steps=FSDP_STEPS, nproc=2)
    return {**runs, "data": data, "args": args}


@pytest.fixture(scope="module")
def fsdp_in_one(fsdp_runs, tiny_model_dir) -> Path:
    """The 2-process FSDP checkpoint of step 3, resumed to step 5 in one process."""
    out = fsdp_runs["at_step_3"]
    _train(tiny_model_dir, fsdp_runs["data"], out, *fsdp_runs["args"], "--resume", batch=4,
           steps=FSDP_STEPS)
    return out


def test_fsdp_adapters_match_one_process_at_twice_the_batch(fsdp_runs):
    # Before rank 0's LoRA init was broadcast, each process kept its own random A shard:
    # step 1 agreed (B = 0) and step 2 was off by 0.7.
    one, two = _losses(fsdp_runs["one"]), _losses(fsdp_runs["two"])
    assert len(one) == len(two) == FSDP_STEPS
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=0)


def test_fsdp_checkpoint_resumes_in_one_process_with_the_same_losses(fsdp_runs, fsdp_in_one):
    in_one, two = _losses(fsdp_in_one), _losses(fsdp_runs["two"])
    assert len(in_one) == FSDP_STEPS
    # measured: 5e-8 apart (packed rows of 2 vs 4); a lost optimizer state is 1e-2
    torch.testing.assert_close(torch.tensor(in_one), torch.tensor(two), rtol=1e-6, atol=0)


def test_fsdp_saves_the_one_process_adapter_in_peft_format(fsdp_runs):
    from safetensors.torch import load_file

    one = load_file(str(fsdp_runs["one"] / "adapter/adapter_model.safetensors"))
    two = load_file(str(fsdp_runs["two"] / "adapter/adapter_model.safetensors"))
    assert sorted(two) == sorted(one) and all(".lora_" in k for k in two)
    config = json.loads((fsdp_runs["two"] / "adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    # Adapter weights reach 0.2; DDP and FSDP both end 3.5e-5 from one process (the
    # first-step sign amplification above) and 4e-6 from each other.
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-3, atol=1e-4)


def test_a_sharded_runs_adapter_merges_like_a_one_process_one(fsdp_runs, tiny_model_dir,
                                                               tmp_path):
    from safetensors.torch import load_file

    from tunelab.merge import merge_to_checkpoint

    merged = {}
    for run in ("one", "two"):
        report = merge_to_checkpoint(str(tiny_model_dir), fsdp_runs[run] / "adapter",
                                     tmp_path / run)
        assert report["max_abs_logit_diff"] < 1e-4  # the merge computes base + adapter
        merged[run] = load_file(str(tmp_path / run / "model.safetensors"))
    assert sorted(merged["two"]) == sorted(merged["one"])
    for key, weight in merged["one"].items():  # within the adapters' own difference
        torch.testing.assert_close(merged["two"][key], weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("fsdp_runs", ["qlora"], indirect=True)
def test_fsdp_qlora_shards_the_packed_4bit_base(fsdp_runs):
    one = json.loads((fsdp_runs["one"] / "summary.json").read_text())["quantized_layers"]
    two = json.loads((fsdp_runs["two"] / "summary.json").read_text())["quantized_layers"]
    # NF4 packs 2 weights a byte; each of 2 processes holds half of those bytes, and the
    # quantization constants (absmax, codebook) whole
    assert one["n_weights"] == two["n_weights"]
    assert one["quantized_bytes"] - two["quantized_bytes"] == one["n_weights"] // 4


@pytest.mark.parametrize("fsdp_runs", ["lora"], indirect=True)
def test_fsdp_bad_process_counts_fail_with_one_line_and_keep_the_run(fsdp_runs, tiny_model_dir,
                                                                     tmp_path):
    lonely = _train(tiny_model_dir, fsdp_runs["data"], tmp_path / "lonely", "parallel=fsdp",
                    check=False)
    assert lonely.returncode == 2 and not (tmp_path / "lonely").exists()
    assert lonely.stderr.count("error:") == 1 and "--nproc 2" in lonely.stderr
    run = fsdp_runs["two"]
    before = (run / "metrics.jsonl").read_text()
    for nproc, batch, fix in ((3, 2, "resume on 1 (batch_size 4), 2 (batch_size 2)"),
                              (2, 3, "Set batch_size to 2")):
        bad = _train(tiny_model_dir, fsdp_runs["data"], run, "--resume", "parallel=fsdp",
                     batch=batch, steps=FSDP_STEPS + 2, nproc=nproc, check=False)
        assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and fix in bad.stderr
    assert (run / "metrics.jsonl").read_text() == before


def test_auto_shards_adapters_only_where_a_replicated_base_does_not_fit(tiny_model_dir,
                                                                        qa_data):
    from tunelab import models, preflight
    from tunelab.config import build_config
    from tunelab.train import load_datasets

    cfg = build_config({"model": str(tiny_model_dir), "data": str(qa_data), "device": "cpu"})
    train_set, _, _ = load_datasets(cfg, models.load_tokenizer(str(tiny_model_dir)))
    gpu, arch = torch.device("cuda"), preflight.model_arch(cfg.model)  # sized, not used
    replicated = preflight._planned_bytes(arch, cfg, train_set, 4, gpu, 0, 2)[0]
    sharded = preflight._planned_bytes(arch, cfg, train_set, 4, gpu, 0, 2, sharded=True)[0]
    assert sharded < replicated

    def decide(c, budget, world=2):
        return preflight.shard_over_processes(c, train_set, 4, gpu, budget=budget, world=world)

    assert not decide(cfg, replicated)  # the replicated base fits: DDP
    assert decide(cfg, replicated - 1)  # it does not: FSDP
    assert not decide(cfg, replicated - 1, world=1)
    assert not decide(dataclasses.replace(cfg, parallel="ddp"), replicated - 1)
    assert decide(dataclasses.replace(cfg, parallel="fsdp"), 10**15)
    assert decide(dataclasses.replace(cfg, method="full"), None)  # full: FSDP regardless
