"""Nothing lost: random SIGKILLs, a full disk during a checkpoint, Ctrl-C."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_jsonl
from tunelab.checkpoint import latest_checkpoint
from tunelab.config import build_config
from tunelab.errors import TunelabError
from tunelab.train import train

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _cmd(model, data, out, *extra):
    return [sys.executable, "-m", "tunelab", "train", f"model={model}", f"data={data}",
            f"out={out}", "lr=3e-2", "batch_size=2", "max_steps=40", "device=cpu",
            "val_fraction=0", "lora_r=4", "save_every=1", "lora_dropout=0.1", "--no-progress",
            *extra]


def test_random_sigkills_always_resume_to_the_same_adapter(tiny_model_dir, qa_data, tmp_path):
    subprocess.run(_cmd(tiny_model_dir, qa_data, tmp_path / "ref"), check=True, env=ENV,
                   capture_output=True)
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    while kills < 10:
        extra = ["--resume"] if (out / "checkpoints").exists() else []
        proc = subprocess.Popen(_cmd(tiny_model_dir, qa_data, out, *extra), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 7.0))  # imports take ~3 s; then a few steps run
        if proc.poll() is not None:
            break  # finished before this kill: the remaining kills would find nothing to do
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    subprocess.run(_cmd(tiny_model_dir, qa_data, out, "--resume"), check=True, env=ENV,
                   capture_output=True)
    assert kills >= 5, f"only {kills} kills landed before the run finished"
    ref = load_file(str(tmp_path / "ref/adapter/adapter_model.safetensors"))
    got = load_file(str(out / "adapter/adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    losses = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == list(range(1, 41))


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, qa_data,
                                                              tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "1m")
    if not mounted:  # not root: simulate ENOSPC at the third checkpoint write instead
        import tunelab.checkpoint as ckpt

        real, calls = ckpt.save_file, {"n": 0}

        def flaky(tensors, filename, *a, **k):
            calls["n"] += 1
            if calls["n"] > 4:
                raise OSError(28, "No space left on device")
            return real(tensors, filename, *a, **k)

        monkeypatch.setattr(ckpt, "save_file", flaky)
    try:
        out = disk / "run"
        cfg = build_config({"model": str(tiny_model_dir), "data": str(qa_data),
                            "out": str(out), "method": "full", "lr": 1e-3, "batch_size": 2,
                            "max_steps": 10, "save_every": 1, "val_fraction": 0,
                            "device": "cpu"})
        with pytest.raises(TunelabError, match=r"could not write the checkpoint of step \d+ "
                                               r".*No space left on device.*is intact"):
            train(cfg, progress=False)
        good = latest_checkpoint(out)
        assert good is not None and good.name < "step-00000010"
        weights = load_file(str(good / "trainable.safetensors"))
        assert weights and all(bool(t.isfinite().all()) for t in weights.values())
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=False)


def test_ctrl_c_saves_a_checkpoint_then_exits(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "capital of France is Paris"}] * 8)
    out = tmp_path / "run"
    cmd = _cmd(tiny_model_dir, data, out, "max_steps=100000", "save_every=0")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted at step" in err and "--resume" in err
    saved = latest_checkpoint(out)
    assert saved is not None
    assert (out / "adapter/adapter_model.safetensors").is_file()
