"""``tunelab export``: merged HF folders, and GGUF files that transformers' GGUF loader reads
back with the logits of the merged model (tiny Llama; SmolLM2 in the slow test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.serve.conftest import make_random_adapter
from tunelab import adapters, models
from tunelab.cli import main
from tunelab.errors import ModelError
from tunelab.export import export_model, llama_permute, llama_unpermute, ollama_modelfile

IDS = torch.tensor([[5, 17, 33, 60, 120, 7, 9, 250, 3, 1, 2, 44, 101, 300]])


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_gguf(file, **kw):
    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                dtype=torch.float32, **kw)


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_random_adapter(tiny_model_dir, tmp_path_factory.mktemp("exp") / "lora", 5,
                               "all-linear", 4, std=0.3)


@pytest.fixture(scope="module")
def with_adapter(tiny_model_dir, adapter):
    """Base + adapter through peft: the model the exports must reproduce."""
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    return logits(adapters.load_adapter(model, adapter))


@pytest.fixture(scope="module")
def exports(tiny_model_dir, adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_model(str(tiny_model_dir), to="gguf", adapter=adapter, quant=q,
                            out=out / q) for q in ("f32", "f16", "q8_0")}


def rounded_copy(folder, quant):
    """The merged HF model with every 2-D weight rounded as the GGUF file stores it."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from tunelab.export import tensor_quant

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            w = p.detach().numpy()
            outer = {"model.embed_tokens.weight": "token_embd.weight",
                     "lm_head.weight": "output.weight"}.get(name, "")
            quant_here = tensor_quant(outer, quant)
            if quant_here == "f16":
                w = w.astype(np.float16).astype(np.float32)
            else:
                q = GGMLQuantizationType[quant_here.upper()]
                w = dequantize(quantize(w, q), q).reshape(w.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))
    return model


def test_permutation_is_llama_cpps_and_invertible():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads x head_dim 4
    p = llama_permute(w, 2, 2)
    # inside each head, HF's halves [0 1 | 2 3] become interleaved pairs [0 2 1 3]
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]
    np.testing.assert_array_equal(llama_unpermute(p, 2, 2), w)
    k = np.random.default_rng(0).normal(size=(16, 5)).astype(np.float32)
    np.testing.assert_array_equal(llama_unpermute(llama_permute(k, 8, 2), 8, 2), k)


def test_gguf_f32_round_trip_has_the_merged_models_logits(exports, with_adapter, tmp_path,
                                                           tiny_model_dir, adapter):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    from tunelab.merge import merge_to_checkpoint

    file = Path(exports["f32"]["out"])
    got = logits(load_gguf(file))
    torch.testing.assert_close(got, with_adapter, rtol=0, atol=1e-4)
    merge_to_checkpoint(str(tiny_model_dir), adapter, tmp_path / "merged")
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"))
    torch.testing.assert_close(got, merged, rtol=0, atol=1e-5)
    # q and k really are stored permuted (and v is not): the loader's inverse makes it right
    hf = load_file(tmp_path / "merged" / "model.safetensors")
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(file)).tensors}
    q = hf["model.layers.0.self_attn.q_proj.weight"].numpy()
    k = hf["model.layers.0.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], llama_permute(q, 4, 4))
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], llama_permute(k, 4, 2))
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], q)
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"],
                                  hf["model.layers.0.self_attn.v_proj.weight"].numpy())


