"""Read training data in the formats people have, and tokenize it the way inference will.

Files: ``.jsonl``, ``.json`` (a list of records, or ``{"data": [...]}``), ``.csv``, ``.parquet``.
Formats, detected per record from its fields (or forced with ``format``):

* ``text``: ``{"text": "..."}`` -- every token is a target;
* ``prompt_completion``: ``{"prompt": "...", "completion": "..."}``;
* ``instruction`` (alpaca): ``{"instruction": "...", "input": "...", "output": "..."}``;
* ``chat``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``;
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``
  (human -> user, gpt -> assistant).

Besides files, ``data`` can name a `datasets` source (a ``save_to_disk`` folder, a folder of
parquet/arrow shards, ``hf:ORG/NAME``): see :mod:`tunelab.data.sources`. Those are streamed
(:func:`encode_source`): rows are tokenized as they are read and only the examples are kept.

Prompt/completion and instruction records become a one-turn chat, so a chat model sees
the same template in training as in ``tunelab generate``. With ``train_on: completions``
(the default) labels mask everything except the completion / assistant tokens, including
the end-of-turn token so the model learns to stop.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data import sources
from tunelab.errors import DataError

IGNORE_INDEX = -100
# batch entry: bool [rows, T], True at the tokens of replay examples (tunelab.replay); present
# only in a batch holding one, so the batches of a run without replay are unchanged
REPLAY_KEY = "replay_mask"
FORMATS = ("text", "prompt_completion", "instruction", "chat", "sharegpt")
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}
MAX_LINE_BYTES = 16 * 1024 * 1024  # a single record over 16 MiB is almost surely a broken file

_FORMAT_KEYS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "instruction": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    line: int


@dataclass
class Example:
    """One tokenized example: ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``."""

    input_ids: list[int]
    labels: list[int]
    replay: bool = False  # a replay row (tunelab.replay): REPLAY_KEY marks its tokens

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the data, reported in the run summary (never silently)."""

    n_records: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_target_tokens: int = 0
    max_length: int = 0
    lengths: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, int]:
        return {"records": self.n_records, "truncated": self.n_truncated,
                "dropped": self.n_dropped, "tokens": self.n_tokens,
                "target_tokens": self.n_target_tokens, "max_length": self.max_length}


# ----------------------------------------------------------------------------- reading


def read_records(path: str | Path, *, split: str = "train",
                 columns: str | dict[str, str] | None = None) -> list[Record]:
    """Read every record of a data file or `datasets` source (:mod:`tunelab.data.sources`);
    raise ``DataError`` naming file and line on bad input. ``columns`` renames fields
    (``"prompt=instruction"``: the ``instruction`` field is read as ``prompt``)."""
    mapping = sources.parse_columns(columns)
    if sources.is_source(path):
        records = [Record(r.data, r.where, r.index)
                   for r in sources.iter_rows(path, split, mapping)]
        if not records:
            raise DataError("the source holds no examples", path=str(path))
        return records
    records = _read_file(Path(path))
    if mapping:
        rows = (sources.Row(r.data, r.path, r.line) for r in records)
        records = [Record(sources.rename(r.data, mapping, r), r.where, r.index) for r in rows]
    return records


def _read_file(path: Path) -> list[Record]:
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type '{suffix}'; use one of {', '.join(SUFFIXES)}",
                        path=str(path))
    if suffix == ".parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix]
        records = reader(text, str(path))
    if not records:
        raise DataError("the file holds no examples", path=str(path))
    return records


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark from Windows editors
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"not valid UTF-8 (byte {exc.start}); re-save the file as UTF-8",
                        path=str(path), line=line) from None


def _read_jsonl(text: str, path: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"line is {len(line):,} characters long (limit {MAX_LINE_BYTES:,}); "
                            "is the file really one JSON object per line?", path=path, line=number)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON at column {exc.colno}: {exc.msg}", path=path,
                            line=number) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path,
                            line=number)
        records.append(Record(obj, path, number))
    return records


