"""The GGUF v3 file format: writer, reader, and ggml's q8_0 encoding (minigpt.weights.gguf).

The format (little-endian): "GGUF", version u32, tensor count u64, metadata count u64; metadata as
(key string, value type u32, value); tensor infos as (name, n_dims u32, dims u64 each with the
fastest-moving dimension first, ggml type u32, offset u64 into the data section); the data section
starts at the next multiple of general.alignment (32) and every tensor starts aligned. Strings are
a u64 byte length + UTF-8 bytes; arrays an element type u32, a u64 count, the items.

Writer and reader: our own, not the `gguf` package. The format is small and stable; our own code
keeps minigpt's runtime dependencies as they are (torch, tiktoken, numpy, safetensors, tqdm),
streams tensors to disk one at a time through an atomic write, and turns every malformed input
into a one-line CheckpointError that names the file (truncated data, bad magic, unknown tensor
types). The `gguf` package (llama.cpp's own Python reader) serves instead as an independent
reference in tests/weights/test_gguf.py, beside llama.cpp itself (llama-cpp-python).

q8_0: blocks of 32 values along a row, an fp16 scale d = max|x| / 127 and 32 int8 q = roundf(x * (1 / d))
(fp32 throughout, halves away from zero): byte for byte ggml's reference quantizer.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch

from ...errors import CheckpointError, ConfigError
from ...fileio import atomic_write

__all__ = ["DTYPES", "F32", "F16", "BF16", "Q8_0", "GGUFFile", "GGUFTensor", "TensorToWrite", "quantize_q8_0",
           "dequantize_q8_0", "read_gguf", "write_gguf"]

PathLike = Union[str, os.PathLike]
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

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


# --- tensor encodings -----------------------------------------------------------------------

def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf in fp32: halves away from zero. floor(|x| + 0.5) is wrong for |x| = 0.5 - 2**-25
    (the sum rounds up to 1.0); |x| - floor(|x|) is exact, so compare the fraction instead."""
    a = x.abs()
    f = a.floor()
    return torch.copysign(f + (a - f >= 0.5).to(a.dtype), x)


def quantize_q8_0(t: torch.Tensor) -> np.ndarray:
    """ggml's q8_0 (quantize_row_q8_0_ref, byte for byte) of a float tensor whose last dimension is a
    multiple of 32: uint8 array of (numel / 32) blocks of 34 bytes: the fp16 of d = max|x| / 127,
    then 32 int8 roundf(x * (1 / d)), all in fp32 with 1 / d taken from the fp32 d."""
    x = t.detach().to("cpu", torch.float32).reshape(-1, 32)
    d = torch.div(x.abs().amax(dim=1, keepdim=True), torch.tensor(127.0))        # fp32, as ggml
    inv = torch.where(d > 0, torch.div(torch.tensor(1.0), d), torch.zeros_like(d))  # 1/d of the fp32 d
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


# --- writing --------------------------------------------------------------------------------

@dataclass
class TensorToWrite:
    """A tensor for write_gguf: its GGUF name, the values, the ggml type to store them as."""

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


def write_gguf(path: PathLike, metadata: dict, tensors: list[TensorToWrite]) -> Path:
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


# --- reading --------------------------------------------------------------------------------

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
