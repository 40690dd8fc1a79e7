"""Speed costs no correctness: packed vs padded batches, target-only vs full logits,
length-grouped batching. Losses and gradients agree within 1e-5 relative."""

from __future__ import annotations

import pytest
import torch

from tunelab import data, models
from tunelab.loss import TargetLoss, full_logits_loss
from tunelab.packing import BOUNDS_KEY, collate_packed, use_packed_attention
from tunelab.train import train

from .conftest import packed_lora_model, varied_examples, write_jsonl


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(b.detach().abs().max())
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def _per_example_losses(model, batch, bounds=None):
    """Summed loss of each example, from full logits (reference definition)."""
    targets = batch["labels"][:, 1:]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"},
                   use_cache=False).logits.float()[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0),
                                            reduction="none") * (targets != -100)
    if bounds is None:
        return nll.sum(dim=1)
    return torch.stack([nll[0, max(0, s - 1):e - 1].sum()
                        for s, e in zip(bounds[:-1], bounds[1:], strict=True)])


def test_packed_batch_gives_the_padded_per_example_losses_and_gradients(tiny_model_dir,
                                                                          tiny_tokenizer):
    model = packed_lora_model(tiny_model_dir)
    examples = varied_examples(tiny_tokenizer)
    padded = data.collate(examples, tiny_tokenizer.pad_token_id)
    packed = collate_packed(examples)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # padding is gone

    with torch.no_grad():
        alone = _per_example_losses(model, padded)
        together = _per_example_losses(model, packed, packed[BOUNDS_KEY].tolist())
    assert (alone > 0).all()
    _assert_close_rel(together, alone)

    loss_fn = TargetLoss(model)
    model.zero_grad()
    loss_pad, n_pad = loss_fn(**padded)
    loss_pad.backward()
    g_pad = _grads(model)
    model.zero_grad()
    loss_packed, n_packed = loss_fn(**packed)
    loss_packed.backward()
    g_packed = _grads(model)
    assert int(n_pad) == int(n_packed) == sum(e.n_targets for e in examples)
    _assert_close_rel(loss_packed, loss_pad)
    assert g_pad.keys() == g_packed.keys() and len(g_pad) > 0
    for name in g_pad:
        _assert_close_rel(g_packed[name], g_pad[name])


def test_packed_examples_do_not_see_each_other(tiny_model_dir, tiny_tokenizer):
    model = packed_lora_model(tiny_model_dir)
    first, second, third = varied_examples(tiny_tokenizer, 3)
    changed = data.Example([(t * 7 + 3) % 50 + 5 for t in second.input_ids], second.labels)
    with torch.no_grad():
        a = collate_packed([first, second, third])
        b = collate_packed([first, changed, third])
        la = model(**{k: v for k, v in a.items() if k != "labels"}).logits
        lb = model(**{k: v for k, v in b.items() if k != "labels"}).logits
    n1, n2 = len(first.input_ids), len(second.input_ids)
    torch.testing.assert_close(la[0, :n1], lb[0, :n1], rtol=0, atol=1e-6)  # before: same
    torch.testing.assert_close(la[0, n1 + n2:], lb[0, n1 + n2:], rtol=0, atol=1e-6)  # after
    assert not torch.allclose(la[0, n1:n1 + n2], lb[0, n1:n1 + n2])


def test_no_target_crosses_an_example_boundary(tiny_tokenizer):
    examples = varied_examples(tiny_tokenizer, 3)
    packed = collate_packed(examples)
    bounds = packed[BOUNDS_KEY].tolist()
    for start in bounds[:-1]:
        assert packed["labels"][0, start] == data.IGNORE_INDEX
        assert packed["position_ids"][0, start] == 0
    assert data.batch_tokens(packed) == bounds[-1]


