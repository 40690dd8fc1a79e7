"""Padding-free micro-batches: every example of a micro-batch in one row, none of them padded.

A padded micro-batch of examples with lengths ``n_1..n_B`` costs ``B * max(n_i)`` tokens of
work in every linear layer; chat data of varied lengths wastes a third of that on padding.
Packed, the same examples cost ``sum(n_i)`` and give the same loss and gradients:

* the row is ``concat(x_1, ..., x_B)`` with position ids restarting at 0 for each example,
  so rotary embeddings see the positions they would see alone;
* attention runs per example (causal within ``[start_i, end_i)``, nothing across), by
  :func:`packed_attention`, which calls SDPA once per example on its slice, so no FLOP goes
  to the ``(sum n_i)^2`` block-diagonal mask a dense kernel would need;
* the first token of each example is never a target, so the last position of one example
  is never trained to predict the first token of the next.

Only the micro-batch's composition changes its layout: the examples, their order within the
step and the optimizer step are those of the padded path. ``tests/test_packing.py`` checks
per-example losses and gradients against the padded batch.

The attention function is registered with transformers' ``AttentionInterface`` under
``ATTENTION_NAME``; it falls back to plain SDPA when a call carries no packing bounds
(validation, generation), so a model switched to it behaves as before everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, REPLAY_KEY, Example

ATTENTION_NAME = "tunelab_packed_sdpa"
BOUNDS_KEY = "tunelab_seq_bounds"  # forward kwarg: a host tensor [0, end_1, ..., end_B]
# forward kwarg of a preference row (tunelab.objectives.pairs): host tensor [pairs, 3] of
# (prompt, chosen, rejected) lengths
PAIR_KEY = "tunelab_pair_lengths"
HOST_KEYS = (BOUNDS_KEY, PAIR_KEY)  # batch entries that stay on the host


def collate_packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """One row holding every example; ``position_ids`` restart and bounds mark each one."""
    ids, labels, positions, bounds = [], [], [], [0]
    for ex in examples:
        n = len(ex.input_ids)
        ids.extend(ex.input_ids)
        own = list(ex.labels)
        own[0] = IGNORE_INDEX  # predicted by the previous example's last token otherwise
        labels.extend(own)
        positions.extend(range(n))
        bounds.append(bounds[-1] + n)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "position_ids": torch.tensor([positions]),
             BOUNDS_KEY: torch.tensor(bounds, dtype=torch.long)}
    if any(ex.replay for ex in examples):
        batch[REPLAY_KEY] = torch.tensor([[ex.replay for ex in examples
                                           for _ in range(len(ex.input_ids))]])
    return batch


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example: ``softmax(q_i k_i^T * s + causal) v_i``.

    ``query`` is ``[1, heads, T, d]``, ``key``/``value`` ``[1, kv_heads, T, d]``; returns
    ``[1, T, heads, d]`` as transformers' attention functions do.
    """
    bounds = kwargs.pop(BOUNDS_KEY, None)
    pairs = kwargs.pop(PAIR_KEY, None)
    if pairs is not None:
        return pair_attention(module, query, key, value, pairs, dropout, scaling), None
    if bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    lengths = bounds.diff().tolist()
    # split, not slicing: the backward of a split is one concatenation, while each slice's
    # backward would zero-fill and accumulate a gradient the size of the whole row
    outputs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if module.training else 0.0,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                           value.split(lengths, dim=2), strict=True)
    ]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def pair_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, pairs: torch.Tensor, dropout: float = 0.0,
                   scaling: float | None = None) -> torch.Tensor:
    """Attention of preference rows ``[prompt | chosen | rejected]``, one per pair.

    ``prompt + chosen`` is causal as one sequence; each rejected query sees the whole prompt
    and the rejected tokens up to itself, never the chosen answer: the same attention each
    answer would get in a row of its own, with the prompt computed once. Returns
    ``[1, T, heads, d]``.
    """
    gqa = query.shape[1] != key.shape[1]
    drop = dropout if module.training else 0.0
    lengths = [n for p, c, r in pairs.tolist() for n in (p + c, r)]
    outputs = []
    qs, ks, vs = (t.split(lengths, dim=2) for t in (query, key, value))
    for i, (p, _, r) in enumerate(pairs.tolist()):
        outputs.append(F.scaled_dot_product_attention(
            qs[2 * i], ks[2 * i], vs[2 * i], dropout_p=drop, is_causal=True, scale=scaling,
            enable_gqa=gqa))
        if r:
            k = torch.cat([ks[2 * i][:, :, :p], ks[2 * i + 1]], dim=2)
            v = torch.cat([vs[2 * i][:, :, :p], vs[2 * i + 1]], dim=2)
            mask = torch.ones(r, p + r, dtype=torch.bool, device=query.device)
            mask[:, p:] = torch.ones(r, r, dtype=torch.bool, device=query.device).tril()
            outputs.append(F.scaled_dot_product_attention(
                qs[2 * i + 1], k, v, attn_mask=mask, dropout_p=drop, scale=scaling,
                enable_gqa=gqa))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous()


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model (or a peft/DDP wrapper's) to :func:`packed_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tunelab.loss import unwrap

    AttentionInterface.register(ATTENTION_NAME, packed_attention)
    # Unpacked calls (validation) build the same masks as SDPA does.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    unwrap(model).set_attn_implementation(ATTENTION_NAME)


def supports_packing(model: torch.nn.Module) -> bool:
    """Decoder models whose attention goes through transformers' attention interface."""
    from tunelab.loss import unwrap

    inner = unwrap(model)
    return bool(getattr(inner, "_supports_attention_backend", False))
