"""Catalogue numbers, name lookup, GPU lookup and config/Hub readers of ``tunelab plan``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.errors import ConfigError, ModelError
from tunelab.plan import catalog
from tunelab.plan.catalog import (
    CATALOG,
    arch_from_hf_config,
    find_arch,
    get_arch,
    get_gpu,
    resolve_model,
)

# Published parameter counts (model cards / papers), in billions, and our tolerance.
PUBLISHED_B = {
    "llama-2-7b": 6.74, "llama-2-13b": 13.02, "llama-2-70b": 68.98, "llama-3-8b": 8.03,
    "llama-3-70b": 70.55, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21, "mistral-7b": 7.24,
    "mixtral-8x7b": 46.7, "qwen2.5-0.5b": 0.49, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
    "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.8, "qwen2.5-72b": 72.7,
    "gemma-2-2b": 2.61, "gemma-2-9b": 9.24, "gemma-2-27b": 27.2, "gemma-3-1b": 1.0,
    "gemma-3-4b": 4.3, "gemma-3-12b": 12.2, "gemma-3-27b": 27.4, "phi-3-mini": 3.82,
    "phi-3-medium": 14.0, "llama-65b": 65.2, "gpt-3-175b": 175.0, "smollm2-135m": 0.135,
    "smollm2-360m": 0.362, "smollm2-1.7b": 1.71,
}


@pytest.mark.parametrize("key,billions", sorted(PUBLISHED_B.items()))
def test_catalogue_parameter_counts_match_published(key: str, billions: float) -> None:
    arch = get_arch(key)
    assert arch.total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_every_catalogue_entry_is_consistent() -> None:
    keys = [a.key for a in CATALOG]
    assert len(keys) == len(set(keys))
    for arch in CATALOG:
        assert arch.heads % arch.kv_heads == 0, arch.key
        assert arch.licence != "unknown", arch.key
        assert find_arch(arch.key) is arch
        for hf_id in arch.hf_ids:
            assert find_arch(hf_id) is arch, hf_id


def test_llama_2_7b_exact_numbers() -> None:
    a = get_arch("llama-2-7b")
    assert (a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab) == (
        4096, 32, 32, 32, 11008, 32000)
    assert not a.tied_embeddings
    assert a.total_params == 6_738_415_616  # the HF checkpoint's parameter count


def test_mixtral_holds_all_experts_but_runs_two() -> None:
    a = get_arch("mixtral-8x7b")
    assert a.experts == 8 and a.active_experts == 2
    active = a.active_linear_weight_params + a.embedding_params + a.lm_head_params
    assert active / 1e9 == pytest.approx(12.9, rel=0.01)  # "12.9B active parameters"
    assert a.total_params > 3.5 * active


@pytest.mark.parametrize("name,key", [
    ("llama-2-7b", "llama-2-7b"), ("LLaMA-2-7B", "llama-2-7b"), ("llama2-7b", "llama-2-7b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"), ("meta-llama/Llama-2-7b-chat-hf", "llama-2-7b"),
    ("Meta-Llama-3.1-8B-Instruct", "llama-3.1-8b"), ("mistral-7b", "mistral-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral-7b"), ("Mistral-7B-v0.3", "mistral-7b-v0.3"),
    ("qwen2.5-7b", "qwen2.5-7b"), ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("smollm2-135m", "smollm2-135m"), ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("google/gemma-2-9b-it", "gemma-2-9b"), ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
    ("GPT-3", "gpt-3-175b"), ("huggyllama/llama-65b", "llama-65b"),
])
def test_aliases_and_hf_ids(name: str, key: str) -> None:
    assert get_arch(name).key == key


def test_unknown_model_lists_what_is_accepted() -> None:
    with pytest.raises(ModelError) as err:
        get_arch("llama-9-900b")
    msg = str(err.value)
    assert "llama-9-900b" in msg and "local model folder" in msg and ".gguf" in msg
    assert "llama-2-7b" in msg and "smollm2-135m" in msg


@pytest.mark.parametrize("name,key", [("24GB", "24gb"), ("a100-80gb", "a100-80gb"),
                                      ("A100", "a100-80gb"), ("H100", "h100"), ("4090", "4090"),
                                      ("rtx4090", "4090"), ("48gb", "48gb"), ("t4", "t4")])
def test_gpu_lookup(name: str, key: str) -> None:
    assert get_gpu(name).key == key


def test_gpu_catalogue_figures() -> None:
    assert get_gpu("h100").peak_tflops == 989.0
    assert get_gpu("a100-80gb").memory_gib == 80
    assert get_gpu("t4").default_dtype == "fp16"  # no bf16 on Turing
    cpu = get_gpu("cpu")
    assert cpu.kind == "cpu" and cpu.memory_bytes > 0 and cpu.default_dtype == "fp32"


def test_unknown_gpu_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_gpu("5090")
    assert "5090" in str(err.value) and "a100-80gb" in str(err.value) and "cpu" in str(err.value)


LLAMA2_7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}


def test_arch_from_hf_config_matches_catalogue() -> None:
    a = arch_from_hf_config(LLAMA2_7B_CONFIG, name="llama2")
    assert a.total_params == get_arch("llama-2-7b").total_params
    assert a.context == 4096 and a.source == "config.json"


def test_arch_from_hf_config_variants() -> None:
    qwen = arch_from_hf_config({
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "vocab_size": 151936, "tie_word_embeddings": True, "max_position_embeddings": 32768})
    assert qwen.total_params == get_arch("qwen2.5-0.5b").total_params
    assert qwen.qkv_bias and qwen.tied_embeddings

    mixtral = arch_from_hf_config({
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2})
    assert mixtral.total_params == get_arch("mixtral-8x7b").total_params
    assert not mixtral.tied_embeddings  # transformers' default for mixtral

    # Multimodal configs nest the language model under text_config.
    gemma3 = arch_from_hf_config({
        "model_type": "gemma3", "text_config": {
            "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
            "num_attention_heads": 8, "num_hidden_layers": 34, "num_key_value_heads": 4,
            "head_dim": 256, "vocab_size": 262208}})
    text_only = get_arch("gemma-3-4b").total_params - get_arch("gemma-3-4b").extra_params
    assert gemma3.total_params == text_only
    assert gemma3.norms_per_layer == 4 and gemma3.qk_norm

    gpt2 = arch_from_hf_config({"model_type": "gpt2", "n_embd": 768, "n_layer": 12,
                                "n_head": 12, "vocab_size": 50257, "n_positions": 1024})
    assert gpt2.total_params == 124_439_808  # GPT-2 small
    assert gpt2.mlp == "plain" and gpt2.tied_embeddings


def test_arch_from_hf_config_missing_keys() -> None:
    with pytest.raises(ModelError) as err:
        arch_from_hf_config({"hidden_size": 64})
    assert "num_hidden_layers" in str(err.value)


def test_resolve_local_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B_CONFIG))
    resolved = resolve_model(str(tmp_path))
    assert resolved.source == "config.json" and resolved.path == tmp_path
    assert resolved.arch.total_params == get_arch("llama-2-7b").total_params


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_known_hub_id_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: object) -> Path:
        raise AssertionError("the catalogue should answer without the Hub")

    monkeypatch.setattr(catalog, "_hub_file", no_network)
    assert resolve_model("meta-llama/Llama-2-13b-hf").arch.key == "llama-2-13b"


def test_unknown_hub_id_offline_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_args: object) -> Path:
        raise ConnectionError("the Hugging Face Hub cannot be reached (offline?)")

    monkeypatch.setattr(catalog, "_hub_file", offline)
    with pytest.raises(ModelError) as err:
        resolve_model("someorg/some-model")
    msg = str(err.value)
    assert "someorg/some-model" in msg and "offline" in msg.lower()
    assert "local model folder" in msg and "llama-2-7b" in msg


def test_hub_id_online_reads_only_config(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    fetched: list[str] = []

    def fake_hub(repo_id: str, filename: str) -> Path:
        fetched.append(filename)
        path = tmp_path / filename
        path.write_text(json.dumps(LLAMA2_7B_CONFIG))
        return path

    monkeypatch.setattr(catalog, "_hub_file", fake_hub)
    resolved = resolve_model("someorg/my-llama")
    assert fetched == ["config.json"]
    assert resolved.source == "hub" and resolved.arch.name == "someorg/my-llama"
    assert resolved.arch.total_params == get_arch("llama-2-7b").total_params


def test_hub_offline_env_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not fetch config.json"):
        resolve_model("someorg/definitely-not-cached-model")
