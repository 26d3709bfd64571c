"""Multi-turn chat on top of the KV-cache decoder: `ChatSession`, its settings and its prompts.

    from minigpt.inference.chat import ChatSession
    from minigpt.training.runs import load_chat_model
    loaded = load_chat_model("out-finetune")            # or a preset, HF dir, --adapter, ...
    chat = ChatSession(loaded.model, template=loaded.template, system="Be brief.",
                       temperature=0.0, max_new_tokens=64)
    for piece in chat.reply_stream("What is 2 + 2?"):    # text pieces, as soon as they are safe
        print(piece, end="", flush=True)
    chat.reply("And 3 + 3?")                             # the same, returned as one string
    chat.set("temperature", "0.5"); chat.reset(); chat.save("talk.json")

Prompts are built with the template the model was tuned with (`Template.prompt_ids`, exactly the
token stream training saw: each earlier answer is followed by EOS). Every reply is decoded from a
fresh prefill of the whole prompt (minigpt.inference.generate.stream_text), so no KV state survives between
turns and an interrupted reply can never leave a stale cache behind.

Context policy: the prompt may use context_length - max_new_tokens tokens, where context_length is
the model's block_size less any virtual tokens (prefix/prompt tuning). When the conversation does
not fit, whole turns are dropped from the oldest (they stay in `turns` and in saved transcripts,
only the prompt omits them). When the newest user message alone does not fit, its END is kept, cut
at a token boundary that starts a UTF-8 character; the history keeps the shortened text (what the
model saw). If even the system prompt leaves no room, it is left out of that turn's prompt.

Interruptions: closing `reply_stream` early (or a KeyboardInterrupt while decoding) records the
partial answer as that turn's reply, flagged `interrupted`, when it holds any text; an interrupted
reply without text drops the user's message too, as if it had not been sent.

Which model to talk to (model sources, the newest local run) is minigpt.training.runs.load_chat_model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from ..data.templates import DEFAULT_TEMPLATE, Template, get_template
from ..errors import ChatError, ConfigError
from .sampling import NAMES as SAMPLING_NAMES
from .sampling import SamplingConfig, check_sampling, parse_number

__all__ = ["ChatSession", "ChatSettings", "ReplyTrim", "ChatError", "PromptInfo", "validate_setting"]

TRANSCRIPT_FORMAT = "minigpt-chat-transcript"


# --- settings ---------------------------------------------------------------------------------

@dataclass
class ChatSettings(SamplingConfig):
    """Sampling settings of a session (SamplingConfig's, with chat's defaults) + reply length and
    seed. seed None = torch's global RNG (otherwise a generator seeded once and on every change)."""

    temperature: float = 0.7
    top_p: Optional[float] = 0.9
    max_new_tokens: int = 256
    seed: Optional[int] = None

    NAMES = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_OFF = ("none", "off", "null", "")


def validate_setting(name: str, value: Any, block_size: Optional[int] = None) -> Any:
    """Parse and check one setting (value may be a string, as typed after /set). Returns the
    normalised value; raises ChatError with a one-line reason."""
    name = name.strip().lower().replace("-", "_")
    if name not in ChatSettings.NAMES:
        raise ChatError(f"unknown setting {name!r}; settings: {', '.join(ChatSettings.NAMES)}")
    if isinstance(value, str) and value.strip().lower() in _OFF or value is None:
        if name in ("top_k", "top_p", "seed"):
            return 1.0 if name == "top_p" else None
        raise ChatError(f"{name} needs a value")
    try:
        if name in SAMPLING_NAMES:
            return check_sampling(name, parse_number(name, value, int if name == "top_k" else float))
        v = parse_number(name, value, int)
    except ConfigError as e:
        raise ChatError(str(e)) from None
    if name == "max_new_tokens" and v < 1:
        raise ChatError(f"max_new_tokens must be >= 1, got {v}")
    if name == "max_new_tokens" and block_size is not None and v >= block_size:
        raise ChatError(f"max_new_tokens must be below the model's context of {block_size} tokens "
                        f"(the prompt needs room too), got {v}")
    if name == "seed" and not 0 <= v < 2 ** 63:
        raise ChatError(f"seed must be in [0, 2**63), got {v}")
    return v


# --- the session ------------------------------------------------------------------------------

@dataclass
class PromptInfo:
    """How the last prompt was built."""

    ids: list[int]
    turns_used: int              # earlier turns included in the prompt
    turns_dropped: int           # earlier turns left out (oldest first) to fit the context
    user_tokens: int             # tokens of the newest user message as typed
    user_kept_tokens: int        # ... as used (< user_tokens when its start was cut)
    system_dropped: bool         # the system prompt did not fit and was left out
    budget: int                  # tokens available to the prompt (context_length - max_new_tokens)

    @property
    def user_truncated(self) -> bool:
        return self.user_kept_tokens < self.user_tokens


class ReplyTrim:
    """A reply's leading and trailing whitespace is not shown (chat and the server alike):
    feed(piece) returns the text to show now; whitespace at the end is held until text follows,
    and dropped when the reply ends."""

    def __init__(self):
        self.started, self.held = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.held + piece
        body = text.rstrip()
        self.held = text[len(body):]
        return body


