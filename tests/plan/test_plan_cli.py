"""The ``plan`` subcommand: parser hook, printed table, JSON, advice and errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tunelab.errors import ConfigError, ModelError
from tunelab.plan import build_plan, format_plan
from tunelab.plan.cli import add_parser, build_parser, run


def plan_output(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    args = build_parser().parse_args(["plan", *argv])
    assert args.func is run
    assert run(args) == 0
    return capsys.readouterr().out


def test_add_parser_registers_plan_with_run() -> None:
    parser = argparse.ArgumentParser(prog="tunelab")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    args = parser.parse_args(["plan", "--model", "llama-2-7b", "--gpu", "24GB", "--grad-ckpt",
                              "--optimizer", "paged", "--lora-r", "8", "--gpus", "2",
                              "--method", "qlora", "--json"])
    assert args.func is run and args.grad_ckpt and args.lora_r == 8 and args.gpus == 2
    assert args.seq == 2048 and args.batch == 1 and args.method == "qlora"


def test_acceptance_llama_2_7b_on_24gb(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "llama-2-7b", "--gpu", "24GB")
    assert "Llama 2 7B" in out and "6.74B params" in out
    assert "licence: llama2 (conditions)" in out
    header = next(line for line in out.splitlines() if line.split() == ["full", "lora", "qlora"])
    assert header
    for row in ("weights", "gradients", "optimizer state", "activations", "logits",
                "overhead", "total peak", "trainable params", "fits 24GB (22.8 GiB)"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    fits = next(line for line in out.splitlines() if line.startswith("fits 24GB"))
    assert fits.split()[-3:] == ["NO", "NO", "yes"]
    assert "Best choice: qlora" in out
    assert "--grad-ckpt saves" in out and "With --grad-ckpt, lora would fit" in out
    assert "--adapter-dtype bf16 saves" in out
    assert "TFLOP/s peak x 0.40 utilization" in out
    assert "Assumptions:" in out


def test_main_cli_dispatches_plan(capsys: pytest.CaptureFixture[str]) -> None:
    main_cli = pytest.importorskip("tunelab.cli")
    assert main_cli.main(["plan", "--model", "llama-2-7b", "--gpu", "24GB"]) == 0
    assert "Best choice: qlora" in capsys.readouterr().out
    assert main_cli.main(["plan", "--model", "llama-2-7b", "--gpu", "nope"]) == 2
    assert "unknown GPU 'nope'" in capsys.readouterr().err


def test_grad_ckpt_makes_lora_the_choice_and_counts_gpus_for_full(
        capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "llama-2-7b", "--gpu", "24GB", "--grad-ckpt")
    assert "Best choice: lora" in out
    assert "full fine-tuning needs 4 of these GPUs with FSDP" in out
    assert "lora fits on one" in out


def test_small_model_full_finetune_is_best(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "smollm2-135m", "--gpu", "24GB")
    assert "Best choice: full" in out


def test_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "qwen2.5-7b", "--gpu", "a100-80gb", "--json",
                      "--tokens", "1000000", "--epochs", "2", "--price-per-hour", "1.5")
    data = json.loads(out)
    assert set(data["methods"]) == {"full", "lora", "qlora"}
    lora = data["methods"]["lora"]
    assert lora["memory"]["total"] == sum(
        lora["memory"][k] for k in ("weights", "adapters", "gradients", "optimizer",
                                    "activations", "logits", "workspace", "retained",
                                    "overlap", "overhead"))
    assert lora["time"]["tokens"] == 2_000_000 and lora["time"]["cost"] > 0
    assert data["recommendation"] == "lora"
    assert data["licence"]["category"] == "permissive"
    assert data["gpu"]["usable_bytes"] == int(80 * 1024**3 * 0.95)


def test_single_method_and_multi_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "llama-2-70b", "--gpu", "a100-80gb", "--gpus", "8",
                      "--method", "full", "--grad-ckpt")
    assert "DDP: everything replicated" in out and "FSDP: weights/grads/optimizer sharded" in out
    tables = [line for line in out.splitlines() if line.startswith("fits A100-80GB")]
    assert len(tables) == 2  # one per parallel mode
    assert "qlora" not in out.split("Training time")[0].split("Peak memory")[1]


def test_dataset_tokens_from_examples(capsys: pytest.CaptureFixture[str]) -> None:
    out = plan_output(capsys, "--model", "smollm2-360m", "--gpu", "l4", "--examples", "5000",
                      "--avg-len", "400", "--epochs", "3", "--price-per-hour", "0.8")
    assert "5K examples x 400 tokens x 3 epoch(s)" in out
    assert any(line.startswith("cost") for line in out.splitlines())


@pytest.mark.parametrize("model,words", [
    ("llama-65b", ["WARNING", "non-commercial"]),
    ("qwen2.5-3b", ["WARNING", "Qwen Research"]),
    ("gpt-3-175b", ["WARNING: licence unknown"]),
])
def test_licence_warnings(capsys: pytest.CaptureFixture[str], model: str,
                          words: list[str]) -> None:
    out = plan_output(capsys, "--model", model, "--gpu", "h100")
    for word in words:
        assert word in out


def test_advice_for_moe_and_large_vocab() -> None:
    text = format_plan(build_plan("mixtral-8x7b", gpu="h100", grad_ckpt=True))
    assert "holds all 8 experts" in text
    gemma = format_plan(build_plan("gemma-2-2b", gpu="24GB", seq=4096, grad_ckpt=True))
    assert "Logits are" in gemma and "soft-capping" in gemma


def test_local_folder_model_with_licence(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True}))
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my model\n")
    out = plan_output(capsys, "--model", str(tmp_path), "--gpu", "cpu", "--method", "lora")
    assert "[config.json]" in out and "apache-2.0 (permissive)" in out
    assert "CPU process baseline" in out and "fp32, r=16" in out


def test_bad_input_errors() -> None:
    with pytest.raises(ConfigError, match="a100-80gb"):
        build_plan("llama-2-7b", gpu="tpu-v5")
    with pytest.raises(ModelError, match="catalogue names"):
        build_plan("no-such-model")
    with pytest.raises(ConfigError, match="avg-len"):
        build_plan("llama-2-7b", examples=100)
    with pytest.raises(ConfigError, match="LoRA target"):
        build_plan("llama-2-7b", lora_targets="q,attn")


def test_return_freed_memory_removes_only_the_allocator_held_term(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = ("--model", "llama-2-7b", "--gpu", "cpu", "--method", "qlora", "--seq", "512",
            "--grad-ckpt", "--json")
    keeping = json.loads(plan_output(capsys, *args))["methods"]["qlora"]["memory"]
    returning = json.loads(plan_output(capsys, *args, "--return-freed-memory")
                           )["methods"]["qlora"]["memory"]
    assert keeping["retained"] > 0 and returning["retained"] == 0
    assert returning["total"] == keeping["total"] - keeping["retained"]
