"""Where training records come from: local files, `datasets` folders and hub ids.

``--data`` takes

* a file (``.jsonl``, ``.json``, ``.csv``, ``.parquet``; see :mod:`tunelab.data`);
* a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict``
  whose split ``--split`` picks), opened memory-mapped with ``datasets.load_from_disk``;
* a folder of ``.parquet`` or ``.arrow`` shards, read shard by shard, batch by batch with
  pyarrow (so an error names the shard file and the row in it);
* ``hf:ORG/NAME`` (or ``hf:PATH``), through ``datasets.load_dataset(NAME, split=...)`` and its
  cache; offline (``HF_DATASETS_OFFLINE=1``) it reads what the cache already holds.

Every source is an iterator of :class:`tunelab.data.Record`, one row at a time: a million-row
source is never held as Python objects while it is tokenized (:func:`tunelab.data.stream`
keeps only the tokenized examples). ``columns`` renames fields on the way in
(``{"prompt": "instruction"}`` reads the ``instruction`` column as ``prompt``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError

HF_PREFIX = "hf:"
SHARD_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 4096  # rows per Arrow batch: big enough to amortise, small next to any dataset


@dataclass(frozen=True)
class Row:
    """A row before it becomes a Record: its fields, the file it is in, its 1-based index."""

    data: dict[str, Any]
    where: str
    index: int


def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"prompt=instruction,completion=output"`` -> ``{"prompt": "instruction", ...}``
    (tunelab's field name = the source's column name)."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        return {str(k): str(v) for k, v in spec.items()}
    out: dict[str, str] = {}
    for item in str(spec).split(","):
        if not item.strip():
            continue
        target, sep, source = item.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise ConfigError(f"columns: '{item.strip()}' is not FIELD=COLUMN; write e.g. "
                              "columns: prompt=instruction,completion=output")
        out[target.strip()] = source.strip()
    return out


def is_source(spec: str | Path) -> bool:
    """A `datasets` source (hub id or folder), rather than one local file."""
    text = str(spec)
    return text.startswith(HF_PREFIX) or Path(text).expanduser().is_dir()


def count_rows(spec: str | Path, split: str = "train") -> int:
    """Rows in a source, from its metadata where it has one (no row is read)."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        return len(_hub_dataset(text, split))
    folder = Path(text).expanduser()
    if _is_saved_dataset(folder):
        return len(_saved_dataset(folder, split))
    total = 0
    for shard in _shards(folder):
        total += _shard_rows(shard)
    return total


def iter_rows(spec: str | Path, split: str = "train",
              columns: Mapping[str, str] | None = None) -> Iterator[Row]:
    """Every row of a source in order, with ``columns`` applied."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        rows = _iter_dataset(_hub_dataset(text, split), text)
    else:
        folder = Path(text).expanduser()
        if _is_saved_dataset(folder):
            rows = _iter_dataset(_saved_dataset(folder, split), str(folder))
        else:
            rows = _iter_shards(folder)
    mapping = dict(columns or {})
    for row in rows:
        yield Row(rename(row.data, mapping, row), row.where, row.index) if mapping else row


def rename(data: dict[str, Any], mapping: dict[str, str], row: Row) -> dict[str, Any]:
    missing = [src for src in mapping.values() if src not in data]
    if missing:
        have = ", ".join(sorted(data)) or "none"
        raise DataError(f"column '{missing[0]}' (named in columns) is not in the data; its "
                        f"columns are: {have}", path=row.where, line=row.index,
                        field=missing[0])
    renamed = {target: data[source] for target, source in mapping.items()}
    sources = set(mapping.values())
    return {**{k: v for k, v in data.items() if k not in sources}, **renamed}


# ------------------------------------------------------------------- `datasets` objects


def _datasets():
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency
        raise DataError("reading `datasets` sources needs the datasets package: "
                        "pip install datasets") from None
    return datasets


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _pick_split(obj: Any, split: str, where: str) -> Any:
    ds = _datasets()
    if isinstance(obj, ds.DatasetDict | ds.IterableDatasetDict):
        if split not in obj:
            raise DataError(f"no split '{split}'; the splits are: {', '.join(obj)}. Pick one "
                            "with --split", path=where)
        return obj[split]
    return obj


def _saved_dataset(folder: Path, split: str) -> Any:
    try:
        obj = _datasets().load_from_disk(str(folder))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"cannot open the dataset saved here: {exc}", path=str(folder)) from None
    return _pick_split(obj, split, str(folder))


def _hub_dataset(spec: str, split: str) -> Any:
    name = spec[len(HF_PREFIX):]
    if not name:
        raise DataError("hf: needs a dataset id, e.g. --data hf:tatsu-lab/alpaca", path=spec)
    try:
        # trust_remote_code stays off: a hub dataset is data, never code run here
        return _datasets().load_dataset(name, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"{exc}. Pick one with --split", path=spec) from None
        raise DataError(f"cannot load the dataset: {exc}", path=spec) from None
    except Exception as exc:  # offline with nothing cached, unknown id, ...
        raise DataError(f"cannot load the dataset: {exc}. Offline, only datasets already in "
                        "the cache (~/.cache/huggingface) can be read", path=spec) from None


def _iter_dataset(dataset: Any, where: str) -> Iterator[Row]:
    index = 0
    for batch in dataset.iter(batch_size=BATCH_ROWS):
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            index += 1
            yield Row(dict(zip(names, values, strict=True)), where, index)


# ------------------------------------------------------------------------ shard folders


def _shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError("not found", path=str(folder))
    shards = sorted(p for p in folder.rglob("*") if p.suffix in SHARD_SUFFIXES and p.is_file())
    if not shards:
        raise DataError("this folder is neither a saved dataset (save_to_disk) nor holds "
                        f"{' or '.join(SHARD_SUFFIXES)} shards", path=str(folder))
    kinds = {p.suffix for p in shards}
    if len(kinds) > 1:
        raise DataError("the folder mixes .parquet and .arrow shards; keep one kind",
                        path=str(folder))
    return shards


def _arrow_reader(shard: Path):
    """An Arrow shard as written by `datasets` (IPC stream) or as an IPC file."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(shard)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(shard)))


def _shard_rows(shard: Path) -> int:
    try:
        if shard.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(shard).metadata.num_rows
        reader = _arrow_reader(shard)
        if hasattr(reader, "num_record_batches"):
            return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        return sum(b.num_rows for b in reader)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise DataError(f"cannot read the shard: {exc}", path=str(shard)) from None


def _shard_batches(shard: Path) -> Iterator[Any]:
    if shard.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(shard).iter_batches(batch_size=BATCH_ROWS)
        return
    reader = _arrow_reader(shard)
    if hasattr(reader, "num_record_batches"):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


def _iter_shards(folder: Path) -> Iterator[Row]:
    for shard in _shards(folder):
        index = 0
        try:
            for batch in _shard_batches(shard):
                for data in batch.to_pylist():
                    index += 1
                    yield Row(data, str(shard), index)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"cannot read the shard: {exc}", path=str(shard),
                            line=index + 1) from None