@pytest.mark.parametrize("quant, loose", [("f16", 0.05), ("q8_0", 1.0)])
def test_gguf_f16_and_q8_0_equal_the_merged_model_with_the_same_rounding(
        exports, with_adapter, tmp_path, tiny_model_dir, adapter, quant, loose):
    from tunelab.merge import merge_to_checkpoint

    file = Path(exports[quant]["out"])
    got = logits(load_gguf(file))
    merge_to_checkpoint(str(tiny_model_dir), adapter, tmp_path / "merged")
    # exactly what the file holds, computed by transformers: only matmul rounding differs
    torch.testing.assert_close(got, logits(rounded_copy(tmp_path / "merged", quant)),
                               rtol=0, atol=1e-4)
    # and close to the unrounded model (the tiny model's weights are large: logits ~ 10)
    assert float((got - with_adapter).abs().max()) < loose
    assert exports[quant]["types"][quant] == 15 and exports[quant]["types"]["f32"] == 5
    sizes = {q: exports[q]["bytes"] for q in exports}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_gguf_metadata_and_tokenizer(exports, tiny_model_dir, tmp_path, monkeypatch):
    from gguf import GGUFReader

    file = Path(exports["f16"]["out"])
    fields = GGUFReader(str(file)).fields

    def value(key):
        return fields[key].contents()

    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert value("general.architecture") == "llama"
    assert value("general.file_type") == 1  # mostly f16
    assert value("llama.context_length") == 512
    assert value("llama.embedding_length") == 32
    assert value("llama.block_count") == 2
    assert value("llama.feed_forward_length") == 64
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 8
    assert value("llama.rope.freq_base") == pytest.approx(10000.0)
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(hf_tok) and tokens[2] == "<|im_end|>"
    assert value("tokenizer.ggml.token_type")[:3] == [3, 3, 3]  # control tokens
    assert len(value("tokenizer.ggml.merges")) > 100
    assert value("tokenizer.ggml.eos_token_id") == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert value("tokenizer.ggml.bos_token_id") == 1
    assert value("tokenizer.ggml.padding_token_id") == 2
    assert value("tokenizer.chat_template") == hf_tok.chat_template
    assert "output.weight" not in {t.name for t in GGUFReader(str(file)).tensors}  # tied

    # transformers rebuilds the same tokenizer from the file
    tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    for text in ["The capital of France is Paris.", '{"country": "Chad"}',
                 "<|im_start|>user\nhello<|im_end|>\n", "  spaces,\ttabs\nand ü"]:
        assert tok(text).input_ids == hf_tok(text).input_ids, text
    assert tok.chat_template == hf_tok.chat_template
    # and tunelab loads the file as a model spec, chat-ready (eos = end of turn)
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    model, tl_tok = models.load_model(str(file), device="cpu")
    assert tl_tok.eos_token == "<|im_end|>"


def test_modelfile_for_chatml(exports):
    text = Path(exports["q8_0"]["modelfile"]).read_text()
    name = Path(exports["q8_0"]["out"]).name
    assert text.startswith(f"FROM ./{name}\n")
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"\nPARAMETER stop "<|im_start|>"')
    assert "SYSTEM" not in text  # the tiny template has no default system prompt


def test_modelfile_keeps_a_default_system_prompt():
    smol_like = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != "
                 "'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named "
                 "SmolLM<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    text = ollama_modelfile("m.gguf", smol_like, "<|im_end|>")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM"""' in text
    other = ollama_modelfile("m.gguf", "{{ bos_token }}[INST] ...", "</s>")
    assert "TEMPLATE" not in other and 'PARAMETER stop "</s>"' in other


