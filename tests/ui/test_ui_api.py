"""The ui's API without a browser, on the tiny model: pages and guards, uploads, data
inspection, plans, field errors, and real background jobs (train, stop, resume, compare)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.ui.conftest import job_env, wait_for
from tunelab import data
from tunelab.ui.jobs import EXIT_FILE, JOB_FILE, Jobs, read_json

STATIC = Path(__file__).resolve().parents[2] / "src" / "tunelab" / "ui" / "static"


def _fields(response) -> dict[str, str]:
    return {e["field"]: e["message"] for e in response.json()["errors"]}


def _qa_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: capital of France?", "completion": "Paris"}
            for i in range(n)]


# ------------------------------------------------------------------------------ page


def test_page_and_assets_are_local(make_client) -> None:
    client = make_client()
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert src.startswith(("/static/", "#")), src
    for name in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/static/..%2Fapp.py").status_code == 404
    assert client.get("/static/nothing.js").status_code == 404
    # nothing from a CDN: the only URL in the assets is the SVG namespace (never fetched)
    for path in STATIC.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", path.read_text(encoding="utf-8")))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


def test_foreign_hosts_and_headerless_changes_are_refused(make_client) -> None:
    client = make_client()
    assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 403
    assert client.get("/api/info", headers={"Host": "localhost:7860"}).status_code == 200
    from fastapi.testclient import TestClient

    plain = TestClient(client.app, base_url="http://127.0.0.1")
    refused = plain.post("/api/plan", json={"model": "smollm2-135m"})
    assert refused.status_code == 403 and "x-tunelab-ui" in refused.json()["errors"][0]["message"]


def test_info(make_client, tmp_path) -> None:
    info = make_client().get("/api/info").json()
    assert info["workspace"] == str((tmp_path / "ws").resolve())
    assert "smollm2-135m" in info["aliases"] and "cpu" in info["gpus"]
    assert info["device"] in ("cpu", "cuda", "mps")


# ------------------------------------------------------------------------------ uploads


def test_uploads_are_kept_and_never_overwritten(make_client, tmp_path) -> None:
    client = make_client()
    first = client.put("/api/uploads/qa.jsonl", content=b'{"text": "a"}\n').json()
    assert Path(first["path"]).read_bytes() == b'{"text": "a"}\n' and first["name"] == "qa.jsonl"
    again = client.put("/api/uploads/qa.jsonl", content=b'{"text": "a"}\n').json()
    assert again["path"] == first["path"]  # the same content: the same file
    other = client.put("/api/uploads/qa.jsonl", content=b'{"text": "b"}\n').json()
    assert other["name"] == "qa-2.jsonl" and Path(first["path"]).read_bytes() == b'{"text": "a"}\n'
    bad = client.put("/api/uploads/notes.txt", content=b"x")
    assert bad.status_code == 400 and "unsupported file type" in _fields(bad)["file"]
    assert client.put("/api/uploads/.hidden.jsonl", content=b"x").status_code == 400
    assert client.put("/api/uploads/empty.jsonl", content=b"").status_code == 400
    small = make_client(tmp_path / "small", max_upload_bytes=8)
    too_big = small.put("/api/uploads/big.jsonl", content=b"x" * 100)
    assert too_big.status_code == 413 and "limit" in _fields(too_big)["file"]
    for workspace in (tmp_path / "ws", tmp_path / "small"):
        leftovers = [p.name for p in (workspace / "uploads").iterdir() if p.name.startswith(".")]
        assert leftovers == []  # no partial files
    listed = client.get("/api/uploads").json()["files"]
    assert {f["name"] for f in listed} == {"qa.jsonl", "qa-2.jsonl"}


def test_a_bad_upload_is_kept_and_its_errors_have_lines(make_client, tiny_model_dir) -> None:
    client = make_client()
    text = "\n".join([
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}]}),
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "beep"},
                                 {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps({"prompt": "a", "completion": "b"}),
    ]) + "\n"
    up = client.put("/api/uploads/bad.jsonl", content=text.encode()).json()
    r = client.post("/api/data/inspect", json={"model": str(tiny_model_dir), "data": up["path"]})
    assert r.status_code == 200
    result = r.json()
    assert Path(up["path"]).read_text() == text  # the upload survives its failed parse
    assert result["format"] == "chat" and result["records"] == 5 and result["n_errors"] == 4
    by_line = {e["line"]: e for e in result["errors"]}
    assert set(by_line) == {2, 3, 4, 5}
    assert "malformed JSON" in by_line[2]["message"]
    assert by_line[3]["data_field"] == "messages[0].role" and "robot" in by_line[3]["message"]
    assert "no assistant turn" in by_line[4]["message"]
    assert "mixed formats" in by_line[5]["message"]
    assert result["stats"]["examples"] == 1


# ------------------------------------------------------------------------------ inspect


def test_inspect_renders_what_training_sees(make_client, tiny_model_dir, tiny_tokenizer,
                                            tmp_path) -> None:
    rows = _qa_rows(10) + [{"prompt": "word " * 80, "completion": "long answer"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    client = make_client()
    r = client.post("/api/data/inspect", json={"model": str(tiny_model_dir), "data": str(path),
                                               "max_length": 40, "val_fraction": 0.2}).json()
    assert r["format"] == "prompt_completion" and r["errors"] == []
    stats = r["stats"]
    assert stats["examples"] == 11 and stats["over_length"] == 1 and stats["truncated"] == 1
    assert stats["train_examples"] + stats["val_examples"] == 11 and stats["val_examples"] == 2
    assert stats["mean_trained"] <= 40 < stats["max"]
    assert sum(stats["histogram"]["counts"]) == 11
    # the rendered segments are exactly tunelab.data's labels
    records = data.read_records(path)
    expected = data.encode_record(records[0], "prompt_completion", tiny_tokenizer)
    segments = r["examples"][0]["segments"]
    assert sum(s["tokens"] for s in segments) == len(expected.input_ids)
    trained = "".join(s["text"] for s in segments if not s["masked"])
    target_ids = [t for t in expected.labels if t != data.IGNORE_INDEX]
    assert trained == tiny_tokenizer.decode(target_ids, skip_special_tokens=False)
    assert trained.startswith("Paris") and "<|im_end|>" in trained
    assert "question 0" in "".join(s["text"] for s in segments if s["masked"])
    assert not any(s["cut"] for s in segments)
    dropped = client.post("/api/data/inspect", json={
        "model": str(tiny_model_dir), "data": str(path), "max_length": 40,
        "overlength": "drop"}).json()["stats"]
    assert dropped["dropped"] == 1 and dropped["truncated"] == 0


def test_inspect_previews_preference_pairs_as_prompt_chosen_rejected(
        make_client, tiny_model_dir, tiny_tokenizer, tmp_path) -> None:
    from tunelab import preference

    rows = [{"prompt": f"question {i}: capital of France?", "chosen": "Paris",
             "rejected": "Tallinn"} for i in range(6)]
    rows += [{"prompt": "q", "chosen": "same", "rejected": "same"},  # no preference: dropped
             {"prompt": "q", "chosen": "a"}]                         # line 8: no rejected
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = make_client().post("/api/data/inspect", json={"model": str(tiny_model_dir),
                                                      "data": str(path)}).json()
    assert r["format"] == "preference" and r["n_errors"] == 1
    assert r["errors"][0]["line"] == 8 and r["errors"][0]["data_field"] == "rejected"
    assert r["stats"]["examples"] == 6 and r["stats"]["identical_answers"] == 1
    assert r["stats"]["dropped"] == 1
    # each part is tokenized exactly as preference training tokenizes the pair
    pair = preference.encode_pair(data.read_records(path)[0], tiny_tokenizer)
    parts = {p["name"]: p for p in r["examples"][0]["parts"]}
    assert list(parts) == ["prompt", "chosen", "rejected"]
    for name, ids in (("prompt", pair.prompt), ("chosen", pair.chosen),
                      ("rejected", pair.rejected)):
        assert parts[name]["tokens"] == len(ids) == sum(s["tokens"]
                                                        for s in parts[name]["segments"])
    assert all(s["masked"] for s in parts["prompt"]["segments"])
    assert "question 0" in "".join(s["text"] for s in parts["prompt"]["segments"])
    for name, answer in (("chosen", "Paris"), ("rejected", "Tallinn")):
        scored = "".join(s["text"] for s in parts[name]["segments"] if not s["masked"])
        assert scored.startswith(answer) and "<|im_end|>" in scored


def test_inspect_marks_every_bad_field(make_client, tmp_path) -> None:
    client = make_client()
    r = client.post("/api/data/inspect", json={"model": str(tmp_path / "nope"),
                                               "data": str(tmp_path / "missing.jsonl"),
                                               "max_length": 2, "format": "yaml"})
    assert r.status_code == 400
    fields = _fields(r)
    assert "model path not found" in fields["model"]
    assert "file not found" in fields["data"]
    assert "must be >= 8" in fields["max_length"]
    assert "allowed" in fields["format"]


# ------------------------------------------------------------------------------ plan


def test_plan_follows_the_settings(make_client) -> None:
    client = make_client()
    base = {"model": "smollm2-135m", "method": "lora", "lora_r": 16, "max_length": 256,
            "batch_size": 2, "gpu": "cpu", "max_steps": 10, "examples": 100, "avg_len": 120}
    plan = client.post("/api/plan", json=base).json()
    lora = plan["methods"]["lora"]
    assert plan["selected"] == "lora" and lora["fit"] == "yes"
    assert plan["licence"]["id"] == "apache-2.0" and plan["licence"]["category"] == "permissive"
    assert lora["time"]["tokens"] == 10 * 2 * 120  # steps x batch x mean length
    assert set(plan["methods"]) == {"full", "lora", "qlora"}
    bigger = client.post("/api/plan", json={**base, "batch_size": 8}).json()
    assert bigger["methods"]["lora"]["memory"]["activations"] > lora["memory"]["activations"]
    rank = client.post("/api/plan", json={**base, "lora_r": 64}).json()
    assert rank["methods"]["lora"]["memory"]["adapters"] == 4 * lora["memory"]["adapters"]
    small = client.post("/api/plan", json={**base, "gpu": "t4", "method": "full",
                                           "max_length": 4096, "batch_size": 64}).json()
    assert small["methods"]["full"]["fit"] == "no"


def test_plan_errors_name_their_field(make_client) -> None:
    client = make_client()
    r = client.post("/api/plan", json={"model": "smollm2-135m", "lora_r": 0, "gpu": "tpu",
                                       "method": "magic", "batch_size": "two"})
    fields = _fields(r)
    assert r.status_code == 400
    assert set(fields) == {"lora_r", "gpu", "method", "batch_size"}
    assert "unknown GPU" in fields["gpu"]
    r = client.post("/api/plan", json={"model": "no-such-model-anywhere"})
    assert r.status_code == 400 and "model" in _fields(r)


# ------------------------------------------------------------------------------ runs


def test_start_form_errors_name_their_fields(make_client, tiny_model_dir, tmp_path) -> None:
    client = make_client()
    path = write_jsonl(tmp_path / "qa.jsonl", _qa_rows(8))
    good = {"model": str(tiny_model_dir), "data": str(path), "device": "cpu"}
    r = client.post("/api/runs", json={"name": "bad name!", "config": {
        **good, "lr": "fast", "method": "magic", "batch_size": 0,
        "data": str(tmp_path / "x.jsonl")}})
    fields = _fields(r)
    assert r.status_code == 400
    assert {"name", "lr", "method", "batch_size", "data"} <= set(fields)
    assert "must be a number" in fields["lr"] and "allowed: lora, full, qlora" in fields["method"]
    # a combination rule goes to the first key it names
    r = client.post("/api/runs", json={"name": "q", "config": {**good, "method": "full",
                                                                 "base_bits": 4}})
    assert r.status_code == 400 and "quantized base" in _fields(r)["base_bits"]
    r = client.post("/api/runs", json={"name": "q", "config": {**good, "nonsense": 1}})
    assert "nonsense" in _fields(r)
    assert _fields(client.post("/api/runs", json={"name": "base", "config": good}))["name"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    r = client.post("/api/runs", json={"name": "q", "config": {**good, "data": str(broken)}})
    error = r.json()["errors"][0]
    assert error["field"] == "data" and error["line"] == 2 and "malformed JSON" in error["message"]
    assert not (tmp_path / "ws" / "q").exists()  # nothing was started
    assert client.get("/api/runs/nope").status_code == 404


def _start(client, name: str, config: dict, **extra) -> dict:
    r = client.post("/api/runs", json={"name": name, "config": config, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def _state(client, name: str, path: str = "") -> str:
    return client.get(f"/api/runs/{name}{path}").json()["state"]


def test_stop_resume_and_a_restarted_server(make_client, tiny_model_dir, tmp_path) -> None:
    """A long run is stopped (SIGINT: checkpoint, weights, exit 130) by a *second* app on
    the same workspace, as after a ui restart, and resumed from its checkpoint."""
    path = write_jsonl(tmp_path / "qa.jsonl", _qa_rows(16))
    first = make_client()
    config = {"model": str(tiny_model_dir), "data": str(path), "device": "cpu",
              "max_steps": 100000, "batch_size": 2, "lr": 1e-3, "lora_r": 4, "eval_every": 50,
              "val_fraction": 0.25}
    started = _start(first, "long", config)
    assert started["state"] == "running" and started["device"] == "cpu"
    wait_for(lambda: first.get("/api/runs/long").json()["step"] >= 3, 120, "the first steps")
    info = first.get("/api/runs/long").json()
    assert info["total_steps"] == 100000 and info["tokens_per_s"] > 0
    assert info["eta_s"] > 0 and info["peak_memory"] > 0 and info["metrics"]
    assert first.get("/api/runs/long?since=2").json()["metrics"][0]["step"] == 3
    # one job per device: a second run waits
    busy = first.post("/api/runs", json={"name": "second", "config": {**config, "max_steps": 2}})
    assert busy.status_code == 409 and "already running" in _fields(busy)["start"]

    second = make_client()  # "the ui server restarted": a new app, the same folder
    assert [r["name"] for r in second.get("/api/runs").json()["runs"]] == ["long"]
    assert _state(second, "long") == "running"
    assert second.post("/api/runs/long/stop").json()["state"] in ("stopping", "stopped")
    wait_for(lambda: _state(second, "long") == "stopped", 60, "the run to stop")
    stopped = second.get("/api/runs/long").json()
    assert stopped["returncode"] == 130 and stopped["has_checkpoint"] and stopped["has_adapter"]
    step = stopped["step"]
    assert second.post("/api/runs/long/stop").status_code == 409

    assert second.post("/api/runs/long/resume", json={}).json()["state"] == "running"
    wait_for(lambda: second.get("/api/runs/long").json()["step"] > step + 2, 120,
             "the resumed run to continue")
    metrics = second.get("/api/runs/long").json()["metrics"]
    steps = [m["step"] for m in metrics]
    assert steps == list(range(1, len(steps) + 1))  # continued from the checkpoint, no gap
    log = (tmp_path / "ws" / "long" / "ui-job.log").read_text()
    assert "resumed from" in log and log.count("--- ") == 2
    record = read_json(tmp_path / "ws" / "long" / JOB_FILE)
    assert [h["action"] for h in record["history"]] == ["start", "resume"]
    second.post("/api/runs/long/stop")
    wait_for(lambda: _state(second, "long") == "stopped", 60, "the run to stop again")


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A workspace with one finished tiny LoRA run, trained through the ui's job."""
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    root = tmp_path_factory.mktemp("ui-finished")
    path = write_jsonl(root / "qa.jsonl", _qa_rows(16))
    with TestClient(create_app(root / "ws", env=job_env(), chat_device="cpu"),
                    base_url="http://127.0.0.1", headers={"X-Tunelab-UI": "1"}) as client:
        _start(client, "tiny", {"model": str(tiny_model_dir), "data": str(path),
                                "device": "cpu", "max_steps": 4, "batch_size": 4,
                                "lr": 5e-3, "lora_r": 4, "eval_every": 2,
                                "save_every": 2, "val_fraction": 0.25})
        wait_for(lambda: _state(client, "tiny") not in ("running", "stopping"), 180,
                 "the tiny run to finish")
    return root / "ws"


