"""`datasets` sources for --data: save_to_disk folders, shard folders, hf: ids (offline, from
local files and from a real datasets cache), column mapping, ShareGPT, and streaming a
1M-row parquet in bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import write_jsonl
from tunelab import data
from tunelab.errors import ConfigError, DataError

SRC = str(Path(__file__).resolve().parents[1] / "src")
ALPACA = [{"instruction": f"capital of country {i}?", "output": "Paris", "id": i}
          for i in range(12)]


def _datasets():
    import datasets

    return datasets


def test_save_to_disk_dataset_dict_with_split_and_columns(tmp_path, tiny_tokenizer):
    ds = _datasets()
    rows = [{"question": r["instruction"], "answer": r["output"]} for r in ALPACA]
    dd = ds.DatasetDict({"train": ds.Dataset.from_list(rows[:8]),
                         "test": ds.Dataset.from_list(rows[8:])})
    dd.save_to_disk(str(tmp_path / "saved"))
    records = data.read_records(tmp_path / "saved", split="test",
                                columns="prompt=question,completion=answer")
    assert [r.data["prompt"] for r in records] == [f"capital of country {i}?"
                                                   for i in range(8, 12)]
    assert {"prompt", "completion"} == set(records[0].data)
    assert data.resolve_format(records) == "prompt_completion"
    with pytest.raises(DataError, match="no split 'validation'; the splits are: train, test"):
        data.read_records(tmp_path / "saved", split="validation")
    with pytest.raises(DataError, match="column 'prompt_text'.*its columns are: answer, "
                                        "question") as info:
        data.read_records(tmp_path / "saved", columns="prompt=prompt_text")
    assert "line 1" in str(info.value)
    with pytest.raises(ConfigError, match="is not FIELD=COLUMN"):
        data.read_records(tmp_path / "saved", columns="prompt")


def test_parquet_and_arrow_shard_folders_name_the_shard_and_row(tmp_path, tiny_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(ALPACA[:6]), shards / "part-0.parquet")
    bad = [dict(r) for r in ALPACA[6:]]
    bad[2]["output"] = None
    pq.write_table(pa.Table.from_pylist(bad), shards / "part-1.parquet")
    with pytest.raises(DataError) as info:
        data.encode_source(shards, tiny_tokenizer)
    assert str(info.value).startswith(f"{shards / 'part-1.parquet'}, line 3, field 'output'")

    arrow = tmp_path / "arrow"  # the .arrow files datasets writes (Arrow IPC streams)
    _datasets().Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    arrow.mkdir()
    for f in (tmp_path / "saved").glob("*.arrow"):
        (arrow / f.name).write_bytes(f.read_bytes())
    train, val, stats = data.encode_source(arrow, tiny_tokenizer, val_fraction=0.25, seed=1)
    assert stats.n_records == 12 and len(train) == 9 and len(val) == 3
    # the same records tokenized from a list give the same examples
    ref = data.encode_records(data.read_records(arrow), tiny_tokenizer)[0]
    assert sorted(e.input_ids for e in train + val) == sorted(e.input_ids for e in ref)


def test_hf_id_through_load_dataset_offline_with_split(tmp_path, tiny_tokenizer, monkeypatch):
    # A dataset repository's layout (data/<split>-*.parquet) in a local folder: load_dataset
    # resolves `hf:<folder>` exactly as a hub id's cached snapshot, without the network.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    repo = tmp_path / "org" / "alpaca-mini"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ALPACA[:9]), repo / "data" / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(ALPACA[9:]), repo / "data" / "test-00000.parquet")
    spec = f"hf:{repo}"
    assert data.sources.is_source(spec) and data.sources.count_rows(spec, "test") == 3
    records = data.read_records(spec, split="test")
    assert [r.data["id"] for r in records] == [9, 10, 11]
    assert data.resolve_format(records) == "instruction"
    with pytest.raises(DataError, match="Pick one with --split"):
        data.read_records(spec, split="nope")
    with pytest.raises(DataError, match="hf:no-such-org/no-such-set.*cannot load"):
        data.read_records("hf:no-such-org/no-such-set")


def _hub_cache_entry(cache: Path, repo_id: str, splits: dict[str, Path], commit: str) -> None:
    """What an online ``load_dataset(repo_id)`` leaves in the datasets cache:
    ``<org>___<name>/default/0.0.0/<commit>/`` with arrow files and dataset_info.json,
    prepared by datasets' own json builder from local files."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    name = repo_id.split("/")[1]
    builder = Json(cache_dir=str(cache), dataset_name=name, config_name="default", hash=commit,
                   data_files={k: str(v) for k, v in splits.items()})
    builder.download_and_prepare()
    # a local build names the config after its data files; a hub build names it "default"
    built = next((cache / name).glob(f"default-*/0.0.0/{commit}"))
    target = cache / repo_id.replace("/", "___") / "default" / "0.0.0"
    target.mkdir(parents=True)
    shutil.move(str(built), str(target / commit))
    shutil.rmtree(cache / name)


