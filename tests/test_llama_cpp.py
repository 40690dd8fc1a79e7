"""tunelab's GGUF files run in llama.cpp itself (node-llama-cpp 3.21.1, its prebuilt CPU
binaries; ``scripts/setup.sh test`` installs it into ``.node/``): greedy generation there
gives the tokens ``tunelab generate`` gives, for the base model and a merged adapter.

Without the package the tests skip, unless ``TUNELAB_REQUIRE_LLAMA_CPP=1`` (``make test``
sets it), where they fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.serve.conftest import make_random_adapter
from tests.test_export import rounded_copy
from tunelab import adapters, models
from tunelab.export import export_model
from tunelab.generate import GenerationSettings, build_prompt, generate
from tunelab.merge import merge_to_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / ".node" / "node_modules" / "node-llama-cpp" / "dist" / "index.js"
N = 8  # tokens compared
PROMPT = "capital of France?"


def _require() -> None:
    if shutil.which("node") and LIB.is_file():
        return
    message = ("node-llama-cpp is not installed: run scripts/setup.sh test (it runs "
               "npm i -E node-llama-cpp@3.21.1 in .node/)")
    if os.environ.get("TUNELAB_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _llama_cpp(jobs: list[dict], tmp_path: Path) -> list[list[int]]:
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    done = subprocess.run(["node", str(ROOT / "tests" / "llama_cpp_greedy.mjs"),
                           str(tmp_path / "jobs.json")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NODE_LLAMA_CPP": str(LIB)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tunelab(model, tokenizer) -> tuple[list[int], str]:
    """The prompt's ids and ``tunelab generate``'s greedy text for it."""
    text = build_prompt(tokenizer, PROMPT)
    out = generate(model, tokenizer, [text], GenerationSettings(max_new_tokens=N))[0]
    return tokenizer(text, add_special_tokens=False)["input_ids"], out["text"]


def _greedy_ids(model, prompt: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=N, do_sample=False)
    return out[0, len(prompt):].tolist()


def _text(tokenizer, ids: list[int]) -> str:
    if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_llama_cpp_generates_what_tunelab_generates(tiny_model_dir, tmp_path):
    _require()
    adapter = make_random_adapter(tiny_model_dir, tmp_path / "lora", 5, "all-linear", 4,
                                  std=0.3)
    files = {(q, a): export_model(str(tiny_model_dir), to="gguf", quant=q,
                                  out=tmp_path / f"{q}-{a}", adapter=adapter if a else None)["out"]
             for q in ("f16", "q8_0") for a in (False, True)}
    base, tokenizer = models.load_model(str(tiny_model_dir), device="cpu")
    merge_to_checkpoint(str(tiny_model_dir), adapter, tmp_path / "merged")
    expected = {}
    for a in (False, True):
        model = base
        if a:
            model, _ = models.load_model(str(tiny_model_dir), device="cpu")
            model = adapters.load_adapter(model, adapter)
        expected[("f16", a)] = _tunelab(model, tokenizer)
    # q8_0: the reference is the merged model with its weights rounded as the file stores them
    rounded = rounded_copy(tmp_path / "merged", "q8_0")
    expected[("q8_0", True)] = _tunelab(rounded, tokenizer)
    jobs = [{"model": files[key], "prompt": expected[key][0], "n": N} for key in expected]
    got = dict(zip(expected, _llama_cpp(jobs, tmp_path), strict=True))
    for key, (prompt, text) in expected.items():
        assert text, key
        if key[0] == "f16":  # the same text as tunelab generate, all N tokens
            assert _text(tokenizer, got[key]) == text, (key, got[key], text)
        else:
            # q8_0: llama.cpp also quantizes the activations to 8 bits in its matmuls, which
            # on this random tiny model moves near-tied logits after a few tokens (measured:
            # the first 3 agree); the first 3 tokens must be tunelab's.
            assert got[key][:3] == _greedy_ids(rounded, prompt)[:3], (key, got[key], text)
    # the adapter changed what the model says (so the merged file carries it)
    assert got[("f16", True)] != got[("f16", False)]


def test_llama_cpp_runs_qwen2_and_4_bit_files(tiny_model_dir, tmp_path):
    """A Qwen2 file (biases, untied output, qwen2 pre-tokenizer) and q4_0 / q4_1 files run
    in llama.cpp with transformers' greedy tokens for exactly the weights the file holds."""
    _require()
    from tests.test_export_archs import build_qwen2

    qwen2 = build_qwen2(tmp_path / "qwen2")
    tokenizer = models.load_tokenizer(str(qwen2))
    prompt = tokenizer(build_prompt(tokenizer, PROMPT), add_special_tokens=False)["input_ids"]
    cases = {("qwen2", "f16"): qwen2, ("qwen2", "q4_0"): qwen2,
             ("llama", "q4_0"): tiny_model_dir, ("llama", "q4_1"): tiny_model_dir}
    files, expected = {}, {}
    for (arch, quant), folder in cases.items():
        files[arch, quant] = export_model(str(folder), to="gguf", quant=quant,
                                          out=tmp_path / f"{arch}-{quant}")["out"]
        expected[arch, quant] = _greedy_ids(rounded_copy(folder, quant), prompt)
    jobs = [{"model": files[key], "prompt": prompt, "n": N} for key in cases]
    got = dict(zip(cases, _llama_cpp(jobs, tmp_path), strict=True))
    assert got["qwen2", "f16"] == expected["qwen2", "f16"]  # all N tokens
    for key in cases:
        # 4-bit: llama.cpp also rounds activations to 8 bits in q4 matmuls, so near-tied
        # logits of a random tiny model may part after a few tokens (measured: all 8 agree)
        assert got[key][:3] == expected[key][:3], (key, got[key], expected[key])
