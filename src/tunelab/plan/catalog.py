"""What the planner knows about models and accelerators.

An :class:`Arch` holds only the numbers that decide memory and compute (hidden size, layers,
heads, MLP width, vocabulary, ...). It can come from

* the built-in offline catalogue (:data:`CATALOG`, exact numbers from each model's
  ``config.json``),
* a local Hugging Face folder's ``config.json`` (:func:`arch_from_hf_config`),
* a GGUF file's header (:func:`arch_from_gguf`), or
* a Hub id, by downloading only ``config.json`` (lazily, when online).

:func:`resolve_model` picks the right reader for a ``--model`` argument. Nothing here loads
weights or imports torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import ConfigError, ModelError

# Canonical names of the linear layers in one transformer block. LoRA targets use these names
# (``q_proj`` and ``q`` are both accepted; see ``normalise_targets`` in ``estimate``).
LINEAR_NAMES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Linear:
    """One linear layer kind inside a block: ``count`` copies of an ``in x out`` matrix.

    ``covers`` lists the canonical names the module implements, so a fused ``qkv`` projection
    (Phi-3) is adapted by LoRA when any of ``q``, ``k``, ``v`` is targeted.
    """

    name: str
    in_features: int
    out_features: int
    count: int = 1
    bias: bool = False
    covers: tuple[str, ...] = ()

    @property
    def weight_params(self) -> int:
        return self.count * self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        return self.count * self.out_features if self.bias else 0


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer, described by the numbers that size its training cost.

    Parameter counts follow the Hugging Face module layout: token embedding ``vocab x hidden``,
    ``layers`` blocks of attention (q, k, v, o) + MLP (gate, up, down for a gated
    SwiGLU/GeGLU MLP; up, down for a plain GELU MLP), RMSNorm/LayerNorm weights, a final norm,
    and an ``lm_head`` of ``hidden x vocab`` unless the embeddings are tied.
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int = 0  # 0: hidden // heads (Gemma and Llama 3.2 set it explicitly)
    tied_embeddings: bool = False
    context: int = 4096
    mlp: Literal["gated", "plain"] = "gated"
    experts: int = 1  # MoE: every expert's weights are held in memory ...
    active_experts: int = 1  # ... but only this many run per token (FLOPs, activations)
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v only
    bias: bool = False  # GPT-2/3 style: biases on every linear and norm
    norm: Literal["rms", "layer"] = "rms"
    norms_per_layer: int = 2  # Gemma 2/3 add post-attention and post-MLP norms: 4
    qk_norm: bool = False  # Gemma 3: RMSNorm on each q and k head
    learned_positions: int = 0  # GPT-3: learned position embeddings (rows)
    fused_qkv: bool = False  # Phi-3: one qkv_proj instead of q/k/v
    fused_gate_up: bool = False  # Phi-3: one gate_up_proj
    attn_softcap: bool = False  # Gemma 2: attention logit soft-capping (eager attention)
    extra_params: int = 0  # e.g. Gemma 3's vision tower: frozen, kept in compute dtype
    weight_dtype: str = "bf16"  # how the checkpoint stores its weights (published: 16-bit)
    extra_note: str = ""
    licence: str = "unknown"
    key: str = ""  # catalogue key, e.g. "llama-2-7b"
    aliases: tuple[str, ...] = ()
    hf_ids: tuple[str, ...] = ()
    source: str = "catalogue"

    # ----------------------------------------------------------------------------- shapes
    @property
    def d_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.d_head

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.d_head

    def linears(self) -> list[Linear]:
        """The linear layers of one block (all experts of an MoE block included)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        qkv_b = self.qkv_bias or self.bias
        out: list[Linear] = []
        if self.fused_qkv:
            out.append(Linear("qkv", h, q + 2 * kv, bias=qkv_b, covers=("q", "k", "v")))
        else:
            out += [
                Linear("q", h, q, bias=qkv_b, covers=("q",)),
                Linear("k", h, kv, bias=qkv_b, covers=("k",)),
                Linear("v", h, kv, bias=qkv_b, covers=("v",)),
            ]
        out.append(Linear("o", q, h, bias=self.bias, covers=("o",)))
        e = self.experts
        if self.mlp == "plain":
            out += [
                Linear("up", h, i, count=e, bias=self.bias, covers=("up",)),
                Linear("down", i, h, count=e, bias=self.bias, covers=("down",)),
            ]
        elif self.fused_gate_up:
            out += [
                Linear("gate_up", h, 2 * i, count=e, bias=self.bias, covers=("gate", "up")),
                Linear("down", i, h, count=e, bias=self.bias, covers=("down",)),
            ]
        else:
            out += [
                Linear("gate", h, i, count=e, bias=self.bias, covers=("gate",)),
                Linear("up", h, i, count=e, bias=self.bias, covers=("up",)),
                Linear("down", i, h, count=e, bias=self.bias, covers=("down",)),
            ]
        if e > 1:
            # The router is a small linear; not a LoRA target by default (covers nothing).
            out.append(Linear("router", h, e))
        return out

    # ----------------------------------------------------------------------------- counts
    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Parameters of a separate output matrix (0 when tied to the embedding)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def layer_linear_weight_params(self) -> int:
        return sum(lin.weight_params for lin in self.linears())

    @property
    def linear_weight_params(self) -> int:
        """Weights of every block linear (quantizable part), all layers, all experts."""
        return self.layers * self.layer_linear_weight_params

    @property
    def norm_params(self) -> int:
        """Norm weights (+ LayerNorm biases) and linear biases: small, kept in compute dtype."""
        per_norm = self.hidden * (2 if self.norm == "layer" else 1)
        per_layer = self.norms_per_layer * per_norm
        if self.qk_norm:
            per_layer += 2 * self.d_head
        per_layer += sum(lin.bias_params for lin in self.linears())
        return self.layers * per_layer + per_norm

    @property
    def total_params(self) -> int:
        return (
            self.embedding_params
            + self.lm_head_params
            + self.linear_weight_params
            + self.norm_params
            + self.extra_params
        )

    @property
    def active_linear_weight_params(self) -> int:
        """Block linear weights a token actually multiplies through (MoE: active experts)."""
        per_layer = 0
        for lin in self.linears():
            if lin.count > 1:
                per_layer += lin.weight_params * self.active_experts // lin.count
            else:
                per_layer += lin.weight_params
        return self.layers * per_layer

    @property
    def largest_linear_params(self) -> int:
        """The biggest single weight matrix (one expert): sizes a dequantization buffer."""
        return max(lin.in_features * lin.out_features for lin in self.linears())

    def describe(self) -> str:
        moe = f", {self.experts} experts ({self.active_experts} active)" if self.experts > 1 else ""
        tied = ", tied embeddings" if self.tied_embeddings else ""
        return (
            f"{self.layers} layers, hidden {self.hidden}, heads {self.heads}/{self.kv_heads} kv, "
            f"MLP {self.intermediate}, vocab {self.vocab}{moe}{tied}"
        )


