"""Export a model (optionally with an adapter merged in) as an HF folder or a GGUF file.

``--to hf`` writes a plain safetensors checkpoint (:mod:`tunelab.merge` when an adapter is
given). ``--to gguf`` writes one GGUF file for llama.cpp / Ollama with the ``gguf`` package,
plus an Ollama ``Modelfile`` beside it:

* architecture ``llama`` (Llama, SmolLM, TinyLlama, Mistral-style models without sliding
  windows): tensor names from gguf's name map (``token_embd``, ``blk.N.attn_q``, ...) and the
  ``llama.*`` hyperparameters (context length, widths, head counts, rope base, RMS eps);
* **q/k permutation**: HF stores each head's rotary pairs as two halves, llama.cpp
  interleaves them, so ``q_proj``/``k_proj`` rows are reordered as llama.cpp's converter does
  (:func:`llama_permute`); readers (llama.cpp, transformers' GGUF loader) undo it;
* weights in ``f32``, ``f16`` or ``q8_0`` (blocks of 32 weights, one fp16 scale); norms and
  other 1-D tensors stay f32, as in llama.cpp;
* the tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``) with tokens, token types
  and merges from ``tokenizer.json``, bos/eos/pad/unk ids and the chat template.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError, TunelabError

log = logging.getLogger(__name__)

QUANTS = ("f32", "f16", "q8_0")


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
    log.warning("unknown pre-tokenizer %s: writing 'default'; llama.cpp may split text "
                "differently from the HF tokenizer", json.dumps(pre)[:200])
    return "default"


def tokenizer_fields(folder: Path, tokenizer: Any, vocab_size: int,
                     source_gguf: str | None = None) -> dict[str, Any]:
    """What GGUF stores about a byte-level BPE tokenizer, read from ``tokenizer.json``."""
    from gguf import TokenType

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise ModelError(f"{folder} has no tokenizer.json: GGUF export needs a fast "
                         "(tokenizers) tokenizer")
    data = json.loads(file.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ModelError(f"GGUF export supports byte-level BPE tokenizers; this one is "
                         f"{model.get('type')}")
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
    return {"tokens": tokens, "token_types": token_types, "merges": merges, "ids": ids,
            "pre": _pre_tokenizer_name(data, source_gguf),
            "add_bos": bool(probe and ids["bos"] is not None and probe[0] == ids["bos"]),
            "chat_template": getattr(tokenizer, "chat_template", None)}


# --------------------------------------------------------------------------- GGUF


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise ModelError(f"GGUF export does not handle rope scaling '{kind}' yet")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _load_state(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder} has no *.safetensors weights")
    state: dict[str, np.ndarray] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (TypeError, ValueError):  # bf16 has no numpy dtype: go through torch
            from safetensors.torch import load_file as load_torch

            state.update({k: v.float().numpy() for k, v in load_torch(str(file)).items()})
    return state


def write_gguf(folder: str | Path, out_file: str | Path, *, quant: str = "f16",
               name: str | None = None, source_gguf: str | None = None,
               licence: str | None = None) -> dict[str, Any]:
    """Write the Llama-architecture HF checkpoint in ``folder`` as one GGUF file."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    from tunelab.models import fix_special_tokens

    if quant not in QUANTS:
        raise TunelabError(f"unknown quant '{quant}'; choose one of {', '.join(QUANTS)}")
    folder, out_file = Path(folder), Path(out_file)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in ("llama", "mistral") or getattr(config, "sliding_window", None):
        raise ModelError(f"GGUF export supports Llama-architecture models; this one is "
                         f"'{config.model_type}'")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fix_special_tokens(tokenizer)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or \
        config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = _load_state(folder)
    tok = tokenizer_fields(folder, tokenizer, config.vocab_size, source_gguf)

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".tmp-{out_file.name}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type("model")
    writer.add_name(name or folder.name)
    if licence:
        writer.add_license(licence)
    writer.add_file_type(int(ftype))
    if quant == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(len(tok["tokens"]))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))

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

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    counts = {"f32": 0, quant: 0}
    written = 0
    for key in sorted(state, key=_tensor_order):
        if key == "lm_head.weight" and tied:
            continue
        if key.endswith(("rotary_emb.inv_freq", ".masked_bias")):
            continue
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"no GGUF name for tensor '{key}': not a plain Llama checkpoint")
        data = state[key].astype(np.float32)
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            data = llama_permute(data, n_head, n_head)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            data = llama_permute(data, n_head, n_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
            counts["f32"] += 1
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
            counts[quant] += 1
        elif data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            counts[quant] += 1
        else:  # rows not a multiple of the 32-weight block: keep this one in f16
            writer.add_tensor(gguf_name, data.astype(np.float16))
            counts["f16"] = counts.get("f16", 0) + 1
        written += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(out_file)
    return {"file": str(out_file), "quant": quant, "tensors": written, "types": counts,
            "bytes": out_file.stat().st_size, "pre_tokenizer": tok["pre"],
            "chat_template": tok["chat_template"], "eos": tok["tokens"][tok["ids"]["eos"]]
            if tok["ids"]["eos"] is not None else None}


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
                 name: str | None = None) -> dict[str, Any]:
    """Export ``model_spec`` (+ ``adapter`` merged in) as an HF folder or a GGUF file.

    For GGUF, ``out`` is a ``.gguf`` file or a folder (the file is then named after the model
    and quant); the Modelfile goes beside the file.
    """
    from tunelab import adapters, models
    from tunelab.merge import merge_to_checkpoint

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
        if adapter is not None:
            merged = merge_to_checkpoint(model_spec, adapter, hf_dir, allow_pickle=allow_pickle,
                                         device=device)
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
                          licence=source.licence_hint)
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
    p.add_argument("--model", default="smollm2-135m", help="alias, folder, GGUF file or hub id")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder or run directory")
    p.add_argument("--to", required=True, choices=("hf", "gguf"))
    p.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF weight type")
    p.add_argument("--out", required=True, help="folder (hf, gguf) or .gguf file")
    p.add_argument("--name", default=None, help="model name stored in the GGUF")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-pickle", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    report = export_model(args.model, to=args.to, out=args.out, adapter=args.adapter,
                          quant=args.quant, allow_pickle=args.allow_pickle, device=args.device,
                          name=args.name)
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
