"""Background jobs of the ui: training and comparison runs as subprocesses, state on disk.

Long work never runs inside a request: ``tunelab train`` and ``tunelab compare`` run as
``python -m tunelab ...`` under a small parent (:mod:`tunelab.ui.runner`) in their own
session, so they keep going when the page is closed and when the ui server stops. Nothing
about a job lives only in the server's memory; the workspace folder is the state:

    WORKSPACE/
      uploads/                 files uploaded on the data page (never deleted by the ui)
      RUN/                     one training run = tunelab train's ``out`` folder
        ui-train.yaml          the config the ui started it with (resume uses it again)
        ui-job.json            the job: command, device, pid, history, stop requests
        ui-job.log             stdout + stderr of every start and resume
        ui-exit.json           the exit status, written by the runner when the job ends
        metrics.jsonl ...      what training writes (see tunelab.train)
        compare/               the prompt-vs-fine-tune comparison of this run, same files

A restarted server lists the runs from these folders, sees which processes are still alive
(pid plus its start time, so a reused pid is not mistaken for the job) and reattaches.
Runs made with ``tunelab train --out WORKSPACE/NAME`` outside the ui are listed too.

One job at a time per device (``cpu``, ``cuda``, ``mps``) unless the caller allows more:
two trainings on one GPU or on a 2-core CPU mostly make both slow or run out of memory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.ui.forms import FieldError, data_path, run_name, train_config
from tunelab.ui.runner import CHILD_FILE, EXIT_FILE, proc_start

log = logging.getLogger(__name__)

JOB_FILE = "ui-job.json"
LOG_FILE = "ui-job.log"
TRAIN_CONFIG = "ui-train.yaml"
COMPARE_DIR = "compare"
UPLOADS = "uploads"
ACTIVE = ("running", "stopping")
# tunelab's exit codes: 2 = a user error (one "error: ..." line), 130 = interrupted by
# SIGINT after saving a checkpoint.
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
LOG_TAIL_BYTES = 64 * 1024


# ------------------------------------------------------------------------------ helpers


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from disk, or {} when the file is missing or half written."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Atomic: a reader (another request, a restarted server) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def pid_alive(pid: Any, start: Any = None) -> bool:
    """Is process ``pid`` running and the same process that was started (its start time
    in /proc matches)? A zombie counts as ended."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").is_file():
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        if fields[0] in ("Z", "X"):
            return False
        return start is None or fields[19] == start
    try:  # no /proc (macOS): existence only
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resolve_device(spec: str) -> str:
    """The device a job with ``device: spec`` will use, as tunelab.models.pick_device
    decides it (the key for one-job-per-device)."""
    import torch

    if spec != "auto":
        if spec == "cuda" and not torch.cuda.is_available():
            raise FieldError.one("device", "no CUDA GPU is available on this machine; use cpu "
                                 "or auto")
        if spec == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                  and torch.backends.mps.is_available()):
            raise FieldError.one("device", "Apple MPS is not available on this machine")
        return spec
    from tunelab.models import pick_device

    return pick_device("auto").type


def _last_error(log_text: str) -> str | None:
    """What went wrong, from the log of the last start: tunelab's one-line ``error: ...``,
    else the last line of a traceback."""
    errors = [ln[len("error: "):] for ln in log_text.splitlines() if ln.startswith("error: ")]
    if errors:
        return errors[-1]
    lines = [ln for ln in log_text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("INFO ", "WARNING ", "---")):
            return line.strip()
    return None


