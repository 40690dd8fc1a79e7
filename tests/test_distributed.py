"""Data-parallel training with torchrun on CPU (gloo, 2 processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
