"""Export a model (optionally with an adapter merged in) as an HF folder or a GGUF file.

``--to hf`` writes a plain safetensors checkpoint (:mod:`tunelab.merge` when an adapter is
given). ``--to gguf`` writes one GGUF file for llama.cpp / Ollama with the ``gguf`` package,
plus an Ollama ``Modelfile`` beside it:

* architectures (:data:`ARCHS`), as llama.cpp's ``convert_hf_to_gguf.py`` writes them:
  ``llama`` (Llama, SmolLM, TinyLlama, Mistral-style models without sliding windows),
  ``qwen2`` (q/k/v biases) and ``gemma3`` (Gemma 3 text models: norms stored as ``1 + w``,
  ``head_dim`` key/value lengths, the sliding window; what llama.cpp hard-codes is checked);
  tensor names from gguf's per-architecture name map (``token_embd``, ``blk.N.attn_q``, ...);
* **q/k permutation** (``llama`` only): HF stores each head's rotary pairs as two halves,
  llama.cpp interleaves them, so ``q_proj``/``k_proj`` rows are reordered as llama.cpp's
  converter does (:func:`llama_permute`); readers (llama.cpp, transformers) undo it;
* weights in every type the ``gguf`` package can encode (:data:`QUANTS`); norms and other
  1-D tensors stay f32, as in llama.cpp; at 4-5 bits the token embedding and output layer
  stay q8_0 (:func:`tensor_quant`);
* the tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``) with tokens, token types
  and merges from ``tokenizer.json``, bos/eos/pad/unk ids and the chat template; a
  SentencePiece tokenizer (Gemma) is copied from the GGUF file the model came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab import gguf_tensors
from tunelab.errors import ModelError, TunelabError

log = logging.getLogger(__name__)

# Weight types the gguf package can write (it has no K-quant encoder: Q4_K etc. need
# llama.cpp's llama-quantize). 4- and 5-bit types use blocks of 32 weights.
QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF -> GGUF row order of a Llama q/k projection (llama.cpp ``convert_hf_to_gguf``).

    HF's rotary embedding rotates dimension ``i`` with ``i + d/2`` inside each head; llama.cpp
    rotates ``2i`` with ``2i + 1``. Reordering the rows of ``W_q`` and ``W_k`` this way gives the
    same attention scores under llama.cpp's convention.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_unpermute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None
                    ) -> np.ndarray:
    """The inverse of :func:`llama_permute` (what GGUF readers do)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    dim = weights.shape[0] // n_head // 2
    return (weights.reshape(n_head, dim, 2, *weights.shape[1:]).swapaxes(2, 1)
            .reshape(weights.shape))


# ------------------------------------------------------------------------ tokenizer


_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# The split regexes of tokenizer.json files whose llama.cpp pre-tokenizer name is known
# (Qwen2 splits digits one by one, Llama 3 in groups of up to three).
SPLIT_REGEXES = {
    _CONTRACTIONS + r"\p{N}" + _TAIL: "qwen2",
    _CONTRACTIONS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",
}


def _pre_tokenizer_name(tokenizer_json: dict, source_gguf: str | None) -> str:
    """llama.cpp's name for the pre-tokenizer (the regex that splits text before BPE)."""
    if source_gguf and Path(source_gguf).is_file():
        from gguf import GGUFReader

        field = GGUFReader(source_gguf).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # plain GPT-2 regex + byte-level
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        known = SPLIT_REGEXES.get((steps[0].get("pattern") or {}).get("Regex"))
        if known:
            return known
    log.warning("unknown pre-tokenizer %s: writing 'default'; llama.cpp may split text "
                "differently from the HF tokenizer", json.dumps(pre)[:200])
    return "default"


