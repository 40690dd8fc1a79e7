"""Load a safetensors checkpoint shard by shard, quantizing as it goes.

Why not ``from_pretrained``: transformers 5 memory-maps *every* shard up front and closes the
files only once the whole model is loaded (``modeling_utils``: the ``all_pointer`` set), so
every page it has read stays in the process's resident set until the end. A QLoRA load of a
Llama-2-7B then peaks at the 4-bit model *plus* the whole 13.5 GB bf16 checkpoint (19.1 GiB
measured on a 24 GB machine, where the trained model needs about 5.5 GiB), and a 13B cannot
load at all. None of its options changes that (``disable_mmap`` reads every file into memory
instead, which is worse).

This loader keeps transformers' model classes and bitsandbytes' layers and only replaces the
reading:

    1. the model is built with parameters on the ``meta`` device (buffers such as rotary
       frequencies are real), from ``config.json`` alone;
    2. with ``bits`` 4 or 8 every ``nn.Linear`` except the output layer is swapped for a
       bitsandbytes ``Linear4bit`` (NF4/FP4, optional double quantization) or
       ``Linear8bitLt`` (what transformers' ``BitsAndBytesConfig`` path does);
    3. shards are opened one at a time; each tensor is read, cast to the compute dtype, moved
       to the device and, for a quantized linear, quantized there; the shard is closed (its
       pages leave the resident set) before the next one is opened.

Peak memory while loading is the loaded model so far + one shard's pages + one tensor in the
compute dtype. The result is marked the way transformers marks a bitsandbytes model
(``is_loaded_in_4bit`` etc.), so peft's ``prepare_model_for_kbit_training`` and its 4-bit LoRA
layers treat it exactly like one loaded by transformers.

Checkpoints whose tensor names differ from the model's parameter names (architectures that
transformers renames while loading) are left to ``from_pretrained``; :func:`can_stream` says
which.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError
from tunelab.memory import release_free_heap

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in index order ([] if none)."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    return [folder / SINGLE] if (folder / SINGLE).is_file() else []


def checkpoint_keys(folder: str | Path) -> set[str]:
    """Tensor names of a checkpoint, from the index or the file headers (nothing is read)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    keys: set[str] = set()
    for file in shard_files(folder):
        with safe_open(str(file), framework="pt") as fh:
            keys.update(fh.keys())
    return keys


def largest_shard_bytes(folder: str | Path) -> int:
    files = shard_files(folder)
    return max((f.stat().st_size for f in files), default=0)


def empty_model(config: Any, dtype: torch.dtype, *, trust_remote_code: bool = False) -> Any:
    """The model of ``config`` with every parameter on the meta device (no storage)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def can_stream(folder: str | Path, model: torch.nn.Module) -> bool:
    """True when every parameter of ``model`` is a tensor of the checkpoint under its own name
    (tied output layers may be absent)."""
    if not shard_files(folder):
        return False
    expected = set(model.state_dict())
    found = checkpoint_keys(folder)
    tied = {k for k in expected - found if k.endswith("lm_head.weight")}
    return not (expected - found - tied) and found <= expected


def _output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def _swap_quantized_linears(model: torch.nn.Module, bits: int, compute_dtype: torch.dtype,
                            quant_type: str, double_quant: bool) -> int:
    """Replace every ``nn.Linear`` but the output layer by its bitsandbytes counterpart, on
    meta (its weight is set when the checkpoint tensor arrives)."""
    import bitsandbytes as bnb

    head = _output_layer(model)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            bias = child.bias is not None
            if bits == 4:
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=bias,
                                        compute_dtype=compute_dtype,
                                        compress_statistics=double_quant,
                                        quant_type=quant_type, quant_storage=torch.uint8,
                                        device="meta")
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=bias,
                                          has_fp16_weights=False, threshold=0.0, device="meta")
            new.requires_grad_(False)
            setattr(parent, name, new)
            count += 1
    return count


def _quantized_weight(module: torch.nn.Module, tensor: torch.Tensor, device: torch.device,
                      bits: int) -> torch.nn.Parameter:
    import bitsandbytes as bnb

    if bits == 4:
        param = bnb.nn.Params4bit(tensor, requires_grad=False, blocksize=64,
                                  compress_statistics=module.weight.compress_statistics,
                                  quant_type=module.weight.quant_type,
                                  quant_storage=torch.uint8, module=module)
    else:
        param = bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False)
    return param.to(device)  # bitsandbytes quantizes on the move to a real device


def _mark_quantized(model: torch.nn.Module, bits: int, compute_dtype: torch.dtype,
                    quant_type: str, double_quant: bool) -> None:
    """What transformers sets on a bitsandbytes model, so peft and our code recognise it."""
    from tunelab.quant import bnb_config

    model.is_loaded_in_4bit = bits == 4
    model.is_loaded_in_8bit = bits == 8
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = bnb_config(bits, compute_dtype, quant_type=quant_type,
                                                  double_quant=double_quant)


@torch.no_grad()
def load_streaming(folder: str | Path, config: Any, *, dtype: torch.dtype,
                   device: torch.device, bits: int = 16, quant_type: str = "nf4",
                   double_quant: bool = True, trust_remote_code: bool = False,
                   model: torch.nn.Module | None = None, progress: bool = True
                   ) -> torch.nn.Module:
    """Load ``folder``'s weights shard by shard into a fresh model of ``config``.

    ``bits`` 4/8 quantizes every linear but the output layer (see the module docstring);
    everything else is stored in ``dtype`` on ``device``. ``model`` may be passed when the
    caller built the empty model already (e.g. for :func:`can_stream`).
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    model = model if model is not None else empty_model(config, dtype,
                                                        trust_remote_code=trust_remote_code)
    if bits != 16:
        _swap_quantized_linears(model, bits, dtype, quant_type, double_quant)
    modules = dict(model.named_modules())
    files = shard_files(folder)
    loaded: set[str] = set()
    for file in tqdm(files, desc="loading shards", unit="shard",
                     disable=not progress or len(files) < 2):
        # pread, not mmap: mapped pages would count in the resident set until the file closes
        with safe_open(str(file), framework="pt", device="cpu", backend="pread") as fh:
            for key in fh.keys():
                module_name, _, attr = key.rpartition(".")
                module = modules[module_name]
                tensor = fh.get_tensor(key).to(dtype)
                quantized = attr == "weight" and bits != 16 and module.weight.device.type \
                    == "meta" and type(module).__name__ in ("Linear4bit", "Linear8bitLt")
                if quantized:
                    value = _quantized_weight(module, tensor, device, bits)
                else:
                    value = torch.nn.Parameter(tensor.to(device), requires_grad=False)
                setattr(module, attr, value)
                del tensor, value
                loaded.add(key)
        release_free_heap()  # the shard's conversion temporaries (see memory.py)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{folder}: the checkpoint has no tensor for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}: it does not match its "
                         "config.json")
    if bits != 16:
        _mark_quantized(model, bits, dtype, quant_type, double_quant)
    for p in model.parameters():  # as from_pretrained: trainable until the recipe decides
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
    model.eval()
    return model
