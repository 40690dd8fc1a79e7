

def test_a_4bit_adapter_on_a_4bit_base_is_not_warned_about(tiny_model_dir, tmp_path, caplog):
    import json
    import logging

    from tests.serve.conftest import make_random_adapter
    from tunelab.serve.engine import Engine

    adapter = make_random_adapter(tiny_model_dir, tmp_path / "q", 1, "all-linear", 4)
    (adapter / "tunelab.json").write_text(json.dumps({"base_bits": 4}))
    with caplog.at_level(logging.WARNING, logger="tunelab.serve.engine"):
        Engine.load(str(tiny_model_dir), [("q", str(adapter))], device="cpu", bits=4)
    assert "changes its outputs" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="tunelab.serve.engine"):
        Engine.load(str(tiny_model_dir), [("q", str(adapter))], device="cpu", bits=16)
    assert "trained on a 4-bit base; serving it on this 16-bit base" in caplog.text
