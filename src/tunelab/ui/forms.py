"""Validation of the ui's forms, with every error tied to the form field it is about.

tunelab's own checks stay the single source of truth: a training form is validated by
:func:`tunelab.config.build_config`, a model by :func:`tunelab.models.resolve_model`, a plan
by :func:`tunelab.plan.build_plan`. This module only decides *which field* an error belongs
to, so the page can show the message next to it, and turns the errors into
``{"errors": [{"field", "message", ...}]}``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from tunelab.config import KEYS, TrainConfig, build_config
from tunelab.data import SUFFIXES
from tunelab.errors import ConfigError, DataError, TunelabError

# The form fields of the training form that are config keys; anything else is refused so a
# typo in the page's code cannot silently train with a default.
TRAIN_FIELDS = ("model", "data", "val_data", "val_fraction", "format", "train_on", "max_length",
                "overlength", "method", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
                "lr", "schedule", "warmup_steps", "max_steps", "epochs", "batch_size",
                "grad_accum", "grad_ckpt", "seed", "eval_every", "save_every",
                "early_stopping_patience", "device", "dtype", "optimizer", "base_bits",
                "objective", "beta", "replay", "replay_ratio", "replay_prompts")
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# "base" is the chat page's name for the base model; "uploads" is the upload folder.
RESERVED_NAMES = frozenset({"base", "uploads", "static", "api"})


class FieldError(TunelabError):
    """One or more bad form fields; ``errors`` is what the API returns."""

    status = 400

    def __init__(self, errors: list[dict[str, Any]], *, status: int | None = None) -> None:
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))
        self.errors = errors
        if status is not None:
            self.status = status

    @classmethod
    def one(cls, field: str, message: str, *, status: int | None = None,
            **extra: Any) -> FieldError:
        return cls([{"field": field, "message": message, **extra}], status=status)


def data_error_details(exc: DataError) -> dict[str, Any]:
    """A DataError as ``{message, line, data_field}``, the message without the location
    prefix (the page shows line and field in their own columns)."""
    where = []
    if exc.path is not None:
        where.append(str(exc.path))
    if exc.line is not None:
        where.append(f"line {exc.line}")
    if exc.field is not None:
        where.append(f"field '{exc.field}'")
    prefix = ", ".join(where) + ": " if where else ""
    text = str(exc)
    return {"message": text[len(prefix):] if prefix and text.startswith(prefix) else text,
            "line": exc.line, "data_field": exc.field}


def error_body(exc: TunelabError, default_field: str = "form") -> dict[str, Any]:
    """The JSON body for any tunelab error: FieldErrors keep their fields, a DataError names
    line and field of the data file, anything else goes to ``default_field``."""
    if isinstance(exc, FieldError):
        return {"errors": exc.errors}
    if isinstance(exc, DataError):
        return {"errors": [{"field": "data", "text": str(exc), **data_error_details(exc)}]}
    return {"errors": [{"field": default_field, "message": str(exc)}]}


# ------------------------------------------------------------------------------ values


def text(body: dict[str, Any], key: str, *, required: bool = False,
         default: str | None = None) -> str | None:
    value = body.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise FieldError.one(key, "required")
        return default
    if not isinstance(value, str):
        raise FieldError.one(key, f"must be text, got {type(value).__name__}")
    return value.strip()


def integer(body: dict[str, Any], key: str, *, default: int | None = None, low: int = 0,
            high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise FieldError.one(key, f"must be a whole number, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError.one(key, f"must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise FieldError.one(key, f"must be {span}, got {value}")
    return value


def number(body: dict[str, Any], key: str, *, default: float | None = None, low: float = 0.0,
           high: float | None = None) -> float | None:
    value = body.get(key)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise FieldError.one(key, f"must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise FieldError.one(key, f"must be a number, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise FieldError.one(key, f"must be {span}, got {value:g}")
    return float(value)


def flag(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if isinstance(value, bool):
        return value
    raise FieldError.one(key, f"must be true or false, got {value!r}")


def run_name(value: Any, field: str = "name") -> str:
    if not isinstance(value, str) or not value.strip():
        raise FieldError.one(field, "give the run a name (letters, digits, '.', '_', '-')")
    name = value.strip()
    if not RUN_NAME_RE.match(name):
        raise FieldError.one(field, f"invalid run name {name!r}: use 1-64 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")
    if name.lower() in RESERVED_NAMES:
        raise FieldError.one(field, f"'{name}' is reserved; pick another name")
    return name


def data_path(value: Any, field: str = "data", *, base: Path | None = None) -> Path:
    """An existing data file of a supported type, made absolute (jobs run elsewhere)."""
    if not isinstance(value, str) or not value.strip():
        raise FieldError.one(field, "choose a data file: upload one or type its path")
    path = Path(value.strip()).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    # abspath, not resolve: a symlinked data file keeps the name the user gave it
    path = Path(os.path.abspath(path))
    if path.suffix.lower() not in SUFFIXES:
        raise FieldError.one(field, f"unsupported file type '{path.suffix}'; use one of "
                             f"{', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FieldError.one(field, f"file not found: {path}")
    return path


def model_spec(value: Any, field: str = "model") -> str:
    """A model the loader can find (alias, GGUF, folder or hub id): checked, not loaded."""
    from tunelab import models
    from tunelab.errors import ModelError

    if not isinstance(value, str) or not value.strip():
        raise FieldError.one(field, "choose a model: an alias (smollm2-135m), a local folder, "
                             "a .gguf file or a hub id (org/name)")
    spec = value.strip()
    try:
        models.resolve_model(spec)
    except ModelError as exc:
        raise FieldError.one(field, str(exc)) from None
    if spec.lower() not in models.ALIASES and Path(spec).expanduser().exists():
        # jobs run in the workspace folder: a relative model path must not change meaning
        return os.path.abspath(Path(spec).expanduser())
    return spec


# ------------------------------------------------------------------------------ training


def _strip_source(message: str, source: str) -> str:
    return message[len(source) + 2:] if message.startswith(f"{source}: ") else message


def _field_of(message: str, candidates: list[str]) -> str:
    """The config key a combination error is about: the first key the message names,
    preferring keys the form set."""
    named = [(m.start(), m.group(0)) for m in re.finditer(r"[a-z_]+", message)
             if m.group(0) in KEYS]
    for _, key in named:
        if key in candidates:
            return key
    return named[0][1] if named else "method"


def train_config(values: dict[str, Any], *, strict: bool = True) -> TrainConfig:
    """Validate a training form into a TrainConfig; every bad key becomes its own error.

    Each key is checked alone first (so three bad fields give three messages, not the
    first one), then together for the combination rules (qlora and base_bits, ...).
    ``strict`` allows only the form's fields; a saved config (resume) may hold any key.
    """
    unknown = [k for k in values if strict and k not in TRAIN_FIELDS and k != "out"]
    if unknown:
        raise FieldError([{"field": k, "message": "not a setting of the training form"}
                          for k in unknown])
    errors = []
    source = "form"
    for key, value in values.items():
        if key in ("data", "out"):
            continue
        try:
            build_config({key: value, "data": "-"}, source=source)
        except ConfigError as exc:
            errors.append({"field": key, "message": _strip_source(str(exc), source)})
    if errors:
        raise FieldError(errors)
    try:
        return build_config(values, source=source)
    except ConfigError as exc:
        message = _strip_source(str(exc), source)
        raise FieldError.one(_field_of(message, list(values)), message) from None