def _is_byte_level(data: dict) -> bool:
    """A GPT-2 style byte-level BPE (SmolLM, Llama 3, Qwen2), not a SentencePiece model
    stored as BPE with byte fallback (Gemma, Llama 2)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return False
    blob = json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
    return '"ByteLevel"' in blob


def tokenizer_fields(folder: Path, tokenizer: Any, vocab_size: int,
                     source_gguf: str | None = None) -> dict[str, Any]:
    """What GGUF stores about the tokenizer.

    Byte-level BPE (``tokenizer.ggml.model = gpt2``) is read from ``tokenizer.json``. A
    SentencePiece tokenizer (Gemma: ``llama``) is copied from the GGUF file the model came
    from: its scores and token types are what llama.cpp tokenizes with, and fine-tuning
    does not change them.
    """
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{folder} has no tokenizer.json: GGUF export needs a fast "
                         "(tokenizers) tokenizer")
    data = json.loads(file.read_text(encoding="utf-8"))
    if not _is_byte_level(data):
        if source_gguf and Path(source_gguf).is_file():
            return _copied_tokenizer(source_gguf, tokenizer)
        kind = (data.get("model") or {}).get("type")
        raise ModelError(f"GGUF export writes byte-level BPE tokenizers from tokenizer.json; "
                         f"{file} is a SentencePiece-style {kind} tokenizer. Export from the "
                         "model's GGUF file (--model FILE.gguf), whose tokenizer is copied")
    return _bpe_tokenizer(data, tokenizer, vocab_size, source_gguf)


def _bpe_tokenizer(data: dict, tokenizer: Any, vocab_size: int,
                   source_gguf: str | None) -> dict[str, Any]:
    from gguf import TokenType

    model = data["model"]
    by_id: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = int(TokenType.CONTROL if added.get("special")
                                      else TokenType.USER_DEFINED)
    n = max(vocab_size, max(by_id) + 1)
    tokens, token_types = [], []
    for i in range(n):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(types.get(i, int(TokenType.NORMAL)))
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            token_types.append(int(TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
           "pad": tokenizer.pad_token_id, "unk": tokenizer.unk_token_id}
    probe = tokenizer("a").input_ids
    return {"model": "gpt2", "tokens": tokens, "token_types": token_types, "merges": merges,
            "ids": ids, "pre": _pre_tokenizer_name(data, source_gguf),
            "add_bos": bool(probe and ids["bos"] is not None and probe[0] == ids["bos"]),
            "chat_template": getattr(tokenizer, "chat_template", None), "copied": []}


def _copied_tokenizer(source_gguf: str, tokenizer: Any) -> dict[str, Any]:
    """Every ``tokenizer.*`` field of ``source_gguf``, as (key, value, type, sub type)."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(source_gguf).fields
    copied = []
    for key, field in fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[1]) if vtype == GGUFValueType.ARRAY else None
        copied.append((key, field.contents(), vtype, sub))
    values = {key: value for key, value, _, _ in copied}
    if "tokenizer.ggml.tokens" not in values:
        raise ModelError(f"{source_gguf} has no tokenizer.ggml.tokens to copy")
    template = getattr(tokenizer, "chat_template", None)
    if template and "tokenizer.chat_template" not in values:  # added by fine-tuning set-up
        copied.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    ids = {k: values.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "pad")}
    ids["unk"] = values.get("tokenizer.ggml.unknown_token_id")
    return {"model": values.get("tokenizer.ggml.model"), "tokens": values["tokenizer.ggml.tokens"],
            "ids": ids, "pre": values.get("tokenizer.ggml.pre", "default"),
            "chat_template": values.get("tokenizer.chat_template", template), "copied": copied}


def write_tokenizer(writer: Any, tok: dict[str, Any]) -> None:
    if tok["copied"]:
        for key, value, vtype, sub in tok["copied"]:
            writer.add_key_value(key, value, vtype, sub)
        return
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["token_types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if tok["ids"][key] is not None:
            add(int(tok["ids"][key]))
    writer.add_add_bos_token(tok["add_bos"])
    writer.add_add_space_prefix(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])


# --------------------------------------------------------------------------- GGUF


@dataclass(frozen=True)
class GgufArch:
    """How one HF architecture maps onto a llama.cpp architecture."""

    name: str  # llama.cpp's architecture name (general.architecture)
    permute_qk: bool  # llama.cpp's rotary pairs are interleaved (Llama) rather than halves
    norm_shift: float  # added to every ``*norm.weight``: Gemma's RMSNorm scales by (1 + w)


