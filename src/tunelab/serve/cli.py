"""``tunelab serve``: load a base and its adapters, then run the HTTP API under uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.serve.net import check_port, is_loopback

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  tunelab serve --model smollm2-135m --adapter countries=runs/a/adapter --adapter chat=runs/b
  tunelab serve --model smollm2-135m --admin --adapter-dir runs --api-key "$KEY" --port 8001

then, with the openai client:
  OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(
      model="countries", messages=[{"role": "user", "content": "..."}], temperature=0)
"""


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH``, or a bare ``PATH`` named after its folder (or its run directory)."""
    from tunelab.serve.engine import check_name

    if "=" in text:
        name, path = text.split("=", 1)
    else:
        path = text
        folder = Path(text.rstrip("/"))
        name = folder.parent.name if folder.name == "adapter" else folder.name
    try:
        return check_name(name), path
    except TunelabError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a base and many LoRA adapters over an OpenAI-compatible API",
        description="Serve one base model and any number of LoRA adapters behind an "
                    "OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, "
                    "/v1/completions). Requests for different adapters share batches.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, GGUF file or hub id")
    p.add_argument("--name", default=None,
                   help="model id of the base in the API (default: the alias or folder name)")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter,
                   metavar="NAME=PATH", help="a LoRA adapter folder or run directory "
                   "(repeatable); NAME is its model id in the API")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $TUNELAB_API_KEY)")
    p.add_argument("--admin", action="store_true",
                   help="enable POST/DELETE /admin/adapters to load and unload adapters")
    p.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="folder the admin endpoint may load adapters from (repeatable)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests to join it")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens when a request does not say")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20,
                   help="largest request body (bytes)")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting at most; more are answered 503 'overloaded'")
    p.add_argument("--read-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request's headers, and then its body, must arrive within this "
                   "long (else the connection is closed, or 408)")
    p.add_argument("--write-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="drop a client that leaves its answer unread this long")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--base-bits", type=int, choices=(4, 8, 16), default=16,
                   help="load the base quantized (bitsandbytes)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (fewer can be faster on a busy machine)")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tunelab.serve.app import create_app
        from tunelab.serve.server import server_config
    except ImportError as exc:
        raise TunelabError(f"tunelab serve needs fastapi and uvicorn ({exc}); "
                           "pip install fastapi uvicorn") from None
    from tunelab.serve.engine import Engine

    api_key = args.api_key or os.environ.get("TUNELAB_API_KEY") or None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.admin and not args.adapter_dir:
        raise TunelabError("--admin needs at least one --adapter-dir to load adapters from")
    if args.read_timeout <= 0 or args.write_timeout <= 0:
        raise TunelabError("--read-timeout and --write-timeout must be positive")
    check_port(args.port)
    if not is_loopback(args.host) and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can "
                    "use the models (set --api-key or TUNELAB_API_KEY)", args.host)
    if args.base_bits == 4:
        from tunelab.memory import return_freed_memory

        # bitsandbytes' repack for its CPU gemv frees the trainable layout's bytes; a heap
        # that keeps them held 10.1 GiB at 7B (tunelab.models.repack_now)
        return_freed_memory()
    engine = Engine.load(args.model, args.adapter, name=args.name, device=args.device,
                         dtype=args.dtype, allow_pickle=args.allow_pickle,
                         trust_remote_code=args.trust_remote_code, bits=args.base_bits,
                         max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                         max_queue=args.max_queue)
    app = create_app(engine, api_key=api_key, admin=args.admin, adapter_dirs=args.adapter_dir,
                     max_request_bytes=args.max_request_bytes,
                     max_tokens_limit=args.max_tokens_limit,
                     default_max_tokens=args.default_max_tokens,
                     body_timeout=args.read_timeout)
    print(f"serving {', '.join(engine.model_ids)} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    uvicorn.Server(server_config(app, host=args.host, port=args.port,
                                 log_level=args.log_level, read_timeout=args.read_timeout,
                                 write_timeout=args.write_timeout)).run()
    return 0
