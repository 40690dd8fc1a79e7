"""The command line end to end on the tiny model: train, generate, chat, merge, errors."""

from __future__ import annotations

import io
import sys

from tunelab.cli import main


def test_train_generate_merge_from_flags(tiny_model_dir, qa_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(qa_data), "--method",
                 "lora", "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                 "--device", "cpu", "--no-progress", "lora_r=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"adapter saved to {out / 'adapter'}" in printed
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out),
                 "--max-new-tokens", "5", "capital of France?"]) == 0
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "max |logit difference| against base+adapter" in capsys.readouterr().out
    assert (tmp_path / "merged/model.safetensors").is_file()


def test_train_from_yaml_with_overrides(tiny_model_dir, qa_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {tiny_model_dir}\ndata: {qa_data.name}\nmax_steps: 2\n"
                   f"lora_r: 4\nbatch_size: 2\nout: {tmp_path / 'y'}\n")
    assert main(["train", str(cfg), "lr=1e-3", "--no-progress"]) == 0
    assert (tmp_path / "y/adapter/adapter_config.json").is_file()


def test_bad_config_prints_one_clear_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: x.jsonl\nlearning_rate: 1\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown config key 'learning_rate'" in err
    assert "Traceback" not in err


def test_bad_data_prints_file_and_line(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--out",
                 str(tmp_path / "r"), "--no-progress"]) == 2
    assert "bad.jsonl, line 2: malformed JSON" in capsys.readouterr().err


def test_chat_reads_turns_from_stdin(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nquestion\n\n"))
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 1


def test_merge_export_and_generate_default_to_the_adapters_recorded_base(tiny_model_dir,
                                                                         tmp_path, capsys):
    """Without --model, the base tunelab recorded when it trained the adapter is loaded (not
    the default SmolLM2, whose shapes would not match)."""
    import json

    from tests.serve.conftest import make_random_adapter

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "lora", 3, "all-linear", 4)
    (adapter / "tunelab.json").write_text(json.dumps({"base_model": str(tiny_model_dir),
                                                      "base_bits": 16}))
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "config.json").read_text())
    assert merged["hidden_size"] == 32
    assert main(["export", "--adapter", str(adapter), "--to", "gguf", "--quant", "f32",
                 "--out", str(tmp_path / "g.gguf")]) == 0
    assert (tmp_path / "g.gguf").is_file()
    assert main(["generate", "--adapter", str(adapter), "--device", "cpu",
                 "--max-new-tokens", "2", "--raw", "hello"]) == 0
    capsys.readouterr()
