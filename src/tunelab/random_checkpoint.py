"""Randomly initialised checkpoints of published shapes, written shard by shard.

Memory and speed work on 7B-70B models needs their *shapes*, not their weights: random
weights allocate, load, quantize and multiply exactly like trained ones. This module writes a
Hugging Face Llama checkpoint (``config.json``, bf16 ``model-0000i-of-0000n.safetensors``
shards, ``model.safetensors.index.json``, a tokenizer) for any shape of the planner's
catalogue (:mod:`tunelab.plan.catalog`) without ever holding the whole model:

    1. the model is built on the ``meta`` device (shapes only, no storage);
    2. its parameter names are grouped, in order, into shards of at most ``shard_bytes``;
    3. each shard's tensors are drawn (``N(0, 0.02)`` for matrices, ones for norms), saved and
       freed before the next shard is drawn.

Peak memory is about one shard (plus its fp32 draw for one tensor). The finished folder is
moved into place by one rename, so an interrupted build never leaves a checkpoint that a
later run would trust. Random weights are right for memory and speed, never for quality.
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

from tunelab.plan.catalog import Arch, get_arch

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 2 * 2**30  # what the Hub's own checkpoints of this size use (~2 GB)
INIT_STD = 0.02  # Llama's initializer_range


def llama_config(arch: Arch, vocab: int | None = None) -> Any:
    """A transformers ``LlamaConfig`` of ``arch``'s shape (``vocab`` overrides its vocabulary,
    e.g. to match a smaller tokenizer)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or arch.vocab, hidden_size=arch.hidden,
        intermediate_size=arch.intermediate, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
        head_dim=arch.d_head, max_position_embeddings=min(arch.context, 8192),
        tie_word_embeddings=arch.tied_embeddings, rms_norm_eps=1e-5,
        initializer_range=INIT_STD, dtype="bfloat16")


def _shards(named_shapes: list[tuple[str, torch.Size]], shard_bytes: int
            ) -> list[list[tuple[str, torch.Size]]]:
    """Consecutive groups of (name, shape) of at most ``shard_bytes`` in bf16 (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    size = 0
    for name, shape in named_shapes:
        nbytes = 2 * shape.numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _draw(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights (Llama has no biases)
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (64 * 2**20) // (4 * shape[-1]))  # draw fp32 in ~64 MiB slices
    for start in range(0, shape[0], rows):
        block = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=generator)
        out[start:start + rows].copy_(block.mul_(INIT_STD))
    return out


def build_random_checkpoint(folder: str | Path, arch: Arch | str, *, tokenizer: Any = None,
                            vocab: int | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                            seed: int = 0) -> Path:
    """Write a random bf16 checkpoint of ``arch`` into ``folder`` (kept if already complete).

    ``tokenizer`` (a transformers tokenizer) is saved beside the weights; ``vocab`` defaults
    to its length when given, else to the shape's own vocabulary (a larger ``vocab`` than the
    tokenizer's keeps the shape's embedding size, e.g. Llama 3's 128k rows).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    arch = get_arch(arch) if isinstance(arch, str) else arch
    if vocab is None and tokenizer is not None:
        vocab = len(tokenizer)
    config = llama_config(arch, vocab)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    named = [(n, p.shape) for n, p in skeleton.state_dict().items()
             if not (config.tie_word_embeddings and n == "lm_head.weight")]
    del skeleton
    groups = _shards(named, shard_bytes)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    try:
        from tqdm.auto import tqdm

        for i, group in enumerate(tqdm(groups, desc=f"writing {arch.key or arch.name}",
                                       unit="shard")):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {name: _draw(name, shape, generator) for name, shape in group}
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            total += sum(2 * t.numel() for t in tensors.values())
            weight_map.update({name: file for name in tensors})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "RANDOM_WEIGHTS").write_text(
            f"Random N(0, {INIT_STD}) weights of the {arch.name} shape: for memory and speed "
            "measurements only.\n")
        if folder.exists():  # an incomplete earlier attempt
            shutil.rmtree(folder)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it 0700; a folder as mkdir would make it
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("random %s checkpoint: %.2f GB in %d shards at %s", arch.name, total / 1e9,
             len(groups), folder)
    return folder
