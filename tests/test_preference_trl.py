"""tunelab's DPO and ORPO against TRL's own code, on the same batch of the tiny model (fp32).

TRL builds and tokenizes the batch; the test turns TRL's rows into tunelab's pair rows (the
same tokens), so what is compared is the objective and the shared-prompt layout, not two
tokenizations. Losses, gradients of every LoRA parameter and the reward metrics must agree
within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from tunelab import models  # noqa: E402
from tunelab.adapters import attach_lora  # noqa: E402
from tunelab.objectives import DPOObjective, ORPOObjective  # noqa: E402
from tunelab.objectives.pairs import collate_pairs  # noqa: E402
from tunelab.packing import use_packed_attention  # noqa: E402
from tunelab.preference import PreferenceExample  # noqa: E402

RTOL = 1e-5


def lora_model(folder, packed: bool):
    torch.manual_seed(0)
    model, _ = models.load_model(str(folder), device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():  # B starts at zero: make the adapter matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    if packed:
        use_packed_attention(model)
    return model


def base_model(folder):
    return models.load_model(str(folder), device="cpu")[0]


def rows(n: int = 4) -> list[dict]:
    ask = "question {}: capital of France?"
    return [{"prompt": [{"role": "user", "content": ask.format(i) * (1 + i % 2)}],
             "chosen": [{"role": "assistant", "content": "Paris " * (i + 1)}],
             "rejected": [{"role": "assistant", "content": "Tallinn is the capital"}]}
            for i in range(n)]


def pairs_from_rows(chosen_ids, chosen_mask, rejected_ids, rejected_mask
                    ) -> list[PreferenceExample]:
    """TRL's chosen and rejected rows (answer positions marked) as tunelab pairs."""
    out = []
    for i in range(chosen_ids.shape[0]):
        sides = []
        for rows_, masks in ((chosen_ids, chosen_mask), (rejected_ids, rejected_mask)):
            ids, mask = rows_[i].tolist(), masks[i].tolist()
            start = mask.index(1)
            end = len(mask) - mask[::-1].index(1)
            sides.append((ids[:start], ids[start:end]))
        (prompt, chosen), (prompt_r, rejected) = sides
        assert prompt == prompt_r
        out.append(PreferenceExample(prompt, chosen, list(chosen), rejected, list(rejected)))
    return out


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        scale = theirs[name].abs().max().clamp(min=1e-12)
        assert (ours[name] - theirs[name]).abs().max() / scale < RTOL, name


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                                  ("sigmoid", 0.2)])
def test_dpo_matches_trl(tiny_model_dir, tiny_tokenizer, tmp_path, loss_type, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # TRL 1.16 keeps label smoothing of the sigmoid loss only in its "aot" loss, which on a
    # single pair (sorting one element is the identity) is exactly conservative DPO.
    n = 1 if smoothing else 4
    trl_loss_type = "aot" if smoothing else loss_type
    beta = 0.3
    theirs_model = lora_model(tiny_model_dir, packed=False)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[trl_loss_type],
                     label_smoothing=smoothing, report_to="none", per_device_train_batch_size=n,
                     use_cpu=True, bf16=False, max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=theirs_model, ref_model=base_model(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(rows(n)), processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer._compute_loss(trainer.model, batch, False)
    trl_loss.backward()
    theirs = lora_grads(theirs_model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours_model = lora_model(tiny_model_dir, packed=True)
    objective = DPOObjective(ours_model, beta=beta, loss_type=loss_type, label_smoothing=smoothing)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    pairs = pairs_from_rows(ids[:n], mask[:n], ids[n:], mask[n:])
    pair_batch = collate_pairs(pairs)
    parts, metrics = objective(**pair_batch)
    loss = parts["pairs"] / objective.counts(pair_batch)["pairs"]
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= RTOL * abs(trl_loss.item())
    assert trl_loss.item() > 1e-3  # the reference differs from the policy: a real loss
    assert_close_grads(lora_grads(ours_model), theirs)
    for ours_key, trl_key in (("rewards/chosen", "rewards/chosen"),
                              ("rewards/rejected", "rewards/rejected"),
                              ("rewards/margins", "rewards/margins"),
                              ("rewards/accuracy", "rewards/accuracies")):
        assert float(metrics[ours_key]) / n == pytest.approx(trl_metrics[trl_key], rel=1e-4,
                                                             abs=1e-6)


def test_orpo_matches_trl(tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's ORPO takes its NLL over prompt and answer; tunelab's over the answer tokens only
    (as SFT trains). So the odds-ratio term is compared with TRL's ``odds_ratio_loss`` and the
    NLL with TRL's ``get_batch_logps`` on the answer labels, each with its gradients."""
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    n, beta = 4, 0.25
    theirs_model = lora_model(tiny_model_dir, packed=False)
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to="none",
                      per_device_train_batch_size=n, use_cpu=True, bf16=False,
                      dataloader_num_workers=0, remove_unused_columns=False)
    trainer = ORPOTrainer(model=theirs_model, args=args, train_dataset=Dataset.from_list(rows(n)),
                          processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    chosen_logps, rejected_logps, chosen_logits, _, _ = trainer.concatenated_forward(
        theirs_model, batch)
    ratio_losses, *_ = trainer.odds_ratio_loss(chosen_logps, rejected_logps)
    labels = batch["chosen_labels"]
    chosen_sum = trainer.get_batch_logps(
        torch.cat([chosen_logits, chosen_logits[:, -1:]], dim=1), labels)
    nll = -chosen_sum.sum() / (labels[:, 1:] != -100).sum()
    trl_loss = nll - ratio_losses.mean()
    trl_loss.backward()
    theirs = lora_grads(theirs_model)

    ours_model = lora_model(tiny_model_dir, packed=True)
    objective = ORPOObjective(ours_model, beta=beta)
    pairs = pairs_from_rows(batch["chosen_input_ids"], (batch["chosen_labels"] != -100).long(),
                            batch["rejected_input_ids"],
                            (batch["rejected_labels"] != -100).long())
    pair_batch = collate_pairs(pairs)
    parts, metrics = objective(**pair_batch)
    counts = objective.counts(pair_batch)
    loss = sum(parts[u] / counts[u] for u in parts)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= RTOL * abs(trl_loss.item())
    assert_close_grads(lora_grads(ours_model), theirs)
    assert float(metrics["rewards/chosen"]) / n == pytest.approx(
        float(beta * chosen_logps.mean()), rel=1e-5)
