"""Reading rows from JSONL/JSON/CSV/Parquet files and saved HF `datasets`, and writing JSONL atomically.

Every row comes with its number so that an error can point at it: "line N" (1-based, as an editor shows
it) for JSONL and CSV, "index N" (0-based, as `dataset[N]` reads it) for JSON arrays, Parquet, datasets
and in-memory lists.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhflab.data.records import RECORD_TYPES, record_to_dict
from rlhflab.errors import ConfigError, DataError

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_BATCH = 1024

# A row is either a dict or the error that reading it raised; the caller decides whether to skip it.
RowOrError = tuple[int, "dict[str, Any] | DataError"]


@dataclass
class Source:
    """An opened data source: its display name, how rows are numbered, and its rows.

    `text_cells` is True for CSV, whose cells are all strings (numbers, booleans and lists are parsed from
    them by the loader).
    """

    name: str
    unit: str
    rows: Iterator[RowOrError]
    text_cells: bool = False


def data_error(
    reason: str,
    *,
    path: str | None,
    unit: str | None = None,
    number: int | None = None,
    field: str | None = None,
) -> DataError:
    """A DataError reading "<path>, <unit> <number>, field '<field>': <reason>".

    DataError itself would write "record <n>"; this says "line 3" or "index 2" so the user knows how to
    count. The structured attributes are set as DataError sets them.
    """
    where = [str(path)] if path is not None else []
    if number is not None:
        where.append(f"{unit or 'record'} {number}")
    if field is not None:
        where.append(f"field '{field}'")
    err = DataError(f"{', '.join(where)}: {reason}" if where else reason)
    err.path, err.record, err.field = path, number, field
    return err


def open_source(source: Any, split: str | None = None) -> Source:
    """Open a path (file or saved-datasets directory), a `datasets.Dataset`/`DatasetDict`, or a list of dicts."""
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), split)
    if isinstance(source, (list, tuple)):
        _no_split(split, "<list>")
        return Source("<list>", "index", _iter_list(source, "<list>"))
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        name = f"<datasets.{type(source).__name__}>"
        return Source(name, "index", _iter_dataset(_pick_split(source, split, name)))
    raise ConfigError(
        f"cannot read data from a {type(source).__name__}; give a file path (.jsonl, .json, .csv, "
        ".parquet), a saved datasets directory, a datasets.Dataset or a list of dicts"
    )


def read_rows(source: Any, split: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(record_number, row)` from `source` (anything `open_source` takes, or a `Source` it opened); raise
    DataError on the first unreadable row.

    An empty source (no rows at all) is an error too, raised once the source is exhausted.
    """
    src = source if isinstance(source, Source) else open_source(source, split)
    n_rows = 0
    for number, row in src.rows:
        if isinstance(row, DataError):
            raise row
        n_rows += 1
        yield number, row
    if n_rows == 0:
        raise data_error("no records found; the source is empty", path=src.name)


def _no_split(split: str | None, name: str) -> None:
    if split is not None:
        raise ConfigError(
            f"{name}: split={split!r} applies only to a DatasetDict (a saved datasets directory "
            "with several splits); leave split unset for this source"
        )


def _open_path(path: Path, split: str | None) -> Source:
    name = str(path)
    if not path.exists():
        raise data_error("no such file or directory", path=name)
    if path.is_dir():
        return Source(name, "index", _iter_dataset(_pick_split(_load_from_disk(path), split, name)))
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise data_error(
            f"unknown file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)} or a "
            "directory written by datasets' save_to_disk",
            path=name,
        )
    _no_split(split, name)
    if kind == "jsonl":
        return Source(name, "line", _iter_jsonl(path))
    if kind == "json":
        return _open_json(path)
    if kind == "csv":
        return Source(name, "line", _iter_csv(path, "\t" if path.suffix.lower() == ".tsv" else ","), True)
    return Source(name, "index", _iter_parquet(path))


def _iter_jsonl(path: Path) -> Iterator[RowOrError]:
    name = str(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                yield (
                    number,
                    data_error(
                        f"not valid UTF-8 ({e.reason} at byte {e.start})",
                        path=name,
                        unit="line",
                        number=number,
                    ),
                )
                continue
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    number,
                    data_error(
                        f"invalid JSON: {e.msg} at column {e.colno}", path=name, unit="line", number=number
                    ),
                )
                continue
            if not isinstance(row, dict):
                yield (
                    number,
                    data_error(
                        f"expected a JSON object {{...}}, got a {type(row).__name__}",
                        path=name,
                        unit="line",
                        number=number,
                    ),
                )
                continue
            yield number, row


