"""Fixtures for the serving tests: random LoRA adapters for the tiny Llama, an engine, and a
live uvicorn server on a free loopback port (in a thread of the test process)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# (name, seed, target modules, rank): different shapes, so batches really mix adapters
ADAPTERS = [("a", 11, ["q_proj", "v_proj"], 4), ("b", 12, ["k_proj", "o_proj", "down_proj"], 2),
            ("c", 13, "all-linear", 8)]


def make_random_adapter(base_dir: Path, out: Path, seed: int, targets, r: int,
                        std: float = 0.5) -> Path:
    """A plain-peft LoRA adapter with non-zero B, so it changes the model's answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Serving tests run tiny batches: one intra-op thread is as fast, and far faster when
    other jobs share the CPU (spinning OpenMP threads then fight over the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: make_random_adapter(tiny_model_dir, root / name, seed, targets, r)
            for name, seed, targets, r in ADAPTERS}


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapter_dirs):
    from tunelab.serve.engine import Engine

    eng = Engine.load(str(tiny_model_dir), [(n, str(p)) for n, p in adapter_dirs.items()],
                      name="tiny", device="cpu", batch_wait_ms=20).start()
    yield eng
    eng.close()


@contextmanager
def running_uvicorn(config, *, sndbuf: int | None = None) -> Iterator[tuple[str, object]]:
    """``uvicorn.Server(config)`` in a thread on a free port of 127.0.0.1; yield its base
    URL and the server. ``sndbuf`` shrinks the send buffer of every accepted connection
    (the listening socket's is inherited), so a client that does not read fills it fast."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run ``app`` under plain uvicorn on a free port of 127.0.0.1; yield its base URL."""
    import uvicorn

    with running_uvicorn(uvicorn.Config(app, log_level="warning", lifespan="on")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server(engine) -> Iterator[str]:
    from tunelab.serve.app import create_app

    with live_server(create_app(engine, max_tokens_limit=64, max_request_bytes=64 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, model: str, text: str, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 10)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc, else psutil)."""
    try:
        with open("/proc/self/statm") as fh:
            import os

            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss
