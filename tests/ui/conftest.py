"""Fixtures for the ui tests: an app over a temporary workspace, a client for it, and
clean-up that stops every job a test left running (they are detached processes)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HEADERS = {"X-Tunelab-UI": "1"}


def job_env() -> dict[str, str]:
    """The environment of the jobs a test starts: one thread each (the CI machine has two
    cores), offline, and this checkout's tunelab."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def stop_all_jobs(workspace: Path, grace: float = 20.0) -> None:
    """SIGINT every job still running under ``workspace``, then SIGKILL what is left."""
    from tunelab.ui.jobs import COMPARE_DIR, JOB_FILE, Jobs, read_json

    if not workspace.is_dir():
        return
    jobs = Jobs(workspace)
    active = []
    for name in jobs.run_names():
        for job_dir in (workspace / name, workspace / name / COMPARE_DIR):
            if (job_dir / JOB_FILE).is_file() and jobs.job_state(job_dir)["state"] in (
                    "running", "stopping"):
                active.append(job_dir)
    for job_dir in active:
        pid = read_json(job_dir / JOB_FILE).get("pid")
        try:
            os.killpg(pid, signal.SIGINT)
        except (ProcessLookupError, TypeError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    for job_dir in active:
        while jobs.job_state(job_dir)["state"] in ("running", "stopping") \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        if jobs.job_state(job_dir)["state"] in ("running", "stopping"):
            try:
                os.killpg(read_json(job_dir / JOB_FILE)["pid"], signal.SIGKILL)
            except (ProcessLookupError, KeyError, PermissionError):
                pass


@pytest.fixture
def make_client(tmp_path) -> Iterator[Callable[..., Any]]:
    """``make_client(workspace=None, **create_app_kwargs)`` -> a TestClient; every workspace
    used is cleaned of running jobs afterwards."""
    from fastapi.testclient import TestClient

    from tunelab.ui.app import create_app

    clients, workspaces = [], []

    def make(workspace: Path | None = None, **kwargs: Any) -> TestClient:
        workspace = workspace or tmp_path / "ws"
        workspaces.append(workspace)
        kwargs.setdefault("env", job_env())
        kwargs.setdefault("chat_device", "cpu")
        client = TestClient(create_app(workspace, **kwargs), base_url="http://127.0.0.1",
                            headers=HEADERS)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    for workspace in set(workspaces):
        stop_all_jobs(workspace)
