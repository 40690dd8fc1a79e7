"""What train prints at the end (plan vs measured) and the licence of a model source."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tunelab import data
from tunelab.config import build_config
from tunelab.licence import licence_for_model_source
from tunelab.models import ModelSource, load_model, resolve_model
from tunelab.plan import compare_to_run, run_estimate, run_shape


def examples(lengths: list[int], targets: int) -> list[data.Example]:
    out = []
    for n in lengths:
        labels = [data.IGNORE_INDEX] * (n - targets) + list(range(targets))
        out.append(data.Example(list(range(n)), labels))
    return out


def test_run_shape_replays_the_schedule() -> None:
    exs = examples([10, 20, 30, 40, 50, 60], targets=3)
    # One micro-batch of 2 from a seeded permutation: the longest of those two examples.
    schedule = data.BatchSchedule(6, 2, seed=0)
    first = schedule.indices(0)
    shape = run_shape(exs, batch_size=2, seed=0, micro_batches=1)
    assert shape.batch == 2 and shape.width == max(len(exs[i].input_ids) for i in first)
    assert shape.targets == 6
    # A whole epoch sees the longest example.
    assert run_shape(exs, batch_size=2, seed=0, micro_batches=3).width == 60
    # Two ranks split each micro-batch.
    assert run_shape(exs, batch_size=1, seed=0, micro_batches=3, rank=1, world=2).batch == 1


@pytest.fixture
def tiny_run(tiny_model_dir: Path, tmp_path: Path):
    rows = [{"prompt": "question about France", "completion": "Paris"} for _ in range(4)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build_config({"model": str(tiny_model_dir), "data": str(path), "method": "full",
                        "batch_size": 2, "device": "cpu", "val_fraction": 0})
    model, tok = load_model(cfg.model, device="cpu")
    train_set, _ = data.encode_records(data.read_records(path), tok)
    return model, cfg, train_set


def test_compare_to_run_prints_measured_and_planned(tiny_run) -> None:
    model, cfg, train_set = tiny_run
    est, shape = run_estimate(model, cfg, train_set, steps=2)
    assert est.method == "full" and est.settings["device"] == "cpu"
    # packed (the default): one row holding both examples
    assert shape.width == 2 * len(train_set[0].input_ids) and shape.batch == 1
    padded = run_estimate(model, replace(cfg, packing=False), train_set, steps=2)[1]
    assert padded.width == len(train_set[0].input_ids) and padded.batch == 2
    line = compare_to_run(model, cfg, est.total, train_set, steps=2)
    assert line.startswith("memory: peak RSS") and "(+0%)" in line and "full" in line
    far = compare_to_run(model, cfg, est.total * 2, train_set, steps=2)
    assert "-50%" in far and "calibrated" in far
    # It never raises: a run it cannot size says so.
    assert "no memory estimate" in compare_to_run(model, cfg, 1, [], steps=1)


def test_compare_to_run_without_heap_retention(tiny_run, monkeypatch) -> None:
    model, cfg, train_set = tiny_run
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert run_estimate(model, cfg, train_set, 1)[0].retained == 0


def test_licence_for_model_source(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = licence_for_model_source(str(tiny_model_dir))
    assert folder.category == "unknown" and folder.warning
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# m\n")
    nc = licence_for_model_source(ModelSource(str(tmp_path), "folder", str(tmp_path)))
    assert nc.category == "non-commercial" and "commercial" in nc.warning
    hub = licence_for_model_source(ModelSource("meta-llama/Llama-2-7b-hf", "hub",
                                               "meta-llama/Llama-2-7b-hf"))
    assert hub.id == "llama2"
    unknown_hub = licence_for_model_source(ModelSource("someone/nothing", "hub",
                                                       "someone/nothing"))
    assert unknown_hub.category == "unknown"
    assert licence_for_model_source(None).category == "unknown"


@pytest.mark.slow
def test_licence_for_the_smollm2_alias_and_its_gguf() -> None:
    from tunelab.errors import ModelError

    try:
        source = resolve_model("smollm2-135m")
    except ModelError as exc:
        pytest.skip(str(exc))
    assert licence_for_model_source(source).id == "apache-2.0"
    assert licence_for_model_source("smollm2-135m").source.startswith("tunelab alias")
    header = licence_for_model_source(replace(source, licence_hint=None))
    assert header.id == "apache-2.0" and header.source.startswith("GGUF")


@pytest.mark.parametrize("method,bits", [("qlora", 4), ("lora", 16)])
def test_tunelab_plan_and_the_run_are_one_computation(tiny_model_dir, method, bits) -> None:
    """``tunelab plan`` for a run's shape gives the figure ``train`` checks before loading
    and reports at the end (they once disagreed: 30.7 vs 18.4 GiB for one 7B run)."""
    from tunelab.plan import arch_from_hf_config, build_plan, plan_run

    arch = arch_from_hf_config(json.loads((tiny_model_dir / "config.json").read_text()))
    seq, targets = 96, 40
    cfg = build_config({"model": str(tiny_model_dir), "data": "x.jsonl", "method": method,
                        "batch_size": 1, "grad_ckpt": True, "device": "cpu"})
    est, shape = plan_run(arch, cfg, examples([seq] * 4, targets), steps=2, device="cpu",
                          dtype="fp32")
    assert (shape.width, shape.targets) == (seq, targets)
    plan = build_plan(str(tiny_model_dir), methods=(method,), gpu="cpu", seq=seq, batch=1,
                      grad_ckpt=True, target_fraction=targets / seq)
    assert plan.methods[method].memory.total == est.total
