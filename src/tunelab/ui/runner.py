"""The parent of one background job: ``python -m tunelab.ui.runner JOB_DIR -- CMD ...``.

The ui server starts this in a new session (its own process group), so the job outlives the
page, the request and the ui server itself. It runs ``CMD`` (``python -m tunelab train ...``)
as its child, waits, and writes the child's exit status to ``JOB_DIR/ui-exit.json``: after a
ui server restart the job is no longer the server's child and its exit code could not be
read any other way. A killed child (out of memory, SIGKILL) is recorded too, since this
parent survives it.

Stopping sends SIGINT to the whole group. The child (tunelab train) finishes its step, saves
a checkpoint and exits 130; this parent only waits for that. It must not *ignore* SIGINT
(``SIG_IGN`` is inherited across exec, and the child would then ignore it too while it loads
the model), so it installs a handler that does nothing instead: handlers reset on exec.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "ui-exit.json"
CHILD_FILE = "ui-child.json"


def proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc/PID/stat field 22):
    with the pid it identifies the process, so a pid reused later is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "(comm)", which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m tunelab.ui.runner JOB_DIR -- CMD ...", file=sys.stderr)
        return 2
    job_dir, cmd = Path(argv[0]), argv[2:]
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        child = subprocess.Popen(cmd)
    except OSError as exc:
        print(f"error: cannot start {cmd[0]}: {exc}", flush=True)
        _write_json(job_dir / EXIT_FILE, {"returncode": 127, "ended": time.time()})
        return 127
    _write_json(job_dir / CHILD_FILE, {"pid": child.pid, "start": proc_start(child.pid)})
    returncode = child.wait()  # PEP 475: retried after our no-op signal handlers run
    _write_json(job_dir / EXIT_FILE, {"returncode": returncode, "ended": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
