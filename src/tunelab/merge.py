"""Merge an adapter into its base and save a plain HF checkpoint (no peft needed to use it).

``W = W0 + (alpha/r) B A`` for every adapted layer, computed in fp32. The merged model is
checked against base+adapter on a probe prompt, and the largest logit difference reported,
so the user sees the rounding cost instead of trusting it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab import adapters, models

PROBE = "The quick brown fox jumps over the lazy dog. Fine-tuning adapts a model to a task."


@torch.no_grad()
def probe_logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    device = next(model.parameters()).device
    ids = tokenizer(PROBE, return_tensors="pt").input_ids.to(device)
    return model(input_ids=ids).logits.float().cpu()


def merge_to_checkpoint(model_spec: str, adapter_path: str | Path, out: Path, *,
                        allow_pickle: bool = False, device: str = "cpu") -> dict[str, Any]:
    base, tokenizer = models.load_model(model_spec, device=device, dtype="fp32",
                                        allow_pickle=allow_pickle)
    model = adapters.load_adapter(base, adapter_path)
    reference = probe_logits(model, tokenizer)
    merged = adapters.merge_adapter(model)
    diff = float((probe_logits(merged, tokenizer) - reference).abs().max())
    with adapters.atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        card = adapters.resolve_adapter_dir(adapter_path) / "README.md"
        if card.is_file():
            (tmp / "README.md").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")
    return {"out": str(out), "max_abs_logit_diff": diff}
