"""Checkpoint tensors as GGUF stores them, read and encoded one tensor at a time.

A GGUF file lists every tensor's name, shape, type and offset before any weights, so a
writer that holds all weights until the end (``GGUFWriter.add_tensor`` then
``write_tensors_to_file``) needs the whole model in memory: 27 GB for a 7B in fp32. Here the
layout of every tensor is computed from the safetensors headers alone
(:func:`stored_layout`), the tensor table is written first, and each tensor is then read,
encoded and written on its own (``GGUFWriter.write_tensor_data``): the peak is one tensor in
fp32 plus its encoding (the token embedding, 0.8 GB for a 7B with a 49k vocabulary).

:func:`stored_layout` is the single place that decides how a tensor is stored; :func:`encode`
follows it, so the table written up front and the bytes written later cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError


@dataclass(frozen=True)
class Layout:
    """How one tensor is stored: its type name, numpy dtype, stored shape and raw GGML type
    (``None`` for f32/f16, which gguf infers from the numpy dtype)."""

    kind: str
    dtype: Any
    stored_shape: tuple[int, ...]
    raw_dtype: Any

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def stored_layout(shape: tuple[int, ...], qtype: Any) -> Layout:
    """Norms, biases and other 1-D tensors stay f32 (as in llama.cpp); a tensor whose rows are
    not a multiple of the type's block size stays f16; the rest is encoded as ``qtype``."""
    import gguf
    from gguf.quants import quant_shape_to_byte_shape

    shape = tuple(int(s) for s in shape)
    if len(shape) == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return Layout("f32", np.float32, shape, None)
    if qtype == gguf.GGMLQuantizationType.F16 or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Layout("f16", np.float16, shape, None)
    return Layout(qtype.name.lower(), np.uint8, tuple(quant_shape_to_byte_shape(shape, qtype)),
                  qtype)


def encode(data: np.ndarray, layout: Layout) -> np.ndarray:
    """``data`` (fp32) as ``layout`` stores it."""
    from gguf.quants import quantize

    if layout.raw_dtype is None:
        stored = data.astype(layout.dtype, copy=False)
    else:
        stored = quantize(data, layout.raw_dtype)
    if stored.shape != layout.stored_shape:  # a bug here would write a corrupt file
        raise AssertionError(f"encoded shape {stored.shape} != planned {layout.stored_shape}")
    return stored


def checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of the safetensors checkpoint in ``folder``: name -> (file, shape), read
    from the file headers only."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights")
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                found[key] = (file, tuple(f.get_slice(key).get_shape()))
    return found


def read_fp32(file: Path, key: str) -> np.ndarray:
    """One tensor of a safetensors file as fp32 numpy (bf16 has no numpy dtype: via torch)."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return f.get_tensor(key).float().numpy()