# ================================================================================= catalogue
_M = 1_000_000

# Gemma 3 4B/12B/27B load as image-text models: a SigLIP vision encoder (~417M parameters
# including the projector, approximate) is held in memory even for text-only fine-tuning.
_GEMMA3_VISION = 417 * _M
_GEMMA3_NOTE = "includes ~417M-parameter vision tower (approximate, frozen)"


def _entries() -> list[Arch]:
    llama2 = dict(vocab=32000, context=4096, licence="llama2")
    llama3 = dict(vocab=128256, context=8192, licence="llama3")
    llama31 = dict(vocab=128256, context=131072, licence="llama3.1")
    llama32 = dict(vocab=128256, context=131072, licence="llama3.2", tied_embeddings=True)
    qwen_small = dict(vocab=151936, tied_embeddings=True, qkv_bias=True)
    qwen_big = dict(vocab=152064, context=131072, qkv_bias=True)
    gemma2 = dict(vocab=256000, context=8192, tied_embeddings=True, norms_per_layer=4,
                  attn_softcap=True, licence="gemma")
    gemma3 = dict(vocab=262208, context=131072, tied_embeddings=True, norms_per_layer=4,
                  qk_norm=True, licence="gemma", extra_params=_GEMMA3_VISION,
                  extra_note=_GEMMA3_NOTE)
    smol = dict(vocab=49152, context=8192, tied_embeddings=True, licence="apache-2.0")
    llama1 = dict(vocab=32000, context=2048, licence="llama1")
    return [
        # ------------------------------------------------------------------ Meta Llama 2
        Arch("Llama 2 7B", 4096, 32, 32, 32, 11008, **llama2, key="llama-2-7b",
             hf_ids=("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf")),
        Arch("Llama 2 13B", 5120, 40, 40, 40, 13824, **llama2, key="llama-2-13b",
             hf_ids=("meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf")),
        Arch("Llama 2 70B", 8192, 80, 64, 8, 28672, **llama2, key="llama-2-70b",
             hf_ids=("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-chat-hf")),
        # ------------------------------------------------------------------ Meta Llama 3.x
        Arch("Llama 3 8B", 4096, 32, 32, 8, 14336, **llama3, key="llama-3-8b",
             hf_ids=("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct")),
        Arch("Llama 3 70B", 8192, 80, 64, 8, 28672, **llama3, key="llama-3-70b",
             hf_ids=("meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct")),
        Arch("Llama 3.1 8B", 4096, 32, 32, 8, 14336, **llama31, key="llama-3.1-8b",
             hf_ids=("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                     "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct")),
        Arch("Llama 3.1 70B", 8192, 80, 64, 8, 28672, **llama31, key="llama-3.1-70b",
             hf_ids=("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                     "meta-llama/Meta-Llama-3.1-70B",
                     "meta-llama/Meta-Llama-3.1-70B-Instruct")),
        Arch("Llama 3.3 70B", 8192, 80, 64, 8, 28672, vocab=128256, context=131072,
             licence="llama3.3", key="llama-3.3-70b",
             hf_ids=("meta-llama/Llama-3.3-70B-Instruct",)),
        Arch("Llama 3.2 1B", 2048, 16, 32, 8, 8192, head_dim=64, **llama32, key="llama-3.2-1b",
             hf_ids=("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct")),
        Arch("Llama 3.2 3B", 3072, 28, 24, 8, 8192, head_dim=128, **llama32,
             key="llama-3.2-3b",
             hf_ids=("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct")),
        # ------------------------------------------------------------------ Mistral
        Arch("Mistral 7B", 4096, 32, 32, 8, 14336, vocab=32000, context=32768,
             licence="apache-2.0", key="mistral-7b", aliases=("mistral-7b-v0.1",),
             hf_ids=("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
                     "mistralai/Mistral-7B-Instruct-v0.2")),
        Arch("Mistral 7B v0.3", 4096, 32, 32, 8, 14336, vocab=32768, context=32768,
             licence="apache-2.0", key="mistral-7b-v0.3",
             hf_ids=("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3")),
        Arch("Mixtral 8x7B", 4096, 32, 32, 8, 14336, vocab=32000, context=32768,
             experts=8, active_experts=2, licence="apache-2.0", key="mixtral-8x7b",
             hf_ids=("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1")),
        # ------------------------------------------------------------------ Qwen2.5
        Arch("Qwen2.5 0.5B", 896, 24, 14, 2, 4864, **qwen_small, context=32768,
             licence="apache-2.0", key="qwen2.5-0.5b",
             hf_ids=("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct")),
        Arch("Qwen2.5 1.5B", 1536, 28, 12, 2, 8960, **qwen_small, context=131072,
             licence="apache-2.0", key="qwen2.5-1.5b",
             hf_ids=("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct")),
        Arch("Qwen2.5 3B", 2048, 36, 16, 2, 11008, **qwen_small, context=32768,
             licence="qwen-research", key="qwen2.5-3b",
             hf_ids=("Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct")),
        Arch("Qwen2.5 7B", 3584, 28, 28, 4, 18944, **qwen_big, licence="apache-2.0",
             key="qwen2.5-7b", hf_ids=("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct")),
        Arch("Qwen2.5 14B", 5120, 48, 40, 8, 13824, **qwen_big, licence="apache-2.0",
             key="qwen2.5-14b", hf_ids=("Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct")),
        Arch("Qwen2.5 32B", 5120, 64, 40, 8, 27648, **qwen_big, licence="apache-2.0",
             key="qwen2.5-32b", hf_ids=("Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct")),
        Arch("Qwen2.5 72B", 8192, 80, 64, 8, 29568, **qwen_big, licence="qwen",
             key="qwen2.5-72b", hf_ids=("Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct")),
        # ------------------------------------------------------------------ Google Gemma
        Arch("Gemma 2 2B", 2304, 26, 8, 4, 9216, head_dim=256, **gemma2, key="gemma-2-2b",
             hf_ids=("google/gemma-2-2b", "google/gemma-2-2b-it")),
        Arch("Gemma 2 9B", 3584, 42, 16, 8, 14336, head_dim=256, **gemma2, key="gemma-2-9b",
             hf_ids=("google/gemma-2-9b", "google/gemma-2-9b-it")),
        Arch("Gemma 2 27B", 4608, 46, 32, 16, 36864, head_dim=128, **gemma2,
             key="gemma-2-27b", hf_ids=("google/gemma-2-27b", "google/gemma-2-27b-it")),
        Arch("Gemma 3 1B", 1152, 26, 4, 1, 6912, head_dim=256, vocab=262144, context=32768,
             tied_embeddings=True, norms_per_layer=4, qk_norm=True, licence="gemma",
             key="gemma-3-1b", hf_ids=("google/gemma-3-1b-pt", "google/gemma-3-1b-it")),
        Arch("Gemma 3 4B", 2560, 34, 8, 4, 10240, head_dim=256, **gemma3, key="gemma-3-4b",
             hf_ids=("google/gemma-3-4b-pt", "google/gemma-3-4b-it")),
        Arch("Gemma 3 12B", 3840, 48, 16, 8, 15360, head_dim=256, **gemma3,
             key="gemma-3-12b", hf_ids=("google/gemma-3-12b-pt", "google/gemma-3-12b-it")),
        Arch("Gemma 3 27B", 5376, 62, 32, 16, 21504, head_dim=128, **gemma3,
             key="gemma-3-27b", hf_ids=("google/gemma-3-27b-pt", "google/gemma-3-27b-it")),
        # ------------------------------------------------------------------ Microsoft Phi-3
        Arch("Phi-3 mini", 3072, 32, 32, 32, 8192, vocab=32064, context=4096,
             fused_qkv=True, fused_gate_up=True, licence="mit", key="phi-3-mini",
             aliases=("phi-3.5-mini", "phi3-mini"),
             hf_ids=("microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-128k-instruct",
                     "microsoft/Phi-3.5-mini-instruct")),
        Arch("Phi-3 medium", 5120, 40, 40, 10, 17920, vocab=32064, context=4096,
             fused_qkv=True, fused_gate_up=True, licence="mit", key="phi-3-medium",
             aliases=("phi3-medium",),
             hf_ids=("microsoft/Phi-3-medium-4k-instruct",
                     "microsoft/Phi-3-medium-128k-instruct")),
        # ------------------------------------------------------------------ LLaMA (v1)
        Arch("LLaMA 7B", 4096, 32, 32, 32, 11008, **llama1, key="llama-7b",
             hf_ids=("huggyllama/llama-7b",)),
        Arch("LLaMA 13B", 5120, 40, 40, 40, 13824, **llama1, key="llama-13b",
             hf_ids=("huggyllama/llama-13b",)),
        Arch("LLaMA 33B", 6656, 60, 52, 52, 17920, **llama1, key="llama-33b",
             aliases=("llama-30b",), hf_ids=("huggyllama/llama-30b",)),
        Arch("LLaMA 65B", 8192, 80, 64, 64, 22016, **llama1, key="llama-65b",
             hf_ids=("huggyllama/llama-65b",)),
        # ------------------------------------------------------------------ OpenAI GPT-3
        # Brown et al. 2020, Table 2.1: d_model 12288, 96 layers, 96 heads of 128, FFN 4x,
        # context 2048, GPT-2 vocabulary and layout (biases, LayerNorm, learned positions,
        # tied embeddings). Weights were never released: useful for sizing comparisons.
        Arch("GPT-3 175B", 12288, 96, 96, 96, 4 * 12288, vocab=50257, context=2048,
             mlp="plain", bias=True, norm="layer", learned_positions=2048,
             tied_embeddings=True, licence="proprietary", key="gpt-3-175b",
             aliases=("gpt-3", "gpt3", "gpt-3-davinci", "davinci")),
        # ------------------------------------------------------------------ SmolLM2
        Arch("SmolLM2 135M", 576, 30, 9, 3, 1536, **smol, key="smollm2-135m",
             hf_ids=("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")),
        Arch("SmolLM2 360M", 960, 32, 15, 5, 2560, **smol, key="smollm2-360m",
             hf_ids=("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct")),
        Arch("SmolLM2 1.7B", 2048, 24, 32, 32, 8192, **smol, key="smollm2-1.7b",
             hf_ids=("HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B-Instruct")),
    ]


CATALOG: tuple[Arch, ...] = tuple(_entries())

# Suffixes that name a variant of the same architecture (chat/instruct tunes, HF packaging).
_VARIANT_SUFFIXES = ("-hf", "-instruct", "-chat", "-it", "-pt", "-base", "-4k", "-128k",
                     "-v0.1", "-v0.2")


def _normalise(name: str) -> str:
    """``Meta-Llama-3.1-8B-Instruct`` -> ``llama-3.1-8b``: lower case, last path part, no
    variant suffixes, ``_``/space as ``-``."""
    s = name.strip().lower().rsplit("/", 1)[-1]
    s = re.sub(r"[\s_]+", "-", s)
    if s.startswith("meta-llama-"):
        s = s[len("meta-"):]
    changed = True
    while changed:
        changed = False
        for suffix in _VARIANT_SUFFIXES:
            if s.endswith(suffix) and len(s) > len(suffix):
                s = s[: -len(suffix)]
                changed = True
    return s


def _compact(name: str) -> str:
    # "llama2-7b" and "llama-2-7b" are the same request.
    return _normalise(name).replace("-", "")


def _build_index() -> tuple[dict[str, Arch], dict[str, Arch]]:
    exact: dict[str, Arch] = {}
    loose: dict[str, Arch] = {}
    for arch in CATALOG:
        for n in (arch.key, *arch.aliases, *arch.hf_ids):
            exact.setdefault(n.lower(), arch)
            loose.setdefault(_compact(n), arch)
    return exact, loose


_EXACT, _LOOSE = _build_index()


def catalog_names() -> list[str]:
    return [a.key for a in CATALOG]


def find_arch(name: str) -> Arch | None:
    """Catalogue entry for a key, alias or Hugging Face id (case-insensitive), else None."""
    return _EXACT.get(name.strip().lower()) or _LOOSE.get(_compact(name))


def get_arch(name: str) -> Arch:
    arch = find_arch(name)
    if arch is None:
        raise ModelError(
            f"unknown model '{name}': pass a local model folder (with config.json), a .gguf "
            f"file, a Hugging Face Hub id (needs network), or one of the catalogue names: "
            f"{', '.join(catalog_names())}"
        )
    return arch


# ================================================================================= GPUs
@dataclass(frozen=True)
class GPU:
    """An accelerator: memory and peak dense 16-bit tensor throughput (no sparsity)."""

    key: str
    name: str
    memory_bytes: int
    peak_tflops: float  # dense bf16 (fp16 where the GPU has no bf16), FP32 accumulate
    bf16: bool = True
    kind: Literal["cuda", "cpu"] = "cuda"
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        """Short display name: ``24GB``, ``A100-80GB``, ``4090``, ``CPU``."""
        return self.key.upper()

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024**3

    @property
    def default_dtype(self) -> str:
        if self.kind == "cpu":
            return "fp32"
        return "bf16" if self.bf16 else "fp16"


_GiB = 1024**3

GPUS: tuple[GPU, ...] = (
    GPU("t4", "NVIDIA T4 16GB", 16 * _GiB, 65.0, bf16=False, note="no bf16: fp16 peak"),
    GPU("v100", "NVIDIA V100 32GB", 32 * _GiB, 125.0, bf16=False,
        note="SXM2; no bf16: fp16 peak", aliases=("v100-32gb",)),
    GPU("3090", "NVIDIA RTX 3090 24GB", 24 * _GiB, 71.0, aliases=("rtx3090", "rtx-3090")),
    GPU("4090", "NVIDIA RTX 4090 24GB", 24 * _GiB, 165.2, aliases=("rtx4090", "rtx-4090")),
    GPU("a10g", "NVIDIA A10G 24GB", 24 * _GiB, 70.0, note="AWS g5"),
    GPU("l4", "NVIDIA L4 24GB", 24 * _GiB, 121.0),
    GPU("a6000", "NVIDIA RTX A6000 48GB", 48 * _GiB, 154.8, aliases=("rtx-a6000",)),
    GPU("l40s", "NVIDIA L40S 48GB", 48 * _GiB, 362.0),
    GPU("a100-40gb", "NVIDIA A100 40GB", 40 * _GiB, 312.0, aliases=("a100-40",)),
    GPU("a100-80gb", "NVIDIA A100 80GB", 80 * _GiB, 312.0, aliases=("a100", "a100-80")),
    GPU("h100", "NVIDIA H100 SXM 80GB", 80 * _GiB, 989.0, aliases=("h100-80gb", "h100-sxm")),
    GPU("h200", "NVIDIA H200 141GB", 141 * 10**9, 989.0, aliases=("h200-141gb",)),
    # Generic sizes: memory is what matters; throughput is a stated, typical card's figure.
    GPU("16gb", "generic 16GB GPU", 16 * _GiB, 65.0, note="throughput assumed T4-class"),
    GPU("24gb", "generic 24GB GPU", 24 * _GiB, 71.0, note="throughput assumed RTX 3090-class"),
    GPU("40gb", "generic 40GB GPU", 40 * _GiB, 312.0, note="throughput assumed A100-class"),
    GPU("48gb", "generic 48GB GPU", 48 * _GiB, 154.8, note="throughput assumed A6000-class"),
    GPU("80gb", "generic 80GB GPU", 80 * _GiB, 312.0, note="throughput assumed A100-class"),
)

# CPU throughput is a stated assumption: ~50 GFLOP/s fp32 per logical core (AVX2 FMA at
# ~2.5 GHz, 8 lanes x 2 FMA units x 2 FLOPs = 32 FLOP/cycle/core, derated for memory bounds).
CPU_TFLOPS_PER_CORE = 0.05


def cpu_device() -> GPU:
    """This machine's CPU as a 'device': total RAM and an assumed per-core throughput."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 * _GiB
    cores = os.cpu_count() or 1
    return GPU("cpu", f"CPU ({cores} logical cores)", int(memory), cores * CPU_TFLOPS_PER_CORE,
               kind="cpu", note=f"{CPU_TFLOPS_PER_CORE * 1000:.0f} GFLOP/s per core assumed")


def gpu_names() -> list[str]:
    return [g.key for g in GPUS] + ["cpu"]


def get_gpu(name: str) -> GPU:
    """Look up a GPU by key or alias (case-insensitive; ``24GB``, ``A100-80GB``, ``cpu``)."""
    wanted = re.sub(r"[\s_]+", "-", name.strip().lower())
    if wanted == "cpu":
        return cpu_device()
    for gpu in GPUS:
        if wanted == gpu.key or wanted in gpu.aliases:
            return gpu
    raise ConfigError(f"unknown GPU '{name}': use one of {', '.join(gpu_names())}")


# ================================================================================= readers
# Model types whose MLP is a plain up/GELU/down (not gated).
_PLAIN_MLP_TYPES = {"gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi",
                    "starcoder2", "gpt_neo"}
# Default of ``tie_word_embeddings`` when config.json omits it (transformers' per-model default).
_UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
                      "phi3", "gpt_neox", "falcon", "olmo", "olmo2", "granite", "cohere"}


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


_REQUIRED = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}


def _fill_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fill keys a config.json may omit from transformers' config class defaults.

    Only imports transformers when something is missing (Gemma 3 text configs, for one,
    leave head counts at their class defaults).
    """
    model_type = cfg.get("model_type")
    if not model_type:
        return cfg
    try:
        from transformers import AutoConfig

        full = AutoConfig.for_model(model_type).to_dict()
    except Exception:  # unknown model type or transformers missing: keep what we have
        return cfg
    return {**full, **{k: v for k, v in cfg.items() if v is not None}}


def arch_from_hf_config(config: Mapping[str, Any], *, name: str | None = None) -> Arch:
    """Build an :class:`Arch` from a Hugging Face config dict (``config.json`` or
    ``model.config.to_dict()``).

    Multimodal configs use their ``text_config``. Keys missing from the dict are filled from
    transformers' defaults for the ``model_type`` when transformers is importable.
    """
    cfg: dict[str, Any] = dict(config)
    top = cfg
    if isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg["text_config"]}
        cfg.setdefault("tie_word_embeddings", top.get("tie_word_embeddings"))
    if any(_first(cfg, *keys) is None for keys in _REQUIRED.values()):
        cfg = _fill_defaults(cfg)
    missing = [keys[0] for keys in _REQUIRED.values() if _first(cfg, *keys) is None]
    if missing:
        raise ModelError(
            f"config has no {', '.join(missing)}: cannot size the model. Expected a Hugging "
            f"Face causal-LM config.json (keys hidden_size, num_hidden_layers, "
            f"num_attention_heads, vocab_size, intermediate_size)"
        )
    model_type = str(cfg.get("model_type") or top.get("model_type") or "").lower()
    hidden = int(_first(cfg, *_REQUIRED["hidden"]))
    heads = int(_first(cfg, *_REQUIRED["heads"]))
    kv_heads = int(_first(cfg, "num_key_value_heads", "multi_query_group_num") or heads)
    experts = int(_first(cfg, "num_local_experts", "num_experts", "n_routed_experts") or 1)
    intermediate = _first(cfg, "moe_intermediate_size") if experts > 1 else None
    intermediate = int(intermediate or _first(cfg, "intermediate_size", "n_inner", "ffn_dim")
                       or 4 * hidden)
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = model_type not in _UNTIED_BY_DEFAULT
    plain = model_type in _PLAIN_MLP_TYPES
    is_gpt2 = model_type in {"gpt2", "gpt_bigcode", "gpt_neo"}
    return Arch(
        name=name or str(top.get("_name_or_path") or model_type or "model"),
        hidden=hidden,
        layers=int(_first(cfg, *_REQUIRED["layers"])),
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=int(cfg["vocab_size"]),
        head_dim=int(cfg.get("head_dim") or 0),
        tied_embeddings=bool(tied),
        context=int(_first(cfg, "max_position_embeddings", "n_positions", "n_ctx") or 2048),
        mlp="plain" if plain else "gated",
        experts=experts,
        active_experts=int(_first(cfg, "num_experts_per_tok", "moe_k") or 1) if experts > 1
        else 1,
        qkv_bias=model_type in {"qwen2", "qwen2_moe"} or bool(cfg.get("attention_bias")),
        bias=is_gpt2,
        norm="layer" if plain else "rms",
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
        qk_norm=model_type.startswith(("gemma3", "qwen3", "olmo2")),
        learned_positions=int(cfg.get("n_positions") or 0) if is_gpt2 else 0,
        fused_qkv=model_type == "phi3",
        fused_gate_up=model_type == "phi3",
        attn_softcap=cfg.get("attn_logit_softcapping") is not None,
        weight_dtype=_weight_dtype(top.get("dtype") or top.get("torch_dtype")
                                   or cfg.get("dtype") or cfg.get("torch_dtype")),
        licence=str(top.get("license") or "unknown"),
        source="config.json",
    )


def _weight_dtype(name: Any) -> str:
    """config.json's ``dtype`` as a plan dtype; 16-bit (bf16) when it says nothing usable."""
    return {"float32": "fp32", "float16": "fp16"}.get(str(name).removeprefix("torch."), "bf16")


def _gguf_value(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    if fld is None:
        return None
    value = fld.contents()
    if isinstance(value, list) and value and not isinstance(value[0], str):
        # Per-layer arrays (e.g. feed_forward_length): the widest layer sizes memory.
        return max(value)
    return value


def arch_from_gguf(path: str | os.PathLike[str]) -> Arch:
    """Build an :class:`Arch` from a GGUF file's header (metadata only; weights not read).

    Keys used, with ``A`` = ``general.architecture`` (e.g. ``llama``): ``A.block_count``,
    ``A.embedding_length``, ``A.feed_forward_length``, ``A.attention.head_count``,
    ``A.attention.head_count_kv``, ``A.attention.key_length`` (head size, optional),
    ``A.context_length``, ``A.expert_count``/``A.expert_used_count`` (MoE), vocabulary size
    from the length of ``tokenizer.ggml.tokens`` (or ``A.vocab_size``). Embeddings are tied
    when the file has no ``output.weight`` tensor.
    """
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - gguf is a dependency
        raise ModelError("reading a GGUF file needs the 'gguf' package: pip install gguf") from exc
    try:
        reader = GGUFReader(os.fspath(path), "r")
    except Exception as exc:
        raise ModelError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch_name = _gguf_value(reader, "general.architecture") or "llama"
    p = f"{arch_name}."

    def need(key: str) -> int:
        value = _gguf_value(reader, p + key)
        if value is None:
            raise ModelError(f"{path}: GGUF metadata has no '{p + key}': cannot size the model")
        return int(value)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)  # one entry per token; cheaper than decoding the strings
    else:
        vocab = need("vocab_size")
    tensor_names = {t.name for t in reader.tensors}
    heads = need("attention.head_count")
    experts = int(_gguf_value(reader, p + "expert_count") or 1)
    plain = arch_name in {"gpt2", "gptneox", "falcon", "bloom", "starcoder", "phi2", "gptj"}
    has_gate = any(n.startswith("blk.0.ffn_gate") for n in tensor_names)
    return Arch(
        name=str(_gguf_value(reader, "general.name") or Path(path).stem),
        hidden=need("embedding_length"),
        layers=need("block_count"),
        heads=heads,
        kv_heads=int(_gguf_value(reader, p + "attention.head_count_kv") or heads),
        intermediate=need("feed_forward_length"),
        vocab=vocab,
        head_dim=int(_gguf_value(reader, p + "attention.key_length") or 0),
        tied_embeddings="output.weight" not in tensor_names,
        context=int(_gguf_value(reader, p + "context_length") or 2048),
        mlp="plain" if plain else "gated",
        experts=experts,
        active_experts=int(_gguf_value(reader, p + "expert_used_count") or 1) if experts > 1
        else 1,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        norm="layer" if plain else "rms",
        norms_per_layer=4 if arch_name in {"gemma2", "gemma3"} else 2,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        fused_qkv="blk.0.attn_qkv.weight" in tensor_names,
        fused_gate_up=not plain and not has_gate and arch_name == "phi3",
        attn_softcap=_gguf_value(reader, p + "attn_logit_softcapping") is not None,
        licence=str(_gguf_value(reader, "general.license") or "unknown"),
        source="gguf",
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host resolves and accepts a connection (fails fast offline, instead
    of huggingface_hub's retries with back-off)."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_file(repo_id: str, filename: str) -> Path:
    """One small file from the Hub: the local HF cache first, then a download (lazy import;
    raises on any failure)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        pass  # not cached: try the network
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("HF_HUB_OFFLINE is set and the file is not in the local cache")
    if not _hub_reachable():
        raise ConnectionError("the Hugging Face Hub cannot be reached (offline?)")
    return Path(hf_hub_download(repo_id, filename))


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A ``--model`` argument resolved to an architecture, with where it came from."""

    arch: Arch
    source: str  # "catalogue" | "config.json" | "gguf" | "hub"
    path: Path | None = None  # local folder / file, or the downloaded config's folder


def resolve_model(spec: str) -> ResolvedModel:
    """Turn ``--model`` into an :class:`Arch`, reading as little as possible.

    Order: an existing path (folder with config.json, or a .gguf file); a catalogue name, alias
    or known Hub id (offline); any other ``org/name`` via the Hub (config.json only, lazily).
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            config = path / "config.json"
            if not config.is_file():
                raise ModelError(f"{path}: folder has no config.json; pass a Hugging Face model "
                                 f"folder, a .gguf file or a catalogue name")
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelError(f"{config}: cannot read config.json ({exc})") from exc
            arch = arch_from_hf_config(data, name=path.name)
            return ResolvedModel(arch, "config.json", path)
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(arch_from_gguf(path), "gguf", path)
        if path.name == "config.json":
            return resolve_model(str(path.parent))
        raise ModelError(f"{path}: not a model folder or .gguf file")
    arch = find_arch(spec)
    if arch is not None:
        return ResolvedModel(arch, "catalogue")
    if _HUB_ID.match(spec.strip()):
        repo = spec.strip()
        try:
            config_path = _hub_file(repo, "config.json")
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except Exception as exc:
            raise ModelError(
                f"could not fetch config.json for '{repo}' from the Hugging Face Hub "
                f"({type(exc).__name__}: {exc}). Offline, pass a local model folder, a .gguf "
                f"file, or one of the catalogue names: {', '.join(catalog_names())}"
            ) from exc
        arch = replace(arch_from_hf_config(data, name=repo), source="hub")
        return ResolvedModel(arch, "hub", config_path.parent)
    get_arch(spec)  # raises the ModelError listing what is accepted
    raise AssertionError("unreachable")
