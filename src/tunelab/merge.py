"""Merge an adapter into its base and save a plain HF checkpoint (no peft needed to use it).

``W = W0 + (alpha/r) B A`` for every adapted layer, computed in fp32. The merged model is
checked against base+adapter on a probe prompt and the largest logit difference reported,
so the user sees the rounding cost instead of trusting it.

For an adapter trained on a quantized base (QLoRA), the reference is the quantized base +
adapter, the model that was trained. ``W0`` is then the *dequantized* quantized weight
(what the adapter learned to correct), merged in fp32 and saved in full precision. Two other
paths are measured against the same reference: merging into the original unquantized weights,
and re-quantizing the merged model (what peft's merge on a 4-bit base does, and what it only
warns about).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from tunelab import adapters, models

log = logging.getLogger(__name__)

PROBE = "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a model to a task."


def wants_streaming(model_spec: str) -> bool:
    """Merge shard by shard when the in-memory merge would not fit: it holds about three
    fp32 copies of the base (quantized reference, dequantized merge, original)."""
    from tunelab.loading import shard_files
    from tunelab.memory import memory_budget_bytes

    try:
        folder = Path(models.local_folder(models.resolve_model(model_spec)))
    except Exception:  # a hub id or a bad spec: the in-memory path reports it
        return False
    files = shard_files(folder) if folder.is_dir() else []
    if not files:
        return False
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    stored = 2 if str(config.get("dtype") or config.get("torch_dtype")) in (
        "bfloat16", "float16") else 4
    fp32_bytes = sum(f.stat().st_size for f in files) * 4 // stored
    budget = memory_budget_bytes(torch.device("cpu"))
    return budget is not None and 3 * fp32_bytes > budget


@torch.no_grad()
def probe_logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = tokenizer(PROBE, return_tensors="pt").input_ids.to(device)
    return model(input_ids=ids).logits.float().cpu()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _save(merged: torch.nn.Module, tokenizer: Any, adapter_path: str | Path, out: Path) -> None:
    with adapters.atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        card = adapters.resolve_adapter_dir(adapter_path) / "README.md"
        if card.is_file():
            (tmp / "README.md").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")


def merge_to_checkpoint(model_spec: str, adapter_path: str | Path, out: Path, *,
                        allow_pickle: bool = False, device: str = "cpu",
                        requantize: str | None = None) -> dict[str, Any]:
    """Merge and save; return ``{"out", "max_abs_logit_diff", "paths": {path: diff}}``."""
    meta = adapters.adapter_meta(adapter_path)
    bits = int(meta.get("base_bits", 16))
    qkw = {"quant_type": meta.get("quant_type", "nf4"),
           "double_quant": meta.get("double_quant", True)}
    load = {"device": device, "dtype": "fp32", "allow_pickle": allow_pickle}
    if bits == 16:
        base, tokenizer = models.load_model(model_spec, **load)
        model = adapters.load_adapter(base, adapter_path)
        reference = probe_logits(model, tokenizer)
        merged = adapters.merge_adapter(model)
        paths = {"merged (fp32)": _max_diff(probe_logits(merged, tokenizer), reference)}
    else:
        from tunelab.quant import dequantize_model

        base, tokenizer = models.load_model(model_spec, bits=bits, **qkw, **load)
        reference = probe_logits(adapters.load_adapter(base, adapter_path), tokenizer)
        base, _ = models.load_model(model_spec, bits=bits, **qkw, **load)
        merged = adapters.merge_adapter(adapters.load_adapter(dequantize_model(base),
                                                              adapter_path))
        paths = {f"dequantized int{bits} base, merged in fp32 (saved)":
                 _max_diff(probe_logits(merged, tokenizer), reference)}
        original, _ = models.load_model(model_spec, **load)
        original = adapters.merge_adapter(adapters.load_adapter(original, adapter_path))
        paths["original fp32 base, merged"] = _max_diff(probe_logits(original, tokenizer),
                                                        reference)
        del original
    _save(merged, tokenizer, adapter_path, out)
    if requantize:
        # Re-quantizing the merged weights rounds them again: measure what that costs.
        requant_bits = 8 if requantize == "int8" else 4
        again, _ = models.load_model(str(out), bits=requant_bits, quant_type=(
            requantize if requantize in ("nf4", "fp4") else "nf4"), **load)
        paths[f"merged, re-quantized to {requantize}"] = _max_diff(
            probe_logits(again, tokenizer), reference)
    first = next(iter(paths.values()))
    return {"out": str(out), "max_abs_logit_diff": first, "paths": paths,
            "base_bits": bits}