def test_a_finished_run(make_client, finished) -> None:
    client = make_client(finished)
    run = client.get("/api/runs/tiny").json()
    assert run["state"] == "done" and run["returncode"] == 0, run["log"]
    assert run["step"] == 4 == run["total_steps"] and run["eta_s"] is None
    assert [m["step"] for m in run["metrics"] if "val_loss" in m] == [2, 4]
    assert run["has_adapter"] and run["has_report"] and run["summary"]["steps"] == 4
    report = client.get("/runs/tiny/report.html")
    assert report.status_code == 200 and "script-src" not in report.headers[
        "content-security-policy"]
    assert client.get("/runs/tiny/compare/report.html").status_code == 404
    done = client.post("/api/runs/tiny/resume", json={})
    assert done.status_code == 409 and "finished" in _fields(done)["run"]


def test_compare_job(make_client, finished) -> None:
    client = make_client(finished)
    r = client.post("/api/runs/tiny/compare", json={"limit": 0, "few_shot": "x"})
    assert r.status_code == 400 and {"limit", "few_shot"} <= set(_fields(r))
    r = client.post("/api/runs/tiny/compare", json={"limit": 3, "max_new_tokens": 3,
                                                    "few_shot": "1", "batch_size": 4})
    assert r.status_code == 201 and r.json()["state"] == "running"
    assert client.get("/api/runs").json()["runs"][0]["compare"] == "running"
    wait_for(lambda: _state(client, "tiny", "/compare") not in ("running", "stopping"), 180,
             "the comparison")
    result = client.get("/api/runs/tiny/compare").json()
    assert result["state"] == "done", result["log"]
    report = result["report"]
    assert [s["name"] for s in report["systems"]] == ["zero-shot", "few-shot k=1", "LoRA (tiny)"]
    assert all(s["ci_low"] <= s["score"] <= s["ci_high"] for s in report["systems"])
    assert report["verdict"]["decision"] in ("finetune", "tradeoff", "prefer_prompting",
                                             "prompting_better")
    assert report["verdict"]["n_examples"] == 3 and result["options"]["limit"] == 3
    assert client.get("/runs/tiny/compare/report.html").status_code == 200