# HF config.model_type -> llama.cpp architecture (what convert_hf_to_gguf.py writes for it).
ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True, norm_shift=0.0),
    "mistral": GgufArch("llama", permute_qk=True, norm_shift=0.0),
    "qwen2": GgufArch("qwen2", permute_qk=False, norm_shift=0.0),
    "gemma3_text": GgufArch("gemma3", permute_qk=False, norm_shift=1.0),
}


def gguf_arch(config: Any) -> GgufArch:
    """The llama.cpp architecture for ``config``; a clear error for what is not handled."""
    kind = config.model_type
    arch = ARCHS.get(kind)
    if arch is None:
        hint = (" (an image-text Gemma 3: export its text model, Gemma3ForCausalLM)"
                if kind == "gemma3" else "")
        raise ModelError(f"GGUF export supports Llama-architecture models (Llama, Mistral, "
                         f"SmolLM), Qwen2 and Gemma 3 text models; this one is "
                         f"'{kind}'{hint}")
    if arch.name == "llama" and getattr(config, "sliding_window", None):
        raise ModelError(f"GGUF export: '{kind}' with a sliding window (Mistral v0.1 style) "
                         "is not a plain Llama; llama.cpp's 'llama' architecture has no window")
    if kind == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ModelError("GGUF export: Qwen2 with use_sliding_window=true is not handled "
                         "(llama.cpp's qwen2 attends to the whole context)")
    if arch.name == "gemma3":
        _check_gemma3(config)
    return arch


def _check_gemma3(config: Any) -> None:
    """What llama.cpp's gemma3 hard-codes must hold for this checkpoint, or the file would
    load and compute something else: every 6th layer global, local rope base 10000, the
    query scale 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads))."""
    n = int(config.num_hidden_layers)
    layer_types = list(getattr(config, "layer_types", None) or [])
    want = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    if layer_types and layer_types != want:
        raise ModelError("GGUF export: llama.cpp's gemma3 makes every 6th layer global "
                         "(sliding_window_pattern 6); this checkpoint's layer_types differ")
    local = _rope_theta(config, "sliding_attention", 10000.0)
    if local != 10000.0:
        raise ModelError(f"GGUF export: llama.cpp's gemma3 uses rope base 10000 on sliding "
                         f"layers; this checkpoint has {local:g}")
    head_dim = int(config.head_dim)
    scale_dim = config.hidden_size // config.num_attention_heads if n == 62 else head_dim
    scalar = getattr(config, "query_pre_attn_scalar", head_dim)
    if scalar != scale_dim:
        raise ModelError(f"GGUF export: llama.cpp's gemma3 scales queries by "
                         f"1/sqrt({scale_dim}); this checkpoint's query_pre_attn_scalar is "
                         f"{scalar}")


def _rope_theta(config: Any, layer_type: str = "full_attention",
                default: float = 10000.0) -> float:
    """The rope base (of ``layer_type`` layers where the config has one per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type), dict):  # Gemma 3: one set per attention type
        params = params[layer_type]
    elif layer_type == "sliding_attention":
        local = getattr(config, "rope_local_base_freq", None)
        params = {"rope_theta": local} if local is not None else {}
    scaling = getattr(config, "rope_scaling", None) or {}
    if isinstance(scaling.get(layer_type), dict):
        scaling = scaling[layer_type]
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise ModelError(f"GGUF export does not handle rope scaling '{kind}' yet")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)
                       if layer_type == "full_attention" else None)
    return float(theta if theta is not None else default)


def _write_hparams(writer: Any, config: Any, arch: GgufArch) -> None:
    """The ``<arch>.*`` hyperparameters, as llama.cpp's converter writes them per architecture."""
    n_head = int(config.num_attention_heads)
    n_kv = int(config.num_key_value_heads or n_head)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    if arch.name == "gemma3":
        writer.add_rope_freq_base(_rope_theta(config, "full_attention", 1_000_000.0))
        # Gemma 3 sets head_dim independently of hidden/heads (256 for a 640-wide 270M)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"]):
            writer.add_sliding_window(int(config.sliding_window))
        return
    writer.add_rope_freq_base(_rope_theta(config))
    if arch.name == "llama":
        writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


