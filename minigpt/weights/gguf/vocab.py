"""Names for llama.cpp's gpt2 architecture: tensor names, the tokenizer metadata, the chat template.

Tensor names: token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up,
ffn_down}.{weight, bias}, output_norm; `output.weight` for an untied head (gguf_name / minigpt_name).

Tokenizer metadata comes from the shipped GPT-2 ranks: byte-level token strings (GPT-2's
bytes-to-unicode map), merges recovered from the ranks (each token's last merge is what BPE over
the lower-ranked tokens leaves as two parts), <|endoftext|> = 50256 as bos/eos/control, no BOS
added. `tokenizer.chat_template` is a Jinja template generated from minigpt.data.templates, so
llama.cpp's chat endpoints build exactly the prompt chat.py builds (tests compare token ids).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

from ...data.templates import EOS_TEXT, Template, get_template
from ...errors import ConfigError
from .format import ARRAY, INT32, STRING

__all__ = ["gguf_name", "minigpt_name", "gpt2_vocab", "tokenizer_metadata", "chat_template_jinja", "EOT_ID"]

EOT_ID = 50256
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


# --- tensor names: minigpt <-> llama.cpp ----------------------------------------------------------

_TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight"}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_BLOCK_PARTS = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
                "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_BLOCK_BACK = {v: k for k, v in _BLOCK_PARTS.items()}


def gguf_name(key: str) -> str:
    """llama.cpp's name for a minigpt parameter ("transformer.h.3.attn.c_attn.weight" ->
    "blk.3.attn_qkv.weight"); ConfigError for anything that is not a GPT-2 parameter."""
    if key in _TOP:
        return _TOP[key]
    parts = key.split(".")
    if len(parts) >= 5 and parts[:2] == ["transformer", "h"] and parts[2].isdigit():
        mod = _BLOCK_PARTS.get(".".join(parts[3:-1]))
        if mod and parts[-1] in ("weight", "bias"):
            return f"blk.{parts[2]}.{mod}.{parts[-1]}"
    raise ConfigError(f"{key} is not a GPT-2 parameter that llama.cpp's gpt2 architecture knows")


def minigpt_name(name: str) -> Optional[str]:
    """The minigpt parameter for a llama.cpp gpt2 tensor name; None when it is not one."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_BACK \
            and parts[3] in ("weight", "bias"):
        return f"transformer.h.{parts[1]}.{_BLOCK_BACK[parts[2]]}.{parts[3]}"
    return None


# --- tokenizer metadata from the shipped ranks ----------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE token strings)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair BPE merges last to make `token`: byte-pair encoding of its bytes with only the
    tokens ranked below it leaves exactly two parts."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not reachable by merges of lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def gpt2_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(token strings by id, merges "a b" in rank order) of GPT-2's BPE, from the shipped ranks."""
    from ...data.tokenizer import load_ranks

    ranks = load_ranks()
    u = _bytes_to_unicode()
    tokens = [""] * len(ranks)
    for tok, r in ranks.items():
        tokens[r] = "".join(u[b] for b in tok)
    merges = []
    for tok in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        a, b = _last_merge(tok, ranks)
        merges.append("".join(u[x] for x in a) + " " + "".join(u[x] for x in b))
    return tuple(tokens) + (EOS_TEXT,), tuple(merges)


def tokenizer_metadata(vocab_size: int = 50257, template: Union[str, Template, None] = None) -> dict:
    """tokenizer.* metadata for llama.cpp's "gpt2" BPE tokenizer (rows past 50257 are unused
    padding tokens)."""
    tokens, merges = gpt2_vocab()
    if vocab_size < len(tokens):
        raise ConfigError(f"vocab_size {vocab_size} is smaller than GPT-2's {len(tokens)} tokens; llama.cpp "
                          "needs one embedding row per token of the GPT-2 tokenizer")
    pad = [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types = [TOKEN_NORMAL] * EOT_ID + [TOKEN_CONTROL] + [TOKEN_UNUSED] * len(pad)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": (ARRAY, (STRING, list(tokens) + pad)),
        "tokenizer.ggml.token_type": (ARRAY, (INT32, types)),
        "tokenizer.ggml.merges": (ARRAY, (STRING, list(merges))),
        "tokenizer.ggml.bos_token_id": EOT_ID,
        "tokenizer.ggml.eos_token_id": EOT_ID,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": chat_template_jinja(template),
    }


# --- chat template (Jinja) from minigpt.data.templates --------------------------------------------

def _lit(s: str) -> str:
    """A Jinja string literal (single quotes; backslash, quote and newlines escaped)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def _split(fmt: str, placeholder: str) -> tuple[str, str]:
    before, found, after = fmt.partition(placeholder)
    if not found:
        return fmt, ""
    return before, after


def _out(*parts: str) -> str:
    """{{ a + b + ... }} of Jinja expressions and literals, empty literals left out."""
    parts = [p for p in parts if p != "''"]
    return "{{ " + " + ".join(parts) + " }}" if parts else ""


def chat_template_jinja(template: Union[str, Template, None] = None) -> str:
    """A Jinja chat template (HF / llama.cpp conventions: messages, eos_token,
    add_generation_prompt, raise_exception) that renders a conversation exactly as
    `Template.prompt_text` does: an optional first system message, user turns, assistant turns
    each followed by eos_token. The answer header closes every user turn (as in training); after
    the final user turn only with add_generation_prompt. One line, so trim_blocks/lstrip_blocks
    cannot change it."""
    t = get_template(template)
    sys_pre, sys_post = _split(t.system_fmt, "{system}")
    u_pre, rest = _split(t.user_fmt, "{content}")
    u_mid, gen = _split(rest, "{input_block}") if "{input_block}" in rest else ("", rest)
    r_pre, r_post = _split(t.response_fmt, "{content}")
    content, inp = "message['content']", "message['input']"
    has_input = f"{{%- if {inp} is defined and {inp} -%}}"
    if t.input_fmt is not None:
        in_pre, in_post = _split(t.input_fmt, "{input}")
        user = (_out(_lit(u_pre), content, _lit(u_mid)) + has_input + _out(_lit(in_pre), inp, _lit(in_post))
                + "{%- endif -%}")
    else:
        user = _out(_lit(u_pre), content) + has_input + _out(_lit("\n\n"), inp) + "{%- endif -%}" + _out(_lit(u_mid))
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if not loop.first -%}{{ raise_exception('only the first message may be a system message') }}"
        f"{{%- elif {content} -%}}{_out(_lit(sys_pre), content, _lit(sys_post))}{{%- endif -%}}"
        f"{{%- elif message['role'] == 'user' -%}}{user}"
        f"{{%- if not loop.last or add_generation_prompt -%}}{_out(_lit(gen))}{{%- endif -%}}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{_out(_lit(r_pre), content, _lit(r_post), 'eos_token')}"
        "{%- else -%}{{ raise_exception('unexpected role ' + message['role']) }}"
        "{%- endif -%}{%- endfor -%}"
    )
