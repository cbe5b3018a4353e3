"""Read training rows from a file or a Hugging Face dataset, and split off a validation set.

Every reader returns a list of plain dicts (one per row). Bad input is a `DataError` that names
the file and, where there is one, the line number or byte offset: the pipeline never skips a row
silently.

Supported sources:
  *.jsonl            one JSON object per line (blank lines are allowed)
  *.json             a list of objects, or {"data": [...]}
  *.csv              a header row, then one row per record (every value is a string)
  *.parquet          read with pyarrow (optional: pip install pyarrow)
  owner/name         a Hugging Face dataset id, read with `datasets` (optional) when online
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """The training data is malformed; the message names the file, row/line and field."""


def load_records(source: str) -> list[dict]:
    """Read every row of `source` (a local file, or a Hugging Face dataset id) as a list of dicts."""
    if not isinstance(source, str) or not source:
        raise DataError(f"data.path={source!r} is not allowed; give a .jsonl/.json/.csv/.parquet file or a dataset id")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"{source}: is a directory; give one {'/'.join(LOCAL_SUFFIXES)} file")
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{source}: unsupported file type {suffix!r}; supported: {', '.join(LOCAL_SUFFIXES)}")
        records = readers[suffix](path)
    elif suffix in LOCAL_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: file not found")
    else:
        records = _read_hub(source)
    if not records:
        raise DataError(f"{source}: no records (the file or dataset is empty)")
    return records


def _decode_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a leading byte-order mark (Excel exports)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not valid UTF-8: byte {data[e.start]:#04x} at byte offset {e.start} (line {line}); "
            "re-save the file as UTF-8"
        ) from None


def _check_object(row, path: Path, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}:{where}: expected a JSON object with named fields, got {type(row).__name__}")
    return row


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    for lineno, line in enumerate(_decode_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
        records.append(_check_object(row, path, f"{lineno}"))
    return records


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(_decode_utf8(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or {{\"data\": [...]}}, got {type(data).__name__}")
    return [_check_object(row, path, f"item {i}") for i, row in enumerate(data)]


def _read_csv(path: Path) -> list[dict]:
    reader = csv.reader(io.StringIO(_decode_utf8(path), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV: {e}") from None
    records = []
    try:
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}:{reader.line_num}: expected {len(header)} columns ({', '.join(header)}), got {len(row)}"
                )
            records.append(dict(zip(header, row)))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return records


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet needs pyarrow; install it with `pip install pyarrow`") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    return table.to_pylist()


def _read_hub(source: str) -> list[dict]:
    """`owner/name` or `owner/name:split` (default split "train") from the Hugging Face hub."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a local file, and reading a Hugging Face dataset id needs the `datasets` "
            "library (pip install datasets); or download the data and give a .jsonl/.json/.csv/.parquet path"
        ) from None
    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown id, missing split: all reported with the id
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split or 'train'!r}): {e}") from None
    return [dict(row) for row in ds]


def split_records(records: list, val_size: float | int, seed: int) -> tuple[list, list]:
    """Hold out `val_size` rows for validation: a fraction in (0, 1), a count >= 1, or 0 (none).

    Deterministic given `seed`; both parts keep the original row order.
    """
    n = len(records)
    n_val = _val_count(val_size, n)
    if n_val == 0:
        return list(records), []
    if n_val >= n:
        raise DataError(f"data.val_size={val_size!r} holds out {n_val} of {n} rows and leaves none for training")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val


def _val_count(val_size: float | int, n: int) -> int:
    bad = DataError(f"data.val_size={val_size!r} is not allowed; use a fraction in (0, 1), a count >= 1, or 0")
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0:
        raise bad
    if val_size == 0:
        return 0
    if val_size < 1:
        return max(1, round(val_size * n))  # a fraction of a tiny set still holds out one row
    if float(val_size).is_integer():
        return int(val_size)
    raise bad
