"""Containers of instruction data: which files a --data path names, and the rows each file holds.

    data_files(path)          a file; a folder: its .json/.jsonl/.csv/.tsv/.parquet/.txt files (not
                              its subfolders, hidden files or other extensions), sorted by name; a glob
                              pattern (`data/*.parquet`, `**` recursive): the matching files, sorted
    container_of(path, text)  "json" | "jsonl" | "csv" | "tsv" | "parquet" | "text": .csv, .tsv and
                              .parquet (or Parquet's magic bytes) by name, the rest by content:
                              '[' or '{' JSON (json_rows: an array, JSON lines or one object),
                              anything else '### Human:' text
    *_rows(...)               [(where, row)]; `where` names the file and the row's place:
        JSON, JSONL   FILE:LINE                  the line the record starts on
        CSV, TSV      FILE:LINE                  the line the row starts on (the header row is line 1,
                                                 so it is the spreadsheet's row unless cells hold line breaks)
        Parquet       FILE:row-group G, row R    both counted from 0, as pyarrow does

CSV and TSV need a header row (read with the csv module: quoted cells may hold separators and line
breaks). Parquet needs pyarrow (the optional `[data]` extra). Malformed input raises DataError with
a one-line message that starts with the place.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import re
from pathlib import Path

from ..errors import DataError
from .formats import json_kind, line_of, shape_of

__all__ = ["CONTAINERS", "DATA_SUFFIXES", "container_of", "data_files", "delimited_rows", "json_rows", "jsonl_rows",
           "parquet_rows", "read_text"]

CONTAINERS = ("json", "jsonl", "csv", "tsv", "parquet", "text")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
_BY_SUFFIX = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_WRAPPER_KEYS = ("train", "data")           # {"train": [records]} / {"data": [records]}
_WS = re.compile(r"\s*")
DATA_EXTRA = 'pip install -e ".[data]"'


def data_files(path) -> list[Path]:
    """The data files `path` names (see the module docstring). FileNotFoundError if it names none
    that exist; DataError for something that is not a regular file or a folder without data files."""
    p = Path(path)
    name = str(path)
    if not p.exists() and any(c in name for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(name, recursive=True) if Path(f).is_file())
        if not files:
            raise FileNotFoundError(f"instruction data {name!r}: no files match the pattern")
        return files
    if p.is_dir():
        files = sorted((q for q in p.iterdir() if q.suffix.lower() in DATA_SUFFIXES and not q.name.startswith(".")
                        and q.is_file()), key=lambda q: q.name)
        if not files:
            raise DataError(f"{name}: folder holds no instruction data files ({', '.join(DATA_SUFFIXES)})")
        return files
    if not p.exists():
        raise FileNotFoundError(f"instruction data {name!r} not found")
    if not p.is_file():
        raise DataError(f"{name}: not a regular file")
    return [p]


def read_text(p: Path) -> str:
    """The file as UTF-8 text (a BOM dropped); DataError names the line of a byte that is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text") from None


def container_of(p: Path, text: str | None = None) -> str:
    """The container of file p: by name, else (given its text) by content; "parquet" by magic bytes."""
    if p.suffix.lower() in _BY_SUFFIX:
        return _BY_SUFFIX[p.suffix.lower()]
    if text is None:
        if p.suffix.lower() in DATA_SUFFIXES:
            return "unknown"
        with open(p, "rb") as f:
            return "parquet" if f.read(4) == b"PAR1" else "unknown"
    return "json" if text.lstrip()[:1] in ("[", "{") else "text"


# --- JSON and JSON lines ------------------------------------------------------------------------------

def _array_rows(text: str, path: str, pos: int, whole: bool = True) -> list[tuple[str, object]]:
    """Rows of the JSON array starting at text[pos] == '['; whole: nothing may follow it."""
    dec = json.JSONDecoder()
    out: list[tuple[str, object]] = []
    pos = _WS.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        line = line_of(text, pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_of(text, e.pos)}: invalid JSON ({e.msg})") from None
        out.append((f"{path}:{line}", obj))
        pos = _WS.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            if whole and text[pos + 1:].strip():
                raise DataError(f"{path}:{line_of(text, pos + 1)}: unexpected data after the JSON list")
            return out
        raise DataError(f"{path}:{line_of(text, pos)}: invalid JSON (expected ',' or ']')")