def _read_json(text: str, path: str) -> list[Record]:
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at column {exc.colno}: {exc.msg}", path=path,
                        line=exc.lineno) from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError("expected a JSON list of records (or {\"data\": [...]})", path=path)
    records = []
    for index, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            raise DataError(f"record {index} is {type(item).__name__}, expected an object",
                            path=path)
        records.append(Record(item, path, index))
    return records


def _read_csv(text: str, path: str) -> list[Record]:
    reader = csv.DictReader(io.StringIO(text))
    records = []
    for row in reader:
        number = reader.line_num
        if None in row:
            raise DataError("row has more cells than the header", path=path, line=number)
        data: dict[str, Any] = {k: v for k, v in row.items() if v not in (None, "")}
        if "messages" in data:  # a chat conversation stored as a JSON string in one cell
            try:
                data["messages"] = json.loads(data["messages"])
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON in the cell: {exc.msg}", path=path, line=number,
                                field="messages") from None
        records.append(Record(data, path, number))
    return records


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise DataError("reading Parquet needs pyarrow: pip install pyarrow",
                        path=str(path)) from exc
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise DataError(f"cannot read Parquet: {exc}", path=str(path)) from None
    return [Record(row, str(path), i) for i, row in enumerate(rows, start=1)]


# ------------------------------------------------------------------------ normalising


def detect_format(record: Record) -> str:
    for name, keys in _FORMAT_KEYS.items():
        if all(k in record.data for k in keys):
            return name
    if "instruction" in record.data:
        raise DataError("instruction record has no 'output' (the completion to learn)",
                        path=record.path, line=record.line, field="output")
    if "prompt" in record.data:
        raise DataError("prompt record has no 'completion'", path=record.path,
                        line=record.line, field="completion")
    keys = ", ".join(sorted(record.data)) or "none"
    raise DataError(f"cannot tell the format from the fields ({keys}); expected one of: "
                    "'text'; 'prompt'+'completion'; 'instruction'(+'input')+'output'; "
                    "'messages'; 'conversations' (ShareGPT). Map other column names with "
                    "columns: prompt=COLUMN,completion=COLUMN", path=record.path,
                    line=record.line)


def resolve_format(records: Sequence[Record], forced: str = "auto") -> str:
    """The single format of a file: forced, or detected and checked on every record."""
    if forced != "auto":
        return forced
    first = detect_format(records[0])
    for record in records[1:]:
        found = detect_format(record)
        if found != first:
            raise DataError(f"mixed formats in one file: this record is '{found}' but the "
                            f"first one (line {records[0].line}) is '{first}'; use one format "
                            "per file", path=record.path, line=record.line)
    return first


def _text_field(record: Record, name: str, *, required: bool = True) -> str:
    value = record.data.get(name)
    if value is None:
        if required:
            raise DataError("missing field", path=record.path, line=record.line, field=name)
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path=record.path,
                        line=record.line, field=name)
    if required and not value.strip():
        raise DataError("empty content", path=record.path, line=record.line, field=name)
    return value


def to_messages(record: Record, fmt: str) -> list[dict[str, str]] | None:
    """A record as chat messages, or ``None`` for plain text. Validates roles and contents."""
    if fmt == "text":
        _text_field(record, "text")
        return None
    if fmt == "prompt_completion":
        return [{"role": "user", "content": _text_field(record, "prompt")},
                {"role": "assistant", "content": _text_field(record, "completion")}]
    if fmt == "instruction":
        prompt = _text_field(record, "instruction")
        extra = _text_field(record, "input", required=False)
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _text_field(record, "output")}]
    if fmt == "sharegpt":
        return _check_turns(record, _sharegpt_messages(record), "conversations")
    return _check_turns(record, parse_messages(record, "messages"), "messages")


