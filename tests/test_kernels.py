"""tunelab.kernels: the fused LoRA update and RMSNorm give peft's / transformers' outputs
and gradients (within 1e-5 relative), and hand back to them in every case they don't cover."""

from __future__ import annotations

import torch

from tunelab import data, models
from tunelab.adapters import attach_lora
from tunelab.kernels import LoraDelta, fuse_lora, fuse_rms_norm, unfuse
from tunelab.loss import TargetLoss


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.detach().abs().max()))


def _model(tiny_model_dir, dropout=0.0):
    torch.manual_seed(0)
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(model, r=4, alpha=8, dropout=dropout, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _batch(tokenizer):
    rows = [{"prompt": "word " * (2 + 3 * i), "completion": "yes " * (1 + i)} for i in range(4)]
    records = [data.Record(r, "mem", i + 1) for i, r in enumerate(rows)]
    return data.collate(data.encode_records(records, tokenizer)[0], tokenizer.pad_token_id)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss, _ = TargetLoss(model)(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def test_lora_delta_matches_autograd_of_the_plain_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, x, a, b: LoraDelta.apply(y, x, a, b, 0.7),
                                    (y, x, a, b))
    # in place into a non-leaf output (the base layer's), as in a model
    assert torch.autograd.gradcheck(lambda y, x, a, b: LoraDelta.apply(y * 1, x, a, b, 0.7),
                                    (y, x, a, b))
    torch.testing.assert_close(LoraDelta.apply(y, x, a, b, 0.7), y + (x @ a.T) @ b.T * 0.7)


def test_fused_model_gives_the_same_loss_and_gradients(tiny_model_dir, tiny_tokenizer):
    model = _model(tiny_model_dir)
    batch = _batch(tiny_tokenizer)
    loss, grads = _loss_and_grads(model, batch)
    assert fuse_lora(model) == 7 * model.config.num_hidden_layers  # every linear of each layer
    assert fuse_rms_norm(model) == 2 * model.config.num_hidden_layers + 1
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    _close(fused_loss, loss)
    assert grads.keys() == fused_grads.keys() and grads
    for name in grads:
        _close(fused_grads[name], grads[name])
    assert unfuse(model) == 9 * model.config.num_hidden_layers + 1
    _close(_loss_and_grads(model, batch)[0], loss)


def test_fused_lora_hands_back_to_peft_when_merged_disabled_or_dropout(tiny_model_dir,
                                                                      tiny_tokenizer):
    model = _model(tiny_model_dir)
    batch = _batch(tiny_tokenizer)
    fuse_lora(model)
    ids = batch["input_ids"]
    with torch.no_grad():
        on = model(input_ids=ids).logits
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
    assert not torch.allclose(on, off)
    _close(merged, on, rel=1e-4)
    dropped = _model(tiny_model_dir, dropout=0.5)
    fuse_lora(dropped)
    dropped.train()
    with torch.no_grad():
        a = dropped(input_ids=ids).logits
        b = dropped(input_ids=ids).logits
    assert not torch.allclose(a, b)  # peft's dropout path still runs


def test_fused_lora_hands_back_to_peft_for_a_lora_bias(tiny_model_dir, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base, _ = models.load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            lora_bias=True, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # weight and bias
    ids = _batch(tiny_tokenizer)["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        fuse_lora(model)
        fused = model(input_ids=ids).logits
    _close(fused, plain)


def test_fused_rms_norm_gives_the_weight_gradient_of_full_fine_tuning(tiny_model_dir,
                                                                      tiny_tokenizer):
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    batch = _batch(tiny_tokenizer)
    loss, grads = _loss_and_grads(model, batch)
    fuse_rms_norm(model)
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    _close(fused_loss, loss)
    norms = [n for n in grads if "norm" in n]
    assert norms and grads.keys() == fused_grads.keys()
    for name in grads:
        _close(fused_grads[name], grads[name])


def test_fused_qlora_layers_give_the_same_gradients(tiny_model_dir, tiny_tokenizer):
    model, _ = models.load_model(str(tiny_model_dir), device="cpu", bits=4)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _batch(tiny_tokenizer)
    loss, grads = _loss_and_grads(model, batch)
    assert fuse_lora(model) == 7 * model.config.num_hidden_layers
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    _close(fused_loss, loss)
    for name in grads:
        _close(fused_grads[name], grads[name])
