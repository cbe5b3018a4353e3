"""Readers (jsonl/json/csv/parquet/hub) and the train/validation split."""

import json
import sys

import pytest

from lorakit.data import DataError, load_records, split_records

ROWS = [
    {"instruction": "Name a colour.", "context": "", "response": "Blue"},
    {"instruction": "Capital of France?", "context": "Europe", "response": "Paris"},
    {"instruction": "2 + 2?", "context": "", "response": "4, with ünïcödé"},
]


def write_jsonl(path, rows, blank_line=False):
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if blank_line:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_json_csv_parquet_read_the_same_rows(tmp_path):
    assert load_records(write_jsonl(tmp_path / "a.jsonl", ROWS, blank_line=True)) == ROWS
    (tmp_path / "b.json").write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_records(str(tmp_path / "b.json")) == ROWS
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    assert load_records(str(tmp_path / "c.json")) == ROWS
    header = "instruction,context,response\n"
    body = "".join(f'"{r["instruction"]}","{r["context"]}","{r["response"]}"\n' for r in ROWS)
    (tmp_path / "d.csv").write_text(header + body, encoding="utf-8")
    assert load_records(str(tmp_path / "d.csv")) == ROWS


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "e.parquet")
    assert load_records(str(tmp_path / "e.parquet")) == ROWS


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "e.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pip install pyarrow"):
        load_records(str(path))


def test_hub_id_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"databricks/databricks-dolly-15k.*needs the `datasets`"):
        load_records("databricks/databricks-dolly-15k")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "ok"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:4: malformed JSON at column 10"):
        load_records(str(path))


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b",}\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        load_records(str(path))


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "a"}\n["text"]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.jsonl:2: expected a JSON object.*got list"):
        load_records(str(path))


def test_non_utf8_reports_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = '{"text": "ok"}\n'.encode()
    path.write_bytes(good + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    offset = len(good) + len(b'{"text": "caf')
    with pytest.raises(DataError, match=rf"not valid UTF-8: byte 0xe9 at byte offset {offset} \(line 2\)"):
        load_records(str(path))


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("empty.json", "[]"),
                                          ("header_only.csv", "text\n"), ("empty.csv", "")])
def test_empty_source_is_an_error(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_records(str(tmp_path / name))


def test_csv_wrong_column_count_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 2 columns \(prompt, completion\), got 3"):
        load_records(str(path))


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_records(str(tmp_path / "x.txt"))


# ------------------------------------------------------------------ split


@pytest.mark.parametrize("val_size,n_val", [(0.1, 10), (0.25, 25), (7, 7), (7.0, 7), (0.001, 1), (0, 0)])
def test_split_sizes_partition_and_order(val_size, n_val):
    records = [{"i": i} for i in range(100)]
    train, val = split_records(records, val_size, seed=3)
    assert len(val) == n_val and len(train) == 100 - n_val
    assert sorted(r["i"] for r in train + val) == list(range(100))  # a partition
    assert [r["i"] for r in train] == sorted(r["i"] for r in train)  # original order kept
    assert [r["i"] for r in val] == sorted(r["i"] for r in val)


def test_split_is_deterministic_given_seed():
    records = [{"i": i} for i in range(50)]
    a = split_records(records, 0.2, seed=1)
    assert split_records(records, 0.2, seed=1) == a
    assert split_records(records, 0.2, seed=2)[1] != a[1]


@pytest.mark.parametrize("val_size", [-1, 1.5, "0.1", True])
def test_split_bad_val_size(val_size):
    with pytest.raises(DataError, match="val_size"):
        split_records([{"i": i} for i in range(10)], val_size, seed=0)


def test_split_leaving_no_training_rows():
    with pytest.raises(DataError, match="leaves none for training"):
        split_records([{"i": i} for i in range(5)], 5, seed=0)
