"""Record shapes of instruction data: one row (a JSON object, a CSV/TSV row, a Parquet row) -> one record.

Shapes, recognised by their keys (a key whose value is null counts as absent):

    messages           {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
    ShareGPT           {"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value"}, ...]}
                       (also "chatgpt", "bing", "bard" = gpt; turns spelled {"role", "content"} too)
    Alpaca             {"instruction", "input" (optional), "output"}
    prompt/response    {"prompt", "response"}              (the columns of chatbot_instruction_prompts)
    prompt/completion  {"prompt", "completion"}            (trl): strings kept as is, spaces included,
                       since the completion continues the prompt (train with --template none); or
                       trl's conversational form, two lists of role/content messages
    text               {"text": "### Human: ... ### Assistant: ..."}   (openassistant-guanaco)

Every shape may carry "system" and the pass-through fields "split", "task", "exact" (CSV cells
"true"/"false" count as booleans; an empty cell as absent). Other texts are stripped and must not
be empty. A list field may also be a JSON string (a CSV cell). Preference data is refused with a
pointer to the preference objective: {"prompt", "chosen", "rejected"} (trl) and Chatbot Arena rows
{"conversation_a", "conversation_b", "winner"}. SFT does not train on the winner's conversation:
ties and both-bad verdicts have no answer to learn, and the preference objective uses both sides.

`parse_columns("prompt=question,response=answer")` maps other column names onto these fields
(`--columns`); `to_record` applies it, recognises the shape and returns the one internal record
(see minigpt.data.records). `parse_text_conversations` reads `### Human:` / `### Assistant:` text.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping

from ..errors import ConfigError, DataError

__all__ = ["FIELDS", "ROLES", "SHAREGPT_ROLES", "TURN_MARKER", "json_kind", "line_of", "parse_columns",
           "parse_text_conversations", "rename_columns", "shape_of", "to_record"]

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
_PASS_THROUGH = {"split": str, "task": str, "exact": bool}
# the fields --columns can map a source column onto (chosen/rejected: for the preference objective)
FIELDS = ("instruction", "input", "output", "system", "messages", "conversations", "prompt", "response",
          "completion", "text", "chosen", "rejected", *_PASS_THROUGH)
EXPECTED = ("expected Alpaca fields ('instruction', 'output', optional 'input'), chat 'messages', ShareGPT "
            "'conversations', 'prompt' with 'response' or 'completion', or 'text' with '### Human:' turns")
_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _err(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def json_kind(obj) -> str:
    """How JSON spells the type of a decoded value ("null", "a number", ...), for messages."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(obj), type(obj).__name__)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


# --- --columns ---------------------------------------------------------------------------------

def parse_columns(spec: str | Mapping[str, str] | None) -> dict[str, str]:
    """{field: source column} from "field=column,..." or a mapping; ConfigError names a bad item."""
    if not spec:
        return {}
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        items = []
        for item in (s.strip() for s in spec.split(",")):
            field, eq, src = item.partition("=")
            if not eq:
                raise ConfigError(f"--columns: expected FIELD=COLUMN, got {item!r} (e.g. prompt=question)")
            items.append((field.strip(), src.strip()))
    out: dict[str, str] = {}
    for field, src in items:
        if field not in FIELDS:
            raise ConfigError(f"--columns: unknown field {field!r}; fields: {', '.join(FIELDS)}")
        if not src:
            raise ConfigError(f"--columns: no column given for {field!r}")
        if field in out:
            raise ConfigError(f"--columns: field {field!r} is mapped twice")
        out[field] = src
    return out


