"""GGUF for llama.cpp: export any minigpt GPT-2 (base, fine-tuned, LoRA merged), LoRA adapters as
llama.cpp LoRA GGUFs, and import GGUF GPT-2 files.

    from minigpt.weights.gguf import export_gguf, export_lora_gguf, read_gguf
    export_gguf(model, "model.gguf", dtype="f16", template="alpaca")   # f32 | f16 | bf16 | q8_0
    export_lora_gguf(lora_model, "adapter.gguf")      # llama-cli -m base.gguf --lora adapter.gguf
    GPT.from_pretrained("model.gguf")                 # import (f32/f16/bf16/q8_0, dequantized)

The format (GGUF v3, little-endian): "GGUF", version u32, tensor count u64, metadata count u64;
metadata as (key string, value type u32, value); tensor infos as (name, n_dims u32, dims u64 each
with the fastest-moving dimension first, ggml type u32, offset u64 into the data section); the data
section starts at the next multiple of general.alignment (32) and every tensor starts aligned.
Strings are a u64 byte length + UTF-8 bytes; arrays an element type u32, a u64 count, the items.

Writer and reader: our own (about 200 lines here), not the `gguf` package. The format is small and
stable; our own code keeps minigpt's runtime dependencies as they are (torch, tiktoken, numpy,
safetensors, tqdm), streams tensors to disk one at a time through an atomic write, and turns
every malformed input into a one-line CheckpointError that names the file (truncated data, bad
magic, unknown tensor types). The `gguf` package (llama.cpp's own Python reader) serves instead as
an independent reference in tests/test_gguf.py, beside llama.cpp itself (llama-cpp-python).

Layout for architecture "gpt2" (what llama.cpp's loader reads): token_embd, position_embd,
blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}.{weight, bias}, output_norm;
`output.weight` only when the head is not tied to token_embd (llama.cpp reuses token_embd
otherwise). minigpt's Linear weights are (out, in), which is ggml's [in, out]: written as they are
(Hugging Face's Conv1D (in, out) is transposed by keymap long before this module sees it).
Matrices are stored in the chosen dtype; biases and LayerNorm vectors stay f32 (as llama.cpp's own
converter does). q8_0: blocks of 32 values along a row, an fp16 scale d = max|x| / 127 and 32 int8
q = round(x / d) (rounded half away from zero, as ggml); a matrix whose rows are not a multiple of
32 long is stored f16 instead.

Tokenizer metadata comes from the shipped GPT-2 ranks: byte-level token strings (GPT-2's
bytes-to-unicode map), merges recovered from the ranks (each token's last merge is what BPE over
the lower-ranked tokens leaves as two parts), <|endoftext|> = 50256 as bos/eos/control, no BOS
added. `tokenizer.chat_template` is a Jinja template generated from minigpt.data.templates, so
llama.cpp's chat endpoints build exactly the prompt chat.py builds (tests compare token ids).

LoRA adapters (llama.cpp's format): general.type = "adapter", adapter.type = "lora",
adapter.lora.alpha; per adapted matrix `<tensor>.lora_a` = lora_A (r, in) -> ggml [in, r] and
`<tensor>.lora_b` = lora_B (out, r) -> ggml [r, out]; llama.cpp adds (alpha / r) * B (A x). No
transposition is needed for minigpt's (out, in) layout (llama.cpp's converter transposes GPT-2
LoRA pairs for Conv1D; doing that to already-Linear pairs would be wrong).
"""
from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Optional, Union

import numpy as np
import torch

from ..data.templates import EOS_TEXT, Template, get_template
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write
from ..model.config import GPTConfig

__all__ = ["DTYPES", "GGUFFile", "GGUFTensor", "chat_template_jinja", "export_gguf", "export_lora_gguf",
           "gpt2_vocab", "gguf_name", "load_gguf_checkpoint", "minigpt_name", "quantize_q8_0",
           "dequantize_q8_0", "read_gguf", "write_gguf"]

PathLike = Union[str, os.PathLike]
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
EOT_ID = 50256

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
           BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NP = {UINT8: "<u1", INT8: "<i1", UINT16: "<u2", INT16: "<i2", UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4",
       BOOL: "<u1", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# ggml tensor types minigpt writes and reads: (block size in values, bytes per block)
F32, F16, Q8_0, BF16 = 0, 1, 8, 30
_BLOCK = {F32: (1, 4), F16: (1, 2), Q8_0: (32, 34), BF16: (1, 2)}
_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
               10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
               17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
               24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
               35: "TQ2_0", 39: "MXFP4"}
DTYPES = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}          # llama.cpp's LLAMA_FTYPE_*
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