def parse_messages(record: Record, name: str, value: Any = None, *,
                   string_ok: bool = False) -> list[dict[str, str]]:
    """``value`` (default: the record's field ``name``) as validated ``{role, content}``
    messages: the one check every chat field goes through (SFT ``messages``, preference
    ``prompt``/``chosen``/``rejected``), so a bad turn reads the same wherever it is.
    ``string_ok``: the caller also takes a plain string there (the error says so)."""
    if value is None:
        value = record.data.get(name)
    if not isinstance(value, list) or not value:
        either = "a string or " if string_ok else ""
        raise DataError(f"expected {either}a non-empty list of {{role, content}} messages",
                        path=record.path, line=record.line, field=name)
    out = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError("expected an object with 'role' and 'content'", path=record.path,
                            line=record.line, field=where)
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}",
                            path=record.path, line=record.line, field=f"{where}.role")
        if not isinstance(content, str):
            raise DataError(f"content must be a string, got {type(content).__name__}",
                            path=record.path, line=record.line, field=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _sharegpt_messages(record: Record) -> list[dict[str, str]]:
    turns = record.data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("expected a non-empty list of {from, value} turns", path=record.path,
                        line=record.line, field="conversations")
    out = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise DataError("expected an object with 'from' and 'value'", path=record.path,
                            line=record.line, field=where)
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"unknown speaker {speaker!r}; allowed: system, human, gpt",
                            path=record.path, line=record.line, field=f"{where}.from")
        if not isinstance(value, str):
            raise DataError(f"value must be a string, got {type(value).__name__}",
                            path=record.path, line=record.line, field=f"{where}.value")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return out


def _check_turns(record: Record, out: list[dict[str, str]], name: str
                 ) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("conversation has no assistant turn, so nothing to learn from",
                        path=record.path, line=record.line, field=name)
    if out[0]["role"] == "assistant":
        # Chat templates render the reply header only as part of a generation prompt, which
        # needs a turn before it: there is no prompt to learn the reply from.
        raise DataError("conversation starts with an assistant turn; put a user (or system) "
                        "turn first", path=record.path, line=record.line, field=f"{name}[0]")
    return out


# ------------------------------------------------------------------------ tokenizing


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The text a chat model sees before it answers: what ``generate`` and training share."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], record: Record
                     ) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and find the character span of each assistant reply.

    The span of reply *i* is what rendering ``messages[:i+1]`` adds to the generation
    prompt of ``messages[:i]``: the reply and its end-of-turn token. Trailing whitespace
    after the end-of-turn token is left out, since generation stops before it.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render_prompt(tokenizer, messages[:i])
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise DataError("the chat template does not render this conversation turn by turn, "
                            "so completion-only labels cannot be found; set train_on: all",
                            path=record.path, line=record.line, field="messages")
        spans.append((len(prefix), len(upto.rstrip())))
    return full, spans


def encode_record(record: Record, fmt: str, tokenizer: Any, *, train_on: str = "completions",
                  ) -> Example:
    """Tokenize one record; labels mark the target tokens (see module docstring)."""
    messages = to_messages(record, fmt)
    if messages is None:
        text = record.data["text"]
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Example(ids, list(ids))
    if getattr(tokenizer, "chat_template", None):
        text, spans = _assistant_spans(tokenizer, messages, record)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
    else:
        # No template (a base model): prompt and completion are concatenated, eos appended.
        if len(messages) != 2 and fmt in ("chat", "sharegpt"):
            raise DataError("the tokenizer has no chat template, so chat data cannot be "
                            "rendered; use a chat model or prompt/completion data",
                            path=record.path, line=record.line, field="messages")
        prompt = "\n\n".join(m["content"] for m in messages[:-1]) + "\n\n"
        text = prompt + messages[-1]["content"]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        spans = [(len(prompt), len(text) + 1)]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
            offsets.append((len(text), len(text) + 1))
    if train_on == "all":
        return Example(list(ids), list(ids))
    labels = [tok if any(a <= start < b for a, b in spans) and end > start else IGNORE_INDEX
              for tok, (start, end) in zip(ids, offsets, strict=True)]
    return Example(list(ids), labels)