class ChatSession:
    """A conversation with a GPT: history, template, system prompt, sampling settings, context
    truncation, streaming replies and transcripts. See the module docstring for the policies.

    model:     a minigpt GPT (eval mode is used for decoding).
    template:  name or Template (alpaca, human-assistant, chat); its stop_strings end a reply.
    system:    optional system prompt.
    stop:      extra user stop strings (never shown; the reply ends before them).
    on_notice: callable(str) for notices (history dropped, message cut); default: collected in
               `self.notices` only.
    **settings: ChatSettings fields (temperature, top_k, top_p, repetition_penalty,
               max_new_tokens, seed), validated.
    """

    def __init__(self, model, tokenizer=None, template: Union[str, Template, None] = DEFAULT_TEMPLATE,
                 system: Optional[str] = None, stop: Sequence[str] = (),
                 on_notice: Optional[Callable[[str], None]] = None, compile: bool = False, **settings):
        from ..data.tokenizer import get_tokenizer

        self.model = model
        self.compile = compile                   # generate(compile=True): CUDA-graph decoding steps
        self.tokenizer = tokenizer or get_tokenizer()
        self.template = get_template(template)
        self.system = system or None
        self.user_stops = [s for s in stop if s]
        self.on_notice = on_notice
        self.notices: list[str] = []
        self.turns: list[dict] = []
        self.last_prompt: Optional[PromptInfo] = None
        self.settings = ChatSettings()
        if "max_new_tokens" not in settings or settings["max_new_tokens"] is None:
            settings["max_new_tokens"] = min(ChatSettings.max_new_tokens, self.context_length // 2)
        for k, v in settings.items():
            self.set(k, v)
        self._reset_generator()

    # -- properties ----------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        """Real tokens a prompt + reply may hold: block_size less the model's virtual tokens."""
        return int(self.model.context_length)

    @property
    def block_size(self) -> int:
        """The context in tokens (context_length; kept for older callers)."""
        return self.context_length

    @property
    def eos_token_id(self) -> int:
        return int(getattr(self.tokenizer, "eot_token", 50256))

    @property
    def stop_strings(self) -> list[str]:
        """Template turn markers + user stops: the reply ends before the first of them."""
        out = []
        for s in list(self.template.stop_strings) + self.user_stops:
            if s not in out:
                out.append(s)
        return out

    # -- state ---------------------------------------------------------------------------------
    def _notice(self, msg: str) -> None:
        self.notices.append(msg)
        if self.on_notice is not None:
            self.on_notice(msg)

    def _reset_generator(self) -> None:
        seed = self.settings.seed
        if seed is None:
            self.generator = None
        else:
            dev = getattr(self.model, "device", torch.device("cpu"))
            self.generator = torch.Generator(device=dev).manual_seed(seed)

    def set(self, name: str, value: Any) -> Any:
        """Change one setting (value may be a string); returns the stored value. Raises ChatError."""
        key = name.strip().lower().replace("-", "_")
        v = validate_setting(key, value, self.context_length)
        setattr(self.settings, key, v)
        if key == "seed" and hasattr(self, "generator"):
            self._reset_generator()
        return v

    def set_system(self, text: Optional[str]) -> None:
        self.system = (text or "").strip() or None

    def reset(self) -> None:
        """Forget the conversation (settings and system prompt stay)."""
        self.turns.clear()
        self.last_prompt = None

    def messages(self, turns: Optional[Sequence[dict]] = None) -> list[dict]:
        """History as role/content messages."""
        out = []
        for t in self.turns if turns is None else turns:
            out.append({"role": "user", "content": t["user"]})
            out.append({"role": "assistant", "content": t["assistant"]})
        return out

    # -- prompts -------------------------------------------------------------------------------
    def _ids(self, turns: Sequence[dict], user: str, system: Optional[str]) -> list[int]:
        msgs = self.messages(turns) + [{"role": "user", "content": user}]
        return self.template.prompt_ids(msgs, self.tokenizer, system)

    def _tail_text(self, toks: list[int], keep: int) -> str:
        """Text of the last `keep` tokens, starting at a token that begins a UTF-8 character."""
        start = max(len(toks) - keep, 0)
        while start < len(toks):
            b = self.tokenizer.decode_single_token_bytes(toks[start]) if hasattr(
                self.tokenizer, "decode_single_token_bytes") else b"a"
            if b and (b[0] & 0xC0) != 0x80:                                   # not a continuation byte
                break
            start += 1
        return self.tokenizer.decode(toks[start:]).lstrip()

    def build_prompt(self, user_text: str) -> tuple[list[int], PromptInfo, str]:
        """(prompt ids, info, user text as used) for the next reply; applies the context policy."""
        max_new = self.settings.max_new_tokens
        budget = self.context_length - max_new
        if budget < 1:
            raise ChatError(f"max_new_tokens={max_new} leaves no room for the prompt in the model's "
                            f"context of {self.context_length} tokens; lower it with /set max_new_tokens N")
        system = self.system
        user_toks = self.tokenizer.encode_ordinary(user_text)
        ids = self._ids([], user_text, system)
        system_dropped = False
        kept = len(user_toks)
        if len(ids) > budget:                                   # the newest message alone is too long
            overhead = len(self._ids([], "", system))
            if system and overhead >= budget:
                system, system_dropped = None, True
                overhead = len(self._ids([], "", None))
            keep = budget - overhead
            if keep < 1:
                raise ChatError(f"the prompt template alone needs {overhead} tokens but only {budget} fit "
                                f"(context {self.context_length} - max_new_tokens {max_new}); lower "
                                f"max_new_tokens with /set max_new_tokens N")
            while True:
                user_text = self._tail_text(user_toks, keep)
                ids = self._ids([], user_text, system)
                if len(ids) <= budget or keep <= 1:
                    break
                keep = max(1, keep - (len(ids) - budget))
            if len(ids) > budget:
                raise ChatError(f"your message does not fit in the context ({budget} prompt tokens)")
            kept = len(self.tokenizer.encode_ordinary(user_text))
            info = PromptInfo(ids, 0, len(self.turns), len(user_toks), kept, system_dropped, budget)
            return ids, info, user_text
        used = 0
        for j in range(1, len(self.turns) + 1):                 # keep the most recent turns that fit
            cand = self._ids(self.turns[-j:], user_text, system)
            if len(cand) > budget:
                break
            ids, used = cand, j
        info = PromptInfo(ids, used, len(self.turns) - used, len(user_toks), kept, False, budget)
        return ids, info, user_text

    # -- replies -------------------------------------------------------------------------------
    def reply_stream(self, user_text: str) -> Iterator[str]:
        """Send a user message; yield the reply as text pieces while it is decoded.

        The reply ends at EOS, at the template's next turn marker or a user stop string (none of
        which is ever yielded), or after max_new_tokens. Leading and trailing whitespace is not
        yielded, so "".join(pieces) == the stored reply. The turn is added to `turns` when the
        stream ends; see the module docstring for interruptions. Raises ChatError (before the
        first piece) when the message is empty or cannot fit.
        """
        from .generate import stream_text

        if not isinstance(user_text, str) or not user_text.strip():
            raise ChatError("empty message")
        user_text = user_text.strip()
        prev = self.last_prompt
        ids, info, used_text = self.build_prompt(user_text)
        if info.user_truncated:
            self._notice(f"your message is {info.user_tokens:,} tokens, more than the {info.budget} the "
                         f"prompt may use (context {self.context_length} - max_new_tokens "
                         f"{self.settings.max_new_tokens}); kept its last {info.user_kept_tokens:,} tokens")
        if info.system_dropped:
            self._notice("the system prompt does not fit next to your message; left out of this turn")
        if info.turns_dropped and (prev is None or info.turns_dropped > prev.turns_dropped
                                   or info.user_truncated):
            n = info.turns_dropped
            self._notice(f"context full: the oldest {n} turn{'s' if n != 1 else ''} left out of the prompt")
        self.last_prompt = info
        s = self.settings
        pieces = stream_text(self.model, self.tokenizer, ids, s.max_new_tokens, stop=self.stop_strings,
                             eos_token_id=self.eos_token_id, temperature=s.temperature, top_k=s.top_k,
                             top_p=s.top_p if s.top_p < 1.0 else None,
                             repetition_penalty=s.repetition_penalty, generator=self.generator,
                             compile=self.compile)
        return self._record(pieces, used_text, user_text)

    def _record(self, pieces: Iterator[str], used_text: str, typed: str) -> Iterator[str]:
        parts: list[str] = []
        trim = ReplyTrim()
        finished = False
        try:
            for piece in pieces:
                body = trim.feed(piece)
                if body:
                    parts.append(body)
                    yield body
            finished = True
        finally:
            if hasattr(pieces, "close"):
                pieces.close()
            reply = "".join(parts)
            if finished or reply:
                turn = {"user": used_text, "assistant": reply}
                if used_text != typed:
                    turn["user_truncated_from_chars"] = len(typed)
                if not finished:
                    turn["interrupted"] = True
                self.turns.append(turn)

    def reply(self, user_text: str) -> str:
        """reply_stream, collected into one string."""
        return "".join(self.reply_stream(user_text))

    # -- transcripts ---------------------------------------------------------------------------
    def to_dict(self, **extra) -> dict:
        return {"format": TRANSCRIPT_FORMAT, "version": 1,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **extra,
                "template": self.template.name, "system": self.system,
                "settings": self.settings.to_dict(), "stop": list(self.user_stops),
                "block_size": int(self.model.config.block_size), "context_length": self.context_length,
                "turns": [dict(t) for t in self.turns]}

    def save(self, path: Union[str, os.PathLike], **extra) -> Path:
        """Write the transcript (settings, system, turns, + `extra` fields) as JSON; returns the path."""
        p = Path(path).expanduser()
        data = self.to_dict(**extra)
        tmp = p.with_name(f".{p.name}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
                f.write("\n")
            os.replace(tmp, p)
        finally:
            if tmp.exists():
                tmp.unlink()
        return p