def test_target_only_logits_give_the_full_logits_gradients(tiny_model_dir, tiny_tokenizer):
    model = packed_lora_model(tiny_model_dir)
    batch = data.collate(varied_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model.zero_grad()
    fast, n = TargetLoss(model)(**batch)
    fast.backward()
    g_fast = _grads(model)
    model.zero_grad()
    slow, n_slow = full_logits_loss(model, batch)
    slow.backward()
    g_slow = _grads(model)
    assert int(n) == int(n_slow) > 0
    _assert_close_rel(fast, slow)
    for name in g_slow:
        _assert_close_rel(g_fast[name], g_slow[name])


def test_packed_attention_without_bounds_is_plain_sdpa(tiny_model_dir, tiny_tokenizer):
    plain, _ = models.load_model(str(tiny_model_dir), device="cpu")
    switched, _ = models.load_model(str(tiny_model_dir), device="cpu")
    use_packed_attention(switched)
    batch = data.collate(varied_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        a = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = switched(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_length_grouped_schedule_sees_every_example_once_per_epoch():
    lengths = [(i * 37) % 101 for i in range(50)]
    s = data.BatchSchedule(50, 4, seed=3, lengths=lengths)
    epoch = [i for k in range(s.batches_per_epoch) for i in s.indices(k)]
    assert sorted(epoch) == list(range(50))
    # batches are of similar length: much less padding than the random order
    plain = data.BatchSchedule(50, 4, seed=3)

    def padding(schedule):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in (schedule.indices(k) for k in range(schedule.batches_per_epoch)))

    assert padding(s) < padding(plain) / 3
    assert s.indices(7) == data.BatchSchedule(50, 4, seed=3, lengths=lengths).indices(7)
    assert s.indices(13) != s.indices(13 + s.batches_per_epoch)  # a new order each epoch
    assert len(s.indices(s.batches_per_epoch - 1)) == 2  # the short batch stays last


def test_training_packed_equals_training_padded(tiny_model_dir, tmp_path):
    rows = [{"prompt": "tell me " * (1 + i % 5), "completion": "ok " * (1 + i % 3)}
            for i in range(24)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    losses = {}
    for packing in (True, False):
        out = tmp_path / f"packed-{packing}"
        cfg = {"model": str(tiny_model_dir), "data": str(path), "out": str(out),
               "lr": 1e-2, "batch_size": 4, "max_steps": 4, "device": "cpu",
               "val_fraction": 0.0, "lora_r": 4, "packing": packing}
        from tunelab.config import build_config

        train(build_config(cfg), progress=False)
        import json

        losses[packing] = [json.loads(x)["train_loss"]
                           for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses[True]) == 4
    for a, b in zip(losses[True], losses[False], strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)


def test_training_runs_attention_through_the_packed_kernel(tiny_model_dir, tiny_tokenizer,
                                                           monkeypatch):
    from tunelab import packing
    from tunelab.loss import unwrap

    model = packed_lora_model(tiny_model_dir)
    assert unwrap(model).config._attn_implementation == packing.ATTENTION_NAME
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.shape[2], kw.get("is_causal"), kw.get("attn_mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(packing.F, "scaled_dot_product_attention", spy)
    examples = varied_examples(tiny_tokenizer, 3)
    TargetLoss(model)(**collate_packed(examples))
    layers = unwrap(model).config.num_hidden_layers
    # one causal call per example and layer, each on that example's own length, no mask
    assert sorted(seen) == sorted((len(e.input_ids), True, None) for e in examples
                                  for _ in range(layers))


def test_chunked_target_loss_gives_the_full_logits_gradients_of_full_fine_tuning(
        tiny_model_dir, tiny_tokenizer, monkeypatch):
    from tunelab.loss import ChunkedCrossEntropy

    monkeypatch.setattr(ChunkedCrossEntropy, "CHUNK", 5)  # several chunks, a short last one
    model, _ = models.load_model(str(tiny_model_dir), device="cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    batch = data.collate(varied_examples(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model.zero_grad()
    fast, n = TargetLoss(model)(**batch)
    assert fast.grad_fn is not None and "ChunkedCrossEntropy" in type(fast.grad_fn).__name__
    assert int(n) > 5
    (fast * 0.5).backward()  # the incoming gradient is applied
    g_fast = _grads(model)
    model.zero_grad()
    slow, _ = full_logits_loss(model, batch)
    (slow * 0.5).backward()
    g_slow = _grads(model)
    _assert_close_rel(fast, slow)
    assert "lm_head.weight" in g_slow or "model.embed_tokens.weight" in g_slow
    for name in g_slow:
        _assert_close_rel(g_fast[name], g_slow[name])


def test_chunked_cross_entropy_is_exact_for_targets_the_model_all_but_rules_out():
    """p[y] underflows in fp32 when the target's logit is ~100 below the best one; the
    loss must still be lse - z[y], not inf, and its gradient softmax - onehot."""
    import torch.nn.functional as F

    from tunelab.loss import ChunkedCrossEntropy

    torch.manual_seed(0)
    weight = torch.randn(11, 4)
    hidden = torch.randn(6, 4, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():  # row 2: target 2 far below the others (p ~ e^-200)
        weight[2] = -50 * hidden[2] / hidden[2].norm() ** 2
        weight[7] = 150 * hidden[2] / hidden[2].norm() ** 2
    fast = ChunkedCrossEntropy.apply(hidden, weight, targets)
    (g_fast,) = torch.autograd.grad(fast, hidden)
    slow = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (g_slow,) = torch.autograd.grad(slow, hidden)
    assert torch.isfinite(fast) and float(slow) > 150
    _assert_close_rel(fast, slow)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)


def test_output_layer_chunks_use_onednn_on_cpu_and_match_the_plain_matmul(monkeypatch):
    """The chunked loss's ``h W^T`` goes through oneDNN on CPU in fp32 (faster there) and
    gives the plain matmul's logits; with a graph being recorded it stays the plain matmul."""
    from tunelab import loss

    if loss._ONEDNN_LINEAR is None:
        pytest.skip("this torch build has no oneDNN linear kernel")
    calls = []
    real = loss._ONEDNN_LINEAR
    monkeypatch.setattr(loss, "_ONEDNN_LINEAR", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    weight = torch.randn(300, 16)
    hidden = torch.randn(9, 16, requires_grad=True)
    targets = torch.randint(0, 300, (9,))
    with torch.no_grad():
        torch.testing.assert_close(loss.head_logits(hidden, weight), hidden @ weight.t(),
                                   rtol=1e-5, atol=1e-5)
    assert calls == [(9, 16)]
    assert loss.head_logits(hidden, weight).grad_fn is not None  # autograd: plain matmul
    assert len(calls) == 1
    monkeypatch.setattr(loss.ChunkedCrossEntropy, "CHUNK", 4)
    fast = loss.ChunkedCrossEntropy.apply(hidden, weight, targets)
    assert calls[1:] == [(4, 16), (4, 16), (1, 16)]
    slow = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    _assert_close_rel(fast, slow)