# ================================================================================================
# Tensor names: minigpt <-> llama.cpp
# ================================================================================================
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


# ================================================================================================
# Tensor encodings
# ================================================================================================
def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def quantize_q8_0(t: torch.Tensor) -> np.ndarray:
    """ggml's q8_0 of a float tensor whose last dimension is a multiple of 32: uint8 array of
    (numel / 32) blocks of 34 bytes (fp16 scale d = max|x| / 127, then 32 int8 round(x / d))."""
    x = t.detach().to("cpu", torch.float32).reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = _round_half_away(x * inv).clamp_(-127, 127).to(torch.int8)
    out = np.empty((x.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.numpy().view(np.uint8)
    return out.reshape(-1)


def dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    """float32 values of q8_0 blocks (uint8 array of 34-byte blocks)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (q * d).reshape(-1)


def _encode(t: torch.Tensor, ggml_type: int) -> np.ndarray:
    t = t.detach().to("cpu").contiguous()
    if ggml_type == F32:
        return t.to(torch.float32).numpy()
    if ggml_type == F16:
        return t.to(torch.float16).numpy()
    if ggml_type == BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    if ggml_type == Q8_0:
        return quantize_q8_0(t)
    raise ConfigError(f"cannot write ggml type {_TYPE_NAMES.get(ggml_type, ggml_type)}")


def _decode(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == F32:
        return raw.view("<f4")
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return dequantize_q8_0(raw)


def _nbytes(shape: tuple[int, ...], ggml_type: int) -> int:
    block, size = _BLOCK[ggml_type]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return n // block * size


# ================================================================================================
# Writing
# ================================================================================================
@dataclass
class _Tensor:
    name: str
    tensor: torch.Tensor          # float, minigpt/torch shape (out, in)
    ggml_type: int


def _enc_str(s: Union[str, bytes]) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def _enc_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return _enc_str(value)
    if vtype == ARRAY:
        sub, items = value
        head = struct.pack("<IQ", sub, len(items))
        if sub == STRING:
            return head + b"".join(_enc_str(x) for x in items)
        return head + np.asarray(items, dtype=_NP[sub]).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def _typed(value) -> tuple[int, object]:
    """(value type, value) for a plain Python value: str, bool, int (u32), float (f32), or an
    explicit (type, value) pair, e.g. (ARRAY, (INT32, [...]))."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], int) and value[0] in range(13):
        return value
    if isinstance(value, str):
        return STRING, value
    if isinstance(value, bool):
        return BOOL, value
    if isinstance(value, int):
        return UINT32, value
    if isinstance(value, float):
        return FLOAT32, value
    raise TypeError(f"no GGUF type for {type(value).__name__}")


def _pad(n: int) -> int:
    return (-n) % ALIGNMENT


def write_gguf(path: PathLike, metadata: dict, tensors: list[_Tensor]) -> Path:
    """Write a GGUF v3 file atomically: metadata {key: value or (type, value)}, tensors in order."""
    path = Path(path)
    kv = [(k, *_typed(v)) for k, v in metadata.items()]
    if "general.alignment" not in metadata:
        kv.insert(1, ("general.alignment", UINT32, ALIGNMENT))
    head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kv))]
    head += [_enc_str(k) + struct.pack("<I", vt) + _enc_value(vt, v) for k, vt, v in kv]
    offset = 0
    for t in tensors:
        shape = tuple(t.tensor.shape)
        head.append(_enc_str(t.name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *reversed(shape),
                                                   t.ggml_type, offset))
        nbytes = _nbytes(shape, t.ggml_type)
        offset += nbytes + _pad(nbytes)
    header = b"".join(head)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(header + b"\0" * _pad(len(header)))
            for t in tensors:
                data = _encode(t.tensor, t.ggml_type)
                f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
                f.write(b"\0" * _pad(data.nbytes))
    atomic_write(path, write)
    return path