def test_chat_side_by_side(make_client, finished, tiny_model_dir) -> None:
    client = make_client(finished)
    assert [a["name"] for a in client.get("/api/chat").json()["adapters"]] == ["tiny"]
    question = [{"role": "user", "content": "question 3: capital of France?"}]
    body = {"model": str(tiny_model_dir), "max_new_tokens": 4,
            "columns": [{"model": "base", "messages": question},
                        {"model": "tiny", "messages": question}]}
    r = client.post("/api/chat", json=body)
    assert r.status_code == 200, r.text
    replies = r.json()["replies"]
    assert [x["model"] for x in replies] == ["base", "tiny"]
    assert all(x["completion_tokens"] <= 4 and x["prompt_tokens"] > 5 for x in replies)
    # the same answers as tunelab.generate on base and adapter
    from tunelab import adapters, models
    from tunelab.generate import GenerationSettings, build_prompt, generate

    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    prompt = build_prompt(tok, question)
    settings = GenerationSettings(max_new_tokens=4)
    assert replies[0]["text"] == generate(model, tok, [prompt], settings)[0]["text"]
    tuned = adapters.load_adapter(model, finished / "tiny" / "adapter")
    assert replies[1]["text"] == generate(tuned, tok, [prompt], settings)[0]["text"]
    bad = client.post("/api/chat", json={**body, "max_new_tokens": 0,
                                         "columns": [{"model": "nope", "messages": question}]})
    assert bad.status_code == 400 and "max_new_tokens" in _fields(bad)
    bad = client.post("/api/chat", json={**body, "columns": [{"model": "nope",
                                                              "messages": question}]})
    assert "no adapter named 'nope'" in _fields(bad)["columns"]
    bad = client.post("/api/chat", json={**body, "columns": [{"model": "base", "messages": []}]})
    assert "prompt" in _fields(bad)


