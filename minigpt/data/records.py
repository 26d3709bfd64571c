"""Reading instruction data into records, and splitting them.

`load_records` turns three formats into one record shape:

* Alpaca-style JSON (a list) or JSONL: {"instruction", "input" (optional), "output", "system" (opt.)}
* chat JSONL (or a JSON list): {"messages": [{"role": "system"|"user"|"assistant", "content"}...]}
* plain text with `### Human:` / `### Assistant:` turns. A turn's text runs up to the next marker
  (markers may also sit mid-line, as in the OpenAssistant-Guanaco dumps). Turns of one
  conversation follow each other directly; a *blank line followed by a `### Human:` line* starts a
  new conversation. So `### Human: a\\n### Assistant: b\\n### Human: c\\n### Assistant: d` is one
  two-turn conversation, while separating the pairs with an empty line makes two conversations.
  Blank lines anywhere else belong to the turn's text.

Every record becomes

    {"messages": [{"role": "user", "content": str, "input": str}, {"role": "assistant", ...}, ...],
     "system": str | None, "source": "file:line", + optional "split", "task", "exact"}

with roles alternating user/assistant, starting with user and ending with assistant; contents are
stripped and non-empty. An Alpaca `input` is kept on the user message (templates decide where it
goes). Anything malformed raises `DataError` (a ValueError) with a one-line message that starts
with `file:line:` (or `file:` when no line applies, e.g. a file that is not a regular file).

`split_records` holds out a validation set; `checkable_records` keeps those with exact answers.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, DataError

__all__ = ["ROLES", "checkable_records", "default_instructions_path", "load_records", "parse_text_conversations",
           "split_records"]

ROLES = ("system", "user", "assistant")
_PASS_THROUGH = {"split": str, "task": str, "exact": bool}

def default_instructions_path() -> Path:
    """The instruction set shipped with minigpt (minigpt/assets/instructions.jsonl)."""
    return Path(str(resources.files("minigpt").joinpath("assets/instructions.jsonl")))


# --- readers ---------------------------------------------------------------------------------

def _err(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def _text(obj: dict, key: str, where: str, required: bool = True, allow_empty: bool = False) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise _err(where, f"missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise _err(where, f"field {key!r} must be a string, got {type(v).__name__}")
    v = v.strip()
    if not v and required and not allow_empty:
        raise _err(where, f"field {key!r} is empty")
    return v


def _extras(obj: dict, where: str) -> dict:
    out = {}
    for k, typ in _PASS_THROUGH.items():
        if k in obj and obj[k] is not None:
            if not isinstance(obj[k], typ):
                raise _err(where, f"field {k!r} must be a {typ.__name__}, got {type(obj[k]).__name__}")
            out[k] = obj[k]
    return out


def _check_turns(messages: list[dict], where: str) -> None:
    if not messages:
        raise _err(where, "conversation has no user/assistant turns")
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _err(where, f"turn {i + 1} is {m['role']!r}, expected {want!r} "
                              "(turns must alternate user/assistant, starting with user)")
    if messages[-1]["role"] != "assistant":
        raise _err(where, "conversation ends with a user turn (nothing to learn from)")


def _from_alpaca(obj: dict, where: str) -> dict:
    instruction = _text(obj, "instruction", where)
    inp = _text(obj, "input", where, required=False)
    output = _text(obj, "output", where)
    system = _text(obj, "system", where, required=False) or None
    msgs = [{"role": "user", "content": instruction, "input": inp},
            {"role": "assistant", "content": output}]
    return {"messages": msgs, "system": system, "source": where, **_extras(obj, where)}


def _from_chat(obj: dict, where: str) -> dict:
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise _err(where, "field 'messages' must be a non-empty list")
    system = _text(obj, "system", where, required=False) or None
    msgs = []
    for i, m in enumerate(raw):
        w = f"{where}: message {i + 1}"
        if not isinstance(m, dict):
            raise DataError(f"{w}: must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if not isinstance(role, str):
            raise DataError(f"{w}: missing or non-string 'role'")
        if role not in ROLES:
            raise DataError(f"{w}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = _text(m, "content", w)
        if role == "system":
            if msgs or system is not None:
                raise DataError(f"{w}: a system message may only come first")
            system = content
        else:
            msgs.append({"role": role, "content": content})
    _check_turns(msgs, where)
    return {"messages": msgs, "system": system, "source": where, **_extras(obj, where)}


def _json_kind(obj) -> str:
    """How JSON spells the type of a decoded value ("null", "a number", ...), for messages."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(obj), type(obj).__name__)


