"""Preference pairs: one prompt, a chosen and a rejected answer, tokenized as SFT does.

Record forms (TRL's conventions), detected from the fields:

* explicit, strings: ``{"prompt": "...", "chosen": "...", "rejected": "..."}``; the prompt
  becomes a user turn and each answer an assistant turn, as ``prompt_completion`` does in SFT;
* explicit, chat: ``{"prompt": [messages], "chosen": [{"role": "assistant", ...}],
  "rejected": [...]}``;
* implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, two whole
  conversations that share every turn but the last (assistant) one; the shared turns are
  the prompt.

Each side is rendered by :func:`tunelab.data.encode_record` (the chat template, or prompt and
completion joined for a base model), so the answer tokens, the end-of-turn token included,
are exactly the target tokens SFT would train on. The prompt is the token prefix the two
renderings share; the answer is what follows it, trailing non-target tokens cut (no
log-probability is ever taken of them).

Bad input raises ``DataError`` naming file, line and field. A record whose chosen and rejected
answers are identical carries no preference: it is dropped and counted (``n_dropped``), and
the run logs the count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data import IGNORE_INDEX, DataStats, Record, encode_record, parse_messages
from tunelab.errors import DataError

log = logging.getLogger(__name__)

ANSWERS = ("chosen", "rejected")


@dataclass
class PreferenceExample:
    """One tokenized pair. ``chosen_labels[i]`` is ``chosen[i]`` or ``IGNORE_INDEX``."""

    prompt: list[int]
    chosen: list[int]
    chosen_labels: list[int]
    rejected: list[int]
    rejected_labels: list[int]
    # the reference's (chosen, rejected) log-probs, when computed before training
    ref_logps: tuple[float, float] | None = None

    @property
    def input_ids(self) -> list[int]:
        """The shared-prompt row ``prompt + chosen + rejected`` (what the planner sizes)."""
        return self.prompt + self.chosen + self.rejected

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt) + self.chosen_labels + self.rejected_labels

    def __len__(self) -> int:  # tokens of the shared-prompt row: prompt + chosen + rejected
        return len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.chosen_labels + self.rejected_labels if t != IGNORE_INDEX)


def is_preference(records: Sequence[Record]) -> bool:
    """True when the file holds preference pairs (its first record has chosen and rejected)."""
    return bool(records) and all(k in records[0].data for k in ANSWERS)


def _answer(record: Record, name: str) -> dict[str, str]:
    """The one assistant turn of an explicit-form answer."""
    value = record.data.get(name)
    if isinstance(value, str):
        msg = {"role": "assistant", "content": value}
    else:
        msgs = parse_messages(record, name, value, string_ok=True)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError("with a separate 'prompt', an answer is one assistant message "
                            "(or a string)", path=record.path, line=record.line, field=name)
        msg = msgs[0]
    if not msg["content"].strip():
        raise DataError("empty answer", path=record.path, line=record.line, field=name)
    return msg


def to_pair(record: Record) -> tuple[list[dict[str, str]], dict[str, str], dict[str, str]]:
    """``(prompt messages, chosen turn, rejected turn)`` of one record, validated."""
    for name in ANSWERS:
        if record.data.get(name) is None:
            raise DataError("missing field", path=record.path, line=record.line, field=name)
    if "prompt" in record.data:
        prompt = record.data["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError("empty content", path=record.path, line=record.line,
                                field="prompt")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = parse_messages(record, "prompt", prompt, string_ok=True)
            if messages[-1]["role"] == "assistant":
                raise DataError("the prompt ends with an assistant turn; its last turn is the "
                                "one the answers reply to (user or system)",
                                path=record.path, line=record.line,
                                field=f"prompt[{len(messages) - 1}]")
        return messages, _answer(record, "chosen"), _answer(record, "rejected")
    # implicit prompt: two whole conversations sharing all turns but the last
    chosen = parse_messages(record, "chosen", record.data["chosen"])
    rejected = parse_messages(record, "rejected", record.data["rejected"])
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise DataError("the conversation must end with the assistant answer",
                            path=record.path, line=record.line, field=f"{name}[{len(conv) - 1}]")
        if len(conv) < 2:
            raise DataError("no prompt: without a 'prompt' field the conversation needs the "
                            "turns the answer replies to", path=record.path, line=record.line,
                            field=name)
        if not conv[-1]["content"].strip():
            raise DataError("empty answer", path=record.path, line=record.line,
                            field=f"{name}[{len(conv) - 1}].content")
    if chosen[:-1] != rejected[:-1]:
        differ = next((i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b),
                      min(len(chosen), len(rejected)) - 1)
        raise DataError("chosen and rejected do not share their prompt (every turn but the "
                        f"last must be the same); they differ at turn {differ}",
                        path=record.path, line=record.line, field=f"rejected[{differ}]")
    return chosen[:-1], chosen[-1], rejected[-1]


def encode_pair(record: Record, tokenizer: Any) -> PreferenceExample | None:
    """Tokenize one record, or ``None`` when its two answers are the same (no preference)."""
    prompt, chosen, rejected = to_pair(record)
    if chosen["content"] == rejected["content"]:
        return None
    sides = []
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        side = Record({"messages": prompt + [answer]}, record.path, record.line)
        ex = encode_record(side, "chat", tokenizer)
        # the last answer: the final run of target tokens (earlier assistant turns of a
        # multi-turn prompt are targets in SFT, context here)
        end = max(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX) + 1
        start = end
        while start > 0 and ex.labels[start - 1] != IGNORE_INDEX:
            start -= 1
        if start == 0:
            raise DataError("the answer has no prompt before it", path=record.path,
                            line=record.line, field=name)
        sides.append((ex.input_ids[:end], start))
    (c_ids, c_start), (r_ids, r_start) = sides
    shared = 0
    limit = min(c_start, r_start)
    while shared < limit and c_ids[shared] == r_ids[shared]:
        shared += 1
    c_labels = [IGNORE_INDEX] * (c_start - shared) + c_ids[c_start:]
    r_labels = [IGNORE_INDEX] * (r_start - shared) + r_ids[r_start:]
    return PreferenceExample(c_ids[:shared], c_ids[shared:], c_labels,
                             r_ids[shared:], r_labels)


def encode_pairs(records: Sequence[Record], tokenizer: Any, *, max_length: int = 1024,
                 overlength: str = "truncate") -> tuple[list[PreferenceExample], DataStats]:
    """Tokenize preference records; ``max_length`` bounds prompt + the longer answer.

    Over-length pairs are, by ``overlength``: refused (``error``), dropped (``drop``), or
    (``truncate``) cut to their last ``max_length`` tokens of prompt (answers kept whole) or,
    when the answers alone are too long, their answers cut at the end.
    """
    examples: list[PreferenceExample] = []
    stats = DataStats(n_records=len(records), max_length=max_length)
    identical = 0
    for record in records:
        ex = encode_pair(record, tokenizer)
        if ex is None:
            identical += 1
            stats.n_dropped += 1
            continue
        longest = len(ex.prompt) + max(len(ex.chosen), len(ex.rejected))
        stats.lengths.append(longest)
        if longest > max_length:
            if overlength == "error":
                raise DataError(f"pair is {longest} tokens (prompt + longer answer), over "
                                f"max_length {max_length}; raise max_length or set overlength: "
                                "truncate", path=record.path, line=record.line)
            if overlength == "drop":
                stats.n_dropped += 1
                continue
            ex = _truncate(ex, max_length)
            stats.n_truncated += 1
            if ex is None:
                stats.n_dropped += 1
                continue
        stats.n_tokens += len(ex)
        stats.n_target_tokens += ex.n_targets
        examples.append(ex)
    if identical:
        log.warning("%d preference record(s) dropped: chosen and rejected are the same answer, "
                    "so they carry no preference", identical)
    if not examples:
        raise DataError(f"no preference pair is left ({stats.n_dropped} dropped: identical "
                        f"answers or over max_length {max_length})", path=records[0].path)
    return examples, stats


def _truncate(ex: PreferenceExample, max_length: int) -> PreferenceExample | None:
    answer = max(len(ex.chosen), len(ex.rejected))
    keep_prompt = max(1, max_length - answer)
    prompt = ex.prompt[-keep_prompt:]
    room = max_length - len(prompt)
    out = PreferenceExample(prompt, ex.chosen[:room], ex.chosen_labels[:room],
                            ex.rejected[:room], ex.rejected_labels[:room])
    if all(t == IGNORE_INDEX for t in out.chosen_labels) or all(
            t == IGNORE_INDEX for t in out.rejected_labels):
        return None
    return out