def _open_json(path: Path) -> Source:
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise data_error(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=name) from None
    if not text.strip():
        return Source(name, "index", iter(()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file, as HF datasets also accepts
            return Source(name, "line", _iter_jsonl(path))
        raise data_error(
            f"invalid JSON: {e.msg} at column {e.colno}", path=name, unit="line", number=e.lineno
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise data_error(
            'expected a JSON array of objects [{...}, ...] or {"data": [...]}, got a '
            f"{type(data).__name__}" + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else ""),
            path=name,
        )
    return Source(name, "index", _iter_list(data, name))


def _iter_list(items: Iterable[Any], name: str) -> Iterator[RowOrError]:
    for i, item in enumerate(items):
        if isinstance(item, Mapping):
            yield i, dict(item)
        else:
            yield (
                i,
                data_error(
                    f"expected an object/dict, got {type(item).__name__}", path=name, unit="index", number=i
                ),
            )


def _iter_csv(path: Path, delimiter: str) -> Iterator[RowOrError]:
    name = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            end = reader.line_num
            for cells in reader:
                number, end = end + 1, reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                if len(cells) > len(header):
                    yield (
                        number,
                        data_error(
                            f"has {len(cells)} fields but the header has {len(header)} ({', '.join(header)}); "
                            "quote cells that contain the delimiter",
                            path=name,
                            unit="line",
                            number=number,
                        ),
                    )
                    continue
                # Short rows leave their last columns missing; the loader reports the field it needed.
                yield number, {h: (cells[i] if i < len(cells) else None) for i, h in enumerate(header)}
    except UnicodeDecodeError as e:
        raise data_error(f"not valid UTF-8 ({e.reason} at byte {e.start})", path=name) from None
    except csv.Error as e:
        raise data_error(f"malformed CSV: {e}", path=name) from None


def _iter_parquet(path: Path) -> Iterator[RowOrError]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-Parquet file
        raise data_error(f"cannot read as Parquet ({type(e).__name__}: {e})", path=str(path)) from None
    index = 0
    for batch in pf.iter_batches(batch_size=_BATCH):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _load_from_disk(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise data_error(
            f"is a directory but not one written by datasets' save_to_disk ({e})", path=str(path)
        ) from None


def _pick_split(ds: Any, split: str | None, name: str):
    import datasets

    if isinstance(ds, datasets.Dataset):
        _no_split(split, name)
        return ds
    splits = list(ds)
    if split is None:
        if len(splits) == 1:
            return ds[splits[0]]
        raise ConfigError(f"{name}: holds several splits ({', '.join(splits)}); choose one with split=")
    if split not in ds:
        raise ConfigError(f"{name}: no split {split!r}; available splits: {', '.join(splits)}")
    return ds[split]


def _iter_dataset(ds) -> Iterator[RowOrError]:
    ds = ds.with_format(None)  # plain python values even if the user set a torch/numpy format
    index = 0
    for batch in ds.iter(batch_size=_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield index, dict(zip(columns, values))
            index += 1


def write_jsonl(items: Iterable[Any], path: str | os.PathLike) -> int:
    """Write records (or plain dicts) as JSON Lines, atomically; return how many were written.

    The lines go to a temporary file in the target's directory, which replaces `path` only once every
    item has been written and synced: a crash or a bad item leaves any previous file untouched and no
    partial file behind. An item that is not JSON-serializable raises DataError naming its index.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(_json_line(item, n, str(path)))
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return n


def _json_line(item: Any, index: int, name: str) -> str:
    if isinstance(item, tuple(RECORD_TYPES.values())):
        item = record_to_dict(item)
    if not isinstance(item, Mapping):
        raise data_error(
            f"expected a record or a dict, got {type(item).__name__}", path=name, unit="item", number=index
        )
    try:
        return json.dumps(dict(item), ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise data_error(f"cannot be written as JSON ({e})", path=name, unit="item", number=index) from None