def test_a_run_that_fails_says_why(make_client, tiny_model_dir, tmp_path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "robot", "content": "beep"},
                          {"role": "assistant", "content": "boop"}]}] * 4
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    client = make_client()
    _start(client, "broken", {"model": str(tiny_model_dir), "data": str(path), "device": "cpu",
                              "max_steps": 2, "val_fraction": 0})
    wait_for(lambda: _state(client, "broken") == "failed", 120, "the run to fail")
    run = client.get("/api/runs/broken").json()
    assert run["returncode"] == 2
    assert "line 2" in run["error"] and "unknown role 'robot'" in run["error"]


# ------------------------------------------------------------------------------ jobs


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_jobs_record_how_they_ended(tmp_path) -> None:
    """The runner records the exit status, survives its child's SIGKILL, forwards a stop
    as SIGINT to the job, and runs it in a session of its own (so a Ctrl-C of the ui
    server does not reach it)."""
    jobs = Jobs(tmp_path / "ws", env=job_env())

    def spawn(name: str, code: str) -> Path:
        job_dir = jobs.root / name
        jobs._spawn(job_dir, kind="train", name=name, command=_py(code), device="cpu",
                    action="start", meta={})
        return job_dir

    ok = spawn("ok", "print('hello')")
    killed = spawn("killed", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    user = spawn("user", "import sys; print('error: bad thing, line 3'); sys.exit(2)")
    waiting = spawn("waiting", "import signal, sys, time\n"
                    "signal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
                    "print('ready', flush=True)\ntime.sleep(60)")
    for job_dir in (ok, killed, user):
        wait_for(lambda d=job_dir: (d / EXIT_FILE).is_file(), 30, f"{job_dir.name} to end")
    assert jobs.job_state(ok)["state"] == "done"
    assert "hello" in (ok / "ui-job.log").read_text()
    state = jobs.job_state(killed)
    assert state["state"] == "failed" and "SIGKILL" in state["error"]
    state = jobs.job_state(user)
    assert state["state"] == "failed" and state["error"] == "bad thing, line 3"
    wait_for(lambda: "ready" in (waiting / "ui-job.log").read_text(), 30, "the job to start")
    record = read_json(waiting / JOB_FILE)
    assert os.getsid(record["pid"]) == record["pid"] != os.getsid(0)
    assert jobs.job_state(waiting)["state"] == "running"
    assert jobs.stop("waiting")["state"] in ("stopping", "stopped")
    wait_for(lambda: jobs.job_state(waiting)["state"] == "stopped", 30, "the job to stop")
    assert jobs.job_state(waiting)["returncode"] == 130


def test_a_job_whose_process_vanished_is_lost(tmp_path) -> None:
    jobs = Jobs(tmp_path / "ws")
    run = jobs.root / "ghost"
    run.mkdir()
    (run / JOB_FILE).write_text(json.dumps({"kind": "train", "name": "ghost", "pid": 2 ** 22 + 7,
                                            "pid_start": "1", "started": time.time(),
                                            "config": {"max_steps": 5}}))
    state = jobs.job_state(run)
    assert state["state"] == "lost" and "without recording" in state["error"]
    assert jobs.run_info("ghost")["state"] == "lost"
    # a reused pid (ours, with another start time) is not mistaken for the job
    (run / JOB_FILE).write_text(json.dumps({"pid": os.getpid(), "pid_start": "0"}))
    assert jobs.job_state(run)["state"] == "lost"


def test_runs_made_on_the_command_line(make_client, finished, tmp_path) -> None:
    """Runs trained with `tunelab train --out WORKSPACE/NAME` are listed; one without a
    summary is stopped (resumable from its run_config.json) unless its files changed in the
    last minutes: then it may still be training in a terminal and is left alone."""
    import shutil

    workspace = tmp_path / "cli-ws"
    for name in ("done-run", "cut-run"):
        shutil.copytree(finished / "tiny", workspace / name,
                        ignore=shutil.ignore_patterns("ui-*", "compare"))
    cut = workspace / "cut-run"
    (cut / "summary.json").unlink()
    client = make_client(workspace)
    states = {r["name"]: r["state"] for r in client.get("/api/runs").json()["runs"]}
    assert states == {"done-run": "done", "cut-run": "external"}
    r = client.post("/api/runs/cut-run/resume", json={})
    assert r.status_code == 409 and "outside the ui" in _fields(r)["run"]
    assert client.post("/api/runs/done-run/resume", json={}).status_code == 409
    old = time.time() - 3600
    for f in cut.iterdir():
        os.utime(f, (old, old))
    assert _state(client, "cut-run") == "stopped"
    assert client.post("/api/runs/cut-run/resume", json={}).json()["state"] == "running"
    wait_for(lambda: _state(client, "cut-run") not in ("running", "stopping"), 120,
             "the resumed run")
    run = client.get("/api/runs/cut-run").json()
    assert run["state"] == "done", run["log"]
    assert "resumed from" in run["log"] and "(step 4)" in run["log"]
    assert (cut / "summary.json").is_file() and run["step"] == 4


def test_cli_ui_refuses_bad_flags(tmp_path, capsys) -> None:
    from tunelab.cli import main

    assert main(["ui", "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["ui", "--workspace", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