# Token embeddings and the output layer decide every logit: at 4-5 bits llama-quantize keeps
# them at q6_K, which gguf cannot encode; q8_0 is the nearest type it can.
KEEP_Q8 = ("token_embd.weight", "output.weight")
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")


def tensor_quant(gguf_name: str, quant: str) -> str:
    """The ``--quant`` type a 2-D tensor is written in (norms and biases are always f32)."""
    return "q8_0" if quant in LOW_BIT and gguf_name in KEEP_Q8 else quant


def _types(quant: str) -> tuple[Any, Any]:
    """(tensor type, file type) of a ``--quant`` name."""
    import gguf

    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}.get(quant, f"MOSTLY_{quant.upper()}")
    return gguf.GGMLQuantizationType[quant.upper()], gguf.LlamaFileType[file_type]


def write_gguf(folder: str | Path, out_file: str | Path, *, quant: str = "f16",
               name: str | None = None, source_gguf: str | None = None,
               licence: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Write the HF checkpoint in ``folder`` (Llama, Qwen2 or Gemma 3) as one GGUF file,
    one tensor at a time (:mod:`tunelab.gguf_tensors`): the tensor table first, from the
    safetensors headers, then each tensor read, encoded and written on its own."""
    import gguf
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoTokenizer

    from tunelab.models import fix_special_tokens

    if quant not in QUANTS:
        raise TunelabError(f"unknown quant '{quant}'; choose one of {', '.join(QUANTS)}")
    folder, out_file = Path(folder), Path(out_file)
    config = AutoConfig.from_pretrained(folder)
    arch = gguf_arch(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_special_tokens(tokenizer)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or \
        config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tok = tokenizer_fields(folder, tokenizer, config.vocab_size, source_gguf)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(model_arch, int(config.num_hidden_layers))
    plan = _plan_tensors(gguf_tensors.checkpoint_tensors(folder), names, quant, tied,
                         n_vocab=len(tok["tokens"]), model_type=config.model_type)

    ftype = _types(quant)[1]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{out_file.name}")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    writer.add_type("model")
    writer.add_name(name or folder.name)
    if licence:
        writer.add_license(licence)
    writer.add_file_type(int(ftype))
    if quant not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(len(tok["tokens"]))
    _write_hparams(writer, config, arch)
    write_tokenizer(writer, tok)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, t.layout.stored_shape, t.layout.dtype,
                               t.layout.nbytes, raw_dtype=t.layout.raw_dtype)
    counts: dict[str, int] = {"f32": 0, quant: 0}
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tqdm(plan, desc="writing GGUF", unit="tensor", disable=not progress):
            data = _gguf_values(gguf_tensors.read_fp32(t.file, t.key), t.key, t.gguf_name,
                                arch, n_head, n_kv, len(tok["tokens"]))
            writer.write_tensor_data(gguf_tensors.encode(data, t.layout))
            counts[t.layout.kind] = counts.get(t.layout.kind, 0) + 1
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # never leave a half-written file behind
        raise
    writer.close()
    tmp.replace(out_file)
    eos = tok["ids"]["eos"]
    return {"file": str(out_file), "quant": quant, "arch": arch.name, "tensors": len(plan),
            "types": counts, "bytes": out_file.stat().st_size, "pre_tokenizer": tok["pre"],
            "chat_template": tok["chat_template"],
            "eos": tok["tokens"][eos] if eos is not None else None}


@dataclass(frozen=True)
class _PlannedTensor:
    key: str  # checkpoint name
    file: Path  # the shard that holds it
    gguf_name: str
    layout: gguf_tensors.Layout


def _plan_tensors(tensors: dict[str, tuple[Path, tuple[int, ...]]], names: Any, quant: str,
                  tied: bool, *, n_vocab: int, model_type: str) -> list[_PlannedTensor]:
    """Which checkpoint tensors are written, under which GGUF name, in which layout, in file
    order: everything the tensor table needs, from the shapes alone."""
    plan = []
    for key in sorted(tensors, key=_tensor_order):
        if key == "lm_head.weight" and tied:
            continue
        if key.endswith(("rotary_emb.inv_freq", ".masked_bias")):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor '{key}': not a plain {model_type} "
                             "checkpoint")
        file, shape = tensors[key]
        if gguf_name == "token_embd.weight" and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # rows no token reaches (Gemma pads to 262208)
        qtype = _types(tensor_quant(gguf_name, quant))[0]
        plan.append(_PlannedTensor(key, file, gguf_name, gguf_tensors.stored_layout(shape, qtype)))
    return plan


def _gguf_values(data: np.ndarray, key: str, gguf_name: str, arch: GgufArch, n_head: int,
                 n_kv: int, n_vocab: int) -> np.ndarray:
    """A checkpoint tensor's fp32 values as llama.cpp reads them (see the module docstring)."""
    if arch.permute_qk and key.endswith(("q_proj.weight", "q_proj.bias")):
        data = llama_permute(data, n_head, n_head)
    elif arch.permute_qk and key.endswith(("k_proj.weight", "k_proj.bias")):
        data = llama_permute(data, n_head, n_kv)
    if arch.norm_shift and key.endswith("norm.weight"):
        data = data + np.float32(arch.norm_shift)
    if gguf_name == "token_embd.weight" and data.shape[0] > n_vocab:
        data = data[:n_vocab]
    return data


def _tensor_order(key: str) -> tuple[int, int, str]:
    match = re.search(r"layers\.(\d+)\.", key)
    if match:
        return (1, int(match.group(1)), key)
    return (0 if "embed" in key else 2, 0, key)


# ---------------------------------------------------------------------- Modelfile


def ollama_modelfile(gguf_name: str, chat_template: str | None, eos: str | None) -> str:
    """An Ollama Modelfile for a GGUF file beside it.

    ChatML templates (``<|im_start|>role\\ncontent<|im_end|>``) are translated into Ollama's
    Go template; a default system prompt the Jinja template inserts becomes ``SYSTEM``.
    Other templates are left to Ollama's own detection, with a note.
    """
    lines = [f"FROM ./{gguf_name}", ""]
    template = chat_template or ""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        system = re.search(r"<\|im_start\|>system\\n(.+?)<\|im_end\|>", template)
        if system is None:
            system = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template)
        go = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
              '{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}\n'
              '{{ .Content }}<|im_end|>\n{{ end }}{{- end }}<|im_start|>assistant\n')
        lines += [f'TEMPLATE """{go}"""', ""]
        if system is not None:
            lines += [f'SYSTEM """{system.group(1)}"""', ""]
        lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"']
    else:
        lines.insert(0, "# the chat template is not ChatML: Ollama uses the GGUF's "
                        "tokenizer.chat_template if it recognises it")
        if eos:
            lines.append(f'PARAMETER stop "{eos}"')
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- export