def test_cli_export_hf_and_gguf(tiny_model_dir, adapter, with_adapter, tmp_path, capsys):
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                 "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), with_adapter, rtol=0, atol=1e-4)
    assert "HF checkpoint saved to" in capsys.readouterr().out

    out = tmp_path / "g" / "mine.gguf"
    assert main(["export", "--model", str(tiny_model_dir), "--adapter", str(adapter),
                 "--to", "gguf", "--quant", "q8_0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"saved to {out}" in printed and "Modelfile" in printed
    assert out.is_file() and (out.parent / "Modelfile").is_file()
    # no adapter: the base alone
    assert main(["export", "--model", str(tiny_model_dir), "--to", "gguf", "--quant", "f32",
                 "--out", str(tmp_path / "base")]) == 0
    base_file = next((tmp_path / "base").glob("*.gguf"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.testing.assert_close(logits(load_gguf(base_file)), logits(plain), rtol=0, atol=1e-5)


def test_non_llama_models_are_refused(tmp_path, tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path / "gpt2"
    tok = build_tiny_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2)
                    ).save_pretrained(folder)
    with pytest.raises(ModelError, match="Llama-architecture.*Qwen2 and Gemma 3.*'gpt2'"):
        export_model(str(folder), to="gguf", out=tmp_path / "x")


@pytest.mark.slow
def test_smollm2_gguf_f16_round_trip(tmp_path):
    """The real SmolLM2 (9 query / 3 key-value heads): export f16 and read it back."""
    from tunelab.models import load_model

    report = export_model("smollm2-135m", to="gguf", quant="f16", out=tmp_path)
    file = Path(report["out"])
    assert report["pre_tokenizer"] == "smollm"
    reference, tok = load_model("smollm2-135m", device="cpu")
    ids = tok("The capital of France is Paris. Fine-tuning adapts a model to a task.",
              return_tensors="pt").input_ids
    want = logits(reference, ids)
    del reference
    got = logits(load_gguf(file), ids)
    assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max())  # ~1e-3 measured
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    back = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    text = "Hello, world! 12345 <|im_start|>user\nJSON {\"a\": 1}<|im_end|>"
    assert back(text).input_ids == tok(text).input_ids
    assert back.chat_template == tok.chat_template


def test_export_with_streaming_merge_writes_the_merged_shards(tiny_model_dir, adapter,
                                                              with_adapter, tmp_path):
    from tunelab.merge_streaming import merge_streaming

    report = export_model(str(tiny_model_dir), to="gguf", adapter=adapter, quant="f32",
                          out=tmp_path / "g", streaming=True)
    assert report["merge"] == "streaming" and "merge_max_abs_logit_diff" not in report
    merged = merge_streaming(tiny_model_dir, adapter, tmp_path / "merged", progress=False)
    expected = logits(AutoModelForCausalLM.from_pretrained(merged["out"],
                                                           dtype=torch.float32))
    got = logits(load_gguf(Path(report["out"])))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the bf16 shards round the merged weights; the adapter's effect is kept
    assert (got - with_adapter).abs().max() < 0.1 * (with_adapter - logits(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max()


GGUF_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
from tunelab.export import write_gguf

def rss(field):
    line = next(x for x in Path('/proc/self/status').read_text().splitlines()
                if x.startswith(field))
    return int(line.split()[1]) * 1024

write_gguf(sys.argv[1], Path(sys.argv[2]) / 'warm.gguf', quant='f16')  # imports, caches
Path('/proc/self/clear_refs').write_text('5')  # reset VmHWM to the current RSS
before = rss('VmRSS:')
info = write_gguf(sys.argv[1], Path(sys.argv[2]) / 'model.gguf', quant='q8_0')
print(json.dumps({"before": before, "peak": rss('VmHWM:'), "bytes": info["bytes"]}))
"""


@pytest.mark.slow
def test_gguf_is_written_one_tensor_at_a_time(tiny_model_dir, tmp_path):
    """The writer's peak grows by about one tensor, not by the model: 134M weights are 537 MB
    in fp32, the largest tensor 17 MB (measured: +85 MiB; writing from the whole state dict,
    as before, +698 MiB)."""
    import json
    import os
    import subprocess
    import sys

    from tunelab.plan.catalog import Arch
    from tunelab.random_checkpoint import build_random_checkpoint

    shape = Arch("test 134M", hidden=1024, layers=8, heads=16, kv_heads=16, intermediate=4096,
                 vocab=400, key="test-134m")
    model = build_random_checkpoint(tmp_path / "model", shape,
                                    tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
                                    shard_bytes=100 * 2**20)
    fp32_bytes = 4 * shape.total_params
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", GGUF_PEAK_SCRIPT, str(model), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["bytes"] > fp32_bytes / 4  # q8_0 of every weight was written
    assert got["peak"] - got["before"] < fp32_bytes / 4, got  # holding the model: > 1x