def _wrapped_list(text: str, obj: dict) -> int | None:
    """Where the record list of a {"train"|"data": [...]} object starts in text (None: not such an object)."""
    key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), list)), None)
    if key is None or shape_of(obj) is not None:
        return None
    dec = json.JSONDecoder()
    pos = _WS.match(text, text.index("{") + 1).end()
    while True:                                  # the text is valid JSON: walk its top-level keys
        k, pos = dec.raw_decode(text, pos)
        pos = _WS.match(text, _WS.match(text, pos).end() + 1).end()     # past ':'
        if k == key:
            return pos
        _, pos = dec.raw_decode(text, pos)
        pos = _WS.match(text, _WS.match(text, pos).end() + 1).end()     # past ','


def json_rows(text: str, path: str) -> list[tuple[str, object]]:
    """Rows of a JSON array; of JSON lines; or of one JSON object: a record, or {"train"|"data": [records]}."""
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "[":
        return _array_rows(text, path, start)
    if text[start:start + 1] == "{":
        try:
            obj = json.loads(text)
        except ValueError:
            return jsonl_rows(text, path)
        pos = _wrapped_list(text, obj) if isinstance(obj, dict) else None
        if pos is None:
            return [(f"{path}:{line_of(text, start)}", obj)]
        return _array_rows(text, path, pos, whole=False)
    try:
        got = f", got {json_kind(json.loads(text))}"
    except ValueError:
        got = ""
    raise DataError(f"{path}:1: expected a JSON list of records{got}")


def jsonl_rows(text: str, path: str) -> list[tuple[str, object]]:
    """Rows of JSON lines (blank lines skipped)."""
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
    return out


def refuse_json_scalar(text: str, path: str) -> None:
    """DataError if the first non-blank line is a JSON scalar (null, 3, "x", true): JSON, not records.

    Such a file is no conversation text either (that must start with `### Human:`), so say what
    it is. The message names only the file when that value is all the file holds.
    """
    body = text.strip()
    first = body.split("\n", 1)[0]
    try:
        obj = json.loads(first)
    except ValueError:
        return
    where = path if first == body else f"{path}:{line_of(text, text.index(first))}"
    raise DataError(f"{where}: expected a JSON array of records or JSON lines (one object per line), "
                    f"got {json_kind(obj)}")


# --- CSV, TSV, Parquet ---------------------------------------------------------------------------------

def _header(row: list[str], path: str, line: int) -> list[str]:
    names = [c.strip() for c in row]
    for i, n in enumerate(names):
        if not n:
            raise DataError(f"{path}:{line}: header column {i + 1} has no name")
        if n in names[:i]:
            raise DataError(f"{path}:{line}: header names column {n!r} twice")
    return names


def delimited_rows(text: str, path: str, delimiter: str = ",") -> list[tuple[str, dict]]:
    """Rows of CSV (or TSV, delimiter "\\t") text with a header row, as {column: cell} dicts."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))    # long responses: no 128 KiB cap
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header, out, start = None, [], 1
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in row):                  # blank line, or only empty cells
                continue
            if header is None:
                header = _header(row, path, line)
            elif len(row) != len(header):
                n = f"{len(row)} field{'s' if len(row) != 1 else ''}"
                raise DataError(f"{path}:{line}: row has {n}, the header {len(header)} ({', '.join(header)})")
            else:
                out.append((f"{path}:{line}", dict(zip(header, row))))
    except csv.Error as e:
        raise DataError(f"{path}:{start}: invalid {kind} ({e}; a quote opened on this row?)") from None
    return out


def parquet_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows of a Parquet file, row group by row group, as {column: value} dicts (needs pyarrow)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: {DATA_EXTRA} (or pip install pyarrow)") from None
    with open(path, "rb") as f:                  # open() here: a missing permission stays PermissionError
        try:
            pf = pq.ParquetFile(f)
            return [(f"{path}:row-group {g}, row {r}", row) for g in range(pf.num_row_groups)
                    for r, row in enumerate(pf.read_row_group(g).to_pylist())]
        except pyarrow.ArrowException as e:
            msg = " ".join(str(e).split())
            raise DataError(f"{path}: not a readable Parquet file ({msg})") from None