def export_model(model_spec: str, *, to: str, out: str | Path, adapter: str | Path | None = None,
                 quant: str = "f16", allow_pickle: bool = False, device: str = "cpu",
                 name: str | None = None, streaming: bool | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Export ``model_spec`` (+ ``adapter`` merged in) as an HF folder or a GGUF file.

    For GGUF, ``out`` is a ``.gguf`` file or a folder (the file is then named after the model
    and quant); the Modelfile goes beside the file. ``streaming`` merges the adapter shard by
    shard (:mod:`tunelab.merge_streaming`; default: when the in-memory merge would not fit);
    the GGUF itself is always written one tensor at a time.
    """
    from tunelab import adapters, models
    from tunelab.merge import merge_to_checkpoint, wants_streaming

    if to not in ("hf", "gguf"):
        raise TunelabError(f"--to must be hf or gguf, not '{to}'")
    source = models.resolve_model(model_spec)
    source_gguf = source.path if source.kind == "gguf" else None
    out = Path(out)
    report: dict[str, Any] = {"to": to}
    if adapter is not None:
        adapters.resolve_adapter_dir(adapter)  # fail early with a clear message
    base_name = name or (Path(adapter).resolve().name if adapter else None) \
        or _default_name(model_spec)
    if base_name == "adapter" and adapter is not None:
        base_name = Path(adapter).resolve().parent.name
    scratch = None
    try:
        if to == "hf":
            hf_dir = out
        else:
            scratch = Path(tempfile.mkdtemp(prefix=".tunelab-export-"))
            hf_dir = scratch / "merged"
        if adapter is not None and (streaming or (streaming is None
                                                  and wants_streaming(model_spec))):
            from tunelab.merge_streaming import merge_streaming

            merge_streaming(models.local_folder(source), adapter, hf_dir, progress=progress)
            report["merge"] = "streaming"  # no logit check: it needs the whole model
        elif adapter is not None:
            merged = merge_to_checkpoint(model_spec, adapter, hf_dir, allow_pickle=allow_pickle,
                                         device=device)
            report["merge"] = "in-memory"
            report["merge_max_abs_logit_diff"] = merged["max_abs_logit_diff"]
        elif to == "hf":
            model, tokenizer = models.load_model(model_spec, device=device, dtype="fp32",
                                                 allow_pickle=allow_pickle)
            with adapters.atomic_dir(hf_dir) as tmp:
                model.save_pretrained(str(tmp), safe_serialization=True)
                tokenizer.save_pretrained(str(tmp))
        else:
            hf_dir = Path(models.local_folder(source))  # already a safetensors folder
        if to == "hf":
            report["out"] = str(out)
            return report
        file = out if out.suffix.lower() == ".gguf" else out / f"{base_name}-{quant}.gguf"
        info = write_gguf(hf_dir, file, quant=quant, name=base_name, source_gguf=source_gguf,
                          licence=source.licence_hint, progress=progress)
        modelfile = file.parent / "Modelfile"
        modelfile.write_text(ollama_modelfile(file.name, info["chat_template"], info["eos"]),
                             encoding="utf-8")
        report.update(out=str(file), modelfile=str(modelfile), **{
            k: info[k] for k in ("quant", "tensors", "types", "bytes", "pre_tokenizer")})
        return report
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _default_name(spec: str) -> str:
    from tunelab.serve.engine import default_model_id

    return default_model_id(spec)


# ---------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="export a model (+ adapter merged in) as an HF folder or GGUF file",
        description="Export a model, with an adapter merged in first if given, as a plain "
                    "HF safetensors folder (--to hf) or a GGUF file for llama.cpp / Ollama "
                    "with a Modelfile beside it (--to gguf).",
        epilog="examples:\n"
               "  tunelab export --model smollm2-135m --adapter runs/a --to gguf --out out/\n"
               "  tunelab export --model smollm2-135m --adapter runs/a --to gguf --quant q8_0 "
               "--out out/a.gguf\n"
               "  tunelab export --model smollm2-135m --adapter runs/a --to hf --out out/a-hf",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="alias, folder, GGUF file or hub id (default: "
                   "the adapter's base as recorded in training, else smollm2-135m)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder or run directory")
    p.add_argument("--to", required=True, choices=("hf", "gguf"))
    p.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF weight type")
    p.add_argument("--out", required=True, help="folder (hf, gguf) or .gguf file")
    p.add_argument("--name", default=None, help="model name stored in the GGUF")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the adapter shard by shard (default: when the model in fp32 "
                        "would not fit in memory); the GGUF is always written tensor by tensor")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from tunelab.adapters import base_model_for

    report = export_model(base_model_for(args.model, args.adapter), to=args.to, out=args.out,
                          adapter=args.adapter,
                          quant=args.quant, allow_pickle=args.allow_pickle, device=args.device,
                          name=args.name, streaming=args.streaming, progress=True)
    if report.get("merge") == "streaming":
        print("merged adapter shard by shard (no logit check: that would need the whole "
              "model in memory)")
    if "merge_max_abs_logit_diff" in report:
        print(f"merged adapter (max |logit difference| against base+adapter: "
              f"{report['merge_max_abs_logit_diff']:.2e})")
    if args.to == "hf":
        print(f"HF checkpoint saved to {report['out']}")
    else:
        print(f"GGUF ({report['quant']}, {report['tensors']} tensors, "
              f"{report['bytes'] / 2**20:.1f} MiB) saved to {report['out']}")
        print(f"Ollama Modelfile: {report['modelfile']}  (ollama create NAME -f Modelfile)")
    return 0
