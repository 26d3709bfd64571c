"""Prompt templates: the single source of truth for template names, turn markers and stop strings.

A template renders a conversation (a record from `minigpt.data.records`, or a message list) into
(text, is_response) segments. Every response segment is followed by the EOS token, which is
supervised, so the model learns to stop after each answer. `Template.prompt_ids` encodes a chat
prompt segment by segment with the GPT-2 BPE exactly as `minigpt.data.instruct.tokenize_example` does,
so training and chat see identical token streams.

    TEMPLATE_NAMES     ("alpaca", "human-assistant", "chat", "none")
    DEFAULT_TEMPLATE   "alpaca"
    STOP_STRINGS       every turn marker of every template (generation stops before any of them)

No torch or tokenizer is imported at module level.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["DEFAULT_TEMPLATE", "EOS_TEXT", "STOP_STRINGS", "TEMPLATES", "TEMPLATE_NAMES", "Segment", "Template",
           "get_template"]

EOS_TEXT = "<|endoftext|>"

Segment = tuple[str, bool]           # (text, is_response); responses are followed by EOS

# Turn markers. Each template is written with its own markers, and its stop_strings are exactly them.
_INSTRUCTION, _INPUT, _RESPONSE = "### Instruction:", "### Input:", "### Response:"
_HUMAN, _ASSISTANT = "### Human:", "### Assistant:"
_USER_TAG, _SYSTEM_TAG, _ASSISTANT_TAG = "<|user|>", "<|system|>", "<|assistant|>"


@dataclass(frozen=True)
class Template:
    """A plain-text prompt format.

    system_fmt:   text for the optional system prompt ("{system}").
    user_fmt:     a user turn up to where the answer starts ("{content}", "{input_block}").
    input_fmt:    how a non-empty Alpaca `input` appears in {input_block}; when None the input is
                  appended to the content after a blank line instead.
    response_fmt: the answer ("{content}"); it is supervised and followed by EOS.
    stop_strings: the template's turn markers: generation should stop at any of them.
    """

    name: str
    user_fmt: str
    response_fmt: str = "{content}"
    system_fmt: str = "{system}\n\n"
    input_fmt: str | None = None
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

    def _segments(self, messages: Sequence[dict], system: str | None) -> list[Segment]:
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
                raise ConfigError(f"unexpected role {m['role']!r} in a conversation")
        if prompt:
            segs.append((prompt, False))
        return segs

    def render(self, record: dict | Sequence[dict], system: str | None = None) -> list[Segment]:
        """(text, is_response) segments of a whole conversation (a record or a message list)."""
        if isinstance(record, dict):
            system = record.get("system") if system is None else system
            record = record["messages"]
        return self._segments(record, system)

    def render_text(self, record, system: str | None = None) -> str:
        """The conversation as one string, with `<|endoftext|>` after each response."""
        return "".join(t + (EOS_TEXT if r else "") for t, r in self.render(record, system))

    def prompt_text(self, messages: Sequence[dict], system: str | None = None) -> str:
        """Prompt for the next answer: history (alternating, ending with a user message).

        Earlier answers are followed by the literal `<|endoftext|>`; encode with
        allowed_special={"<|endoftext|>"} or better use prompt_ids.
        """
        if not messages or messages[-1]["role"] != "user":
            raise ConfigError("the prompt's last message must be a user message")
        return self.render_text(list(messages), system)

    def prompt_ids(self, messages: Sequence[dict], tokenizer=None, system: str | None = None) -> list[int]:
        """Token ids of prompt_text, encoded segment by segment exactly as in training."""
        if not messages or messages[-1]["role"] != "user":
            raise ConfigError("the prompt's last message must be a user message")
        if tokenizer is None:
            from .tokenizer import get_tokenizer
            tokenizer = get_tokenizer()
        ids: list[int] = []
        for text, is_resp in self._segments(list(messages), system):
            ids += tokenizer.encode_ordinary(text)
            if is_resp:
                ids.append(tokenizer.eot_token)
        return ids


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        name="alpaca",
        user_fmt=f"{_INSTRUCTION}\n{{content}}\n\n{{input_block}}{_RESPONSE}\n",
        input_fmt=f"{_INPUT}\n{{input}}\n\n",
        system_fmt="{system}\n\n",
        stop_strings=(_INSTRUCTION, _INPUT, _RESPONSE),
        description="Alpaca sections; the Input section only when the input is non-empty",
    ),
    "human-assistant": Template(
        name="human-assistant",
        user_fmt=f"{_HUMAN} {{content}}\n{_ASSISTANT}",
        response_fmt=" {content}",
        system_fmt="{system}\n",
        stop_strings=(_HUMAN, _ASSISTANT),
        description="'### Human: ...' / '### Assistant: ...' turns (OpenAssistant-Guanaco style)",
    ),
    "chat": Template(
        name="chat",
        user_fmt=f"{_USER_TAG}\n{{content}}\n{_ASSISTANT_TAG}\n",
        system_fmt=f"{_SYSTEM_TAG}\n{{system}}\n",
        stop_strings=(_USER_TAG, _SYSTEM_TAG, _ASSISTANT_TAG),
        description="role tags <|system|>, <|user|>, <|assistant|> as plain BPE text",
    ),
    "none": Template(
        name="none",
        user_fmt="{content}",
        description="no template: the prompt text as is, the response right after it (trl's prompt/completion)",
    ),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)
DEFAULT_TEMPLATE = "alpaca"
# Every template's turn markers, in template order, without duplicates.
STOP_STRINGS: tuple[str, ...] = tuple(dict.fromkeys(s for t in TEMPLATES.values() for s in t.stop_strings))


def get_template(name: str | Template | None = None) -> Template:
    """A template by name (see TEMPLATE_NAMES; None -> DEFAULT_TEMPLATE); a Template passes through."""
    if isinstance(name, Template):
        return name
    name = name or DEFAULT_TEMPLATE
    if name not in TEMPLATES:
        raise ConfigError(f"unknown prompt template {name!r}; choose from {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]