def _from_object(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise _err(where, f"expected a JSON object, got {_json_kind(obj)}")
    if "messages" in obj:
        return _from_chat(obj, where)
    if "instruction" in obj or "output" in obj:
        return _from_alpaca(obj, where)
    raise _err(where, "expected Alpaca fields ('instruction', 'input', 'output') or chat 'messages'")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json_array(text: str, path: str) -> list[dict]:
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    ws = re.compile(r"\s*")
    pos = ws.match(text, pos).end()
    if pos < len(text) and text[pos] == "]":
        return out
    while True:
        line = _line_of(text, pos)
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{_line_of(text, e.pos)}: invalid JSON ({e.msg})") from None
        out.append(_from_object(obj, f"{path}:{line}"))
        pos = ws.match(text, pos).end()
        if pos < len(text) and text[pos] == ",":
            pos = ws.match(text, pos + 1).end()
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}:{_line_of(text, pos + 1)}: unexpected data after the JSON list")
            return out
        raise DataError(f"{path}:{_line_of(text, pos)}: invalid JSON (expected ',' or ']')")


def _refuse_json_scalar(text: str, path: str) -> None:
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
    where = path if first == body else f"{path}:{_line_of(text, text.index(first))}"
    raise DataError(f"{where}: expected a JSON array of records or JSON lines (one object per line), "
                    f"got {_json_kind(obj)}")


def _read_jsonl(text: str, path: str) -> list[dict]:
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        out.append(_from_object(obj, f"{path}:{i}"))
    return out


_MARKER = re.compile(r"###[ \t]*(Human|Assistant):")


def parse_text_conversations(text: str, path: str = "<text>") -> list[dict]:
    """Records from `### Human:` / `### Assistant:` text (see the module docstring for the rules)."""
    marks = list(_MARKER.finditer(text))
    if not marks:
        raise DataError(f"{path}:1: no '### Human:' / '### Assistant:' turns found")
    lead = text[:marks[0].start()]
    if lead.strip():
        first = len(lead) - len(lead.lstrip())
        raise DataError(f"{path}:{_line_of(text, first)}: text before the first '### Human:' turn")
    convs: list[list[tuple[str, str, int]]] = [[]]
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = text[m.end():end]
        role = "user" if m.group(1) == "Human" else "assistant"
        line = _line_of(text, m.start())
        if role == "user" and convs[-1]:
            before = text[marks[i - 1].end():m.start()]
            # blank line(s) right before a line-initial `### Human:` -> a new conversation
            if re.search(r"\n[ \t]*\n[ \t]*$", before):
                convs.append([])
        convs[-1].append((role, body.strip(), line))
    records = []
    for conv in convs:
        start = conv[0][2]
        msgs = []
        for role, content, line in conv:
            if not content:
                raise DataError(f"{path}:{line}: empty {'Human' if role == 'user' else 'Assistant'} turn")
            msgs.append({"role": role, "content": content})
        where = f"{path}:{start}"
        for i, (role, _, line) in enumerate(conv):
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                raise DataError(f"{path}:{line}: expected a '### {'Human' if want == 'user' else 'Assistant'}:' "
                                f"turn here (turns alternate, starting with Human)")
        _check_turns(msgs, where)
        records.append({"messages": msgs, "system": None, "source": where})
    return records


def load_records(path, format: str = "auto") -> list[dict]:
    """Read an instruction dataset; returns normalised records (see module docstring).

    format: "auto" (by content: '[' -> JSON list, '{' -> JSONL, another JSON value such as null
    -> DataError, otherwise ### Human/Assistant text), "json", "jsonl" or "text". Raises DataError
    on malformed input, an empty dataset or a path that is not a regular file (checked before
    reading: /dev/zero would never end), IsADirectoryError for a folder and FileNotFoundError if
    the file is missing.
    """
    p = Path(path)
    name = str(p)
    if p.is_dir():
        raise IsADirectoryError(f"instruction data {name!r} is a folder; pass a .json, .jsonl or .txt file")
    if not p.exists():
        raise FileNotFoundError(f"instruction data {name!r} not found")
    if not p.is_file():
        raise DataError(f"{name}: not a regular file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"{name}:1: empty dataset")
    head = text.lstrip()[:1]
    if format == "auto":
        format = "json" if head == "[" else "jsonl" if head == "{" else "text"
        if format == "text":
            _refuse_json_scalar(text, name)
    if format == "json":
        if head != "[":
            try:
                got = f", got {_json_kind(json.loads(text))}"
            except ValueError:
                got = ""
            raise DataError(f"{name}:1: expected a JSON list of records{got}")
        records = _read_json_array(text, name)
    elif format == "jsonl":
        records = _read_jsonl(text, name)
    elif format == "text":
        records = parse_text_conversations(text, name)
    else:
        raise ConfigError(f"unknown format {format!r}; use auto, json, jsonl or text")
    if not records:
        raise DataError(f"{name}:1: empty dataset (no records)")
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