def encode_records(records: Sequence[Record], tokenizer: Any, *, fmt: str = "auto",
                   max_length: int = 1024, overlength: str = "truncate",
                   train_on: str = "completions") -> tuple[list[Example], DataStats]:
    """Tokenize records; over-length ones are truncated or dropped and counted in the stats."""
    fmt = resolve_format(records, fmt)
    examples, stats = [], DataStats(n_records=len(records), max_length=max_length)
    for record in records:
        ex = encode_record(record, fmt, tokenizer, train_on=train_on)
        stats.lengths.append(len(ex.input_ids))
        if len(ex.input_ids) > max_length:
            if overlength == "error":
                raise DataError(f"example is {len(ex.input_ids)} tokens, over max_length "
                                f"{max_length}; raise max_length or set overlength: truncate",
                                path=record.path, line=record.line)
            if overlength == "drop":
                stats.n_dropped += 1
                continue
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
            stats.n_truncated += 1
        if ex.n_targets == 0:  # truncation cut every target token: nothing left to learn
            stats.n_dropped += 1
            continue
        stats.n_tokens += len(ex.input_ids)
        stats.n_target_tokens += ex.n_targets
        examples.append(ex)
    if not examples:
        raise DataError(f"no example is left after applying max_length {max_length} "
                        f"({stats.n_dropped} dropped); raise max_length",
                        path=records[0].path)
    return examples, stats


STREAM_CHUNK = 1024  # records tokenized per call: plain text goes to the tokenizer in one batch


def encode_source(spec: str | Path, tokenizer: Any, *, split: str = "train",
                  columns: str | dict[str, str] | None = None, val_fraction: float = 0.0,
                  seed: int = 0, fmt: str = "auto", max_length: int = 1024,
                  overlength: str = "truncate", train_on: str = "completions"
                  ) -> tuple[list[Example], list[Example], DataStats]:
    """Stream a `datasets` source into train and validation examples.

    Rows are read one Arrow batch at a time and tokenized in chunks of ``STREAM_CHUNK``; a
    record is dropped as soon as it is tokenized, so the peak memory is the examples plus one
    chunk of records, never every record and every example at once. The validation rows are
    ``round(n * val_fraction)`` row indices drawn with ``seed`` (n from the source's metadata).
    """
    import numpy as np

    mapping = sources.parse_columns(columns)
    forced = fmt
    n = sources.count_rows(spec, split)
    if n == 0:
        raise DataError("the source holds no examples", path=str(spec))
    val_rows: set[int] = set()
    if val_fraction > 0 and n >= 2:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
        picked = np.random.default_rng(seed).choice(n, size=n_val, replace=False)
        val_rows = {int(i) + 1 for i in picked}  # 1-based positions
    stats = DataStats(max_length=max_length)
    train: list[Example] = []
    val: list[Example] = []
    first: Record | None = None
    chunk: list[tuple[Record, bool]] = []
    for position, row in enumerate(sources.iter_rows(spec, split, mapping), start=1):
        record = Record(row.data, row.where, row.index)  # errors name the shard and its row
        if first is None:
            first = record
            fmt = detect_format(record) if fmt == "auto" else fmt
        elif (forced == "auto" and not all(k in record.data for k in _FORMAT_KEYS[fmt])
              and (found := detect_format(record)) != fmt):
            raise DataError(f"mixed formats in one source: this record is '{found}' but the "
                            f"first one ({first.path} row {first.line}) is '{fmt}'; use one "
                            "format per source", path=record.path, line=record.line)
        # the validation split is by position in the whole source (rows of every shard)
        chunk.append((record, position in val_rows))
        stats.n_records += 1
        if len(chunk) >= STREAM_CHUNK:
            _flush_marked(chunk, fmt, tokenizer, train_on, stats, max_length, overlength,
                          train, val)
    _flush_marked(chunk, fmt, tokenizer, train_on, stats, max_length, overlength, train, val)
    if not train:
        raise DataError(f"no example is left after applying max_length {max_length} "
                        f"({stats.n_dropped} dropped); raise max_length", path=str(spec))
    return train, val, stats


def _flush_marked(chunk: list[tuple[Record, bool]], fmt: str, tokenizer: Any, train_on: str,
                  stats: DataStats, max_length: int, overlength: str, train: list[Example],
                  val: list[Example]) -> None:
    records = [r for r, _ in chunk]
    for (record, is_val), ex in zip(chunk, _encode_chunk(records, fmt, tokenizer, train_on),
                                    strict=True):
        kept = _fit(ex, record, stats, max_length, overlength)
        if kept is not None:
            (val if is_val else train).append(kept)
    chunk.clear()


