"""``tunelab serve`` on the command line: flags, safe defaults, and a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tunelab.cli import build_parser, main


def test_defaults_bind_to_loopback_with_admin_off():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and args.port == 8000
    assert args.admin is False and args.api_key is None and args.adapter == []


def test_adapter_flags():
    args = build_parser().parse_args(["serve", "--adapter", "x=/p/q", "--adapter",
                                      "runs/countries/adapter", "--adapter", "runs/chat"])
    assert args.adapter == [("x", "/p/q"), ("countries", "runs/countries/adapter"),
                            ("chat", "runs/chat")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--adapter", "../x=/p"])


def test_admin_without_adapter_dir_is_a_user_error(capsys):
    assert main(["serve", "--model", "m", "--admin"]) == 2
    assert "--admin needs at least one --adapter-dir" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process_with_api_key_from_the_environment(tiny_model_dir, adapter_dirs):
    port = _free_port()
    env = {**os.environ, "TUNELAB_API_KEY": "from-env"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--model", str(tiny_model_dir), "--name",
         "tiny", "--adapter", f"a={adapter_dirs['a']}", "--port", str(port), "--device", "cpu",
         "--threads", "1", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {proc.stdout.read()}")
            time.sleep(0.3)
        client = OpenAI(base_url=f"{url}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "a"]
        reply = client.chat.completions.create(
            model="a", messages=[{"role": "user", "content": "hello"}], max_tokens=5,
            temperature=0)
        assert reply.usage.completion_tokens <= 5
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert f"serving tiny, a on http://127.0.0.1:{port}/v1 (API key required)" in out
