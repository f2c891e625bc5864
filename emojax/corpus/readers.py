"""Readers for user corpora: JSONL, CSV and Parquet, with configurable text, label and id columns.

A reader yields one `RawRecord` per row, bad rows included: a row it cannot use carries `error` (missing
column, invalid UTF-8, unparseable line) and the pipeline sends it to rejected.jsonl with its location. Only a
file that cannot be read at all raises (`CorpusError`, naming the file).

Multi-label rows (the GoEmotions layout): the label column holds comma-separated label ids and
`label_names` maps id -> name (one name per line of a labels file); an id outside 0..len-1 (a negative one
included) rejects the row.

Locations: JSONL and CSV rows are "line L" (the physical line a CSV row starts on), Parquet rows "row N". The
default doc id is "<file name>:<N>" with N the row's number among the file's data rows (for JSONL, its line).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterator
from pathlib import PurePath

from emojax.errors import EmojaxError


class CorpusError(EmojaxError):
    """A corpus input that cannot be read at all."""


@dataclasses.dataclass(frozen=True)
class ReaderSpec:
    text_column: str = "text"
    label_column: str = "label"
    id_column: str | None = None  # a stable id per row; default "<file name>:<row>"
    label_names: tuple[str, ...] = ()  # non-empty: the label column holds comma-separated ids into this list
    format: str = "auto"  # auto (by suffix) | jsonl | csv | parquet


@dataclasses.dataclass(frozen=True)
class RawRecord:
    source: str  # file name as given
    location: str  # "line 12" / "row 5"
    doc_id: str
    text: str | None = None
    labels: tuple[str, ...] = ()
    error: str | None = None
    topic: str = ""  # the built-in generator's topic ("" for file rows and implicit scenarios)
    split: str = ""  # the split its source assigns (the world's, implicit scenarios'); "": the corpus stage assigns it


def file_format(path: str, spec: ReaderSpec) -> str:
    if spec.format != "auto":
        return spec.format
    suffixes = PurePath(path).suffixes
    for fmt, exts in (("jsonl", (".jsonl", ".json", ".ndjson")), ("csv", (".csv", ".tsv")),
                      ("parquet", (".parquet", ".pq"))):
        if any(s in exts for s in suffixes):
            return fmt
    raise CorpusError(f"{path}: cannot tell the format from the name; set format to jsonl, csv or parquet")


def read_records(path: str, data: bytes, spec: ReaderSpec) -> Iterator[RawRecord]:
    """All rows of one file, given its bytes."""
    for location, default_id, row, error in read_rows(path, data, file_format(path, spec)):
        yield (RawRecord(path, location, default_id, error=error) if error is not None
               else _record(path, location, default_id, row, spec))


def read_rows(path: str, data: bytes, fmt: str) -> Iterator[tuple[str, str, dict | None, str | None]]:
    """(location, default id, row, error) for every row of one file in format `fmt` (jsonl, csv, parquet): the
    row as a dict, or None with the reason it cannot be read. Only a file unreadable as a whole raises."""
    name = PurePath(path).name
    if fmt == "jsonl":
        yield from _jsonl(name, data)
    elif fmt == "csv":
        yield from _csv(path, name, data)
    elif fmt == "parquet":
        yield from _parquet(path, name, data)
    else:
        raise CorpusError(f"{path}: unknown format {fmt!r} (jsonl, csv or parquet)")


def _record(path: str, location: str, default_id: str, row: dict, spec: ReaderSpec) -> RawRecord:
    doc_id = default_id
    if spec.id_column and row.get(spec.id_column) not in (None, ""):
        doc_id = str(row[spec.id_column])
    missing = [c for c in (spec.text_column, spec.label_column) if c not in row]
    if missing:
        return RawRecord(path, location, doc_id, error=f"missing column(s) {missing}")
    text = row[spec.text_column]
    if text is not None and not isinstance(text, str):
        return RawRecord(path, location, doc_id, error=f"column {spec.text_column!r} is not text")
    try:
        labels = _labels(row[spec.label_column], spec)
    except ValueError as e:
        return RawRecord(path, location, doc_id, text=text, error=str(e))
    return RawRecord(path, location, doc_id, text=text, labels=labels)


def _labels(value, spec: ReaderSpec) -> tuple[str, ...]:
    if value is None or value == "":
        raise ValueError("empty label")
    if not spec.label_names:
        return (str(value).strip(),)
    labels = []
    n = len(spec.label_names)
    for part in str(value).split(","):
        try:
            index = int(part)
        except ValueError:
            index = -1
        # Checked by hand: Python would read a negative id as counting from the end of the list.
        if not 0 <= index < n:
            raise ValueError(f"label id {part.strip()!r} is not an index into the {n} label names (0..{n - 1})")
        labels.append(spec.label_names[index])
    return tuple(labels)


def _jsonl(name: str, data: bytes) -> Iterator[tuple[str, str, dict | None, str | None]]:
    for i, raw in enumerate(data.splitlines(), start=1):
        location = f"line {i}"
        if not raw.strip():
            yield location, f"{name}:{i}", None, "empty line"
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield location, f"{name}:{i}", None, f"invalid UTF-8 at byte {e.start}"
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield location, f"{name}:{i}", None, f"not JSON ({e.msg})"
            continue
        if not isinstance(row, dict):
            yield location, f"{name}:{i}", None, "not a JSON object"
            continue
        yield location, f"{name}:{i}", row, None


def _csv(path: str, name: str, data: bytes) -> Iterator[tuple[str, str, dict | None, str | None]]:
    delimiter = "\t" if PurePath(path).suffix == ".tsv" else ","
    lines = data.splitlines(keepends=True)
    if not lines:
        raise CorpusError(f"{path}: empty file (a CSV corpus needs a header row)")
    try:
        header = next(csv.reader([lines[0].decode("utf-8-sig")], delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CorpusError(f"{path}: cannot read the CSV header ({e})") from None
    # Rows are read one at a time from their first physical line, so that one bad byte or one unbalanced
    # quote rejects one row, never the file or the rows after it. A quoted field may span lines; when the
    # row it starts is not well formed, only its first line is rejected and reading resumes on the next.
    row_number, i = 0, 1
    while i < len(lines):
        location = f"line {i + 1}"
        try:
            first = lines[i].decode("utf-8")
        except UnicodeDecodeError as e:
            row_number += 1
            yield location, f"{name}:{row_number}", None, f"invalid UTF-8 at byte {e.start}"
            i += 1
            continue
        if not first.strip():
            i += 1
            continue
        row_number += 1
        default_id = f"{name}:{row_number}"
        values, used, problem = _csv_row(lines, i, delimiter)
        if problem is None and len(values) == len(header):
            yield location, default_id, dict(zip(header, values)), None
            i += used
            continue
        if problem is None and used == 1:
            problem = f"{len(values)} fields, header has {len(header)}"
        elif used > 1 or problem == "unexpected end of data":
            problem = (f"unbalanced quote: the quoted field opened on this line does not close into a row of "
                       f"{len(header)} fields (only this line is rejected)")
        else:
            problem = f"bad CSV row ({problem})"
        yield location, default_id, None, problem
        i += 1


def _csv_row(lines: list[bytes], start: int, delimiter: str) -> tuple[list[str], int, str | None]:
    """The CSV row starting at physical line `start`: (values, lines it spans, problem or None)."""
    def decoded():
        for raw in lines[start:]:
            yield raw.decode("utf-8")

    reader = csv.reader(decoded(), delimiter=delimiter, strict=True)
    try:
        return next(reader), reader.line_num, None
    except UnicodeDecodeError:  # a continuation line; it is reported on its own when reading resumes there
        return [], reader.line_num + 1, "invalid UTF-8 inside a quoted field"
    except csv.Error as e:
        return [], reader.line_num, str(e)


def _parquet(path: str, name: str, data: bytes) -> Iterator[tuple[str, str, dict | None, str | None]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"row {i}", f"{name}:{i}", row, None


def read_label_names(path: str) -> tuple[str, ...]:
    """A labels file: one label name per line (GoEmotions' emotions.txt)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: cannot read label names ({e})") from None
    if not names:
        raise CorpusError(f"{path}: no label names")
    return names
