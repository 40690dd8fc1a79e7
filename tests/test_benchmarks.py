"""benchmarks/: the FLOPs the throughput benchmark divides by are the matmuls a step does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import packed_lora_model, varied_examples
from tunelab import data
from tunelab.loss import ChunkedCrossEntropy, TargetLoss
from tunelab.packing import collate_packed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from train_throughput import step_flops  # noqa: E402


def test_step_flops_equal_the_matmul_flops_of_a_packed_lora_step(tiny_model_dir, tiny_tokenizer,
                                                                  monkeypatch):
    # the oneDNN output layer is an op torch's FLOP counter does not know; the plain matmul is
    monkeypatch.setattr(ChunkedCrossEntropy, "ONEDNN", False)
    model = packed_lora_model(tiny_model_dir)
    examples = varied_examples(tiny_tokenizer)
    batch = collate_packed(examples)
    targets = [e.n_targets for e in examples]
    assert int((batch["labels"] != data.IGNORE_INDEX).sum()) == sum(targets)

    with FlopCounterMode(display=False) as counter:
        loss, _ = TargetLoss(model)(**batch)
        loss.backward()

    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    # CPU flash attention is not in torch's FLOP registry, so the counter saw matmuls only
    expected = step_flops(config, [len(e.input_ids) for e in examples], targets, lora_r=4,
                          attention=False)
    assert counter.get_total_flops() == expected