# ================================================================================================
# Reading
# ================================================================================================
@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]        # torch order (ggml's dims reversed)
    ggml_type: int
    offset: int                   # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata (key -> value; arrays as lists) and tensor infos."""

    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor as float32 (f16/bf16/q8_0 dequantized), in torch order."""
        info = self.tensors[name]
        if info.ggml_type not in _BLOCK:
            raise CheckpointError(f"{self.path}: tensor {name} is {info.type_name}, which minigpt cannot "
                                  "read (supported: F32, F16, BF16, Q8_0); re-export it as f16 or q8_0")
        raw = np.empty(info.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(raw))
        if got != info.nbytes:
            raise CheckpointError(f"{self.path}: truncated GGUF file (tensor {name} needs bytes "
                                  f"{info.offset}..{info.offset + info.nbytes})")
        return torch.from_numpy(_decode(raw, info.ggml_type).astype(np.float32, copy=False).reshape(info.shape))


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise _Truncated
        return self.f.read(n)

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8")

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            sub, n = self.unpack("<I"), self.unpack("<Q")
            if sub in _NP:
                width = np.dtype(_NP[sub]).itemsize
                arr = np.frombuffer(self.take(n * width), dtype=_NP[sub])
                return arr.astype(bool).tolist() if sub == BOOL else arr.tolist()
            if n > self.size:
                raise _Truncated
            return [self.value(sub) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.unpack(_SCALAR[vtype])


def _parse(cur: _Cursor, path: Path) -> GGUFFile:
    if cur.take(4) != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    if n_tensors > cur.size or n_kv > cur.size:
        raise _Truncated
    out = GGUFFile(path, version)
    for _ in range(n_kv):
        key = cur.string()
        out.metadata[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if n_dims > 8:
            raise ValueError(f"tensor {name} has {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
        infos.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
    align = int(out.metadata.get("general.alignment", ALIGNMENT))
    start = cur.f.tell() + (-cur.f.tell()) % align
    for name, shape, gtype, off in infos:
        nbytes = _nbytes(shape, gtype) if gtype in _BLOCK else 0
        info = GGUFTensor(name, shape, gtype, start + off, nbytes)
        if info.offset + nbytes > cur.size:
            raise CheckpointError(f"{path}: truncated GGUF file (tensor {name} needs bytes "
                                  f"{info.offset}..{info.offset + nbytes}, the file has {cur.size})")
        out.tensors[name] = info
    return out


def read_gguf(path: PathLike) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor infos); tensors are read on demand."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            return _parse(_Cursor(f, size), path)
        except _Truncated:
            raise CheckpointError(f"{path}: truncated GGUF file (the header ends at byte {size})") from None
        except (ValueError, UnicodeDecodeError, struct.error) as e:
            raise CheckpointError(f"{path}: corrupted GGUF header ({e})") from None


# ================================================================================================
# Tokenizer metadata from the shipped ranks
# ================================================================================================
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
    from ..data.tokenizer import load_ranks

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


# ================================================================================================
# Chat template (Jinja) from minigpt.data.templates
# ================================================================================================
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


# ================================================================================================
# Export
# ================================================================================================
def _plain_weights(model, merge: bool) -> dict[str, torch.Tensor]:
    """The model's GPT-2 parameters (minigpt names); a LoRA, DoRA or IA3 update folded in (merge) or
    left out (the base). Methods that add virtual tokens or modules cannot be written."""
    from ..methods import MERGEABLE, NAMES, method_of
    from ..methods.ia3 import ia3_layers
    from ..methods.lora import lora_layers

    method = method_of(model)
    if method is not None and method not in MERGEABLE:
        raise ConfigError(f"a {NAMES[method]} model adds virtual tokens or modules that llama.cpp cannot apply "
                          "and that do not merge into GPT-2's weights; GGUF export needs a full fine-tune or "
                          "a LoRA, DoRA or IA3 adapter")
    sd = dict(model.state_dict())
    for name, m in lora_layers(model).items():
        for extra in ("lora_A", "lora_B", "lora_magnitude"):
            sd.pop(f"{name}.{extra}", None)
        if merge and not m.merged and m.weight is model.transformer.wte.weight:
            raise ConfigError(f"{name} has a LoRA update on the tied output head; merging it would "
                              "change the token embeddings too, so it cannot be exported (train the "
                              "adapter without lm_head)")
        sd[f"{name}.weight"] = m.merged_weight() if merge else m.base_weight()
    for name, m in ia3_layers(model).items():
        sd.pop(f"{name}.ia3_l")
        sd[f"{name}.weight"], bias = m.weights(merged=merge)
        if bias is not None:
            sd[f"{name}.bias"] = bias
    return sd


def _check_shapes(model, sd: dict) -> GPTConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "transformer"):
        raise ConfigError(f"export_gguf needs a minigpt GPT, got {type(model).__name__}")
    c, n = cfg.n_embd, cfg.n_layer
    want = {"transformer.wte.weight": (cfg.vocab_size, c), "transformer.wpe.weight": (cfg.block_size, c),
            "transformer.ln_f.weight": (c,), "transformer.ln_f.bias": (c,), "lm_head.weight": (cfg.vocab_size, c)}
    for i in range(n):
        for part, shape in (("ln_1", (c,)), ("attn.c_attn", (3 * c, c)), ("attn.c_proj", (c, c)), ("ln_2", (c,)),
                            ("mlp.c_fc", (4 * c, c)), ("mlp.c_proj", (c, 4 * c))):
            w = f"transformer.h.{i}.{part}"
            want[f"{w}.weight"] = shape
            want[f"{w}.bias"] = (shape[0],)
    extra = sorted(set(sd) - set(want))
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConfigError(f"the model has tensors that GPT-2 in llama.cpp has no place for: "
                          f"{', '.join(extra[:3])}{more} (a quantized or adapted model: export the plain weights)")
    for k, shape in want.items():
        if k not in sd:
            raise ConfigError(f"the model lacks {k}; not a GPT-2 model")
        if tuple(sd[k].shape) != shape or not sd[k].is_floating_point():
            raise ConfigError(f"{k} has shape {list(sd[k].shape)} ({sd[k].dtype}); GPT-2 of this config needs "
                              f"{list(shape)} floats")
    return cfg


def _tensor_type(t: torch.Tensor, dtype: str) -> int:
    if t.dim() == 1:
        return F32                                  # biases and LayerNorms: f32, as llama.cpp's converter
    if dtype == "q8_0" and t.shape[-1] % 32:
        return F16                                  # rows must be whole q8_0 blocks
    return DTYPES[dtype]


def _check_dtype(dtype: str, allowed=tuple(DTYPES)) -> str:
    if dtype not in allowed:
        raise ConfigError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return dtype


def export_gguf(model, path: PathLike, dtype: str = "f16", *, template: Union[str, Template, None] = None,
                name: Optional[str] = None, merge: bool = True) -> Path:
    """Write `model` (a minigpt GPT) as a llama.cpp GGUF v3 file of architecture gpt2.

    dtype:    f32 | f16 | bf16 | q8_0 for the matrices (vectors stay f32).
    template: the chat template to embed as tokenizer.chat_template (default alpaca).
    name:     general.name (default: the config's name).
    merge:    LoRA layers are folded into the weights (True) or left out (False: the base model,
              for use with export_lora_gguf's adapter). The model itself is not changed.
    An untied head (lm_head not the token embedding) is written as output.weight.
    """
    _check_dtype(dtype)
    from ..model.quant import is_quantized

    if is_quantized(model):
        raise CheckpointError("a quantized (nf4/int8) model cannot be exported: load it without quantize= "
                              "(a QLoRA adapter applies to the full-precision base) and export that")
    sd = _plain_weights(model, merge)
    cfg = _check_shapes(model, sd)
    head, wte = sd.pop("lm_head.weight"), sd["transformer.wte.weight"]
    tied = head.data_ptr() == wte.data_ptr() or torch.equal(head, wte)
    meta = {
        "general.architecture": "gpt2",
        "general.type": "model",
        "general.name": name or (cfg.name if cfg.name != "custom" else "minigpt"),
        "general.file_type": _FILE_TYPE[dtype],
        "general.quantization_version": 2,
        "gpt2.context_length": cfg.block_size,
        "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd,
        "gpt2.block_count": cfg.n_layer,
        "gpt2.attention.head_count": cfg.n_head,
        "gpt2.attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon),
        **tokenizer_metadata(cfg.vocab_size, template),
    }
    order = ["transformer.wte.weight", "transformer.wpe.weight"]
    order += [k for k in sd if k.startswith("transformer.h.")]
    order += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    tensors = [_Tensor(gguf_name(k), sd[k], _tensor_type(sd[k], dtype)) for k in order]
    if not tied:
        tensors.append(_Tensor("output.weight", head, _tensor_type(head, dtype)))
    return write_gguf(path, meta, tensors)


def export_lora_gguf(model, path: PathLike, dtype: str = "f32", *, name: Optional[str] = None) -> Path:
    """Write the (unmerged) LoRA layers of `model` as a llama.cpp LoRA adapter GGUF, for
    `llama-cli -m base.gguf --lora adapter.gguf` (base.gguf: export_gguf(model, ..., merge=False)).

    llama.cpp scales each pair by alpha / r with one alpha per file: the adapter's alpha when all
    layers share alpha / r (rsLoRA: alpha * sqrt(r)), else each layer's scaling is folded into
    lora_b and alpha is 0 (llama.cpp then scales by 1). dtype: f32 | f16 | bf16.
    """
    from ..methods.lora import lora_layers

    _check_dtype(dtype, ("f32", "f16", "bf16"))
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the model has no LoRA layers to export (load an adapter with load_adapter first)")
    products = {m.scaling * m.r for m in layers.values()}
    alpha = products.pop() if len(products) == 1 else 0.0
    tensors = []
    for mod, m in sorted(layers.items()):
        if m.use_dora:
            raise ConfigError(f"{mod} is a DoRA layer: a llama.cpp LoRA GGUF holds plain LoRA pairs only; "
                              "export the model with the adapter merged instead")
        if m.merged:
            raise ConfigError(f"{mod} is merged; unmerge_lora(model) before exporting the adapter")
        if m.weight is model.transformer.wte.weight:
            raise ConfigError(f"{mod}: llama.cpp cannot apply a LoRA on GPT-2's tied output head")
        base = gguf_name(f"{mod}.weight")
        b = m.full_lora_B().detach().float()
        if alpha == 0.0:
            b = b * m.scaling
        tensors += [_Tensor(f"{base}.lora_a", m.lora_A.detach(), DTYPES[dtype]),
                    _Tensor(f"{base}.lora_b", b, DTYPES[dtype])]
    cfg = model.config
    meta = {"general.architecture": "gpt2", "general.type": "adapter",
            "general.name": name or (cfg.name if cfg.name != "custom" else "minigpt") + "-lora",
            "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    return write_gguf(path, meta, tensors)


# ================================================================================================
# Import
# ================================================================================================
def _meta(g: GGUFFile, key: str, kind: type = int):
    if key not in g.metadata:
        raise CheckpointError(f"{g.path}: metadata {key} is missing; not a complete GPT-2 GGUF")
    v = g.metadata[key]
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise CheckpointError(f"{g.path}: metadata {key} = {v!r} is not a number")
    return v


def _gguf_config(g: GGUFFile) -> GPTConfig:
    arch = g.metadata.get("general.architecture")
    if g.metadata.get("general.type") == "adapter":
        raise CheckpointError(f"{g.path}: a GGUF LoRA adapter, not a model (load the base model and the "
                              "adapter's PEFT folder instead)")
    if arch != "gpt2":
        raise CheckpointError(f"{g.path}: architecture {arch!r} is not GPT-2 (minigpt reads general.architecture "
                              "'gpt2' only)")
    n_embd = _meta(g, "gpt2.embedding_length")
    ff = _meta(g, "gpt2.feed_forward_length")
    if ff != 4 * n_embd:
        raise CheckpointError(f"{g.path}: feed_forward_length {ff} is not 4 x embedding_length ({n_embd})")
    if "token_embd.weight" not in g.tensors:
        raise CheckpointError(f"{g.path}: tensor token_embd.weight is missing")
    try:
        return GPTConfig(n_layer=_meta(g, "gpt2.block_count"), n_head=_meta(g, "gpt2.attention.head_count"),
                         n_embd=n_embd, block_size=_meta(g, "gpt2.context_length"),
                         vocab_size=g.tensors["token_embd.weight"].shape[0],
                         layer_norm_epsilon=float(str(np.float32(_meta(g, "gpt2.attention.layer_norm_epsilon",
                                                                       float)))))   # 1e-05, not 9.99e-06
    except ConfigError as e:
        raise CheckpointError(f"{g.path}: {e}") from e


def _check_tokenizer(g: GGUFFile) -> None:
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    ours = gpt2_vocab()[0]
    if g.metadata.get("tokenizer.ggml.model") != "gpt2" or list(tokens[:len(ours)]) != list(ours):
        raise CheckpointError(f"{g.path}: its tokenizer is not GPT-2's BPE (minigpt only has GPT-2's), so "
                              "its token ids would mean other text")


def load_gguf_checkpoint(path: PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, float32 state dict in minigpt layout) of a GGUF GPT-2 file (f32, f16, bf16 or
    q8_0 tensors). An output.weight equal to token_embd (llama.cpp's converter writes one) is
    dropped; a different one is an untied head, which minigpt's GPT does not have."""
    g = read_gguf(path)
    cfg = _gguf_config(g)
    _check_tokenizer(g)
    sd = {}
    for name in g.tensors:
        key = minigpt_name(name)
        if key is None:
            raise CheckpointError(f"{g.path}: tensor {name} is not part of GPT-2")
        sd[key] = g.tensor(name)
    head = sd.pop("lm_head.weight", None)
    if head is not None:
        wte = sd["transformer.wte.weight"]
        if head.shape != wte.shape or not torch.allclose(head, wte, rtol=0, atol=1e-2 * float(wte.abs().max())):
            raise CheckpointError(f"{g.path}: output.weight differs from token_embd.weight (an untied head); "
                                  "minigpt's GPT ties the output head to the token embedding")
    return cfg, sd