def rename_columns(row: dict, columns: Mapping[str, str] | None) -> dict:
    """The row with each mapped source column renamed to its field (sources it lacks are skipped)."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update({field: row[src] for field, src in columns.items() if src in row})
    return out


# --- fields --------------------------------------------------------------------------------------

def _text(obj: dict, key: str, where: str, required: bool = True, strip: bool = True) -> str:
    v = obj.get(key)
    if v is None:
        if required:
            raise _err(where, f"missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise _err(where, f"field {key!r} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise _err(where, f"field {key!r} is empty")
    return v.strip() if strip else v


def _list(obj: dict, key: str, where: str) -> list:
    v = obj.get(key)
    if isinstance(v, str) and v.lstrip().startswith("["):     # a CSV cell holding JSON
        try:
            v = json.loads(v)
        except ValueError as e:
            raise _err(where, f"field {key!r}: invalid JSON ({e})") from None
    if not isinstance(v, list) or not v:
        raise _err(where, f"field {key!r} must be a non-empty list")
    return v


def _extras(obj: dict, where: str) -> dict:
    out = {}
    for k, typ in _PASS_THROUGH.items():
        v = obj.get(k)
        if v is None or v == "":
            continue
        if typ is bool and isinstance(v, str) and v.strip().lower() in _BOOLS:
            v = _BOOLS[v.strip().lower()]
        if not isinstance(v, typ):
            raise _err(where, f"field {k!r} must be a {typ.__name__}, got {type(v).__name__}")
        out[k] = v
    return out


def _record(obj: dict, where: str, messages: list[dict], system: str | None) -> dict:
    return {"messages": messages, "system": system, "source": where, **_extras(obj, where)}


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


# --- shapes --------------------------------------------------------------------------------------

def _from_alpaca(obj: dict, where: str) -> dict:
    msgs = [{"role": "user", "content": _text(obj, "instruction", where),
             "input": _text(obj, "input", where, required=False)},
            {"role": "assistant", "content": _text(obj, "output", where)}]
    return _record(obj, where, msgs, _text(obj, "system", where, required=False) or None)


def _turn(m, w: str, key: str) -> tuple[str, str]:
    """(role, content) of one turn of a 'messages' or 'conversations' list."""
    sharegpt = key == "conversations"
    if not isinstance(m, dict):
        want = "'from' and 'value' (or 'role' and 'content')" if sharegpt else "'role' and 'content'"
        raise DataError(f"{w}: must be an object with {want}, got {type(m).__name__}")
    role_key, text_key = ("from", "value") if sharegpt and "from" in m else ("role", "content")
    role = m.get(role_key)
    if not isinstance(role, str):
        raise DataError(f"{w}: missing or non-string {role_key!r}")
    names = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    if role.lower() not in names:
        raise DataError(f"{w}: unknown role {role!r} (expected one of {', '.join(names)})")
    return names[role.lower()], _text(m, text_key, w)


def _from_turns(obj: dict, key: str, where: str, raw: list | None = None) -> dict:
    """A 'messages' (role/content) or ShareGPT 'conversations' (from/value) record."""
    raw = _list(obj, key, where) if raw is None else raw
    system = _text(obj, "system", where, required=False) or None
    label = "turn" if key == "conversations" else "message"
    msgs = []
    for i, m in enumerate(raw):
        w = f"{where}: {label} {i + 1}"
        role, content = _turn(m, w, key)
        if role == "system":
            if msgs or system is not None:
                raise DataError(f"{w}: a system message may only come first")
            system = content
        else:
            msgs.append({"role": role, "content": content})
    _check_turns(msgs, where)
    return _record(obj, where, msgs, system)


def _from_prompt_response(obj: dict, where: str) -> dict:
    msgs = [{"role": "user", "content": _text(obj, "prompt", where)},
            {"role": "assistant", "content": _text(obj, "response", where)}]
    return _record(obj, where, msgs, _text(obj, "system", where, required=False) or None)


def _from_prompt_completion(obj: dict, where: str) -> dict:
    p, c = obj["prompt"], obj["completion"]
    if isinstance(p, list) and isinstance(c, list):          # trl's conversational prompt/completion
        return _from_turns(obj, "messages", where, raw=[*_list(obj, "prompt", where), *_list(obj, "completion", where)])
    if isinstance(p, list) or isinstance(c, list):
        raise _err(where, "'prompt' and 'completion' must both be strings or both lists of messages")
    msgs = [{"role": "user", "content": _text(obj, "prompt", where, strip=False)},
            {"role": "assistant", "content": _text(obj, "completion", where, strip=False)}]
    return _record(obj, where, msgs, _text(obj, "system", where, required=False) or None)


def _from_text(obj: dict, where: str) -> dict:
    """A 'text' field of '### Human:' / '### Assistant:' turns: one conversation."""
    text = _text(obj, "text", where)
    try:
        convs = parse_text_conversations(text, "<text>")
    except DataError as e:
        line, _, msg = str(e).removeprefix("<text>:").partition(": ")
        raise _err(where, f"field 'text', line {line}: {msg}") from None
    msgs = [m for c in convs for m in c["messages"]]
    return _record(obj, where, msgs, _text(obj, "system", where, required=False) or None)


def _refuse_preference(obj: dict, where: str, arena: bool) -> dict:
    kind = "a Chatbot Arena record (conversation_a, conversation_b, winner)" if arena else \
        "a preference record (prompt, chosen, rejected)"
    raise _err(where, f"{kind} compares two answers, and supervised fine-tuning needs one per prompt: "
                      "train on it with the preference objective (--objective dpo)")


_SHAPES = {
    "messages": lambda o, w: _from_turns(o, "messages", w),
    "sharegpt": lambda o, w: _from_turns(o, "conversations", w),
    "arena": lambda o, w: _refuse_preference(o, w, arena=True),
    "preference": lambda o, w: _refuse_preference(o, w, arena=False),
    "alpaca": _from_alpaca,
    "prompt-response": _from_prompt_response,
    "prompt-completion": _from_prompt_completion,
    "text": _from_text,
}


def shape_of(row: dict) -> str | None:
    """The shape a row's keys name (a key of _SHAPES), or None."""
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"conversation_a", "conversation_b"}:
        return "arena"
    if keys & {"chosen", "rejected"}:
        return "preference"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if "prompt" in keys and keys & {"response", "completion"}:
        return "prompt-response" if "response" in keys else "prompt-completion"
    return "text" if "text" in keys else None


