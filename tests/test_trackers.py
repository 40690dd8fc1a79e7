"""report_to: tensorboard, mlflow and wandb get per-step metrics, the config, the final summary
and the report files; each is read back here with the tracker's own library."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import build_config
from tunelab.errors import ConfigError
from tunelab.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    rows = [{"prompt": f"question {i}: capital of France?", "completion": "Paris"}
            for i in range(16)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root),
           "WANDB_CACHE_DIR": str(root / "wandb-cache"),
           "WANDB_CONFIG_DIR": str(root / "wandb-config")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        out = root / "run"
        cfg = build_config({"model": str(tiny_model_dir), "data": str(root / "qa.jsonl"),
                            "out": str(out), "lr": 3e-2, "batch_size": 4, "max_steps": 4,
                            "device": "cpu", "val_fraction": 0.25, "eval_every": 2,
                            "lora_r": 4, "report_to": "tensorboard,mlflow,wandb"})
        train(cfg, progress=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, lines


def test_tensorboard_events_hold_the_steps_config_and_summary(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, lines = tracked_run
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    loss = acc.Scalars("train/train_loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in lines])
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    assert acc.Scalars("final/steps")[0].value == 4
    texts = acc.Tags()["tensors"]
    assert "config/text_summary" in texts and "summary/text_summary" in texts
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lora_r": 4' in config


def test_mlflow_file_store_holds_params_metrics_and_artifacts(tracked_run):
    from mlflow.tracking import MlflowClient

    out, lines = tracked_run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["lora_r"] == "4" and run.data.params["lr"] == "0.03"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([r["train_loss"] for r in lines])
    assert run.data.metrics["final_steps"] == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "summary.json"} <= artifacts


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (``run-*.wandb``), parsed with wandb's
    own message types. wandb 0.31 ships no Python reader any more (its Go core writes and
    syncs the file); the framing is LevelDB's log format: a 7-byte header (':W&B', magic,
    version), then 32 KiB blocks of [crc32 (4), length (2, LE), type (1), data] chunks, with
    FIRST/MIDDLE/LAST chunks for a record that spans blocks."""
    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    pos, block, pending = 7, 32 * 1024, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length = int.from_bytes(raw[pos + 4:pos + 6], "little")
        kind = raw[pos + 6]
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_history_config_summary_and_artifact(tracked_run):
    out, lines = tracked_run
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history, config, summary, artifact_files = {}, {}, {}, set()
    for record in _wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history[int(items["_step"])] = items
        elif kind == "run":
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "summary":
            summary |= {i.key: json.loads(i.value_json) for i in record.summary.update}
        elif kind == "artifact":
            artifact_files |= {e.path for e in record.artifact.manifest.contents}
    assert sorted(history) == [1, 2, 3, 4]
    assert [history[s]["train_loss"] for s in (1, 2, 3, 4)] == pytest.approx(
        [r["train_loss"] for r in lines])
    assert config["lora_r"] == 4 and config["lr"] == 0.03
    assert summary["final_steps"] == 4
    assert {"report.html", "summary.json"} <= artifact_files


def test_unknown_or_missing_tracker_is_one_error_line(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'comet'"):
        build_config({"data": "x.jsonl", "report_to": "tensorboard,comet"})
    # a Python where wandb cannot be imported: the CLI names the extra to install
    blocker = ("import sys, importlib.abc\n"
               "class B(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'wandb': raise ModuleNotFoundError(name)\n"
               "sys.meta_path.insert(0, B())\n"
               "import importlib.util\n"
               "real = importlib.util.find_spec\n"
               "importlib.util.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a)\n"
               "from tunelab.cli import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", blocker, "train", "--model",
                           str(tiny_model_dir), "--data", str(tmp_path / "x.jsonl"),
                           "--report-to", "wandb"], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert errors == ["error: report_to: wandb needs the wandb package, which is not "
                      "installed: pip install 'tunelab[trackers]'"], done.stderr


def test_a_crash_mid_training_closes_every_tracker_run_as_failed(tiny_model_dir, tmp_path,
                                                                 monkeypatch):
    """Step 3 raises: MLflow's run ends FAILED with the error, W&B's run finishes with exit
    code 1, TensorBoard's events up to step 2 are flushed to disk; the error still reaches
    the caller."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import tunelab.train as train_module

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "wc"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wcfg")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real_step, calls = train_module.train_step, {"n": 0}

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash in step 3")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", failing_step)
    rows = [{"prompt": f"question {i}?", "completion": "Paris"} for i in range(16)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    cfg = build_config({"model": str(tiny_model_dir), "data": str(tmp_path / "qa.jsonl"),
                        "out": str(out), "batch_size": 4, "max_steps": 6, "device": "cpu",
                        "lora_r": 4, "report_to": "tensorboard,mlflow,wandb"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, progress=False)

    import mlflow

    assert mlflow.active_run() is None  # a next run in this process can start
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: simulated crash in step 3"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/train_loss")] == [1, 2]
    assert "error/text_summary" in acc.Tags()["tensors"]

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    records = list(_wandb_records(next(run_dir.glob("run-*.wandb"))))
    exits = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert len(exits) == 1 and exits[0].exit_code == 1
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [int(h["_step"]) for h in history] == [1, 2], history