def _log_since_last_start(path: Path) -> str:
    """The log from the last ``--- start`` / ``--- resume`` line on (of the last 64 KiB)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            lines = fh.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("--- ")]
    return "\n".join(lines[starts[-1]:] if starts else lines)


# ------------------------------------------------------------------------------ jobs


class Jobs:
    """Start, watch and stop the jobs of one workspace (thread-safe)."""

    def __init__(self, root: str | os.PathLike[str], *, python: str = sys.executable,
                 allow_parallel: bool = False, env: dict[str, str] | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / UPLOADS).mkdir(exist_ok=True)
        self.python = python
        self.allow_parallel = allow_parallel
        self.env = env
        self._children: dict[Path, subprocess.Popen[bytes]] = {}
        # the "is the device free?" check and the spawn must not interleave between requests
        self._lock = threading.RLock()

    # ---------------------------------------------------------------------- paths

    def run_dir(self, name: str, *, must_exist: bool = True) -> Path:
        name = run_name(name)
        folder = self.root / name
        if must_exist and not self.is_run(folder):
            raise FieldError.one("run", f"no run named '{name}' in {self.root}", status=404)
        return folder

    @staticmethod
    def is_run(folder: Path) -> bool:
        return folder.is_dir() and ((folder / JOB_FILE).is_file()
                                    or (folder / "run_config.json").is_file())

    def run_names(self) -> list[str]:
        """Runs of the workspace, newest first."""
        found = []
        for folder in self.root.iterdir():
            if folder.name == UPLOADS or folder.name.startswith(".") or not self.is_run(folder):
                continue
            stamp = max((folder / f).stat().st_mtime for f in (JOB_FILE, "run_config.json")
                        if (folder / f).is_file())
            found.append((stamp, folder.name))
        return [name for _, name in sorted(found, reverse=True)]

    # ---------------------------------------------------------------------- state

    def _reap(self) -> None:
        """Collect our own finished children so they do not linger as zombies (after a
        restart the runners are not ours; init reaps them)."""
        for key, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[key]

    def job_state(self, job_dir: Path) -> dict[str, Any]:
        """State of the job in ``job_dir``: running, stopping, done, stopped, failed, lost
        (ended without an exit status: the machine rebooted or the runner was killed), or
        none (never started from the ui)."""
        with self._lock:
            self._reap()
        record = read_json(job_dir / JOB_FILE)
        if not record:
            return {"state": "none"}
        out: dict[str, Any] = {"started": record.get("started"), "device": record.get("device"),
                               "command": record.get("command"), "error": None,
                               "returncode": None, "ended": None}
        ended = read_json(job_dir / EXIT_FILE)
        child = read_json(job_dir / CHILD_FILE)
        if ended:
            code = ended.get("returncode")
            out["returncode"], out["ended"] = code, ended.get("ended")
            if code == 0:
                out["state"] = "done"
            elif code == EXIT_INTERRUPTED or (record.get("stop_requested") and code in (
                    -signal.SIGINT, -signal.SIGTERM)):
                out["state"] = "stopped"
            else:
                out["state"] = "failed"
                message = _last_error(_log_since_last_start(job_dir / LOG_FILE))
                if isinstance(code, int) and code < 0:
                    try:
                        sig = signal.Signals(-code).name
                    except ValueError:
                        sig = f"signal {-code}"
                    message = f"the process was killed by {sig}" + (
                        " (out of memory?)" if sig == "SIGKILL" else "")
                out["error"] = message or f"exited with code {code}"
        elif pid_alive(record.get("pid"), record.get("pid_start")) or pid_alive(
                child.get("pid"), child.get("start")):
            out["state"] = "stopping" if record.get("stop_requested") else "running"
        else:
            out["state"] = "lost"
            out["error"] = ("the job ended without recording how (was the machine restarted "
                            "or its process killed?)")
        return out

    def busy(self, device: str) -> list[str]:
        """Jobs running on ``device`` (``RUN`` or ``RUN/compare``)."""
        names = []
        for name in self.run_names():
            for job_dir, label in ((self.root / name, name),
                                   (self.root / name / COMPARE_DIR, f"{name}/compare")):
                if not (job_dir / JOB_FILE).is_file():
                    continue
                state = self.job_state(job_dir)
                if state["state"] in ACTIVE and state.get("device") == device:
                    names.append(label)
        return names

    def _check_device(self, device: str, allow_parallel: bool) -> None:
        if allow_parallel or self.allow_parallel:
            return
        busy = self.busy(device)
        if busy:
            raise FieldError.one(
                "start", f"{busy[0]} is already running on {device}; wait for it, stop it, "
                "or tick 'allow more than one job per device'", status=409, busy=busy)

    # ---------------------------------------------------------------------- spawning

    def _spawn(self, job_dir: Path, *, kind: str, name: str, command: list[str], device: str,
               action: str, meta: dict[str, Any]) -> dict[str, Any]:
        job_dir.mkdir(parents=True, exist_ok=True)
        for stale in (EXIT_FILE, CHILD_FILE):  # the previous start's, about to be rewritten
            (job_dir / stale).unlink(missing_ok=True)
        record = read_json(job_dir / JOB_FILE)
        history = list(record.get("history", []))
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # log lines appear as they are printed
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        runner = [self.python, "-m", "tunelab.ui.runner", str(job_dir), "--", *command]
        with open(job_dir / LOG_FILE, "ab") as log_fh:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log_fh.write(f"--- {action} {stamp}: {shlex.join(command)}\n".encode())
            log_fh.flush()
            try:
                proc = subprocess.Popen(runner, stdout=log_fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.root, env=env,
                                        start_new_session=True)
            except OSError as exc:
                raise FieldError.one("start", f"cannot start {self.python}: {exc}",
                                     status=500) from None
        self._children[job_dir] = proc
        now = time.time()
        history.append({"action": action, "time": now})
        record.update(meta)
        record.update({"kind": kind, "name": name, "command": command, "device": device,
                       "pid": proc.pid, "pid_start": proc_start(proc.pid), "started": now,
                       "stop_requested": None, "history": history})
        write_json(job_dir / JOB_FILE, record)
        log.info("%s %s %s (pid %d) on %s", action, kind, name, proc.pid, device)
        return self.job_state(job_dir)

    def _train_command(self, run_dir: Path, resume: bool) -> list[str]:
        cmd = [self.python, "-m", "tunelab", "train", str(run_dir / TRAIN_CONFIG),
               "--no-progress"]
        return cmd + (["--resume"] if resume else [])

    def start_train(self, name: str, values: dict[str, Any], *,
                    allow_parallel: bool = False) -> dict[str, Any]:
        """Validate the training form and start ``tunelab train`` for run ``name``."""
        errors: list[dict[str, Any]] = []
        checks = {"name": lambda: run_name(name),
                  "data": lambda: data_path(values.get("data"))}
        if values.get("val_data"):
            checks["val_data"] = lambda: data_path(values.get("val_data"), "val_data")
        checked: dict[str, Any] = {}
        for key, check in checks.items():
            try:
                checked[key] = check()
            except FieldError as exc:
                errors.extend(exc.errors)
        try:
            train_config({**values, "data": "-"} if "data" in values else values)
        except FieldError as exc:
            errors.extend(e for e in exc.errors if e["field"] != "data")
        if "model" in values:
            from tunelab.ui.forms import model_spec

            try:
                checked["model"] = model_spec(values["model"])
            except FieldError as exc:
                errors.extend(exc.errors)
        if errors:
            raise FieldError(errors)
        run_dir = self.root / checked["name"]
        if run_dir.exists():
            raise FieldError.one("name", f"a run named '{name}' already exists; pick another "
                                 "name, or resume it from the runs list", status=409)
        values = {**values, "data": str(checked["data"]), "out": str(run_dir)}
        if "model" in checked:
            values["model"] = checked["model"]
        if "val_data" in checked:
            values["val_data"] = str(checked["val_data"])
        cfg = train_config(values)
        total = _total_steps(cfg, checked=True)
        with self._lock:
            device = resolve_device(cfg.device)
            self._check_device(device, allow_parallel)
            run_dir.mkdir(parents=True)
            config = {k: getattr(cfg, k) for k in values}
            (run_dir / TRAIN_CONFIG).write_text(yaml.safe_dump(config, sort_keys=False),
                                                encoding="utf-8")
            return self._spawn(run_dir, kind="train", name=checked["name"],
                               command=self._train_command(run_dir, False), device=device,
                               action="start", meta={"total_steps": total, "config": config})

    def resume_train(self, name: str, *, allow_parallel: bool = False) -> dict[str, Any]:
        """Continue a stopped (or failed, or lost) run from its last checkpoint."""
        run_dir = self.run_dir(name)
        with self._lock:
            state = self.job_state(run_dir)
            if state["state"] in ACTIVE:
                raise FieldError.one("run", f"run '{name}' is still {state['state']}",
                                     status=409)
            if state["state"] == "none":
                state.update(_outside_state(run_dir))
            if state["state"] == "external":
                raise FieldError.one("run", state["error"], status=409)
            if state["state"] == "done":
                raise FieldError.one("run", f"run '{name}' has finished; start a new run "
                                     "to train more", status=409)
            if not (run_dir / TRAIN_CONFIG).is_file():
                # A run trained from the command line: its validated config says it all.
                cfg = read_json(run_dir / "run_config.json")
                if not cfg:
                    raise FieldError.one("run", f"run '{name}' has no config to resume from")
                cfg = {k: v for k, v in cfg.items() if k not in ("extra", "resume")}
                cfg["out"] = str(run_dir)
                (run_dir / TRAIN_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False),
                                                    encoding="utf-8")
            config = yaml.safe_load((run_dir / TRAIN_CONFIG).read_text(encoding="utf-8"))
            cfg_obj = train_config(config, strict=False)
            device = resolve_device(cfg_obj.device)
            self._check_device(device, allow_parallel)
            meta: dict[str, Any] = {"config": config}
            if not read_json(run_dir / JOB_FILE).get("total_steps"):
                meta["total_steps"] = _total_steps(cfg_obj)
            return self._spawn(run_dir, kind="train", name=name,
                               command=self._train_command(run_dir, True), device=device,
                               action="resume", meta=meta)

    def start_compare(self, name: str, options: dict[str, Any], *,
                      allow_parallel: bool = False) -> dict[str, Any]:
        """``tunelab compare`` of run ``name`` (its validation split, its training split
        for the shots) into ``RUN/compare``."""
        from tunelab.ui import forms

        run_dir = self.run_dir(name)
        job_dir = run_dir / COMPARE_DIR
        if not ((run_dir / "adapter").is_dir() or (run_dir / "model").is_dir()):
            raise FieldError.one("run", f"run '{name}' has no final weights yet: let it "
                                 "finish (or stop it: stopping saves them) first")
        errors = []
        parsed: dict[str, Any] = {}
        for key, parse in (
                ("limit", lambda: forms.integer(options, "limit", default=20, low=1)),
                ("max_new_tokens", lambda: forms.integer(options, "max_new_tokens",
                                                         default=64, low=1, high=4096)),
                ("batch_size", lambda: forms.integer(options, "batch_size", default=8, low=1)),
                ("few_shot", lambda: _few_shot(options.get("few_shot"))),
                ("instruction", lambda: forms.text(options, "instruction")),
                ("forgetting", lambda: forms.flag(options, "forgetting", False)),
                ("min_gain", lambda: forms.number(options, "min_gain", default=0.0))):
            try:
                parsed[key] = parse()
            except FieldError as exc:
                errors.extend(exc.errors)
        if errors:
            raise FieldError(errors)
        cfg = read_json(run_dir / "run_config.json")
        if cfg and not cfg.get("val_data") and not cfg.get("val_fraction"):
            raise FieldError.one("run", f"run '{name}' trained without a validation split, "
                                 "so there is nothing held out to compare on")
        cmd = [self.python, "-m", "tunelab", "compare", "--adapter", str(run_dir),
               "--out", str(job_dir), "--limit", str(parsed["limit"]),
               "--max-new-tokens", str(parsed["max_new_tokens"]),
               "--batch-size", str(parsed["batch_size"]), "--min-gain", str(parsed["min_gain"]),
               "--no-progress"]
        for k in parsed["few_shot"]:
            cmd += ["--few-shot", str(k)]
        if parsed["instruction"]:
            cmd += ["--instruction", parsed["instruction"]]
        if not parsed["forgetting"]:
            cmd.append("--no-forgetting")
        with self._lock:
            if self.job_state(run_dir)["state"] in ACTIVE:
                raise FieldError.one("run", f"run '{name}' is still training", status=409)
            if self.job_state(job_dir)["state"] in ACTIVE:
                raise FieldError.one("start", f"the comparison of '{name}' is already running",
                                     status=409)
            device = resolve_device(str(cfg.get("device", "auto")))
            self._check_device(device, allow_parallel)
            return self._spawn(job_dir, kind="compare", name=name, command=cmd,
                               device=device, action="start", meta={"options": parsed})

    def stop(self, name: str, *, compare: bool = False) -> dict[str, Any]:
        """Ask a job to stop: SIGINT to its process group. Training finishes its step,
        saves a checkpoint and its weights, and exits; the run can be resumed."""
        job_dir = self.run_dir(name) / (COMPARE_DIR if compare else "")
        with self._lock:
            state = self.job_state(job_dir)
            if state["state"] not in ACTIVE:
                raise FieldError.one("run", f"'{name}' is not running (it is {state['state']})",
                                     status=409)
            record = read_json(job_dir / JOB_FILE)
            pid = record["pid"]
            try:
                if pid_alive(pid, record.get("pid_start")):
                    os.killpg(pid, signal.SIGINT)  # runner = session leader: pgid == pid
                else:  # the runner is gone but its child is not: tell the child directly
                    os.kill(read_json(job_dir / CHILD_FILE)["pid"], signal.SIGINT)
            except (ProcessLookupError, KeyError):
                pass  # ended in between: its exit status says how
            record["stop_requested"] = time.time()
            write_json(job_dir / JOB_FILE, record)
            return self.job_state(job_dir)

    # ---------------------------------------------------------------------- reading

    def run_info(self, name: str, *, since: int = 0, details: bool = True) -> dict[str, Any]:
        """Everything the train page shows about a run: state, config, metrics after step
        ``since``, tokens/s, ETA, memory, and what the run wrote."""
        from tunelab.report.run import read_metrics

        run_dir = self.run_dir(name)
        record = read_json(run_dir / JOB_FILE)
        state = self.job_state(run_dir)
        if state["state"] == "none":
            state.update(_outside_state(run_dir))
        config = record.get("config") or read_json(run_dir / "run_config.json")
        metrics = read_metrics(run_dir / "metrics.jsonl")
        summary = read_json(run_dir / "summary.json")
        total = record.get("total_steps") or config.get("max_steps") or None
        last = metrics[-1] if metrics else {}
        step = int(last.get("step", 0))
        info: dict[str, Any] = {
            "name": name, **state, "model": config.get("model"), "method": config.get("method"),
            "data": config.get("data"), "step": step, "total_steps": total,
            "train_loss": last.get("train_loss"),
            "val_loss": next((r["val_loss"] for r in reversed(metrics) if "val_loss" in r),
                             None),
            "has_adapter": (run_dir / "adapter" / "adapter_config.json").is_file(),
            "has_model": (run_dir / "model" / "config.json").is_file(),
            "has_report": (run_dir / "report.html").is_file(),
            "has_checkpoint": (run_dir / "checkpoints").is_dir() and any(
                (p / "state.json").is_file() for p in (run_dir / "checkpoints").glob("step-*")),
            "compare": self.job_state(run_dir / COMPARE_DIR)["state"]
            if (run_dir / COMPARE_DIR / JOB_FILE).is_file()
            else ("done" if (run_dir / COMPARE_DIR / "report.json").is_file() else "none"),
        }
        if not details:
            return info
        info["config"] = config
        info["metrics"] = [r for r in metrics if int(r.get("step", 0)) > since]
        info["summary"] = summary
        info["tokens_per_s"] = last.get("tokens_per_s")
        info["peak_memory"] = last.get("peak_memory")
        info["eta_s"] = _eta(metrics, total) if state["state"] in ACTIVE else None
        info["elapsed_s"] = (time.time() - state["started"]) if state.get("started") and \
            state["state"] in ACTIVE else None
        info["log"] = _log_since_last_start(run_dir / LOG_FILE)[-8000:]
        return info

    def compare_info(self, name: str) -> dict[str, Any]:
        run_dir = self.run_dir(name)
        job_dir = run_dir / COMPARE_DIR
        state = self.job_state(job_dir)
        report = read_json(job_dir / "report.json")
        if state["state"] == "none" and report:
            state["state"] = "done"
        out: dict[str, Any] = {"name": name, **state,
                               "options": read_json(job_dir / JOB_FILE).get("options"),
                               "log": _log_since_last_start(job_dir / LOG_FILE)[-8000:]}
        if report and state["state"] not in ACTIVE:
            keep = ("verdict", "metric", "systems", "metric_table", "summary", "forgetting",
                    "overfitting", "created")
            out["report"] = {k: report[k] for k in keep if k in report}
            # each row's general ability beside its gain (not the probe's answers: size)
            out["report"]["general_ability"] = {
                name: {k: g.get(k) for k in ("probe_accuracy", "perplexity")}
                for name, g in (report.get("general_ability") or {}).items()}
            out["examples"] = report.get("examples", [])[:20]
        out["has_report"] = (job_dir / "report.html").is_file()
        return out


EXTERNAL_QUIET_S = 300


def _outside_state(run_dir: Path) -> dict[str, Any]:
    """The state of a run made with ``tunelab train`` outside the ui (no job file): done
    with a summary; else, if its files changed in the last minutes, it may still be
    training in a terminal ("external": neither stopped nor resumed from here, since a
    second process on one run folder would corrupt it); else stopped."""
    if (run_dir / "summary.json").is_file():
        return {"state": "done"}
    files = [run_dir / "metrics.jsonl", run_dir / "run_config.json"]
    latest = max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)
    quiet = time.time() - latest
    if quiet < EXTERNAL_QUIET_S:
        return {"state": "external", "error": f"this run was started outside the ui and may "
                f"still be training (its files changed {quiet:.0f} s ago); stop it where it "
                "runs, or resume it here once it has been quiet for "
                f"{EXTERNAL_QUIET_S // 60} minutes"}
    return {"state": "stopped"}


def _few_shot(value: Any) -> list[int]:
    """``"1, 3"`` or ``[1, 3]`` -> ``[1, 3]``."""
    if value in (None, "", []):
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise FieldError.one("few_shot", "give shot counts like '1, 3'")
    out = []
    for item in items:
        try:
            k = int(item)
        except (TypeError, ValueError):
            raise FieldError.one("few_shot", f"{item!r} is not a whole number") from None
        if k < 1 or k > 64:
            raise FieldError.one("few_shot", f"shot counts go from 1 to 64, got {k}")
        out.append(k)
    return sorted(set(out))


def _total_steps(cfg: Any, *, checked: bool = False) -> int | None:
    """Optimizer steps the run will take, as tunelab.train counts them (for the ETA).

    With ``checked`` the data files are read here, so a file that cannot be read at all
    (malformed JSON, an unsupported encoding) is refused at the form, next to the data
    field, instead of as a failed run; problems in single records still fail the run with
    tunelab train's own message, as on the command line.
    """
    from tunelab import data
    from tunelab.errors import DataError
    from tunelab.train import total_steps
    from tunelab.ui.forms import data_error_details

    try:
        records = data.read_records(cfg.data) if checked or not cfg.max_steps else []
        if checked and cfg.val_data:
            data.read_records(cfg.val_data)
    except DataError as exc:
        if not checked:
            return None
        field = "val_data" if cfg.val_data and exc.path == str(cfg.val_data) else "data"
        raise FieldError([{"field": field, **data_error_details(exc)}]) from None
    if cfg.max_steps:
        return int(cfg.max_steps)
    if cfg.val_data:
        n_train = len(records)
    else:
        n_train = len(data.split_records(records, cfg.val_fraction, cfg.seed)[0])
    return total_steps(cfg, n_train)


def _eta(metrics: list[dict[str, Any]], total: int | None) -> float | None:
    """Seconds left: the mean time of the last steps (tokens over tokens/s, as logged)
    times the steps still to run."""
    if not metrics or not total:
        return None
    times = []
    prev_tokens = 0
    for rec in metrics:
        tokens, rate = rec.get("tokens"), rec.get("tokens_per_s")
        if isinstance(tokens, (int, float)) and isinstance(rate, (int, float)) and rate > 0:
            times.append(max(0.0, tokens - prev_tokens) / rate)
            prev_tokens = tokens
    if not times:
        return None
    recent = times[-10:]
    left = max(0, total - int(metrics[-1].get("step", 0)))
    return left * sum(recent) / len(recent)
