"""Merge a LoRA adapter into its base one checkpoint shard at a time.

For every adapted linear of the base, with PEFT's scale ``s = alpha / r`` (``alpha /
sqrt(r)`` under rsLoRA)::

    W = W0 + s * B A

where ``W0`` is the weight the adapter was trained against: the checkpoint's own weight for a
16-bit base, and for a QLoRA base the *dequantized NF4/FP4* weight (quantized here exactly as
the streaming loader quantizes it, then dequantized), so the merged model computes what the
quantized base + adapter computed. The sum is formed in fp32 and written in ``dtype``
(bf16 by default, the checkpoints' own precision).

Nothing but one input shard, its merged output and the adapter is ever in memory: a 7B
merges within about two shards (4 GB) instead of the 28 GB an fp32 model would take. Output
shards follow the input's layout; the folder is written beside the target and renamed into
place, so an interrupted merge leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab import adapters, loading

log = logging.getLogger(__name__)

# Files of a checkpoint folder that describe it rather than hold weights.
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja", "tokenizer.model", "generation_config.json",
               "vocab.json", "merges.txt")


def _adapter_deltas(adapter_dir: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                   float]:
    """``{base weight name: (A, B)}`` in fp32 and the scale ``s``."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("use_dora"):
        raise ValueError("streaming merge does not support DoRA adapters (their magnitude "
                         "vector needs the whole weight's norm); merge with --no-streaming")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("streaming merge needs one rank and alpha for every layer")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key[: -len(marker)].removeprefix("base_model.model.")
                pairs.setdefault(module + ".weight", {})[part] = value.float()
    unknown = [k for k in tensors if ".lora_A." not in k and ".lora_B." not in k]
    if unknown:
        raise ValueError(f"adapter holds tensors besides LoRA A/B ({unknown[:3]}): merge "
                         "with --no-streaming")
    return {name: (p["lora_A"], p["lora_B"]) for name, p in pairs.items()}, scale


def _as_trained(weight: torch.Tensor, bits: int, quant_type: str, double_quant: bool
                ) -> torch.Tensor:
    """The fp32 weight the adapter saw: quantized and dequantized for a k-bit base."""
    weight = weight.float()
    if bits == 16:
        return weight
    import bitsandbytes.functional as bnbf

    if bits == 4:
        q, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                      quant_type=quant_type, quant_storage=torch.uint8)
        return bnbf.dequantize_4bit(q, state).float()
    q, scale, _ = bnbf.int8_vectorwise_quant(weight.to(torch.float16))  # as Int8Params
    return q.float() * scale.float().unsqueeze(1) / 127.0


@torch.no_grad()
def merge_streaming(base_folder: str | Path, adapter_path: str | Path, out: Path, *,
                    dtype: torch.dtype = torch.bfloat16, progress: bool = True
                    ) -> dict[str, Any]:
    """Write ``base + adapter`` merged into ``out``; returns what was done."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    base_folder = Path(base_folder)
    adapter_dir = adapters.resolve_adapter_dir(adapter_path)
    meta = adapters.adapter_meta(adapter_dir)
    bits = int(meta.get("base_bits", 16))
    quant_type, double_quant = meta.get("quant_type", "nf4"), meta.get("double_quant", True)
    deltas, scale = _adapter_deltas(adapter_dir)
    files = loading.shard_files(base_folder)
    if not files:
        raise ValueError(f"{base_folder} has no safetensors weights")
    merged_names: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    with adapters.atomic_dir(out) as tmp:
        for i, file in enumerate(tqdm(files, desc="merging shards", unit="shard",
                                      disable=not progress)):
            name = file.name if len(files) == 1 else \
                f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            shard: dict[str, torch.Tensor] = {}
            with safe_open(str(file), framework="pt", device="cpu", backend="pread") as fh:
                for key in fh.keys():
                    tensor = fh.get_tensor(key)
                    if key in deltas:
                        a, b = deltas[key]
                        w = _as_trained(tensor, bits, quant_type, double_quant)
                        tensor = w.addmm_(b, a, alpha=scale)
                        merged_names.add(key)
                    shard[key] = tensor.to(dtype).contiguous()
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update({k: name for k in shard})
            del shard
        missing = sorted(set(deltas) - merged_names)
        if missing:
            raise ValueError(f"the adapter changes weights the base does not have "
                             f"({missing[:3]}): it was trained on another model")
        if len(files) > 1:
            (tmp / loading.INDEX).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for side in _SIDE_FILES:
            if (base_folder / side).is_file():
                shutil.copy2(base_folder / side, tmp / side)
        card = adapter_dir / "README.md"
        if card.is_file():
            shutil.copy2(card, tmp / "README.md")
    log.info("merged %d weights of %s into %s (%d shards, %s)", len(merged_names),
             base_folder, out, len(files), dtype)
    return {"out": str(out), "merged_weights": len(merged_names), "shards": len(files),
            "bytes": total, "base_bits": bits}
