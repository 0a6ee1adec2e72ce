"""JSON, JSONL, Parquet and CSV files read into the same records."""

from __future__ import annotations

import json

import pytest
from datahelpers import ALPACA, write_jsonl

from qlorakit.data import load_records
from qlorakit.errors import DataFormatError


def write(path, records):
    if path.suffix == ".jsonl":
        write_jsonl(path, records)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_kind_reads_the_same_records_in_order(tmp_path, suffix):
    assert load_records(write(tmp_path / f"data{suffix}", ALPACA)) == ALPACA


def test_csv_cells_stay_strings(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text('instruction,input,output\nAdd 40 and 2.,,42\n"Say\nhi",,007\n', encoding="utf-8")
    assert load_records(path) == [{"instruction": "Add 40 and 2.", "input": "", "output": "42"},
                                  {"instruction": "Say\nhi", "input": "", "output": "007"}]


def test_json_keys_missing_from_some_records_read_as_none(tmp_path):
    path = write_jsonl(tmp_path / "ragged.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    assert load_records(path) == [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]


@pytest.mark.parametrize("name,content,expected", [
    ("missing.jsonl", None, "missing.jsonl: data file not found"),
    ("data.txt", "hello", "data.txt: unsupported data file extension '.txt'; use one of .json, .jsonl, "
                          ".parquet, .csv"),
    ("empty.jsonl", "", "empty.jsonl: the file is empty"),
    ("broken.json", '[{"instruction": "a"},', "broken.json: cannot be read as JSON"),
])
def test_an_unreadable_file_is_one_line_naming_it(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataFormatError) as err:
        load_records(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path / expected.split(":")[0]))
    assert expected in message
