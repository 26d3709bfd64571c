"""Instruction data: readers, prompt templates, masked tokenisation, collation and batching.

Readers (`load_records`) turn three formats into one record shape:

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
goes). Anything malformed raises `DataError` (a ValueError) whose one-line message starts with
`file:line:`.

Templates (`TEMPLATES`, `get_template`) render a conversation into (text, is_response) segments;
every response segment is followed by the EOS token (50256), which is supervised, so the model
learns to stop after each answer. `tokenize_example` encodes each segment separately with the
GPT-2 BPE (text that spells `<|endoftext|>` stays ordinary text) and `Template.prompt_ids` builds
a chat prompt the exact same way, so training and chat see identical token streams.

Truncation policy (`tokenize_example`): keep the start, cut the end. Examples whose first prompt
(system + first user turn) leaves no room for a single response token within `max_length` are
dropped (None); `tokenize_records` counts them.

Collator convention: it returns next-token-aligned tensors, x = ids[:-1] and y = labels[1:], so
`lm_loss(model(batch["input_ids"]), batch["labels"])` is the masked loss directly. Sequences of
max_length tokens therefore feed the model max_length - 1 positions.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch

from .errors import DataError

__all__ = [
    "DataError", "load_records", "parse_text_conversations", "Template", "TEMPLATES", "get_template",
    "tokenize_example", "tokenize_records", "Collator", "length_grouped_batches", "shuffled_batches",
    "split_records", "checkable_records", "exact_match_accuracy", "default_instructions_path",
    "EOS_ID", "IGNORE_INDEX",
]

EOS_ID = 50256
IGNORE_INDEX = -100
EOS_TEXT = "<|endoftext|>"
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


def _from_object(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise _err(where, f"expected a JSON object, got {type(obj).__name__}")
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

    format: "auto" (by content: '[' -> JSON list, '{' -> JSONL, otherwise ### Human/Assistant
    text), "json", "jsonl" or "text". Raises DataError (file:line) on malformed input and on an
    empty dataset, FileNotFoundError if the file is missing.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"instruction data {str(p)!r} is a folder; pass a .json, .jsonl or .txt file")
    if not p.is_file():
        raise FileNotFoundError(f"instruction data {str(p)!r} not found")
    name = str(p)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not UTF-8 text") from None
    head = text.lstrip()[:1]
    if format == "auto":
        format = "json" if head == "[" else "jsonl" if head == "{" else "text"
    if not text.strip():
        raise DataError(f"{name}:1: empty dataset")
    if format == "json":
        if head != "[":
            raise DataError(f"{name}:1: expected a JSON list of records")
        records = _read_json_array(text, name)
    elif format == "jsonl":
        records = _read_jsonl(text, name)
    elif format == "text":
        records = parse_text_conversations(text, name)
    else:
        raise ValueError(f"unknown format {format!r}; use auto, json, jsonl or text")
    if not records:
        raise DataError(f"{name}:1: empty dataset (no records)")
    return records


# --- prompt templates ----------------------------------------------------------------------

Segment = tuple[str, bool]           # (text, is_response); responses are followed by EOS


@dataclass(frozen=True)
class Template:
    """A plain-text prompt format.

    system_fmt:   text for the optional system prompt ("{system}").
    user_fmt:     a user turn up to where the answer starts ("{content}", "{input_block}").
    input_fmt:    how a non-empty Alpaca `input` appears in {input_block}; when None the input is
                  appended to the content after a blank line instead.
    response_fmt: the answer ("{content}"); it is supervised and followed by EOS.
    stop_strings: strings that mark the start of a new turn: generation should stop there.
    """

    name: str
    user_fmt: str
    response_fmt: str = "{content}"
    system_fmt: str = "{system}\n\n"
    input_fmt: Optional[str] = None
    stop_strings: tuple[str, ...] = ()
    description: str = ""

    def _user(self, m: dict) -> str:
        content, inp = m["content"], m.get("input") or ""
        if self.input_fmt is None:
            if inp:
                content = f"{content}\n\n{inp}"
            block = ""
        else:
            block = self.input_fmt.format(input=inp) if inp else ""
        return self.user_fmt.format(content=content, input_block=block)

    def _segments(self, messages: Sequence[dict], system: Optional[str]) -> list[Segment]:
        segs: list[Segment] = []
        prompt = self.system_fmt.format(system=system) if system else ""
        for m in messages:
            if m["role"] == "user":
                prompt += self._user(m)
            elif m["role"] == "assistant":
                segs.append((prompt, False))
                prompt = ""
                segs.append((self.response_fmt.format(content=m["content"]), True))
            else:
                raise ValueError(f"unexpected role {m['role']!r} in a conversation")
        if prompt:
            segs.append((prompt, False))
        return segs

    def render(self, record: Union[dict, Sequence[dict]], system: Optional[str] = None) -> list[Segment]:
        """(text, is_response) segments of a whole conversation (a record or a message list)."""
        if isinstance(record, dict):
            system = record.get("system") if system is None else system
            record = record["messages"]
        return self._segments(record, system)

    def render_text(self, record, system: Optional[str] = None) -> str:
        """The conversation as one string, with `<|endoftext|>` after each response."""
        return "".join(t + (EOS_TEXT if r else "") for t, r in self.render(record, system))

    def prompt_text(self, messages: Sequence[dict], system: Optional[str] = None) -> str:
        """Prompt for the next answer: history (alternating, ending with a user message).

        Earlier answers are followed by the literal `<|endoftext|>`; encode with
        allowed_special={"<|endoftext|>"} or better use prompt_ids.
        """
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the prompt's last message must be a user message")
        return self.render_text(list(messages), system)

    def prompt_ids(self, messages: Sequence[dict], tokenizer=None, system: Optional[str] = None) -> list[int]:
        """Token ids of prompt_text, encoded segment by segment exactly as in training."""
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the prompt's last message must be a user message")
        tok = tokenizer or _default_tokenizer()
        ids: list[int] = []
        for text, is_resp in self._segments(list(messages), system):
            ids += tok.encode_ordinary(text)
            if is_resp:
                ids.append(tok.eot_token)
        return ids


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        name="alpaca",
        user_fmt="### Instruction:\n{content}\n\n{input_block}### Response:\n",
        input_fmt="### Input:\n{input}\n\n",
        system_fmt="{system}\n\n",
        stop_strings=("### Instruction:", "### Input:", "### Response:"),
        description="Alpaca sections; the Input section only when the input is non-empty",
    ),
    "human-assistant": Template(
        name="human-assistant",
        user_fmt="### Human: {content}\n### Assistant:",
        response_fmt=" {content}",
        system_fmt="{system}\n",
        stop_strings=("### Human:", "### Assistant:"),
        description="'### Human: ...' / '### Assistant: ...' turns (OpenAssistant-Guanaco style)",
    ),
    "chat": Template(
        name="chat",
        user_fmt="<|user|>\n{content}\n<|assistant|>\n",
        system_fmt="<|system|>\n{system}\n",
        stop_strings=("<|user|>", "<|system|>", "<|assistant|>"),
        description="role tags <|system|>, <|user|>, <|assistant|> as plain BPE text",
    ),
}
DEFAULT_TEMPLATE = "alpaca"


def get_template(name: Union[str, Template, None] = None) -> Template:
    """A template by name (alpaca, human-assistant, chat); a Template passes through."""
    if isinstance(name, Template):
        return name
    name = name or DEFAULT_TEMPLATE
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


# --- tokenisation --------------------------------------------------------------------------

def _default_tokenizer():
    from .tokenizer import get_tokenizer
    return get_tokenizer()


def _encode(record, tokenizer, template, mask_prompt: bool) -> tuple[list[int], list[int], int]:
    """Full (untruncated) ids, labels and the index of the first response token."""
    tmpl = get_template(template)
    eos = tokenizer.eot_token
    ids: list[int] = []
    labels: list[int] = []
    first_resp = None
    for text, is_resp in tmpl.render(record):
        t = tokenizer.encode_ordinary(text)
        if is_resp:
            if first_resp is None:
                first_resp = len(ids)
            t = t + [eos]
        ids += t
        labels += t if (is_resp or not mask_prompt) else [IGNORE_INDEX] * len(t)
    if first_resp is None:
        raise ValueError("record has no assistant response")
    return ids, labels, first_resp


def tokenize_example(record: dict, tokenizer=None, template: Union[str, Template] = DEFAULT_TEMPLATE,
                     max_length: int = 256, mask_prompt: bool = True) -> Optional[dict]:
    """{"input_ids": [...], "labels": [...]} (equal length, <= max_length) or None if dropped.

    labels are IGNORE_INDEX (-100) on prompt tokens when mask_prompt, and the token id on every
    response token and the EOS after it. Long examples keep their start and lose their end; one
    whose first prompt reaches max_length (no response token would fit) is dropped (None).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids, labels, first_resp = _encode(record, tokenizer or _default_tokenizer(), template, mask_prompt)
    if first_resp >= max_length:
        return None
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_records(records: Iterable[dict], tokenizer=None, template: Union[str, Template] = DEFAULT_TEMPLATE,
                     max_length: int = 256, mask_prompt: bool = True) -> tuple[list[dict], dict]:
    """Tokenise many records; returns (examples, stats) with stats
    {"total", "kept", "dropped" (prompt too long), "truncated" (response cut)}."""
    tok = tokenizer or _default_tokenizer()
    out, stats = [], {"total": 0, "kept": 0, "dropped": 0, "truncated": 0}
    for rec in records:
        stats["total"] += 1
        ids, labels, first_resp = _encode(rec, tok, template, mask_prompt)
        if first_resp >= max_length:
            stats["dropped"] += 1
            continue
        if len(ids) > max_length:
            stats["truncated"] += 1
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
        stats["kept"] += 1
    return out, stats


