"""LoRA adapters: attach, save (PEFT's on-disk format + a model card), load, merge.

LoRA keeps the base weight ``W0`` frozen and learns a low-rank update per target linear:

    x -> W0 x + (alpha / r) * B A x          (rsLoRA: alpha / sqrt(r))

with ``A: r x in`` (random init) and ``B: out x r`` (zero init), so training starts from the
base model exactly. We use peft for all of it, so adapters are interchangeable with the
ecosystem; this module adds validation with useful messages and the model card.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the linear layers a LoRA could target (``q_proj``, ``down_proj``...)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit",
                                                                            "Linear8bitLt"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def _check_targets(model: torch.nn.Module, targets: str | list[str]) -> None:
    if targets == "all-linear":
        return
    wanted = [targets] if isinstance(targets, str) else list(targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in wanted if t not in present]
    if missing:
        raise ModelError(f"target_modules {missing} do not exist in this model; its linear "
                         f"layers are: {', '.join(linear_module_names(model))} "
                         "(or use 'all-linear')")


def attach_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
                target_modules: str | list[str], use_rslora: bool = False,
                use_dora: bool = False) -> Any:
    """Freeze the base and wrap it with trainable LoRA layers (peft)."""
    from peft import LoraConfig, get_peft_model

    _check_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules, use_rslora=use_rslora, use_dora=use_dora,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter folder, given the folder itself or a tunelab run directory holding one."""
    path = Path(path).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    if not path.exists():
        raise ModelError(f"adapter not found: {path}")
    raise ModelError(f"{path} holds no {ADAPTER_CONFIG}: it is not a LoRA adapter "
                     "(nor a tunelab run directory with an adapter/ folder)")


def _check_adapter_fits(model: torch.nn.Module, adapter_dir: Path) -> None:
    """Catch an adapter trained for another base before peft fails with a shape error."""
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise ModelError(f"{adapter_dir} holds a pickle adapter (adapter_model.bin); "
                             "convert it to safetensors or load it with plain peft if trusted")
        raise ModelError(f"{adapter_dir} has no adapter_model.safetensors")
    # a model already wrapped by peft (a second adapter) names its modules under the base
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = dict(base.named_modules())
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            module_name = key.split(".lora_A.")[0]
            module_name = module_name.removeprefix("base_model.model.")
            module = modules.get(module_name)
            if module is None:
                raise ModelError(f"adapter {adapter_dir} was trained for another base model: "
                                 f"it has weights for '{module_name}', which this model lacks")
            in_features = getattr(module, "in_features", None)
            shape = f.get_slice(key).get_shape()
            if in_features is not None and shape[1] != in_features:
                raise ModelError(f"adapter {adapter_dir} was trained for another base model: "
                                 f"'{module_name}' takes {in_features} inputs here but "
                                 f"{shape[1]} in the adapter")


def load_adapter(model: torch.nn.Module, path: str | Path, *, name: str = "default",
                 trainable: bool = False) -> Any:
    """Attach a saved PEFT adapter to a base model."""
    from peft import PeftModel

    adapter_dir = resolve_adapter_dir(path)
    _check_adapter_fits(model, adapter_dir)
    if hasattr(model, "load_adapter") and hasattr(model, "peft_config"):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name,
                                     is_trainable=trainable)


def atomic_dir(final: Path) -> _AtomicDir:
    return _AtomicDir(final)


class _AtomicDir:
    """Context manager: write into a temp folder beside ``final``, then swap it in.

    A crash at any point leaves either the previous ``final`` or the new one, never a mix.
    """

    def __init__(self, final: Path) -> None:
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.final.name}-",
                                         dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _fsync_tree(self.tmp)
        old = None
        if self.final.exists():
            old = self.final.with_name(f".old-{self.final.name}-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


def model_card(*, base_model: str, licence: str | None, data: str | list[dict[str, Any]],
               method: str, hyperparameters: dict[str, Any], metrics: dict[str, Any]) -> str:
    """A README.md in the Hugging Face model-card style (YAML front matter + text)."""
    from tunelab.data.mixture import describe

    data = describe(data)  # a mixture: every source with its weight
    front = ["---", f"base_model: {base_model}", "library_name: peft",
             f"license: {licence or 'unknown'}", "tags:", "- tunelab", f"- {method}", "---"]
    hp = "\n".join(f"| {k} | {v} |" for k, v in hyperparameters.items())
    mt = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    return "\n".join(front) + f"""

# {method.upper()} adapter for {base_model}

Trained with tunelab on `{data}`.

Base model licence: **{licence or 'unknown'}** (this adapter is a derivative of the base model;
its licence terms apply).

Load with plain peft:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained("<base model folder>")
model = PeftModel.from_pretrained(base, "<this folder>")
```

## Hyperparameters

| key | value |
|---|---|
{hp}

## Final metrics

| metric | value |
|---|---|
{mt}
"""


TUNELAB_META = "tunelab.json"


def save_adapter(model: Any, out_dir: Path, *, card: str | None = None,
                 meta: dict[str, Any] | None = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a PEFT model's adapter atomically to ``out_dir`` (safetensors).

    ``meta`` (base model spec, base quantization) goes to ``tunelab.json`` beside PEFT's
    files, so inference and merging can rebuild the base the adapter was trained on; PEFT
    ignores the extra file.
    """
    with atomic_dir(out_dir) as tmp:
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        if meta is not None:
            (tmp / TUNELAB_META).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def adapter_meta(path: str | Path) -> dict[str, Any]:
    """What tunelab recorded about an adapter's base; ``{}`` for adapters made elsewhere."""
    file = resolve_adapter_dir(path) / TUNELAB_META
    return json.loads(file.read_text()) if file.is_file() else {}


DEFAULT_BASE = "smollm2-135m"


def base_model_for(model: str | None, adapter: str | Path | None) -> str:
    """The base to load: ``--model`` when given, else the base the adapter was trained on (as
    tunelab recorded it), else the default model."""
    if model:
        return model
    if adapter is not None:
        recorded = adapter_meta(adapter).get("base_model")
        if recorded:
            return str(recorded)
    return DEFAULT_BASE


def merge_adapter(model: Any) -> torch.nn.Module:
    """Fold every LoRA update into its base weight: ``W = W0 + (alpha/r) B A``."""
    return model.merge_and_unload()
