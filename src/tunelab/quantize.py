"""``tunelab quantize``: save quantized checkpoints and show what quantization costs.

For the base in fp32 and bf16 and each requested format (nf4, fp4, int8 through
bitsandbytes), one row of measured figures:

* bytes on disk of the saved checkpoint (safetensors; transformers loads it back);
* weight memory of the loaded model and bits per parameter (against the unquantized count);
* load time of the saved checkpoint;
* greedy generation tokens/s on this machine (batch 1);
* perplexity on held-out general text (Python's reference manual prose, see
  ``tunelab.evaluate.forgetting``) and its difference to the fp32 base.

On a CPU the bf16 row keeps bf16 weights (disk, memory, quality) but computes in fp32, since
bf16 matmuls are 10-100x slower on CPUs without native bf16; the table says so.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab import models
from tunelab.errors import ConfigError
from tunelab.memory import tensor_bytes

log = logging.getLogger(__name__)

FORMATS = ("nf4", "fp4", "int8")
GEN_PROMPT = "Write one sentence about the sea."
GEN_TOKENS = 32


@dataclass
class QuantRow:
    format: str
    disk_bytes: int
    weight_bytes: int
    bits_per_param: float
    load_seconds: float
    tokens_per_second: float
    perplexity: float
    perplexity_delta: float | None = None
    path: str | None = None
    note: str = ""


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def _weight_bytes(model: torch.nn.Module) -> int:
    from tunelab.quant import is_quantized_linear, quantized_weight_bytes

    quantized = [m for m in model.modules() if is_quantized_linear(m)]
    skip = {id(m.weight) for m in quantized}
    rest = [p for p in model.parameters() if id(p) not in skip]
    return tensor_bytes(rest) + tensor_bytes(model.buffers()) + sum(
        quantized_weight_bytes(m) for m in quantized)


@torch.no_grad()
def _tokens_per_second(model: torch.nn.Module, tokenizer: Any) -> float:
    from tunelab.generate import build_prompt

    device = next(model.parameters()).device
    ids = tokenizer(build_prompt(tokenizer, GEN_PROMPT), return_tensors="pt",
                    add_special_tokens=False).input_ids.to(device)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
        times.append(time.perf_counter() - start)
    return GEN_TOKENS / statistics.median(times)


def _perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> float:
    from tunelab.evaluate.run import text_nll
    from tunelab.evaluate.stats import corpus_perplexity

    return corpus_perplexity(text_nll(model, tokenizer, texts, max_tokens=128, batch_size=8,
                                      progress=False))


def _measure(fmt: str, spec: str, folder: Path, texts: list[str], *, double_quant: bool,
             device: str) -> QuantRow:
    """Load ``spec`` in ``fmt``, save it to ``folder``, reload it, and measure the row."""
    from transformers import AutoModelForCausalLM

    bits = {"fp32": 16, "bf16": 16, "nf4": 4, "fp4": 4, "int8": 8}[fmt]
    dtype = "bf16" if fmt == "bf16" else "fp32"
    model, tokenizer = models.load_model(spec, device=device, dtype=dtype, bits=bits,
                                         quant_type=fmt if fmt in ("nf4", "fp4") else "nf4",
                                         double_quant=double_quant, streaming=False)
    # streaming=False: save_pretrained of a 4/8-bit model needs transformers' quantizer
    n_params = _unquantized_param_count(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    start = time.perf_counter()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if fmt == "bf16" else torch.float32}
    if bits != 16:
        kwargs["device_map"] = {"": models.pick_device(device)}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    load_seconds = time.perf_counter() - start
    if bits == 4:  # the layout tunelab trains and evaluates with (quant.keep_trainable_layout)
        from tunelab.quant import keep_trainable_layout

        keep_trainable_layout(model)
    weight_bytes = _weight_bytes(model)
    note = ""
    if fmt == "bf16" and models.pick_device(device).type == "cpu":
        model = model.float()  # bf16 weights, fp32 math: see the module docstring
        note = "bf16 weights, fp32 compute on CPU"
    if bits == 16:
        model.to(models.pick_device(device))
    model.eval()
    return QuantRow(format=fmt, disk_bytes=_dir_bytes(folder), weight_bytes=weight_bytes,
                    bits_per_param=8 * weight_bytes / n_params, load_seconds=load_seconds,
                    tokens_per_second=_tokens_per_second(model, tokenizer),
                    perplexity=_perplexity(model, tokenizer, texts), note=note)


def _unquantized_param_count(model: torch.nn.Module) -> int:
    from tunelab.quant import is_quantized_linear

    total = 0
    quantized = {id(m.weight) for m in model.modules() if is_quantized_linear(m)}
    for module in model.modules():
        if is_quantized_linear(module):
            total += module.in_features * module.out_features
    total += sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return total


def quantize(spec: str, formats: list[str], out: Path | None, *, double_quant: bool = True,
             device: str = "auto") -> list[QuantRow]:
    """Measure fp32, bf16 and each format; keep the quantized checkpoints in ``out``."""
    from tunelab.evaluate.forgetting import general_texts

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--to {bad or '(none)'}: choose one or more of {', '.join(FORMATS)}")
    texts = general_texts(16)
    name = Path(spec).stem if Path(spec).exists() else spec.replace("/", "--")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("fp32", "bf16", *formats):
            keep = out is not None and fmt in FORMATS
            folder = (out / f"{name}-{fmt}") if keep else Path(tmp) / fmt
            if keep and folder.exists():
                shutil.rmtree(folder)
            log.info("measuring %s", fmt)
            row = _measure(fmt, spec, folder, texts, double_quant=double_quant, device=device)
            row.path = str(folder) if keep else None
            rows.append(row)
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
    base = rows[0].perplexity
    for row in rows:
        row.perplexity_delta = row.perplexity - base
    return rows


def format_table(rows: list[QuantRow], *, double_quant: bool) -> str:
    head = (f"{'format':7} {'disk MiB':>9} {'weights MiB':>12} {'bits/param':>10} "
            f"{'load s':>7} {'gen tok/s':>9} {'ppl':>8} {'Δppl':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.format:7} {r.disk_bytes / 2**20:9.1f} {r.weight_bytes / 2**20:12.1f} "
                     f"{r.bits_per_param:10.2f} {r.load_seconds:7.2f} "
                     f"{r.tokens_per_second:9.1f} {r.perplexity:8.3f} "
                     f"{r.perplexity_delta:+7.3f}" + (f"  ({r.note})" if r.note else ""))
    lines.append("4-bit formats use " + ("double quantization (block scales in 8 bits)"
                                         if double_quant else "fp32 block scales (no double "
                                         "quantization)") + "; perplexity on general text "
                 "(Python reference manual prose).")
    for r in rows:
        if r.path:
            lines.append(f"saved {r.format}: {r.path}")
    return "\n".join(lines)


def write_json(rows: list[QuantRow], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    tmp.replace(path)
