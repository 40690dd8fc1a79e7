"""What the data page shows about a data file: its format, a few examples tokenized exactly
as training will see them, length statistics, and every bad record with its line.

Everything goes through :mod:`tunelab.data` -- the same reader, format detection, chat
template rendering and label masking as ``tunelab train`` -- so what the page shows *is*
what training gets. The one difference: training stops at the first bad record, while this
collects up to ``max_errors`` of them, so a file can be fixed in one go.

Preference pairs (``prompt``/``chosen``/``rejected``, :mod:`tunelab.preference`) are shown as
their three parts, each tokenized as preference training tokenizes it: the shared prompt
(context only) and the two answers with the tokens their log-probabilities are taken over.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab import data
from tunelab.errors import DataError
from tunelab.ui.forms import data_error_details

MAX_ERRORS = 50
MAX_RECORDS = 20_000  # statistics over more than this would keep the request waiting
SHOW_TOKENS = 768  # tokens rendered per example


def _error(exc: DataError, line: int | None = None) -> dict[str, Any]:
    details = data_error_details(exc)
    if line is not None and details["line"] is None:
        details["line"] = line
    return details


def read_records_all(path: Path, max_errors: int = MAX_ERRORS
                     ) -> tuple[list[data.Record], list[dict[str, Any]], int]:
    """Every readable record, the first ``max_errors`` errors of the others, and how many
    records were bad.

    JSONL is read line by line with tunelab.data's own line reader, so one malformed line
    does not hide the next; other file types are read whole by ``data.read_records``
    (a malformed JSON or Parquet file has no records to salvage).
    """
    try:
        return data.read_records(path), [], 0
    except DataError as exc:
        if path.suffix.lower() != ".jsonl" or exc.line is None:
            return [], [_error(exc)], 1
    # _read_text / _read_jsonl are tunelab.data's readers (the messages the CLI prints);
    # fed one line at a time they report line 1, which is put right below.
    text = data._read_text(path)
    records: list[data.Record] = []
    errors: list[dict[str, Any]] = []
    bad = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            (record,) = data._read_jsonl(line, str(path))
        except DataError as exc:
            bad += 1
            if len(errors) < max_errors:
                errors.append({**_error(exc), "line": number})
            continue
        record.line = number
        records.append(record)
    return records, errors, bad


def _segments(tokenizer: Any, example: data.Example | _Side, max_length: int,
              limit: int = SHOW_TOKENS) -> list[dict[str, Any]]:
    """The example as runs of tokens: ``text`` (decoded, special tokens kept), ``masked``
    (label -100: not trained on), ``cut`` (past max_length, truncated away).

    A token that is part of a multi-byte character decodes to U+FFFD alone; it is joined
    with the next tokens until the character is complete.
    """
    out: list[dict[str, Any]] = []
    ids, labels = example.input_ids, example.labels
    pending: list[int] = []
    n = min(len(ids), limit)
    for i in range(n):
        pending.append(i)
        piece = tokenizer.decode([ids[j] for j in pending], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        if piece.endswith("\ufffd") and i + 1 < n and len(pending) < 8:
            continue
        masked = all(labels[j] == data.IGNORE_INDEX for j in pending)
        out.append({"text": piece, "masked": masked, "cut": pending[0] >= max_length,
                    "tokens": len(pending)})
        pending = []
    return out


def _histogram(lengths: Sequence[int], bins: int = 20) -> dict[str, Any]:
    if not lengths:
        return {"edges": [], "counts": []}
    low, high = min(lengths), max(lengths)
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // width)] += 1
    while counts and counts[-1] == 0:
        counts.pop()
    return {"edges": [low + i * width for i in range(len(counts) + 1)], "counts": counts}


def _percentile(sorted_values: Sequence[int], q: float) -> int:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def inspect_data(path: str | Path, tokenizer: Any, *, fmt: str = "auto",
                 max_length: int = 1024, train_on: str = "completions",
                 overlength: str = "truncate", val_fraction: float = 0.1, seed: int = 0,
                 show: int = 3, max_errors: int = MAX_ERRORS,
                 max_records: int = MAX_RECORDS) -> dict[str, Any]:
    """The data page's view of ``path`` (module docstring). Never raises DataError: a bad
    file is an answer with ``errors``."""
    path = Path(path)
    records, errors, bad = read_records_all(path, max_errors)
    result: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size
                              if path.is_file() else None, "records": len(records) + bad,
                              "format": None, "examples": [], "errors": errors,
                              "n_errors": bad, "stats": None, "sampled": False}
    if not records:
        return result
    sampled = records[:max_records]
    result["sampled"] = len(records) > max_records
    from tunelab import preference

    if preference.is_preference(sampled):
        return _inspect_pairs(result, sampled, tokenizer, max_length=max_length,
                              overlength=overlength, val_fraction=val_fraction, seed=seed,
                              show=show, max_errors=max_errors, bad=bad)

    # The file's format: forced, or that of its first record (as data.resolve_format);
    # records that do not match it are errors, as they are for training.
    chosen = fmt if fmt != "auto" else None
    if chosen is None:
        for record in sampled:
            try:
                chosen = data.detect_format(record)
                break
            except DataError:
                continue
    if chosen is None:  # no record has a known format: each one is an error
        for record in sampled:
            try:
                data.detect_format(record)
            except DataError as exc:
                bad += 1
                if len(errors) < max_errors:
                    errors.append(_error(exc))
        result["n_errors"] = bad
        return result
    result["format"] = chosen
    first = next(r for r in sampled if fmt != "auto" or _detects(r))

    lengths: list[int] = []
    targets: list[int] = []
    over = no_targets = 0
    for record in sampled:
        try:
            if fmt == "auto":
                data.resolve_format([first, record])
            example = data.encode_record(record, chosen, tokenizer, train_on=train_on)
        except DataError as exc:
            bad += 1
            if len(errors) < max_errors:
                errors.append(_error(exc, record.line))
            continue
        n = len(example.input_ids)
        lengths.append(n)
        targets.append(example.n_targets)
        if n > max_length:
            over += 1
            if overlength == "error":
                bad += 1
            if overlength == "error" and len(errors) < max_errors:
                errors.append({"line": record.line, "data_field": None,
                               "message": f"example is {n} tokens, over max_length "
                               f"{max_length}; raise max_length or set overlength: truncate"})
            kept = example.labels[:max_length]
            if overlength == "truncate" and all(t == data.IGNORE_INDEX for t in kept):
                no_targets += 1
        if len(result["examples"]) < show:
            result["examples"].append({
                "line": record.line, "record": record.data, "tokens": n,
                "target_tokens": example.n_targets, "over_length": n > max_length,
                "segments": _segments(tokenizer, example, max_length)})
    result["n_errors"] = bad
    if lengths:
        result["stats"] = _stats(sampled, lengths, targets, max_length=max_length,
                                 overlength=overlength, over=over, no_targets=no_targets,
                                 val_fraction=val_fraction, seed=seed)
    return result


class _Side:
    """Tokens and labels of one part of a pair, shaped as ``_segments`` reads examples."""

    def __init__(self, input_ids: list[int], labels: list[int]) -> None:
        self.input_ids, self.labels = input_ids, labels


def _inspect_pairs(result: dict[str, Any], sampled: list[data.Record], tokenizer: Any, *,
                   max_length: int, overlength: str, val_fraction: float, seed: int,
                   show: int, max_errors: int, bad: int) -> dict[str, Any]:
    """The data page's view of preference pairs: prompt / chosen / rejected per example;
    lengths are prompt + the longer answer (what ``max_length`` bounds in training)."""
    from tunelab import preference

    result["format"] = "preference"
    errors = result["errors"]
    lengths: list[int] = []
    targets: list[int] = []
    over = identical = 0
    for record in sampled:
        try:
            pair = preference.encode_pair(record, tokenizer)
        except DataError as exc:
            bad += 1
            if len(errors) < max_errors:
                errors.append(_error(exc, record.line))
            continue
        if pair is None:  # chosen == rejected: no preference, dropped as training drops it
            identical += 1
            continue
        n = len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))
        lengths.append(n)
        targets.append(pair.n_targets)
        if n > max_length:
            over += 1
            if overlength == "error":
                bad += 1
                if len(errors) < max_errors:
                    errors.append({"line": record.line, "data_field": None,
                                   "message": f"pair is {n} tokens (prompt + longer answer), "
                                   f"over max_length {max_length}; raise max_length or set "
                                   "overlength: truncate"})
        if len(result["examples"]) < show:
            parts = [("prompt", _Side(pair.prompt, [data.IGNORE_INDEX] * len(pair.prompt))),
                     ("chosen", _Side(pair.chosen, pair.chosen_labels)),
                     ("rejected", _Side(pair.rejected, pair.rejected_labels))]
            result["examples"].append({
                "line": record.line, "record": record.data, "tokens": n,
                "target_tokens": pair.n_targets, "over_length": n > max_length,
                "parts": [{"name": name, "tokens": len(side.input_ids),
                           "segments": _segments(tokenizer, side, 10 ** 9)}
                          for name, side in parts]})
    result["n_errors"] = bad
    if lengths:
        result["stats"] = _stats(sampled, lengths, targets, max_length=max_length,
                                 overlength=overlength, over=over, no_targets=identical,
                                 val_fraction=val_fraction, seed=seed)
        result["stats"]["identical_answers"] = identical
    return result


def _stats(sampled: list[data.Record], lengths: list[int], targets: list[int], *,
           max_length: int, overlength: str, over: int, no_targets: int,
           val_fraction: float, seed: int) -> dict[str, Any]:
    ordered = sorted(lengths)
    train_records, val_records = data.split_records(sampled, val_fraction, seed)
    return {
        "examples": len(lengths), "min": ordered[0], "max": ordered[-1],
        "mean": statistics.fmean(lengths), "median": _percentile(ordered, 0.5),
        "p95": _percentile(ordered, 0.95), "tokens": sum(lengths),
        "target_tokens": sum(targets), "max_length": max_length,
        "over_length": over, "overlength": overlength,
        "truncated": over if overlength == "truncate" else 0,
        "dropped": (over if overlength == "drop" else 0) + no_targets,
        # what training will average per example: lengths capped at max_length
        "mean_trained": statistics.fmean(min(n, max_length) for n in lengths),
        "train_examples": len(train_records), "val_examples": len(val_records),
        "histogram": _histogram(lengths),
    }


def _detects(record: data.Record) -> bool:
    try:
        data.detect_format(record)
    except DataError:
        return False
    return True
