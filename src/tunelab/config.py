"""The one config object of a training run, validated once at the edge.

A run is described by a YAML file, ``key=value`` overrides and CLI flags, merged in that
order into a ``TrainConfig``. Validation happens here and only here: an unknown key, a wrong
type or an out-of-range value raises ``ConfigError`` naming the key and what is allowed.
Everything downstream can trust the object it is handed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from tunelab.errors import ConfigError

CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("lora", "full", "qlora"),
    "format": ("auto", "text", "prompt_completion", "instruction", "chat", "sharegpt"),
    "train_on": ("completions", "all"),
    "overlength": ("truncate", "drop", "error"),
    "schedule": ("cosine", "linear", "constant"),
    "dtype": ("auto", "fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "optimizer": ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw"),
    "quant_type": ("nf4", "fp4"),
    "parallel": ("auto", "ddp", "fsdp"),
    "return_freed_memory": ("auto", "on", "off"),
    "objective": ("sft", "dpo", "orpo"),
    "dpo_loss": ("sigmoid", "ipo", "hinge"),
}
# (low, high, inclusive-low) for numeric keys.
RANGES: dict[str, tuple[float, float | None]] = {
    "lr": (0.0, None), "weight_decay": (0.0, None), "warmup_steps": (0, None),
    "warmup_ratio": (0.0, 1.0), "max_steps": (0, None), "epochs": (0.0, None),
    "batch_size": (1, None), "grad_accum": (1, None), "max_length": (8, None),
    "grad_clip": (0.0, None), "save_every": (0, None), "eval_every": (0, None),
    "keep_checkpoints": (1, None), "val_fraction": (0.0, 0.9), "lora_r": (1, None),
    "lora_alpha": (0.0, None), "lora_dropout": (0.0, 1.0), "early_stopping_patience": (0, None),
    "log_every": (1, None), "eval_batch_size": (1, None), "base_bits": (4, 16),
    "beta": (0.0, None), "label_smoothing": (0.0, 0.5),
    "replay_prompts": (0, None), "replay_kl": (0.0, None),
}


@dataclass
class TrainConfig:
    """Every setting of a training run. See the README's config reference for each key."""

    # what to train
    model: str = "smollm2-135m"
    # one source (a file, hf:NAME, a folder), or a weighted mixture: a list of
    # {path, weight, name, format, columns, split} (tunelab.data.mixture)
    data: str | list[dict[str, Any]] = ""
    val_data: str | None = None
    # replay (tunelab.replay): "self" (the base model's own answers to tunelab's general
    # prompts) or a general data file, mixed in at replay_ratio of each epoch's rows
    replay: str = ""
    # 0.2 when replay is set; a ratio > 0 without replay means replay: self
    replay_ratio: float | None = None
    replay_prompts: int = 0  # replay: self answers the first N prompts; 0 = all of them
    replay_kl: float = 0.0  # weight of KL(base || model) on replay rows' target tokens
    val_fraction: float = 0.1
    split: str = "train"  # the split of a `datasets` source (hf:NAME, a save_to_disk folder)
    columns: str = ""  # rename source columns: "prompt=instruction,completion=output"
    report_to: str = ""  # experiment trackers: "tensorboard,mlflow,wandb" (tunelab.trackers)
    format: str = "auto"
    train_on: str = "completions"
    max_length: int = 1024
    overlength: str = "truncate"
    out: str = "runs/latest"
    # objective: sft, or preference tuning on {prompt, chosen, rejected} data
    objective: str = "sft"
    beta: float = 0.1  # DPO: strength of the pull towards the reference; ORPO: odds-ratio weight
    dpo_loss: str = "sigmoid"  # sigmoid (DPO), ipo, hinge
    label_smoothing: float = 0.0  # DPO sigmoid: assumed share of flipped preference labels
    # reference log-probs computed once before training instead of on the fly (always so
    # for full fine-tuning and when starting from init_adapter)
    precompute_ref: bool = False
    init_adapter: str | None = None  # start from this (SFT) adapter; DPO's reference too
    # method
    method: str = "lora"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    base_bits: int = 16  # 4 or 8: a frozen quantized base (bitsandbytes); 16: unquantized
    quant_type: str = "nf4"  # 4-bit code: nf4 (QLoRA) or fp4
    double_quant: bool = True  # quantize the 4-bit block scales too (QLoRA)
    # optimisation
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    grad_clip: float = 1.0
    grad_ckpt: bool = False
    # turn grad_ckpt on when the plan says the run would not fit in memory without it
    grad_ckpt_auto: bool = True
    # throughput: padding-free micro-batches (attention kept within each example), or
    # padded ones grouped by length; neither changes which examples make up a step
    packing: bool = True
    group_by_length: bool = False
    fused_kernels: bool = True  # tunelab.kernels: fused LoRA update and RMSNorm, same math
    # CPU: have glibc return freed tensors to the system (tunelab.memory); auto = on only
    # when the plan says the run would not fit otherwise (it costs page faults per step)
    return_freed_memory: str = "auto"
    seed: int = 0
    # evaluation and checkpoints
    eval_every: int = 0
    eval_batch_size: int = 8
    save_every: int = 0
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0
    log_every: int = 1
    # machine and safety
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    resume: bool = False
    force: bool = False  # train even where the plan says the run will not fit in memory
    # data parallelism under torchrun: auto = FSDP2 for full fine-tuning; for LoRA/QLoRA
    # DDP, or FSDP2 where the plan says a replicated base does not fit
    # (tunelab.preflight.shard_over_processes)
    parallel: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_lora(self) -> bool:
        return self.method in ("lora", "qlora")


