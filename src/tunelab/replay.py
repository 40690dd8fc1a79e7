"""Replay: keep general rows in the training mix so fine-tuning forgets less.

* ``replay: self``: before training, the base model (the loaded model with its adapters
  switched off, so exactly the base the run starts from, quantized or not) answers the
  general prompts shipped in ``tunelab/assets/general_prompts.jsonl`` (facts, language,
  arithmetic, reasoning, code reading; none about the quickstart's countries) once, greedily,
  in left-padded batches. Its answers become chat records ``[user: prompt, assistant:
  answer]``: training on them pulls the model back to what the base itself said.
* ``replay: FILE``: the user's own general data, in any format tunelab reads.

Either way the rows form one more source of the run's data mixture
(:meth:`tunelab.data.mixture.Mixture.add_replay`), ``replay_ratio`` of each epoch's rows;
it is named ``replay`` in ``summary.json``'s sources and ``val_loss/replay``.

**The cache.** The answers are written to ``$TUNELAB_CACHE/replay/<key>.jsonl`` (default
``~/.cache/tunelab``), where ``key`` hashes (a) the model's identity: the resolved source
(path or hub id), the size and modification time of every weight and config file of a folder
(hashing gigabytes each run would cost more than the generation), the chat template, and the
loaded form (base bits, 4-bit code, double quantization, dtype); (b) the prompt set (the
hash of the prompts used, so ``replay_prompts`` and an edited asset give new keys); (c) the
generation settings (:data:`MAX_NEW_TOKENS`, greedy). A second run with the same key reads
the file and generates nothing. The file is written to a temporary name and renamed, so an
interrupted generation never leaves a half file a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tunelab import models

log = logging.getLogger(__name__)

PROMPTS_ASSET = "general_prompts.jsonl"
MAX_NEW_TOKENS = 96  # short answers: the cost of generation grows with it
BATCH_SIZE = 16  # prompts per generate call (left-padded)
FORMAT_VERSION = 1  # bump when the record layout or answer clean-up changes
# end of a sentence: an answer cut at MAX_NEW_TOKENS is trimmed back to the last one
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


@dataclass(frozen=True)
class ReplayPlan:
    """What a run replays: ``path`` (an existing file, or the cache file to be written by
    :func:`answer_prompts`), its format, and the prompts when the base must answer them."""

    path: str
    fmt: str
    prompts: tuple[str, ...] = ()  # replay: self only

    @property
    def pending(self) -> bool:
        """The base model must generate the answers first (a cache miss)."""
        return bool(self.prompts) and not Path(self.path).is_file()


def load_prompts(limit: int = 0) -> list[str]:
    """The shipped general prompts, in file order; the first ``limit`` when it is > 0."""
    text = (resources.files("tunelab") / "assets" / PROMPTS_ASSET).read_text(encoding="utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def _file_stamps(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of a model folder's weight, config and tokenizer files."""
    keep = (".safetensors", ".bin", ".json", ".model", ".gguf", ".txt")
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in keep]


def model_identity(cfg: Any, tokenizer: Any) -> dict[str, Any]:
    """What makes two runs' base models the same for replay (module docstring, (a))."""
    source = models.resolve_model(cfg.model)
    path = Path(source.path)
    if source.kind == "folder":
        files: Any = _file_stamps(path)
    elif source.kind == "gguf":
        st = path.stat()
        files = [(path.name, st.st_size, st.st_mtime_ns)]
    else:  # a hub id: the id is all we know without loading it
        files = []
    return {"source": source.path, "kind": source.kind, "files": files,
            "chat_template": hashlib.sha256(
                str(getattr(tokenizer, "chat_template", "") or "").encode()).hexdigest(),
            "base_bits": cfg.base_bits, "quant_type": cfg.quant_type,
            "double_quant": cfg.double_quant, "dtype": cfg.dtype}


def cache_key(identity: dict[str, Any], prompts: list[str] | tuple[str, ...]) -> str:
    """Hash of (model identity, prompt set, generation settings)."""
    prompt_hash = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()
    raw = json.dumps({"model": identity, "prompts": prompt_hash,
                      "generation": {"max_new_tokens": MAX_NEW_TOKENS, "greedy": True},
                      "version": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def plan(cfg: Any, tokenizer: Any) -> ReplayPlan | None:
    """The replay of ``cfg`` (None without replay or at ``replay_ratio: 0``)."""
    if not cfg.replay or not cfg.replay_ratio:
        return None
    if cfg.replay != "self":
        return ReplayPlan(cfg.replay, "auto")
    prompts = load_prompts(cfg.replay_prompts)
    key = cache_key(model_identity(cfg, tokenizer), prompts)
    stem = Path(models.resolve_model(cfg.model).path).stem or "model"
    path = models.cache_dir() / "replay" / f"{stem}-{key}.jsonl"
    return ReplayPlan(str(path), "chat", tuple(prompts))


def clean_answer(text: str, finish_reason: str) -> str:
    """The answer as trained on: stripped; one cut at the token limit is trimmed back to
    its last sentence end (a reply that stops mid-word would teach the model to do so)."""
    text = text.strip()
    if finish_reason == "length":
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends:
            text = text[:ends[-1]].strip()
    return text


def generate_answers(model: torch.nn.Module, tokenizer: Any, prompts: list[str] | tuple[str, ...]
                     ) -> list[dict[str, Any]]:
    """The base model's greedy answers as chat records (adapters off where it has them);
    prompts it answers with nothing are left out."""
    from tunelab.generate import GenerationSettings, build_prompt, generate

    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    disable = getattr(model, "disable_adapter", None)
    records = []
    with disable() if disable is not None else nullcontext():
        for start in range(0, len(prompts), BATCH_SIZE):
            chunk = list(prompts[start:start + BATCH_SIZE])
            rendered = [build_prompt(tokenizer, p) for p in chunk]
            for prompt, out in zip(chunk, generate(model, tokenizer, rendered, settings),
                                   strict=True):
                answer = clean_answer(out["text"], out["finish_reason"])
                if answer:
                    records.append({"messages": [{"role": "user", "content": prompt},
                                                 {"role": "assistant", "content": answer}]})
    return records


def answer_prompts(replay: ReplayPlan, model: torch.nn.Module, tokenizer: Any) -> Path:
    """Generate and cache ``replay``'s answers (once: a cached file is returned as is)."""
    path = Path(replay.path)
    if path.is_file():
        return path
    log.info("replay: the base model answers %d general prompts (once; cached at %s)",
             len(replay.prompts), path)
    records = generate_answers(model, tokenizer, replay.prompts)
    if not records:
        from tunelab.errors import DataError

        raise DataError("replay: self: the base model answered none of the general prompts "
                        "(every answer was empty); give replay: FILE with general data instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jsonl", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    os.replace(tmp, path)
    log.info("replay: %d of %d prompts answered", len(records), len(replay.prompts))
    return path
