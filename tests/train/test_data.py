"""Data readers: every format, with and without a header, columns by name or index, errors with file and line."""

from __future__ import annotations

import json

import pytest

from rankwise.train.classification import LABEL_NAMES, TEXT_NAMES
from rankwise.train.data import DataError, read_table


def write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name, text", [
    ("a.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n"),
    ("a.csv", 'sentence,label\n"good, really",1\nbad film,0\n'),
    ("a.jsonl", '{"sentence": "good film", "label": 1}\n\n{"sentence": "bad film", "label": 0}\n'),
    ("a.json", json.dumps([{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}])),
    ("b.json", json.dumps({"data": [{"sentence": "good film", "label": 1}, {"sentence": "bad film", "label": 0}]})),
])
def test_formats_by_name(tmp_path, name, text):
    table = read_table(write(tmp_path, name, text), header_names=TEXT_NAMES + LABEL_NAMES)
    text_key = table.resolve("text", None, TEXT_NAMES)
    label_key = table.resolve("label", None, LABEL_NAMES)
    assert [table.value(r, label_key) for r in table.rows] == ["1", "0"]
    assert table.value(table.rows[1], text_key) == "bad film"


def test_headerless_tsv_by_index_like_cola(tmp_path):
    path = write(tmp_path, "cola.tsv", "gj04\t1\t\tthe sailors rode the breeze .\ngj04\t0\t*\tthe more we study .\n")
    table = read_table(path, header_names=TEXT_NAMES + LABEL_NAMES)
    assert table.header is None
    text = table.resolve("text", "3", TEXT_NAMES)
    assert [table.value(r, text) for r in table.rows] == ["the sailors rode the breeze .", "the more we study ."]
    with pytest.raises(DataError, match=r"no header row, so pick columns by 0-based index"):
        table.resolve("text", "sentence", TEXT_NAMES)
    with pytest.raises(DataError, match=r"has no header row; pass --text-column"):
        table.resolve("text", None, TEXT_NAMES)


def test_header_yes_with_indices(tmp_path):
    path = write(tmp_path, "x.tsv", "a\tb\nhello\t1\n")
    table = read_table(path, header="yes")
    assert table.header == ["a", "b"] and len(table.rows) == 1
    assert table.value(table.rows[0], table.resolve("text", "0")) == "hello"


def test_bom_is_dropped(tmp_path):
    path = write(tmp_path, "mrpc.tsv", "\ufeffQuality\t#1 String\t#2 String\n1\ta\tb\n".encode(), "wb")
    table = read_table(path, header_names=TEXT_NAMES + LABEL_NAMES)
    assert table.header == ["Quality", "#1 String", "#2 String"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "\n\n", r"empty.tsv is empty"),
    ("only.tsv", "sentence\tlabel\n", r"only.tsv has a header row but no data rows"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n', r"bad.jsonl, line 2: not valid JSON"),
    ("bad.json", '[{"text": "a"},\n {"text": }]', r"bad.json, line 2: not valid JSON"),
    ("list.jsonl", '["a", 1]\n', r"list.jsonl, line 1: expected a JSON object"),
    ("data.parquet", "x", r"cannot tell the format from the extension '.parquet'; pass --format"),
])
def test_bad_files_name_the_place(tmp_path, name, content, message):
    with pytest.raises(DataError, match=message):
        read_table(write(tmp_path, name, content), header_names=TEXT_NAMES + LABEL_NAMES)


def test_undecodable_line_is_named(tmp_path):
    path = write(tmp_path, "latin.tsv", b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n", "wb")
    with pytest.raises(DataError, match=r"latin.tsv, line 3: not valid UTF-8"):
        read_table(path)


def test_missing_and_short_cells_name_file_and_line(tmp_path):
    table = read_table(write(tmp_path, "t.tsv", "sentence\tlabel\ngood\t1\nno label here\n"),
                       header_names=("sentence",))
    label = table.resolve("label", None, LABEL_NAMES)
    with pytest.raises(DataError, match=r"t.tsv, line 3: has 1 column\(s\), the label is column 1"):
        [table.value(r, label, role="label") for r in table.rows]
    jtable = read_table(write(tmp_path, "t.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'))
    with pytest.raises(DataError, match=r"t.jsonl, line 2: the label field 'label' is missing"):
        [jtable.value(r, "label", role="label") for r in jtable.rows]
    with pytest.raises(DataError, match=r"no column named 'txt' for --text-column; its columns are \['text'"):
        jtable.resolve("text", "txt", TEXT_NAMES)


def test_limit_keeps_the_first_rows(tmp_path):
    table = read_table(write(tmp_path, "t.tsv", "sentence\tlabel\n" + "".join(f"s{i}\t1\n" for i in range(9))),
                       header_names=("sentence",), limit=3)
    assert [r.line for r in table.rows] == [2, 3, 4]