def test_hf_id_from_a_real_datasets_cache_offline(tmp_path, tiny_tokenizer, monkeypatch):
    """`hf:org/name` offline reads what load_dataset cached for that id: no hub, no files
    (the source JSON files are gone by then)."""
    ds = _datasets()
    cache = tmp_path / "datasets-cache"
    files = {"train": write_jsonl(tmp_path / "train.jsonl", ALPACA[:9]),
             "test": write_jsonl(tmp_path / "test.jsonl", ALPACA[9:])}
    _hub_cache_entry(cache, "tunelab-test/alpaca-mini", files, "0123abcd" * 5)
    for file in files.values():
        file.unlink()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(ds.config, "HF_DATASETS_CACHE", cache)  # read at import time
    monkeypatch.setattr(ds.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder of that name either
    spec = "hf:tunelab-test/alpaca-mini"
    assert data.sources.count_rows(spec, "train") == 9
    records = data.read_records(spec, split="test")
    assert [r.data["id"] for r in records] == [9, 10, 11]
    assert data.resolve_format(records) == "instruction"
    encoded = data.encode_records(records, tiny_tokenizer)[0]
    assert len(encoded) == 3 and all(e.n_targets > 0 for e in encoded)
    with pytest.raises(DataError, match="Pick one with --split"):
        data.read_records(spec, split="validation")
    with pytest.raises(DataError, match="hf:tunelab-test/other.*cannot load"):
        data.read_records("hf:tunelab-test/other")


def test_sharegpt_conversations_train_like_chat(tmp_path, tiny_tokenizer):
    share = {"conversations": [{"from": "system", "value": "Answer briefly."},
                               {"from": "human", "value": "capital of France?"},
                               {"from": "gpt", "value": "Paris"}]}
    chat = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "capital of France?"},
                         {"role": "assistant", "content": "Paris"}]}
    a = data.encode_records(data.read_records(write_jsonl(tmp_path / "s.jsonl", [share])),
                            tiny_tokenizer)[0][0]
    b = data.encode_records(data.read_records(write_jsonl(tmp_path / "c.jsonl", [chat])),
                            tiny_tokenizer)[0][0]
    assert a == b and a.n_targets > 0
    assert data.resolve_format(data.read_records(tmp_path / "s.jsonl")) == "sharegpt"
    broken = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [share, broken])
    with pytest.raises(DataError, match=r"bad.jsonl, line 2, field 'conversations\[1\].from': "
                                        "unknown speaker 'bot'"):
        data.encode_records(data.read_records(path), tiny_tokenizer)


def test_cli_trains_from_a_saved_dataset_with_columns(tiny_model_dir, tmp_path):
    rows = [{"question": f"question {i}: capital of France?", "answer": "Paris"}
            for i in range(16)]
    _datasets().Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", "--model",
                           str(tiny_model_dir), "--data", str(tmp_path / "saved"), "--columns",
                           "prompt=question,completion=answer", "--out", str(out),
                           "--max-steps", "2", "--no-progress", "lora_r=4", "device=cpu",
                           "val_fraction=0.25"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_stats"]["records"] == 16 and summary["steps"] == 2
    # without the mapping the columns name no format: the error says how to map them
    with pytest.raises(DataError, match=r"saved, line 1: cannot tell the format.*answer, "
                                        "question.*columns: prompt=COLUMN,completion=COLUMN"):
        data.encode_source(tmp_path / "saved", None)


STREAM_CHILD = r"""
import resource, sys, json
from pathlib import Path
def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
from tunelab import data
from tests.conftest import build_tiny_tokenizer
import pyarrow.parquet as pq
tok = build_tiny_tokenizer(Path(sys.argv[2]))
before = hwm()
if sys.argv[3] == "stream":
    train, val, stats = data.encode_source(sys.argv[1], tok)
    n = len(train)
else:  # what a list of records costs: every row as a Python dict, held at once
    rows = pq.read_table(sys.argv[1]).to_pylist()
    n = len(rows)
print(json.dumps({"growth": hwm() - before, "n": n}))
"""


def test_a_large_parquet_streams_in_bounded_memory(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    n = 1_000_000  # the size: streamed, then held as records, each in a fresh process
    pq.write_table(pa.table({"text": pa.array([f"fox {i % 10}" for i in range(n)])}),
                   folder / "rows.parquet", row_group_size=65_536)

    def child(mode: str) -> dict:
        env = {**os.environ, "PYTHONPATH": f"{SRC}:{Path(SRC).parent}"}
        (tmp_path / mode).mkdir()
        done = subprocess.run([sys.executable, "-c", STREAM_CHILD, str(folder),
                               str(tmp_path / mode), mode], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    stream, records = child("stream"), child("records")
    assert stream["n"] == records["n"] == n
    # Tokenizing while reading keeps the examples and one chunk of rows. Reading every
    # record first (the file path) holds all the records AND all the examples at the peak:
    # more than the records alone. Streaming stays below the records alone.
    assert stream["growth"] < records["growth"], (stream, records)
    # and the streamed text examples are the ones encode_record makes row by row
    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "tok")
    sample = [data.Record({"text": f"fox {i}"}, "mem", i) for i in range(5)]
    assert ([data.encode_record(r, "text", tok) for r in sample]
            == data._encode_chunk(sample, "text", tok, "completions"))
