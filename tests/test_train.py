"""The training loop on a tiny Llama: loss normalisation, loss path, learning, resume."""

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

from tunelab import data, models
from tunelab.adapters import attach_lora
from tunelab.config import build_config
from tunelab.loss import TargetLoss, full_logits_loss
from tunelab.preflight import RunWontFit
from tunelab.train import lr_at, train


def _examples(tokenizer, n=8):
    rows = [{"prompt": f"question {i} " * (1 + i % 3), "completion": "answer " * (1 + i % 2)}
            for i in range(n)]
    records = [data.Record(r, "mem", i + 1) for i, r in enumerate(rows)]
    return data.encode_records(records, tokenizer)[0]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_one_batch_of_8_equals_four_of_2(tiny_model_dir, tiny_tokenizer):
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():  # B starts at zero; make the A grads non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    loss_fn = TargetLoss(model)
    examples = _examples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id

    def step(micro_batches):
        model.zero_grad()
        batches = [data.collate(mb, pad) for mb in micro_batches]
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for b in batches:
            (loss_fn(**b)[0] / n).backward()
        return _grads(model)

    one = step([examples])
    four = step([examples[i:i + 2] for i in range(0, 8, 2)])
    assert one.keys() == four.keys() and len(one) > 0
    for name in one:
        scale = float(one[name].abs().max())
        torch.testing.assert_close(one[name], four[name], rtol=1e-5, atol=1e-5 * scale)


def test_target_only_logits_equal_full_logits_loss(tiny_model_dir, tiny_tokenizer):
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    batch = data.collate(_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    fast, n_fast = TargetLoss(model)(**batch)
    slow, n_slow = full_logits_loss(model, batch)
    assert int(n_fast) == int(n_slow) > 0
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = build_config({"data": "x", "lr": 1.0, "warmup_steps": 2})
    lrs = [lr_at(s, cfg, 10) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


def _cfg(tiny_model_dir, data_path, out, **kw):
    values = {"model": str(tiny_model_dir), "data": str(data_path), "out": str(out),
              "lr": 3e-2, "batch_size": 4, "max_steps": 12, "device": "cpu",
              "val_fraction": 0.25, "eval_every": 4, "lora_r": 4}
    values.update(kw)
    return build_config(values)


def test_lora_training_lowers_loss_and_writes_the_run(tiny_model_dir, qa_data, tmp_path):
    result = train(_cfg(tiny_model_dir, qa_data, tmp_path / "run", save_every=5), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 13))
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert {"val_loss", "lr", "tokens", "tokens_per_s", "peak_memory"} <= set(lines[-1])
    assert (result.weights_dir / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run/best/adapter_config.json").is_file()
    assert result.best_step in (4, 8, 12)
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 12 and summary["memory_parts"]["trainable"] > 0
    assert summary["licence"]["category"] == "unknown"  # the tiny model has no licence
    ckpts = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step-*"))
    assert ckpts == ["step-00000010", "step-00000012"]  # keep_checkpoints=2
    card = (result.weights_dir / "README.md").read_text()
    assert "base_model:" in card and "lora_r" in card


def test_full_finetune_saves_a_loadable_checkpoint(tiny_model_dir, qa_data, tmp_path):
    result = train(_cfg(tiny_model_dir, qa_data, tmp_path / "full", method="full", lr=1e-3,
                        max_steps=4), progress=False)
    model, _ = models.load_model(str(result.weights_dir), device="cpu")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert result.final_train_loss is not None


def test_nan_loss_stops_with_a_message(tiny_model_dir, qa_data, tmp_path):
    from safetensors.torch import load_file

    from tunelab.checkpoint import latest_checkpoint
    from tunelab.train import TrainingDiverged

    out = tmp_path / "nan"
    train(_cfg(tiny_model_dir, qa_data, out, max_steps=2, save_every=1), progress=False)
    # lr=inf: the next update makes the weights inf; the step after that has a NaN loss
    with pytest.raises(TrainingDiverged, match="NaN or infinite at step 3"):
        train(_cfg(tiny_model_dir, qa_data, out, lr=float("inf"), max_steps=4, grad_clip=0.0,
                   save_every=1, resume=True), progress=False)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 4; stopping"):
        train(_cfg(tiny_model_dir, qa_data, out, lr=float("inf"), max_steps=4, grad_clip=0.0,
                   save_every=10, resume=True), progress=False)
    good = latest_checkpoint(out)
    assert good.name == "step-00000002"
    weights = load_file(str(good / "trainable.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def _train_cmd(tiny_model_dir, qa_data, out, *extra):
    return [sys.executable, "-m", "tunelab", "train", f"model={tiny_model_dir}",
            f"data={qa_data}", f"out={out}", "lr=3e-2", "batch_size=4", "max_steps=14",
            "device=cpu", "val_fraction=0", "lora_r=4", "save_every=1", "lora_dropout=0.1",
            "--no-progress", *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["train_loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_gives_the_same_losses(tiny_model_dir, qa_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    clean = tmp_path / "clean"
    subprocess.run(_train_cmd(tiny_model_dir, qa_data, clean), check=True, env=env,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_model_dir, qa_data, killed), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until a few checkpoints exist, then kill hard
        if len(list((killed / "checkpoints").glob("step-0000000[5-9]"))) > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "run finished before it was killed"
    subprocess.run(_train_cmd(tiny_model_dir, qa_data, killed, "--resume"), check=True,
                   env=env, capture_output=True)
    a, b = _losses(clean), _losses(killed)
    assert len(a) == len(b) == 14
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-6, atol=1e-7)


def test_peak_memory_is_this_process_not_its_parent(tmp_path):
    """A child of a big process reports its own peak (ru_maxrss would inherit the parent's)."""
    code = ("import torch; from tunelab.memory import peak_memory_bytes; "
            "print(peak_memory_bytes(torch.device('cpu')))")
    ballast = bytearray(600 * 2**20)  # the parent holds 600 MiB while it starts the child
    ballast[::4096] = b"x" * len(ballast[::4096])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(
                             Path(__file__).resolve().parents[1] / "src")})
    del ballast
    assert int(out.stdout.split()[-1]) < 550 * 2**20


def test_gradient_checkpointing_goes_on_only_when_the_plan_does_not_fit(
        tiny_model_dir, qa_data, tmp_path, monkeypatch, caplog):
    import logging

    import tunelab.train as train_module

    def run(name, **kw):
        train(_cfg(tiny_model_dir, qa_data, tmp_path / name, max_steps=3, eval_every=0, **kw),
              progress=False)
        config = json.loads((tmp_path / name / "run_config.json").read_text())
        losses = [json.loads(x)["train_loss"]
                  for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return config["grad_ckpt"], losses

    roomy, roomy_losses = run("roomy")  # this machine has GBs to spare: stays off
    assert roomy is False
    # a device with 1 MiB to give: the plan does not fit even with checkpointing, so the run
    # is refused before the model loads, with the figures; --force tries anyway
    monkeypatch.setattr(train_module, "memory_budget_bytes", lambda device: 1 << 20)
    with pytest.raises(RunWontFit, match=r"needs about .* has 1\.0 MiB available .*--force"):
        run("refused")
    assert not (tmp_path / "refused" / "run_config.json").exists()
    with caplog.at_level(logging.WARNING, logger="tunelab.preflight"):
        tight, tight_losses = run("tight", force=True)
    assert tight is True
    assert "gradient checkpointing on" in caplog.text
    assert "trying anyway" in caplog.text
    # recomputing activations changes no number
    for a, b in zip(roomy_losses, tight_losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert run("opted-out", grad_ckpt_auto=False, force=True)[0] is False
