"""Log-probabilities of both answers of preference pairs, the shared prompt computed once.

A micro-batch of pairs is one row: ``[prompt_1 | chosen_1 | rejected_1 | prompt_2 | ...]``.
Position ids restart at 0 for each prompt and the rejected answer's continue from the prompt's
end, as if it followed the prompt alone; :func:`tunelab.packing.pair_attention` lets each
answer see its prompt and itself, never the other answer. So every answer token gets the
hidden state it would get in a row of ``prompt + answer``, while the prompt's layers run once
instead of twice (TRL's layout: ``2B`` padded rows, each holding the prompt).

The log-probability of an answer is ``log p(y) = sum_j log softmax(W h_{j-1})[y_j]`` over its
target tokens, where ``h_{j-1}`` is the state before token ``j`` (for the first answer token,
the prompt's last state, shared by both answers). The output layer runs only on those rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tunelab.data import IGNORE_INDEX
from tunelab.loss import unwrap
from tunelab.packing import PAIR_KEY
from tunelab.preference import PreferenceExample


def collate_pairs(examples: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
    """One packed row of pairs, with the rows the output layer needs.

    ``pick[k]`` is the row position whose state predicts target token ``targets[k]``, and
    ``side[k]`` is ``2 i`` (chosen of pair ``i``) or ``2 i + 1`` (rejected).
    """
    ids: list[int] = []
    positions: list[int] = []
    lengths, pick, targets, side = [], [], [], []
    for i, ex in enumerate(examples):
        start, p, c = len(ids), len(ex.prompt), len(ex.chosen)
        ids += ex.prompt + ex.chosen + ex.rejected
        positions += list(range(p + c)) + list(range(p, p + len(ex.rejected)))
        lengths.append((p, c, len(ex.rejected)))
        for s, (labels, offset) in enumerate(((ex.chosen_labels, start + p),
                                              (ex.rejected_labels, start + p + c))):
            for j, t in enumerate(labels):
                if t == IGNORE_INDEX:
                    continue
                pick.append(start + p - 1 if j == 0 else offset + j - 1)
                targets.append(t)
                side.append(2 * i + s)
    batch = {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
             PAIR_KEY: torch.tensor(lengths, dtype=torch.long),
             "pick": torch.tensor(pick, dtype=torch.long),
             "targets": torch.tensor(targets, dtype=torch.long),
             "side": torch.tensor(side, dtype=torch.long)}
    if all(ex.ref_logps is not None for ex in examples):
        batch["ref_logps"] = torch.tensor([v for ex in examples for v in ex.ref_logps])
    return batch


class PairLogps(torch.nn.Module):
    """``forward(batch) -> (logps [2B], n_tokens [2B])``: per answer, chosen then rejected
    of each pair interleaved (``[c_1, r_1, c_2, r_2, ...]``), summed over target tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        inner = unwrap(model)
        self.backbone = getattr(inner, inner.base_model_prefix)
        self.head = inner.get_output_embeddings()
        self.softcap = getattr(inner.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, pick: torch.Tensor,
                targets: torch.Tensor, side: torch.Tensor, **extra: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        n_sides = 2 * extra[PAIR_KEY].shape[0]
        hidden = self.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                               **{PAIR_KEY: extra[PAIR_KEY]}).last_hidden_state
        logits = self.head(hidden[0, pick]).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        token_logps = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        logps = token_logps.new_zeros(n_sides).index_add(0, side, token_logps)
        counts = torch.bincount(side, minlength=n_sides)
        return logps, counts
