"""Data mixtures: weighted, deterministic, resumable sampling over several sources."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tunelab.config import build_config
from tunelab.data.mixture import MixtureSchedule, epoch_quota
from tunelab.train import train

from .conftest import write_jsonl


@pytest.mark.parametrize("weights,n,expected", [
    ([0.8, 0.2], 10, [8, 2]),
    ([1, 1, 1], 10, [4, 3, 3]),  # the remainder goes to the earlier source on a tie
    ([4, 1], 7, [6, 1]),  # 5.6 and 1.4: the larger remainder gets the extra row
    ([0.5, 0.25, 0.25], 1, [1, 0, 0]),
])
def test_epoch_quota_rounds_by_largest_remainder(weights, n, expected):
    assert epoch_quota(weights, n) == expected


def test_epoch_quota_sums_to_the_epoch_and_is_within_one_row_of_each_share():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        weights = (torch.rand(int(torch.randint(1, 6, (1,), generator=gen)),
                              generator=gen) + 0.01).tolist()
        n = int(torch.randint(1, 500, (1,), generator=gen))
        quota = epoch_quota(weights, n)
        assert sum(quota) == n
        assert all(abs(q - w / sum(weights) * n) < 1 for q, w in zip(quota, weights, strict=True))


def _epoch(schedule: MixtureSchedule, epoch: int) -> list[int]:
    per = schedule.batches_per_epoch
    return [i for k in range(epoch * per, (epoch + 1) * per) for i in schedule.indices(k)]


def test_each_epoch_draws_exactly_its_quota_and_rows_evenly():
    # 50 and 10 rows at 0.8 / 0.2: an epoch of 60 takes 48 and 12, so the small source
    # (smaller than its share) repeats rows, the large one draws without replacement
    schedule = MixtureSchedule([50, 10], [0.8, 0.2], batch_size=4, seed=3)
    assert schedule.quota == [48, 12]
    drawn: Counter[int] = Counter()
    for epoch in range(4):
        rows = _epoch(schedule, epoch)
        counts = Counter(schedule.source_of(i) for i in rows)
        assert counts == {0: 48, 1: 12}  # proportions 0.8 / 0.2 exactly (tolerance 1/60)
        drawn.update(rows)
        # after T draws from a source of n rows, each row has been drawn floor(T/n) or
        # ceil(T/n) times: no row a second time before every row once
        for offset, n, q in ((0, 50, 48), (50, 10, 12)):
            t = (epoch + 1) * q
            assert {drawn[i] for i in range(offset, offset + n)} <= {t // n, -(-t // n)}


def test_proportions_over_a_run_that_ends_mid_epoch_stay_within_the_stated_tolerance():
    # a partial epoch is a uniformly shuffled slice of a full one: over m of its N rows the
    # count of source i has mean p_i m and standard deviation below sqrt(m p_i (1 - p_i)),
    # so 4 standard deviations bound it (the seed is fixed: this is one deterministic draw)
    schedule = MixtureSchedule([300, 100, 200], [0.5, 0.3, 0.2], batch_size=8, seed=0)
    m = 37 * 8
    counts = Counter(schedule.source_of(i) for k in range(37) for i in schedule.indices(k))
    for source, p in enumerate((0.5, 0.3, 0.2)):
        assert abs(counts[source] - p * m) <= 4 * (m * p * (1 - p)) ** 0.5


def test_same_seed_same_order_other_seed_other_order():
    a = MixtureSchedule([20, 7], [0.7, 0.3], batch_size=4, seed=5)
    b = MixtureSchedule([20, 7], [0.7, 0.3], batch_size=4, seed=5)
    c = MixtureSchedule([20, 7], [0.7, 0.3], batch_size=4, seed=6)
    ks = [0, 3, 6, 7, 20, 13]  # out of order, across epochs: a pure function of k
    assert [a.indices(k) for k in ks] == [b.indices(k) for k in ks]
    assert [a.indices(k) for k in range(14)] != [c.indices(k) for k in range(14)]
    # a fresh schedule asked for step k first (a resumed run) gives the same batch
    assert MixtureSchedule([20, 7], [0.7, 0.3], 4, 5).indices(20) == a.indices(20)


def test_length_grouping_keeps_each_epochs_quota():
    lengths = [(i * 7) % 23 + 1 for i in range(40)]
    schedule = MixtureSchedule([30, 10], [0.5, 0.5], batch_size=4, seed=1, lengths=lengths)
    for epoch in range(2):
        rows = _epoch(schedule, epoch)
        assert Counter(schedule.source_of(i) for i in rows) == {0: 20, 1: 20}
    # batches are length-grouped: most batches span less than the full length range
    spans = [max(lengths[i] for i in b) - min(lengths[i] for i in b)
             for b in (schedule.indices(k) for k in range(10))]
    assert sorted(spans)[len(spans) // 2] < 11


# ------------------------------------------------------------------------- training runs


@pytest.fixture
def two_sources(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [
        {"prompt": f"question {i}: capital of France?", "completion": "Paris"}
        for i in range(24)])
    text = write_jsonl(tmp_path / "general.jsonl", [
        {"text": f"A quick brown fox {i} jumps over the lazy dog."} for i in range(12)])
    return qa, text


def _mix_cfg(tiny_model_dir, sources, out, **kw):
    values = {"model": str(tiny_model_dir), "out": str(out), "device": "cpu",
              "data": [{"path": str(sources[0]), "weight": 0.75},
                       {"path": str(sources[1]), "weight": 0.25, "name": "general"}],
              "lr": 3e-2, "batch_size": 4, "max_steps": 8, "schedule": "constant",
              "val_fraction": 0.25, "eval_every": 2, "lora_r": 4, "lora_dropout": 0.1}
    values.update(kw)
    return build_config(values)


def _lines(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_mixture_run_logs_per_source_validation_and_counts(tiny_model_dir, two_sources,
                                                           tmp_path):
    out = tmp_path / "mix"
    train(_mix_cfg(tiny_model_dir, two_sources, out), progress=False)
    last = _lines(out)[-1]
    assert {"val_loss", "val_loss/qa", "val_loss/general"} <= set(last)
    # the overall loss is the token-weighted mean of the two, so it lies between them
    lo, hi = sorted((last["val_loss/qa"], last["val_loss/general"]))
    assert lo <= last["val_loss"] <= hi and lo < hi
    sources = json.loads((out / "summary.json").read_text())["sources"]
    assert [s["name"] for s in sources] == ["qa", "general"]
    assert [s["train_examples"] for s in sources] == [18, 9]  # 24 and 12, a quarter held out
    assert [s["val_examples"] for s in sources] == [6, 3]
    assert [s["rows_per_epoch"] for s in sources] == [20, 7]  # 0.75 and 0.25 of 27
    # 8 micro-batches of 4: the first epoch's 27 rows (its last batch holds 3), then 4
    assert sum(s["rows"] for s in sources) == 27 + 4 and all(s["tokens"] > 0 for s in sources)
    report = json.loads((out / "report.json").read_text())
    assert report["sources"][1]["name"] == "general"
    assert "val_loss/general" in report["curves"]["records"][-1]
    html = (out / "report.html").read_text()
    assert "Data sources" in html and "validation loss: general" in html


def test_mixture_resume_gives_the_same_batches_and_losses(tiny_model_dir, two_sources,
                                                          tmp_path):
    clean = tmp_path / "clean"
    train(_mix_cfg(tiny_model_dir, two_sources, clean), progress=False)
    # stop at step 4 (a constant lr does not depend on the total), then resume to 8
    split = tmp_path / "split"
    train(_mix_cfg(tiny_model_dir, two_sources, split, max_steps=4, save_every=4),
          progress=False)
    train(_mix_cfg(tiny_model_dir, two_sources, split, save_every=4, resume=True),
          progress=False)
    a, b = _lines(clean), _lines(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("train_loss", "tokens", "val_loss/qa", "val_loss/general"):
        got = [r[key] for r in b if key in r]
        want = [r[key] for r in a if key in r]
        assert len(got) == len(want) > 0
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64),
                                   rtol=1e-6, atol=1e-7)
    rows = [[s["rows"] for s in json.loads((d / "summary.json").read_text())["sources"]]
            for d in (clean, split)]
    assert rows[0] == rows[1]
