"""``tunelab ui``: serve the local web app under uvicorn (the stack of ``tunelab serve``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.serve.net import check_port, is_loopback

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  tunelab ui                                  # http://127.0.0.1:7860, runs kept in runs/
  tunelab ui --port 8080 --workspace ~/tunelab-runs

Training and comparison runs are processes of their own: they keep going when the page is
closed or this server stops, and a restarted server lists and reattaches to them.
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ui", help="the whole workflow in a local web page",
        description="Serve a local web app: choose a model and data, see the plan (memory, "
                    "time, licence), train with live loss curves, compare prompting with "
                    "fine-tuning, and chat with the base and adapters side by side.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--workspace", default="runs",
                   help="folder for uploads and runs (default: runs/)")
    p.add_argument("--allow-parallel", action="store_true",
                   help="allow more than one training/comparison job per device")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest upload (MiB)")
    p.add_argument("--chat-device", default="auto", help="device of the chat page's model")
    p.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from tunelab.ui.app import create_app
    except ImportError as exc:
        raise TunelabError(f"tunelab ui needs fastapi and uvicorn ({exc}); "
                           "pip install fastapi uvicorn") from None
    check_port(args.port)
    if args.max_upload_mb < 1:
        raise TunelabError(f"--max-upload-mb must be at least 1, got {args.max_upload_mb}")
    workspace = Path(args.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise TunelabError(f"--workspace {workspace} is a file, not a folder")
    extra_hosts = []
    if not is_loopback(args.host):
        # No login on this page, and it starts processes: say so loudly.
        log.warning("the ui listens on %s: anyone who can reach this address can read your "
                    "data, start training and chat with your models", args.host)
        # On a wildcard address the page is reached by any of the machine's names and
        # addresses, so the Host check (a guard for the loopback case) is off.
        extra_hosts = ["*"] if args.host in ("0.0.0.0", "::") else [args.host]
    app = create_app(workspace, allow_parallel=args.allow_parallel, allowed_hosts=extra_hosts,
                     max_upload_bytes=args.max_upload_mb << 20, chat_device=args.chat_device)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"tunelab ui on http://{shown}:{args.port}/ (workspace {app.state.jobs.root})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)
    return 0