# --- collation and batching ----------------------------------------------------------------

@dataclass
class Collator:
    """Pads a list of tokenised examples to the batch's longest (right padding).

    Returns next-token-aligned LongTensors (T = longest length - 1):
      input_ids      (B, T)  ids[:-1], padded with pad_id
      labels         (B, T)  labels[1:], padded with ignore_index
      attention_mask (B, T)  1 on real tokens, 0 on padding
    so that lm_loss(model(input_ids), labels) is the masked next-token loss. With right padding
    and causal attention, real tokens never attend to padding; no mask is needed in the forward.
    """

    pad_id: int = EOS_ID
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("empty batch")
        for ex in batch:
            if len(ex["input_ids"]) != len(ex["labels"]):
                raise ValueError("input_ids and labels differ in length")
            if len(ex["input_ids"]) < 2:
                raise ValueError("examples need at least 2 tokens")
        T = max(len(ex["input_ids"]) for ex in batch) - 1
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        B = len(batch)
        x = torch.full((B, T), self.pad_id, dtype=torch.long)
        y = torch.full((B, T), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"]) - 1
            x[i, :n] = torch.as_tensor(ex["input_ids"][:-1], dtype=torch.long)
            y[i, :n] = torch.as_tensor(ex["labels"][1:], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": x, "labels": y, "attention_mask": mask}


def shuffled_batches(n: int, batch_size: int, seed: int = 0, drop_last: bool = False) -> list[list[int]]:
    """Indices 0..n-1 shuffled (seeded) and cut into batches."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           mega_batch_mult: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Batches of similar-length examples with little padding, still randomised.

    Shuffle all indices (seeded), cut them into mega-chunks of batch_size * mega_batch_mult,
    sort each chunk by length (longest first), cut into batches, shuffle the batch order and put
    the batch holding the longest example first (memory trouble then shows at step 1). Every
    index appears exactly once (unless drop_last drops short batches).
    """
    if batch_size <= 0 or mega_batch_mult <= 0:
        raise ValueError("batch_size and mega_batch_mult must be positive")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
        batches.insert(0, batches.pop(longest))
    return batches


# --- splits and evaluation -----------------------------------------------------------------

_VAL_NAMES = {"val", "valid", "validation", "eval", "test", "dev"}


def split_records(records: Sequence[dict], val_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, val). Records carrying a "split" field are split by it ("val", "validation",
    "eval", "test", "dev" -> val); otherwise a seeded random val_fraction is held out."""
    if any("split" in r for r in records):
        val = [r for r in records if r.get("split", "train").lower() in _VAL_NAMES]
        train = [r for r in records if r.get("split", "train").lower() not in _VAL_NAMES]
        return train, val
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    idx = list(range(len(records)))
    random.Random(seed).shuffle(idx)
    n_val = int(round(len(records) * val_fraction))
    if val_fraction > 0 and len(records) > 1:
        n_val = max(1, n_val)
    val_set = set(idx[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_set],
            [r for i, r in enumerate(records) if i in val_set])


def checkable_records(records: Iterable[dict]) -> list[dict]:
    """Records whose answer can be checked by exact match (field "exact": true)."""
    return [r for r in records if r.get("exact")]


def _cut_at_stops(text: str, stops: Iterable[str]) -> str:
    cut = len(text)
    for s in list(stops) + [EOS_TEXT]:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


def exact_match_accuracy(records: Sequence[dict], generate_fn: Callable[[str], str],
                         template: Union[str, Template] = DEFAULT_TEMPLATE,
                         normalize: Optional[Callable[[str], str]] = None) -> dict:
    """Exact-match accuracy of `generate_fn(prompt) -> completion` on the records' last answer.

    The prompt is template.prompt_text(messages[:-1], system); the completion is cut at the
    template's stop strings and `<|endoftext|>`, then normalize(completion) is compared with
    normalize(expected) (default: strip whitespace). Returns {"accuracy", "correct", "total",
    "results": [{"prompt", "expected", "got", "correct"}, ...]}.
    """
    tmpl = get_template(template)
    norm = normalize or (lambda s: s.strip())
    results = []
    for rec in records:
        msgs = rec["messages"]
        prompt = tmpl.prompt_text(msgs[:-1], rec.get("system"))
        expected = msgs[-1]["content"]
        got = _cut_at_stops(generate_fn(prompt), tmpl.stop_strings)
        results.append({"prompt": prompt, "expected": expected, "got": got,
                        "correct": norm(got) == norm(expected)})
    correct = sum(r["correct"] for r in results)
    return {"accuracy": correct / len(results) if results else 0.0, "correct": correct,
            "total": len(results), "results": results}
