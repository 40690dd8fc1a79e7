"""Security defaults that had no test of their own (issue #9, point 4). The others are listed
with their tests in docs/bad-input.md ("Security defaults")."""

from __future__ import annotations

import hmac
import json
import logging
import pickle
import shutil

import httpx
import pytest

from tests.serve.conftest import live_server
from tunelab.cli import build_parser
from tunelab.errors import ModelError
from tunelab.serve.net import is_loopback


def _subcommands():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sub.choices


def test_every_command_defaults_to_no_pickle_no_remote_code():
    """Every command that can load a model or adapter refuses pickle and remote code unless
    the flag says otherwise (train: the config keys of the same names)."""
    from tunelab.config import TrainConfig

    assert TrainConfig.allow_pickle is False and TrainConfig.trust_remote_code is False
    seen = set()
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if action.dest in ("allow_pickle", "trust_remote_code"):
                assert action.default is False, (name, action.dest)
                seen.add((name, action.dest))
    assert {(c, flag) for c in ("serve", "generate", "eval")
            for flag in ("allow_pickle", "trust_remote_code")} <= seen


def test_serve_defaults_are_the_safe_ones():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.api_key is None
    assert args.admin is False and args.adapter_dir == []
    assert args.allow_pickle is False and args.trust_remote_code is False
    assert args.read_timeout == 30 and args.write_timeout == 60
    assert args.max_request_bytes == 1 << 20 and args.max_queue == 1024


def test_loopback_detection_and_the_warning_for_an_open_server(monkeypatch, caplog):
    from tunelab.serve import cli as serve_cli
    from tunelab.serve.engine import Engine

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.com", ""):
        assert not is_loopback(host), host

    class Stop(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(Engine, "load", no_model)
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    for host, key, warned in (("0.0.0.0", None, True), ("0.0.0.0", "k", False),
                              ("127.0.0.1", None, False)):
        caplog.clear()
        argv = ["serve", "--model", "m", "--host", host] + (["--api-key", key] if key else [])
        with caplog.at_level(logging.WARNING, logger="tunelab.serve.cli"), \
                pytest.raises(Stop):
            serve_cli.run(build_parser().parse_args(argv))
        assert ("without an API key" in caplog.text) is warned, (host, key, caplog.text)


def test_api_key_is_compared_in_constant_time(engine, monkeypatch):
    """Every key check goes through ``hmac.compare_digest`` (constant time for keys of the
    same length), on the API and the admin routes; the key is never compared with ``==``."""
    from tunelab.serve.app import create_app

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    app = create_app(engine, api_key="s3cret-key", admin=True, adapter_dirs=["/nonexistent"])
    with live_server(app) as url:
        for key, status in (("s3cret-key", 200), ("s3cret-kez", 401), ("s3cret", 401),
                            ("s3cret-key-and-more", 401), ("S3CRET-KEY", 401)):
            for method, path in (("GET", "/v1/models"), ("GET", "/admin/adapters")):
                calls.clear()
                r = httpx.request(method, f"{url}{path}",
                                  headers={"Authorization": f"Bearer {key}"})
                assert r.status_code == status, (key, path)
                assert calls == [(key.encode(), b"s3cret-key")], (key, path, calls)


@pytest.fixture
def pickle_adapter(adapter_dirs, tmp_path):
    """An adapter folder whose weights are a pickle that creates a file when unpickled."""
    marker = tmp_path / "pickle-code-ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "library" / "evil"
    folder.mkdir(parents=True)
    shutil.copy(adapter_dirs["a"] / "adapter_config.json", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Evil()))
    return folder, marker


def test_a_pickle_adapter_is_never_unpickled(engine, pickle_adapter):
    from tunelab.serve.app import create_app

    folder, marker = pickle_adapter
    with pytest.raises(ModelError, match="pickle adapter"):
        engine.load_adapter("evil", folder)
    app = create_app(engine, admin=True, adapter_dirs=[folder.parent])
    with live_server(app) as url:
        r = httpx.post(f"{url}/admin/adapters", json={"name": "evil", "path": "evil"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_adapter"
        assert "pickle" in r.json()["error"]["message"]
        assert "evil" not in [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert not marker.exists()
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