_HINTS = get_type_hints(TrainConfig)
SWITCHES = ("return_freed_memory",)  # auto / on / off keys
KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "extra")


def _coerce(key: str, value: Any) -> Any:
    """Check (and, for strings from the command line, convert) one value against its type."""
    if key == "data":
        return _coerce_data(value)
    hint = _HINTS[key]
    text = value if isinstance(value, str) else None
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false", "yes", "no", "1", "0"):
            return text.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if hint is float or hint == float | None:
        if value is None and hint is not float:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text is not None:
            try:
                return float(text)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if key in SWITCHES:  # auto / on / off; YAML and the command line read on/off as bools
        if isinstance(value, bool):
            return "on" if value else "off"
        word = text.lower() if text is not None else None
        if word in ("true", "yes", "1"):
            return "on"
        if word in ("false", "no", "0"):
            return "off"
        if word is not None:
            return word
        raise ConfigError(f"config key '{key}' must be auto, on or off, got {value!r}")
    if key == "target_modules":
        if isinstance(value, str):
            if "," in value:
                return [v.strip() for v in value.split(",") if v.strip()]
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError("config key 'target_modules' must be 'all-linear' or a list of "
                          f"module names, got {value!r}")
    if hint == str | None:
        if value is None or isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    return value


# the keys of one source of a mixture; all but path are optional
SOURCE_KEYS = ("path", "weight", "name", "format", "columns", "split")


def split_weight(text: str) -> tuple[str, float | None]:
    """``"a.jsonl:0.8"`` -> ``("a.jsonl", 0.8)`` (the CLI form of a mixture source);
    ``"a.jsonl"`` and ``"hf:org/name"`` -> ``(text, None)``. What follows the last ``:`` is
    a weight only when it reads as a number and the whole text is not an existing path."""
    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).expanduser().exists():
        return text, None
    try:
        return head, float(tail)
    except ValueError:
        return text, None


def _source_name(path: str) -> str:
    """The default name of a source: its file stem, or the last part of an ``hf:`` id."""
    if path.startswith("hf:"):
        return path[3:].rstrip("/").rsplit("/", 1)[-1] or "hf"
    p = Path(path)
    return p.stem if p.suffix else p.name


