"""Reading instruction data into records, and splitting them.

`load_records(path, format="auto", columns=None)` reads a file, a folder or a glob of files
(minigpt.data.readers: JSON, JSONL, CSV, TSV, Parquet) holding records of any shape
minigpt.data.formats knows (Alpaca, chat 'messages', ShareGPT 'conversations', prompt/response,
prompt/completion, 'text'), or plain text with `### Human:` / `### Assistant:` turns. Files are
read in order and concatenated; each may have its own container and shape, and rows of one file
may mix shapes. `columns` ({field: source column} or "field=column,...") renames columns first.

Plain text: a turn's text runs up to the next marker (markers may also sit mid-line, as in the
OpenAssistant-Guanaco dumps). Turns of one conversation follow each other directly; a *blank line
followed by a `### Human:` line* starts a new conversation. So `### Human: a\\n### Assistant:
b\\n### Human: c\\n### Assistant: d` is one two-turn conversation, while separating the pairs with
an empty line makes two conversations. Blank lines anywhere else belong to the turn's text.

Every record becomes

    {"messages": [{"role": "user", "content": str, "input": str}, {"role": "assistant", ...}, ...],
     "system": str | None, "source": "file:line", + optional "split", "task", "exact"}

with roles alternating user/assistant, starting with user and ending with assistant; contents are
non-empty and stripped (prompt/completion strings are kept as is). An Alpaca `input` is kept on
the user message (templates decide where it goes). Anything malformed raises `DataError` (a
ValueError) with a one-line message that starts with the place (`file:line:`, the CSV row's line,
`file:row-group G, row R:` for Parquet; `file:` when no line applies, e.g. not a regular file).

`split_records` holds out a validation set; `checkable_records` keeps those with exact answers.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, DataError
from .formats import ROLES, TURN_MARKER, parse_columns, parse_text_conversations, to_record
from .readers import (
    CONTAINERS,
    container_of,
    data_files,
    delimited_rows,
    json_rows,
    jsonl_rows,
    parquet_rows,
    read_text,
    refuse_json_scalar,
)

__all__ = ["ROLES", "checkable_records", "default_instructions_path", "load_records", "parse_text_conversations",
           "split_records"]


def default_instructions_path() -> Path:
    """The instruction set shipped with minigpt (minigpt/assets/instructions.jsonl)."""
    return Path(str(resources.files("minigpt").joinpath("assets/instructions.jsonl")))


_NOT_TEXT = ("expected a JSON array, JSON lines, '### Human:' text, or a .csv, .tsv or .parquet file")


def _file_records(p: Path, format: str, columns: dict[str, str]) -> list[dict]:
    """The records of one file."""
    name = str(p)
    container = container_of(p) if format == "auto" else format
    if container == "parquet":
        return [to_record(row, where, columns) for where, row in parquet_rows(p)]
    text = read_text(p)
    if not text.strip():
        raise DataError(f"{name}:1: empty dataset")
    if container == "unknown":
        container = container_of(p, text)
        if container == "text":
            refuse_json_scalar(text, name)
            if not TURN_MARKER.search(text):
                raise DataError(f"{name}:1: no '### Human:' / '### Assistant:' turns found ({_NOT_TEXT})")
    if container == "text":
        return parse_text_conversations(text, name)
    if container in ("csv", "tsv"):
        rows = delimited_rows(text, name, "\t" if container == "tsv" else ",")
    else:
        rows = json_rows(text, name) if container == "json" else jsonl_rows(text, name)
    return [to_record(row, where, columns) for where, row in rows]


def load_records(path, format: str = "auto", columns: str | Mapping[str, str] | None = None) -> list[dict]:
    """Read an instruction dataset (a file, folder or glob); returns records (see module docstring).

    format: "auto" (by name and content, see minigpt.data.readers) or a container for every file:
    "json", "jsonl", "csv", "tsv", "parquet", "text". columns: see minigpt.data.formats.parse_columns.
    Raises DataError on malformed input, an empty file or a path that is not a regular file
    (checked before reading: /dev/zero would never end), FileNotFoundError if nothing is there.
    """
    if format != "auto" and format not in CONTAINERS:
        raise ConfigError(f"unknown format {format!r}; use auto, {', '.join(CONTAINERS)}")
    mapping = parse_columns(columns)
    records: list[dict] = []
    for p in data_files(path):
        recs = _file_records(p, format, mapping)
        if not recs:
            raise DataError(f"{p}:1: empty dataset (no records)")
        records += recs
    return records


# --- splits ----------------------------------------------------------------------------------

_VAL_NAMES = {"val", "valid", "validation", "eval", "test", "dev"}


def split_records(records: Sequence[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val). Records carrying a "split" field are split by it ("val", "validation",
    "eval", "test", "dev" -> val); otherwise a seeded random val_fraction is held out."""
    if any("split" in r for r in records):
        val = [r for r in records if r.get("split", "train").lower() in _VAL_NAMES]
        train = [r for r in records if r.get("split", "train").lower() not in _VAL_NAMES]
        return train, val
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError("val_fraction must be in [0, 1)")
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = max(1, n_val)
    val_set = set(idx[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_set],
            [r for i, r in enumerate(records) if i in val_set])


def checkable_records(records: Iterable[dict]) -> list[dict]:
    """Records whose answer can be checked by exact match (field "exact": true)."""
    return [r for r in records if r.get("exact")]
