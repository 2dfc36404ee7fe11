"""Read training data from TSV, CSV, JSON or JSONL, with or without a header row; pick columns by name or index.

Every error names the file, the line (or JSON item) and the fix. A `Table` keeps each row's line number so
that the task code can report a bad value (an unknown label, an empty text) where it is.

    table = read_table("train.tsv")                        # format from the extension, header auto-detected
    text = table.resolve("text", "sentence", defaults=TEXT_NAMES)
    for row in table.rows: table.value(row, text)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXTENSIONS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class DataError(ValueError):
    """A problem with a data file, with the place and the fix in the message."""


@dataclass
class Row:
    line: int  # 1-based line in the file; for a JSON list, the 1-based item number
    values: list[str] | dict[str, Any]


@dataclass
class Table:
    path: Path
    fmt: str
    header: list[str] | None  # column names (TSV/CSV with a header, or the keys of the first JSON object)
    rows: list[Row]

    def where(self, row: Row) -> str:
        unit = "item" if self.fmt == "json" else "line"
        return f"{self.path}, {unit} {row.line}"

    def resolve(self, role: str, spec: str | None, defaults: tuple[str, ...] = (), *, required: bool = True,
                flag: str = "") -> str | int | None:
        """The column key for `role`: `spec` (a name or a 0-based index), else the first of `defaults` present.

        Returns a name (header / JSON key) or an index; None when nothing fits and `required` is False."""
        flag = flag or f"--{role.replace('_', '-')}-column"
        names = self.header or []
        if spec is not None:
            if spec.lstrip("-").isdigit():
                index = int(spec)
                width = len(names) if names else max((len(r.values) for r in self.rows[:50]), default=0)
                if not 0 <= index < width:
                    raise DataError(f"{self.path}: {flag} {index} is out of range; the file has {width} columns "
                                    f"(indices 0..{width - 1}).")
                return names[index] if (names and self.fmt in ("json", "jsonl")) else index
            if spec not in names:
                hint = (f"its columns are {names}" if names else
                        "it has no header row, so pick columns by 0-based index (e.g. --text-column 0)")
                raise DataError(f"{self.path}: no column named {spec!r} for {flag}; {hint}.")
            return spec
        for name in defaults:
            if name in names:
                return name
        if not required:
            return None
        if names:
            raise DataError(f"{self.path}: cannot tell which column is the {role.replace('_', ' ')}; none of "
                            f"{list(defaults)} is among the columns {names}. Pass {flag} NAME.")
        raise DataError(f"{self.path} has no header row; pass {flag} with a 0-based column index "
                        f"(or --header yes if the first line holds the column names).")

    def value(self, row: Row, key: str | int, *, role: str = "value", allow_empty: bool = False) -> str:
        """The cell `key` of `row` as a string, or a DataError naming the place."""
        values = row.values
        if isinstance(values, dict):
            if key not in values:
                raise DataError(f"{self.where(row)}: the {role} field {key!r} is missing. Add it or drop the row.")
            cell = values[key]
        else:
            index = key if isinstance(key, int) else (self.header or []).index(key)
            if index >= len(values):
                raise DataError(f"{self.where(row)}: has {len(values)} column(s), the {role} is column {index}. "
                                "Check the delimiter (tabs for .tsv, commas for .csv) and fix or drop the row.")
            cell = values[index]
        if cell is None or isinstance(cell, (dict, list)):
            raise DataError(f"{self.where(row)}: the {role} field {key!r} is {cell!r}, expected text or a number.")
        text = str(cell)
        if not allow_empty and not text.strip():
            raise DataError(f"{self.where(row)}: the {role} field {key!r} is empty. Fill it in or drop the row.")
        return text


def read_table(path: str | Path, fmt: str = "auto", header: str = "auto",
               header_names: tuple[str, ...] = (), limit: int | None = None) -> Table:
    """Read a data file. `header`: 'yes', 'no' or 'auto' (a TSV/CSV first row is a header when it holds one
    of `header_names` or a requested column name). `limit`: keep the first N data rows."""
    path = Path(path)
    if fmt == "auto":
        fmt = EXTENSIONS.get(path.suffix.lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the extension {path.suffix!r}; pass --format "
                            f"one of tsv, csv, json, jsonl.")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; give a file with at least one data row.")
    reader = {"tsv": _read_delimited, "csv": _read_delimited, "json": _read_json, "jsonl": _read_jsonl}[fmt]
    table = reader(path, raw, fmt, header, header_names)
    if not table.rows:
        raise DataError(f"{path} has a header row but no data rows; add data below it.")
    if limit is not None:
        table.rows = table.rows[:limit]
    return table


def _decode_lines(path: Path, raw: bytes) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines; a line that is not UTF-8 is an error naming it."""
    out = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8-sig" if i == 1 else "utf-8").rstrip("\r")
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, line {i}: not valid UTF-8 ({err.reason} at byte {err.start}). Re-save the "
                            "file as UTF-8 or remove the line.") from err
        if text.strip():
            out.append((i, text))
    return out


def _read_delimited(path: Path, raw: bytes, fmt: str, header: str, header_names: tuple[str, ...]) -> Table:
    lines = _decode_lines(path, raw)
    rows: list[Row] = []
    for number, text in lines:
        if fmt == "tsv":  # GLUE-style TSV: no quoting, a tab separates fields
            cells = text.split("\t")
        else:
            try:
                cells = next(csv.reader(io.StringIO(text), strict=True))
            except csv.Error as err:
                raise DataError(f"{path}, line {number}: unreadable CSV ({err}). Quote fields that hold commas "
                                "or quotes (\"a, b\"), or remove the line.") from err
        rows.append(Row(number, cells))
    first = [c.strip() for c in rows[0].values]
    has_header = header == "yes" or (header == "auto" and any(name in first for name in header_names))
    if has_header:
        return Table(path, fmt, first, rows[1:])
    return Table(path, fmt, None, rows)


def _read_jsonl(path: Path, raw: bytes, fmt: str, header: str, header_names: tuple[str, ...]) -> Table:
    rows = []
    for number, text in _decode_lines(path, raw):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg} at column {err.colno}). Each line "
                            "must be one JSON object such as {\"text\": \"...\", \"label\": 1}.") from err
        rows.append(Row(number, _object(path, f"line {number}", obj)))
    return Table(path, fmt, _keys(rows), rows)


def _read_json(path: Path, raw: bytes, fmt: str, header: str, header_names: tuple[str, ...]) -> Table:
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason}); re-save the file as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}). For one object per line, name "
                        "the file .jsonl.") from err
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of objects (or an object holding exactly one list), "
                            f"got an object with keys {list(data)[:10]}.")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}.")
    rows = [Row(i, _object(path, f"item {i}", obj)) for i, obj in enumerate(data, start=1)]
    return Table(path, fmt, _keys(rows), rows)


def _object(path: Path, where: str, obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{path}, {where}: expected a JSON object like {{\"text\": ..., \"label\": ...}}, got "
                        f"{type(obj).__name__}.")
    return obj


def _keys(rows: list[Row]) -> list[str] | None:
    return list(rows[0].values) if rows else None