def _coerce_source(index: int, item: Any) -> dict[str, Any]:
    """One source of a mixture, checked: path exists, weight > 0, known keys only."""
    if isinstance(item, str):
        path, weight = split_weight(item)
        item = {"path": path} if weight is None else {"path": path, "weight": weight}
    if not isinstance(item, dict):
        raise ConfigError(f"data[{index}] must be a mapping {{path: FILE, weight: W}} or "
                          f"'FILE:W', got {item!r}")
    path = item.get("path")
    where = f"data[{index}] ({path})" if isinstance(path, str) and path else f"data[{index}]"
    unknown = [k for k in item if k not in SOURCE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'; a source takes "
                          f"{', '.join(SOURCE_KEYS)}")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: no 'path'; write e.g. {{path: general.jsonl, weight: 0.2}}")
    if not path.startswith("hf:") and not Path(path).expanduser().exists():
        raise ConfigError(f"{where}: file not found: {path}")
    weight = item.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
            or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}: weight is {weight!r}; it must be a number > 0 (weights "
                          "are relative: 0.8 and 0.2, or 4 and 1)")
    out: dict[str, Any] = {"path": path, "weight": float(weight)}
    for key in ("name", "format", "columns", "split"):
        if key in item:
            if not isinstance(item[key], str) or not item[key]:
                raise ConfigError(f"{where}: '{key}' must be a non-empty string, "
                                  f"got {item[key]!r}")
            out[key] = item[key]
    if out.get("format", "auto") not in CHOICES["format"]:
        raise ConfigError(f"{where}: format is {out['format']!r}; allowed: "
                          f"{', '.join(CHOICES['format'])}")
    if "columns" in out:
        from tunelab.data.sources import parse_columns

        try:
            parse_columns(out["columns"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return out


def _coerce_data(value: Any) -> str | list[dict[str, Any]]:
    """``data``: a string (one source, as given), or a list of sources (a mixture), each
    checked by :func:`_coerce_source`; default names are made unique (``a``, ``a-2``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ConfigError("config key 'data' must be a file (or hf:NAME, a folder) or a list "
                          f"of sources [{{path: FILE, weight: W}}, ...], got {value!r}")
    if not value:
        raise ConfigError("no training data: 'data' is an empty list")
    sources = [_coerce_source(i, item) for i, item in enumerate(value)]
    given = [s["name"] for s in sources if "name" in s]
    dupes = sorted({n for n in given if given.count(n) > 1})
    if dupes:
        raise ConfigError(f"data: two sources are named {dupes[0]!r}; give each a unique name")
    taken = set(given)
    for source in sources:
        if "name" not in source:
            base = name = _source_name(source["path"])
            k = 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
            source["name"] = name
            taken.add(name)
    return sources


def _check_value(key: str, value: Any) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"config key '{key}' is {value!r}; allowed: {', '.join(CHOICES[key])}")
    if key in RANGES and value is not None:
        low, high = RANGES[key]
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"config key '{key}' is {value!r}; it must be {span}")


def _check_combination(cfg: TrainConfig) -> None:
    if not cfg.data:
        raise ConfigError("no training data: set 'data' (or --data FILE)")
    from tunelab.data.sources import parse_columns

    parse_columns(cfg.columns)  # a malformed mapping fails here, before any model loads
    if isinstance(cfg.data, list) and cfg.objective != "sft":
        raise ConfigError(f"a data mixture (a list under 'data') trains with objective: sft; "
                          f"objective: {cfg.objective} takes one file of preference pairs")
    from tunelab.trackers import check_installed, parse_report_to

    check_installed(parse_report_to(cfg.report_to))  # a missing library: one error line
    if cfg.base_bits not in (4, 8, 16):
        raise ConfigError(f"config key 'base_bits' is {cfg.base_bits}; allowed: 4, 8, 16")
    if cfg.method == "full" and cfg.base_bits != 16:
        raise ConfigError("full fine-tuning cannot update a quantized base "
                          f"(base_bits: {cfg.base_bits}); use method: qlora, or lora with "
                          "base_bits, or base_bits: 16 for full fine-tuning")
    if cfg.method == "qlora" and cfg.base_bits == 16:
        cfg.base_bits = 4
    if cfg.method == "qlora" and cfg.base_bits != 4:
        raise ConfigError(f"method: qlora means a 4-bit base, not base_bits: {cfg.base_bits}; "
                          "for an 8-bit base use method: lora with base_bits: 8")
    if cfg.warmup_steps and cfg.warmup_ratio:
        raise ConfigError("set warmup_steps or warmup_ratio, not both")
    if cfg.parallel == "fsdp" and cfg.base_bits == 8:
        # bitsandbytes keeps an 8-bit layer's scales (CB, SCB) on the weight object itself,
        # which FSDP2 replaces by a plain sharded parameter; the 4-bit layer keeps its
        # quantization state on the module too (tunelab.dequant.quant_state_of) and shards.
        raise ConfigError("parallel: fsdp cannot shard an 8-bit base (bitsandbytes keeps its "
                          "int8 scales on the weight, which FSDP2 replaces); use a 4-bit base "
                          "(method: qlora) or parallel: ddp")
    if cfg.objective in ("dpo", "orpo") and cfg.beta <= 0:
        raise ConfigError(f"config key 'beta' is {cfg.beta}; it must be > 0 for "
                          f"objective: {cfg.objective}")
    if cfg.label_smoothing and not (cfg.objective == "dpo" and cfg.dpo_loss == "sigmoid"):
        raise ConfigError("label_smoothing applies to objective: dpo with dpo_loss: sigmoid")
    if cfg.init_adapter and cfg.method == "full":
        raise ConfigError("init_adapter starts LoRA training from an adapter; with method: "
                          "full, point 'model' at a merged model instead")
    if cfg.init_adapter and not Path(cfg.init_adapter).is_dir():
        raise ConfigError(f"init_adapter: {cfg.init_adapter} is not a folder; give the adapter "
                          "folder (OUT/adapter of an SFT run) or the run folder")
    _check_replay(cfg)
    if cfg.use_dora and cfg.method == "full":
        raise ConfigError("use_dora is a LoRA option; it has no meaning with method: full")


DEFAULT_REPLAY_RATIO = 0.2


def _check_replay(cfg: TrainConfig) -> None:
    """``replay``, ``replay_ratio``, ``replay_prompts``, ``replay_kl`` (tunelab.replay)."""
    if not cfg.replay and cfg.replay_ratio:
        # a ratio alone means the base's own answers, so a sweep over replay_ratio=0,0.2
        # runs on any config
        cfg.replay = "self"
    if not cfg.replay:
        for key, unset in (("replay_prompts", 0), ("replay_kl", 0.0)):
            if getattr(cfg, key) != unset:
                raise ConfigError(f"{key} applies with replay; add replay: self (the base "
                                  "model answers tunelab's general prompts) or replay: FILE")
        return
    if cfg.replay != "self" and not cfg.replay.startswith("hf:") \
            and not Path(cfg.replay).expanduser().exists():
        raise ConfigError(f"replay: file not found: {cfg.replay}; give replay: self (the base "
                          "model answers tunelab's general prompts) or an existing data file")
    if cfg.objective != "sft":
        raise ConfigError(f"replay mixes general rows into SFT data; objective: "
                          f"{cfg.objective} takes one file of preference pairs")
    if cfg.replay_ratio is None:
        cfg.replay_ratio = DEFAULT_REPLAY_RATIO
    if not 0.0 <= cfg.replay_ratio < 1.0:
        raise ConfigError(f"config key 'replay_ratio' is {cfg.replay_ratio!r}; it must be >= 0 "
                          "and < 1 (the share of each epoch's rows that are replay, e.g. 0.2)")
    if cfg.replay_prompts and cfg.replay != "self":
        raise ConfigError("replay_prompts caps the prompts of replay: self; with replay: "
                          f"{cfg.replay} every row of the file is used")
    if cfg.replay_kl and not cfg.is_lora:
        raise ConfigError("replay_kl needs method: lora or qlora (the base is the model with "
                          "its adapters off); with method: full set replay_kl: 0")


def build_config(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a mapping of settings into a ``TrainConfig``."""
    cfg = TrainConfig()
    for key, value in values.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}. "
                              f"Known keys: {', '.join(KEYS)}")
        try:
            coerced = _coerce(key, value)
            _check_value(key, coerced)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        setattr(cfg, key, coerced)
    _check_combination(cfg)
    return cfg


def resolve_data_paths(values: dict[str, Any], config_file: str | Path) -> None:
    """Paths in a config file are relative to the file, so examples run from anywhere: a
    relative ``data`` path (or each source's ``path``) that exists next to the file is
    rewritten to that file."""
    folder = Path(config_file).parent

    def resolve(path: Any) -> Any:
        if not isinstance(path, str) or not path or Path(path).is_absolute() \
                or path.startswith("hf:"):  # "" is no path (replay off), not this folder
            return path
        candidate = folder / path
        return str(candidate) if candidate.exists() else path

    if isinstance(values.get("replay"), str) and values["replay"] != "self":
        values["replay"] = resolve(values["replay"])
    data = values.get("data")
    if isinstance(data, list):
        values["data"] = [{**s, "path": resolve(s.get("path"))} if isinstance(s, dict)
                          else s for s in data]
    elif data is not None:
        values["data"] = resolve(data)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings; values parsed as YAML scalars (so ``lr=1e-4`` is a number)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
