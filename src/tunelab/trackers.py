"""Experiment trackers: ``report_to: tensorboard,mlflow,wandb`` through their own libraries.

The training loop talks to one :class:`Trackers` object: ``log(step, metrics)`` after each
step, ``finish(summary, files)`` at the end (the final summary and the run's report files as
artifacts), or ``fail(error)`` when the run raises (each run is closed as failed, so no
tracker is left waiting on a dead run). Each backend keeps what the user expects of it:

* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` into ``OUT/tensorboard``: one
  scalar per metric and step, the config and the summary as text, the summary's numbers as
  ``final/*`` scalars (TensorBoard has no artifacts);
* ``mlflow``: a run in experiment ``tunelab`` at ``$MLFLOW_TRACKING_URI`` (default: a file
  store in ``OUT/mlruns``): params = the config, metrics per step, ``final_*`` metrics, the
  report files as artifacts;
* ``wandb``: a run in project ``$WANDB_PROJECT`` (default ``tunelab``) under ``OUT/wandb``;
  offline unless ``WANDB_MODE`` or an API key says otherwise (``wandb sync`` uploads it).

Only process 0 reports. A missing library is a :class:`ConfigError` naming the extra.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("tensorboard", "mlflow", "wandb")
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
INSTALL = "pip install 'tunelab[trackers]'"


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` or a list -> the backend names, checked; ``none`` -> []."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [str(v).strip().lower() for v in items if str(v).strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(f"report_to: unknown tracker '{name}'; allowed: "
                              f"{', '.join(BACKENDS)} (comma-separated), or none")
    return list(dict.fromkeys(names))


def check_installed(names: Iterable[str]) -> None:
    """Fail before training starts when a tracker's library is missing."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise ConfigError(f"report_to: {name} needs the {_MODULES[name]} package, which is "
                              f"not installed: {INSTALL}")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}


class _TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str)
                             + "\n```")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "eval/loss",
                                   value, step)

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        step = int(summary.get("steps") or 0)
        for key, value in _scalars(summary).items():
            self.writer.add_scalar(f"final/{key}", value, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1, default=str)
                             + "\n```", step)
        self.writer.close()

    def fail(self, error: str) -> None:
        self.writer.add_text("error", error)
        self.writer.close()  # flushes the events written so far


class _MLflow:
    def __init__(self, out: Path, config: dict[str, Any], run_name: str) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The local file store: no server and no database to set up. MLflow 3 keeps it
            # (in "maintenance mode") behind this switch; a tracking URI of the user's wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunelab"))
        self.run = mlflow.start_run(run_name=run_name)
        # params are strings of at most 6,000 characters in MLflow
        mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.mlflow.log_metrics(_scalars(metrics), step=step)

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        step = int(summary.get("steps") or 0)
        self.mlflow.log_metrics({f"final_{k}": v for k, v in _scalars(summary).items()},
                                step=step)
        for path in files:
            if path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()

    def fail(self, error: str) -> None:
        self.mlflow.set_tag("error", error[:5000])
        # KILLED is MLflow's status for a run stopped from outside (Ctrl-C)
        self.mlflow.end_run(status="KILLED" if error.startswith("KeyboardInterrupt")
                            else "FAILED")


class _WandB:
    def __init__(self, out: Path, config: dict[str, Any], run_name: str) -> None:
        import wandb

        self.wandb = wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                 else "offline")
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"),
                              name=run_name, dir=str(out), config=config, mode=mode,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def finish(self, summary: Mapping[str, Any], files: list[Path]) -> None:
        self.run.summary.update({f"final_{k}": v for k, v in _scalars(summary).items()})
        artifact = self.wandb.Artifact(f"{self.run.name or 'run'}-report".replace("/", "-"),
                                       type="report")
        for path in files:
            if path.is_file():
                artifact.add_file(str(path))
        self.run.log_artifact(artifact)
        self.run.finish()

    def fail(self, error: str) -> None:
        self.run.summary["error"] = error
        self.run.finish(exit_code=1)  # W&B shows a non-zero exit code as a failed run


class Trackers:
    """The trackers of one run; empty (every call a no-op) without ``report_to``."""

    def __init__(self, names: Iterable[str], out: Path, config: dict[str, Any],
                 run_name: str | None = None) -> None:
        names = list(names)
        check_installed(names)
        run_name = run_name or Path(out).name
        flat = {k: v for k, v in config.items() if k != "report_to"}
        self.backends: list[Any] = []
        for name in names:
            if name == "tensorboard":
                self.backends.append(_TensorBoard(Path(out), flat))
            elif name == "mlflow":
                self.backends.append(_MLflow(Path(out), flat, run_name))
            else:
                self.backends.append(_WandB(Path(out), flat, run_name))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for backend in self.backends:
            backend.log(step, metrics)

    def finish(self, summary: Mapping[str, Any], files: Iterable[Path] = ()) -> None:
        files = [Path(f) for f in files]
        for backend in self.backends:
            try:
                backend.finish(summary, files)
            except Exception as exc:  # noqa: BLE001 -- a tracker must not fail a finished run
                log.warning("%s could not record the end of the run: %s",
                            type(backend).__name__.strip("_"), exc)
        self.backends = []

    def fail(self, error: BaseException) -> None:
        """Close every run as failed, with the error, after a crash mid-training."""
        text = f"{type(error).__name__}: {error}"
        for backend in self.backends:
            try:
                backend.fail(text)
            except Exception as exc:  # noqa: BLE001 -- the run's own error is what matters
                log.warning("%s could not record the failure: %s",
                            type(backend).__name__.strip("_"), exc)
        self.backends = []