def to_record(row, where: str, columns: Mapping[str, str] | None = None) -> dict:
    """One record from a row (its columns renamed by `columns` first); DataError names `where`."""
    if not isinstance(row, dict):
        raise _err(where, f"expected a JSON object, got {json_kind(row)}")
    obj = rename_columns(row, columns)
    shape = shape_of(obj)
    if shape is None:
        held = ", ".join(repr(k) for k in row) or "no keys"
        missing = [f"{f}={s}" for f, s in (columns or {}).items() if s not in row]
        hint = (f"--columns {', '.join(missing)}: no such column" if missing else
                "map other names with --columns, e.g. --columns prompt=question,response=answer")
        raise _err(where, f"{EXPECTED}; the record holds {held} ({hint})")
    return _SHAPES[shape](obj, where)


# --- '### Human:' / '### Assistant:' text ------------------------------------------------------------

TURN_MARKER = re.compile(r"###[ \t]*(Human|Assistant):")


def _text_convs(text: str, marks: list, path: str) -> list[list[tuple[str, str, int]]]:
    convs: list[list[tuple[str, str, int]]] = [[]]
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        if role == "user" and convs[-1]:
            before = text[marks[i - 1].end():m.start()]
            # blank line(s) right before a line-initial `### Human:` -> a new conversation
            if re.search(r"\n[ \t]*\n[ \t]*$", before):
                convs.append([])
        convs[-1].append((role, text[m.end():end].strip(), line_of(text, m.start())))
    return convs


def parse_text_conversations(text: str, path: str = "<text>") -> list[dict]:
    """Records from `### Human:` / `### Assistant:` text (the rules: minigpt.data.records)."""
    marks = list(TURN_MARKER.finditer(text))
    if not marks:
        raise DataError(f"{path}:1: no '### Human:' / '### Assistant:' turns found")
    lead = text[:marks[0].start()]
    if lead.strip():
        raise DataError(f"{path}:{line_of(text, len(lead) - len(lead.lstrip()))}: text before the first "
                        "'### Human:' turn")
    records = []
    for conv in _text_convs(text, marks, path):
        msgs = []
        for i, (role, content, line) in enumerate(conv):
            if not content:
                raise DataError(f"{path}:{line}: empty {'Human' if role == 'user' else 'Assistant'} turn")
            want = "user" if i % 2 == 0 else "assistant"
            if role != want:
                raise DataError(f"{path}:{line}: expected a '### {'Human' if want == 'user' else 'Assistant'}:' "
                                f"turn here (turns alternate, starting with Human)")
            msgs.append({"role": role, "content": content})
        where = f"{path}:{conv[0][2]}"
        _check_turns(msgs, where)
        records.append({"messages": msgs, "system": None, "source": where})
    return records
