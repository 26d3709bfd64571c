"""The fields of an OpenAI-style request, checked: `ApiError` (an HTTP status and OpenAI's error
fields) and the readers the server's routes share (sampling, stop strings, token budgets, chat
messages, completion prompts). Every reader raises ApiError(400, ...) naming the field."""
from __future__ import annotations

import reprlib
from typing import Any, Optional

from ..errors import ConfigError, MinigptError
from .sampling import SamplingConfig

__all__ = ["ApiError", "show", "read_field", "read_common", "read_truncation", "read_turns", "read_logprobs",
           "read_prompts"]

ROLES = ("system", "developer", "user", "assistant")
TRUNCATION = ("disabled", "auto")          # the chat extension field "truncation" (see minigpt.inference.serve)
_SHOW = reprlib.Repr()                     # (keyword arguments only from Python 3.12)
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 3, 60, 60, 6, 6


def show(v: Any) -> str:
    """A client's value for an error message: short, and safe however deeply it nests."""
    return _SHOW.repr(v)


class ApiError(MinigptError):
    """A request the API refuses: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- request fields -----------------------------------------------------------------------------

def read_field(body: dict, name: str, kinds: tuple, default=None, check=None, rule: str = ""):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise ApiError(400, f"'{name}' must be {rule or ' or '.join(k.__name__ for k in kinds)}, got {show(v)}",
                       name)
    if check is not None and not check(v):
        raise ApiError(400, f"'{name}' must be {rule}, got {show(v)}", name)
    return v


def read_sampling(body: dict) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=read_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2,
                                                 "a number in [0, 2]"),
                              top_p=read_field(body, "top_p", (int, float), None),
                              top_k=read_field(body, "top_k", (int,), None),
                              repetition_penalty=read_field(body, "repetition_penalty", (int, float), 1.0))
    except ConfigError as e:
        raise ApiError(400, str(e), str(e).split(" ")[0]) from None


def read_stops(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [] if stop is None else None
    if stops is None or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return stops


def read_common(body: dict, echo: bool = False) -> dict:
    """The options both POST routes share, checked (`echo`: a completion that echoes its prompt,
    which may ask for 0 new tokens)."""
    if read_field(body, "n", (int,), 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    return {"sampling": read_sampling(body), "stops": read_stops(body),
            "max_tokens": read_max_tokens(body, 0 if echo else 1),
            "seed": read_field(body, "seed", (int,), None, lambda v: 0 <= v < 2 ** 63, "in [0, 2**63)"),
            "stream": read_field(body, "stream", (bool,), False), "usage": read_include_usage(body)}


def read_max_tokens(body: dict, least: int = 1) -> Optional[int]:
    """max_completion_tokens when given, else max_tokens, else None; each must be >= `least` when given."""
    given = {}
    for name in ("max_completion_tokens", "max_tokens"):
        v = given[name] = read_field(body, name, (int,), None)
        if v is not None and v < least:
            raise ApiError(400, f"'{name}' must be >= {least}, got {v}", name)
    return given["max_tokens"] if given["max_completion_tokens"] is None else given["max_completion_tokens"]


def read_include_usage(body: dict) -> bool:
    opts = read_field(body, "stream_options", (dict,), {}, rule="an object")
    usage = opts.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be a boolean, got {show(usage)}",
                       "stream_options.include_usage")
    return bool(usage)


def read_truncation(body: dict) -> bool:
    """True when a chat asks to be fitted to the context ("truncation": "auto")."""
    v = body.get("truncation")
    if v is not None and (not isinstance(v, str) or v not in TRUNCATION):
        raise ApiError(400, f"'truncation' must be one of {', '.join(TRUNCATION)}, got {show(v)}", "truncation")
    return v == "auto"


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, list):                                   # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
            raise ApiError(400, f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
        c = "".join(p["text"] for p in c)
    if not isinstance(c, str) or not c.strip():
        raise ApiError(400, f"messages[{i}].content must be a non-empty string", f"messages[{i}].content")
    return c


def read_turns(messages) -> tuple[Optional[str], list[dict], str]:
    """(system prompt, earlier turns, last user message) of an OpenAI messages list."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    system, convo = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
        text = _content(m, i)
        if m["role"] in ("system", "developer"):
            system.append(text)
        elif convo and convo[-1][0] == m["role"]:              # consecutive turns of one role: joined
            convo[-1] = (m["role"], convo[-1][1] + "\n\n" + text)
        else:
            convo.append((m["role"], text))
    if not convo or convo[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message", "messages")
    if convo[0][0] == "assistant":
        convo.insert(0, ("user", ""))
    turns = [{"user": convo[j][1], "assistant": convo[j + 1][1]} for j in range(0, len(convo) - 1, 2)]
    return "\n\n".join(system) or None, turns, convo[-1][1]



def read_logprobs(body: dict, chat: bool) -> Optional[int]:
    if chat:
        top = read_field(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
        if not read_field(body, "logprobs", (bool,), False):
            if top is not None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return top or 0
    return read_field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 5, "an integer in [0, 5]")



def read_prompts(body: dict, tokenizer, vocab_size: int) -> list[list[int]]:
    """A completion's prompts as token ids: `prompt` is a string, a list of token ids, or a list of
    either (one choice per prompt)."""
    p = body.get("prompt")
    if isinstance(p, str) or isinstance(p, list) and p and all(_is_id(t) for t in p):
        items = [p]
    elif isinstance(p, list) and p:
        items = p
    else:
        raise ApiError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either", "prompt")
    out = []
    for i, item in enumerate(items):
        where = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str) and item:
            ids = tokenizer.encode_ordinary(item)
        elif isinstance(item, list) and item and all(_is_id(t) for t in item):
            ids = list(item)
        else:
            raise ApiError(400, f"'{where}' must be a non-empty string or a non-empty list of token ids, got "
                                f"{show(item)}", "prompt")
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"'{where}' holds token id {bad}, outside the vocabulary (0..{vocab_size - 1})",
                           "prompt")
        out.append(ids)
    return out


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