def _encode_chunk(records: list[Record], fmt: str, tokenizer: Any, train_on: str
                  ) -> list[Example]:
    if fmt != "text" or not records:
        return [encode_record(r, fmt, tokenizer, train_on=train_on) for r in records]
    texts = [_text_field(r, "text") for r in records]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer itself: same ids, no per-row Python wrapper
        batches = (e.ids for e in backend.encode_batch(texts, add_special_tokens=True))
    else:
        batches = iter(tokenizer(texts, add_special_tokens=True)["input_ids"])
    # every token of plain text is a target: labels can be the same (never mutated) list
    return [Example(full, full) for full in (list(ids) + eos for ids in batches)]


def _fit(ex: Example, record: Record, stats: DataStats, max_length: int, overlength: str
         ) -> Example | None:
    """Apply max_length to one example and count it (the rule of :func:`encode_records`)."""
    stats.lengths.append(len(ex.input_ids))
    if len(ex.input_ids) > max_length:
        if overlength == "error":
            raise DataError(f"example is {len(ex.input_ids)} tokens, over max_length "
                            f"{max_length}; raise max_length or set overlength: truncate",
                            path=record.path, line=record.line)
        if overlength == "drop":
            stats.n_dropped += 1
            return None
        ex = Example(ex.input_ids[:max_length], ex.labels[:max_length])
        stats.n_truncated += 1
    n_targets = len(ex.labels) if ex.labels is ex.input_ids else ex.n_targets
    if n_targets == 0:
        stats.n_dropped += 1
        return None
    stats.n_tokens += len(ex.input_ids)
    stats.n_target_tokens += n_targets
    return ex


def split_records(records: list[Record], val_fraction: float, seed: int
                  ) -> tuple[list[Record], list[Record]]:
    """Deterministic train/validation split: same seed, same split."""
    if val_fraction <= 0 or len(records) < 2:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(records) * val_fraction))
    n_val = min(n_val, len(records) - 1)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


# ------------------------------------------------------------------------ batching


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked in attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(ex.replay for ex in examples):
        batch[REPLAY_KEY] = torch.tensor([[ex.replay] for ex in examples]) & mask.bool()
    return batch


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a padded (attention_mask) or packed (one row) batch."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


class BatchSchedule:
    """Which examples make up micro-batch *k* of a run, as a pure function of *k*.

    Epoch *e* visits the examples in the order ``randperm(n)`` seeded by ``seed + e``;
    micro-batch *k* is the *k*-th slice of that stream. Because the position is a function
    of the step alone, resuming at step *s* needs no saved sampler state, and a different
    number of data-parallel ranks can split each micro-batch between them.

    With ``lengths`` (length-grouped batching), each window of ``GROUP_WINDOW`` batches of
    that random order is sorted by length and cut into batches, and the batches of the epoch
    are shuffled again (same seed): every example is still seen once per epoch, in batches
    of similar lengths, so a padded batch carries little padding.
    """

    GROUP_WINDOW = 64

    def __init__(self, n_examples: int, batch_size: int, seed: int,
                 lengths: Sequence[int] | None = None) -> None:
        self.n = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self.lengths = list(lengths) if lengths is not None else None
        self.batches_per_epoch = max(1, -(-n_examples // batch_size))
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
            if self.lengths is not None:
                order = self._grouped(order, gen)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def _grouped(self, order: list[int], gen: torch.Generator) -> list[int]:
        window = self.GROUP_WINDOW * self.batch_size
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[j:j + self.batch_size]
                        for j in range(0, len(chunk), self.batch_size)]
        short = [b for b in batches if len(b) < self.batch_size]  # at most one: kept last
        full = [b for b in batches if len(b) == self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        return [i for b in shuffled + short for i in b]

    def indices(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.batches_per_epoch)
        order = self._order(epoch)
        return order[pos * self.batch_size:(pos + 1) * self.batch_size]

    def epoch_of(self, k: int) -> float:
        return k / self.batches_per_epoch


def iter_batches(examples: Sequence[Example], batch_size: int, pad_id: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches in a fixed order (for validation): sorted by length so padding stays small."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)
