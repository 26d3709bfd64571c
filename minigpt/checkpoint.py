"""Checkpoint loading and saving: Hugging Face GPT-2 files, OpenAI TF checkpoints, presets.

Sources accepted by `load_model(src)` (what `GPT.from_pretrained` calls):

* a preset name ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"): read from the cache
  ($MINIGPT_HOME, default ~/.cache/minigpt, as <name>/config.json + <name>/model.safetensors),
  downloaded once from the Hugging Face Hub when missing (unless MINIGPT_OFFLINE/HF_HUB_OFFLINE=1);
* a Hugging Face GPT-2 directory: config.json + model.safetensors (or a sharded
  model.safetensors.index.json, or pytorch_model.bin read with `torch.load(weights_only=True)`);
  keys with or without the `transformer.` prefix, Conv1D (in, out) weights;
* a single .safetensors/.bin file: the config comes from a config.json next to it, else it is
  inferred from the tensor shapes with n_head = n_embd // 64 (true for every GPT-2 size) unless
  `n_head=` is passed;
* an OpenAI TF checkpoint directory (hparams.json + model.ckpt.index + model.ckpt.data-*), a
  `.index` file or a checkpoint prefix: read by the tensor-bundle reader below, no TensorFlow;
* a directory written by `save_model` / `GPT.save_pretrained` (same layout as the HF one).

Internally every state dict uses minigpt's layout: `transformer.`-prefixed HF names, nn.Linear
(out, in) weights, no `lm_head.weight` (tied to wte). `hf_to_minigpt` / `minigpt_to_hf` convert.
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import torch

from .config import PRESETS, GPTConfig
from .errors import CheckpointError

PathLike = Union[str, os.PathLike]

__all__ = [
    "CheckpointError", "load_model", "save_model", "load_checkpoint", "load_state_dict_any",
    "model_from_state_dict", "read_tensors", "hf_to_minigpt", "minigpt_to_hf", "is_conv1d_weight",
    "CONV1D_WEIGHTS", "IGNORED_HF_KEYS", "openai_to_minigpt", "read_tf_bundle", "read_tf_index",
    "read_sstable", "crc32c", "mask_crc", "unmask_crc", "cache_dir", "preset_dir",
    "is_preset_cached", "download_preset", "HUB_URL",
]




# ================================================================================================
# Key maps between Hugging Face GPT-2 and minigpt
# ================================================================================================
# Weights that HF stores as Conv1D (in, out) and minigpt as nn.Linear (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers found in Hub files (causal mask, masked-bias constant): dropped on load.
IGNORED_HF_KEYS = ("attn.bias", "attn.masked_bias")
_BLOCK_RE = re.compile(r"^transformer\.h\.(\d+)\.")


def is_conv1d_weight(key: str) -> bool:
    """True for the keys whose HF tensor is (in, out) and minigpt tensor is (out, in)."""
    return key.endswith(CONV1D_WEIGHTS) and ".h." in f".{key}"


_IGNORED_RE = re.compile(r"(?:^|\.)h\.\d+\.attn\.(?:bias|masked_bias)$")


def _is_ignored(key: str) -> bool:
    return _IGNORED_RE.search(key) is not None


def hf_to_minigpt(state_dict: dict, *, drop_buffers: bool = True) -> dict:
    """HF GPT-2 state dict (prefixed or not, Conv1D weights) -> minigpt layout.

    Adds the `transformer.` prefix where missing, transposes Conv1D weights, drops the `attn.bias`
    / `attn.masked_bias` buffers and `lm_head.weight` (tied; it must equal wte when present).
    Keys it does not know (e.g. LoRA tensors) are passed through with the prefix rule applied.
    """
    out = {}
    lm_head = None
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            lm_head = v
            continue
        if drop_buffers and _is_ignored(k):
            continue
        key = k if k.startswith("transformer.") else f"transformer.{k}"
        if is_conv1d_weight(key) and v.dim() == 2:
            v = v.t()
        out[key] = v
    if lm_head is not None:
        wte = out.get("transformer.wte.weight")
        if wte is not None and (wte.shape != lm_head.shape or not torch.equal(wte, lm_head)):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight; minigpt only "
                                  "supports GPT-2 with tied input/output embeddings")
    return out


def minigpt_to_hf(state_dict: dict, *, prefix: bool = True) -> dict:
    """minigpt state dict -> HF Hub layout: Conv1D (in, out) weights, no lm_head, contiguous.

    With prefix=False the `transformer.` prefix is stripped (the original Hub file layout).
    """
    out = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            continue
        if is_conv1d_weight(k) and v.dim() == 2:
            v = v.t()
        if not prefix and k.startswith("transformer."):
            k = k[len("transformer."):]
        out[k] = v.contiguous()
    return out


def openai_to_minigpt(tensors: dict) -> dict:
    """OpenAI TF names (model/h0/attn/c_attn/w [1, in, out], model/ln_f/g, ...) -> minigpt layout."""
    leaf = {"g": "weight", "b": "bias", "w": "weight"}
    out = {}
    for name, t in tensors.items():
        if name in _TF_IGNORED or name.endswith(_TF_IGNORED_SUFFIXES):
            continue
        parts = name.split("/")
        if parts[0] != "model" or len(parts) < 2:
            raise CheckpointError(f"unexpected tensor {name!r} in the OpenAI checkpoint")
        if parts[1] in ("wte", "wpe") and len(parts) == 2:
            out[f"transformer.{parts[1]}.weight"] = t
            continue
        if parts[1] == "ln_f" and len(parts) == 3 and parts[2] in ("g", "b"):
            out[f"transformer.ln_f.{leaf[parts[2]]}"] = t
            continue
        m = re.fullmatch(r"h(\d+)", parts[1])
        if m and len(parts) in (4, 5) and parts[-1] in leaf:
            key = f"transformer.h.{int(m.group(1))}.{'.'.join(parts[2:-1])}.{leaf[parts[-1]]}"
            if parts[-1] == "w":                     # [1, in, out] -> nn.Linear (out, in)
                t = t.reshape(t.shape[-2:]).t() if t.dim() == 3 and t.shape[0] == 1 else t.t()
            out[key] = t
            continue
        raise CheckpointError(f"unexpected tensor {name!r} in the OpenAI checkpoint")
    return out


# optimizer / bookkeeping variables that may sit next to the weights in a TF checkpoint
_TF_IGNORED = ("global_step", "beta1_power", "beta2_power")
_TF_IGNORED_SUFFIXES = ("/Adam", "/Adam_1")


# ================================================================================================
# CRC-32C (Castagnoli), vectorised with numpy; TF's masking
# ================================================================================================
_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_T8 = _byte_table()
_T8_LIST = [int(x) for x in _T8]


@functools.lru_cache(maxsize=1)
def _word_tables() -> tuple[np.ndarray, np.ndarray]:
    """Two 64K tables: the CRC register after 4 zero bytes, for its low and high 16 bits."""
    def four_zero_bytes(s):
        for _ in range(4):
            s = (s >> 8) ^ _T8[s & 0xFF]
        return s
    i = np.arange(65536, dtype=np.uint32)
    return four_zero_bytes(i.copy()), four_zero_bytes(i << np.uint32(16))


# The register update "feed n zero bytes" is linear over GF(2): an operator is stored as the images
# of the 32 unit vectors, which lets independent chunks be checksummed in parallel and combined.
def _op_apply(cols: tuple, x: int) -> int:
    r, j = 0, 0
    while x:
        if x & 1:
            r ^= cols[j]
        x >>= 1
        j += 1
    return r


def _op_compose(a: tuple, b: tuple) -> tuple:
    return tuple(_op_apply(a, c) for c in b)


_Z1 = tuple(((1 << j) >> 8) ^ _T8_LIST[(1 << j) & 0xFF] for j in range(32))
_IDENTITY = tuple(1 << j for j in range(32))


@functools.lru_cache(maxsize=256)
def _zero_op(n: int) -> tuple:
    """Operator advancing a raw CRC register over n zero bytes."""
    result, base = _IDENTITY, _Z1
    while n:
        if n & 1:
            result = _op_compose(base, result)
        n >>= 1
        if n:
            base = _op_compose(base, base)
    return result


@functools.lru_cache(maxsize=256)
def _op_tables(n: int) -> tuple:
    """The operator for n zero bytes as four 256-entry tables (one per register byte)."""
    cols = np.array(_zero_op(n), dtype=np.uint32)
    b = np.arange(256)
    tables = []
    for k in range(4):
        t = np.zeros(256, np.uint32)
        for bit in range(8):
            t ^= np.where((b >> bit) & 1, cols[8 * k + bit], 0).astype(np.uint32)
        tables.append(t)
    return tuple(tables)


def _raw_scalar(state: int, data) -> int:
    t = _T8_LIST
    for byte in bytes(data):
        state = (state >> 8) ^ t[(state ^ byte) & 0xFF]
    return state


def _raw_lanes(words: np.ndarray) -> int:
    """Raw CRC (register starting at 0) of the (N, L) uint32 array's bytes in row order.

    Each of the N rows is checksummed in its own lane (vectorised over rows), then lanes are
    combined pairwise: crc(a || b) = Z_len(b)(crc(a)) ^ crc(b). N must be a power of two.
    """
    n_lanes, n_words = words.shape
    wt = np.ascontiguousarray(words.T)               # (L, N): one contiguous row per step
    lo_t, hi_t = _word_tables()
    crc = np.zeros(n_lanes, np.uint32)
    lo = np.empty(n_lanes, np.uint32)
    hi = np.empty(n_lanes, np.uint32)
    tmp = np.empty(n_lanes, np.uint32)
    for j in range(n_words):
        np.bitwise_xor(crc, wt[j], out=crc)
        np.bitwise_and(crc, 0xFFFF, out=lo)
        np.right_shift(crc, 16, out=hi)
        np.take(lo_t, lo, out=crc)
        np.take(hi_t, hi, out=tmp)
        np.bitwise_xor(crc, tmp, out=crc)
    length = 4 * n_words
    while crc.size > 1:
        t0, t1, t2, t3 = _op_tables(length)
        x = crc[0::2]
        crc = t0[x & 0xFF] ^ t1[(x >> 8) & 0xFF] ^ t2[(x >> 16) & 0xFF] ^ t3[x >> 24] ^ crc[1::2]
        length *= 2
    return int(crc[0])


# (lanes, words per lane) from large to small; what is left over goes byte by byte (< 4 KiB)
_LANE_PLAN = ((16384, 256), (4096, 64), (512, 32), (64, 16))


def _crc32c_numpy(data, value: int = 0) -> int:
    a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    state = value ^ 0xFFFFFFFF
    pos = 0
    for lanes, words in _LANE_PLAN:
        block = lanes * words * 4
        nblocks = (a.size - pos) // block
        if not nblocks:
            continue
        zb = _zero_op(block)
        for _ in range(nblocks):
            w = a[pos:pos + block].view("<u4").reshape(lanes, words)
            state = _op_apply(zb, state) ^ _raw_lanes(w)
            pos += block
    state = _raw_scalar(state, a[pos:])
    return state ^ 0xFFFFFFFF


def _pick_crc32c():
    try:  # optional speed-ups, used only when installed
        import google_crc32c  # type: ignore

        if getattr(google_crc32c, "implementation", "c") == "c":
            return lambda data, value=0: google_crc32c.extend(value, bytes(memoryview(data)))
    except Exception:
        pass
    try:
        import crc32c as _c  # type: ignore

        return lambda data, value=0: _c.crc32c(memoryview(data), value)
    except Exception:
        pass
    return _crc32c_numpy


_crc32c_impl = _pick_crc32c()


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of a bytes-like object (or uint8 numpy array), optionally extending `value`."""
    return _crc32c_impl(data, value)


_MASK_DELTA = 0xA282EAD8


def mask_crc(crc: int) -> int:
    """TF/LevelDB masked CRC: rotate right by 15 bits and add a constant."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - _MASK_DELTA) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ================================================================================================
# Minimal protobuf decoding and the LevelDB-style table (.index) reader
# ================================================================================================
def _varint(buf, pos: int, what: str = "varint") -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError(f"truncated {what}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError(f"malformed {what}")


def _proto_fields(buf: bytes) -> dict[int, list]:
    """Decode one protobuf message into {field number: [values]} (varints as int, others bytes)."""
    fields: dict[int, list] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos, "protobuf tag")
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            val, pos = _varint(buf, pos, "protobuf varint")
        elif wire == 1:
            val, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos, "protobuf length")
            val, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            val, pos = buf[pos:pos + 4], pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise CheckpointError("truncated protobuf message")
        fields.setdefault(num, []).append(val)
    return fields


def _snappy_decompress(src: bytes) -> bytes:
    """Raw snappy block decompression (only used if an index block is snappy-compressed)."""
    n, pos = _varint(src, 0, "snappy length")
    out = bytearray()
    while pos < len(src):
        tag = src[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:                                              # literal
            ln = tag >> 2
            if ln >= 60:
                nb = ln - 59
                ln = int.from_bytes(src[pos:pos + nb], "little")
                pos += nb
            ln += 1
            out += src[pos:pos + ln]
            pos += ln
            continue
        if kind == 1:
            ln = ((tag >> 2) & 7) + 4
            off = ((tag >> 5) << 8) | src[pos]
            pos += 1
        elif kind == 2:
            ln, off = (tag >> 2) + 1, int.from_bytes(src[pos:pos + 2], "little")
            pos += 2
        else:
            ln, off = (tag >> 2) + 1, int.from_bytes(src[pos:pos + 4], "little")
            pos += 4
        if off == 0 or off > len(out):
            raise CheckpointError("corrupted snappy block")
        for _ in range(ln):                                         # copies may overlap
            out.append(out[-off])
    if len(out) != n:
        raise CheckpointError("corrupted snappy block (length mismatch)")
    return bytes(out)


_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_TRAILER_LEN = 5   # 1 byte compression type + 4 bytes masked crc32c


def _read_block(data: bytes, offset: int, size: int, name: str) -> bytes:
    end = offset + size + _TRAILER_LEN
    if offset < 0 or end > len(data):
        raise CheckpointError(f"{name}: truncated table (block at {offset} of {size} bytes ends past EOF)")
    contents = data[offset:offset + size]
    kind = data[offset + size]
    (stored,) = struct.unpack_from("<I", data, offset + size + 1)
    if crc32c(data[offset:offset + size + 1]) != unmask_crc(stored):
        raise CheckpointError(f"{name}: table block at offset {offset} failed its crc32c check (corrupted file)")
    if kind == 0:
        return contents
    if kind == 1:
        return _snappy_decompress(contents)
    raise CheckpointError(f"{name}: unknown block compression type {kind}")


def _block_entries(block: bytes, name: str) -> list[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise CheckpointError(f"{name}: malformed table block")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise CheckpointError(f"{name}: malformed table block (restart array)")
    entries, pos, key = [], 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        vlen, pos = _varint(block, pos)
        if shared > len(key) or pos + non_shared + vlen > limit:
            raise CheckpointError(f"{name}: malformed table block entry")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        entries.append((key, block[pos:pos + vlen]))
        pos += vlen
    return entries


def read_sstable(path_or_bytes) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB-format table (TF's .index file), crc-checked, in order."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), "table"
    else:
        name = str(path_or_bytes)
        data = Path(path_or_bytes).read_bytes()
    if len(data) < _FOOTER_LEN:
        raise CheckpointError(f"{name}: truncated index file ({len(data)} bytes, no table footer)")
    footer = data[-_FOOTER_LEN:]
    (magic,) = struct.unpack_from("<Q", footer, 40)
    if magic != _TABLE_MAGIC:
        raise CheckpointError(f"{name}: not a TF checkpoint index (bad table magic; truncated or corrupted?)")
    pos = 0
    _meta_off, pos = _varint(footer, pos)
    _meta_size, pos = _varint(footer, pos)
    idx_off, pos = _varint(footer, pos)
    idx_size, pos = _varint(footer, pos)
    if idx_off + idx_size + _TRAILER_LEN > len(data) - _FOOTER_LEN:
        raise CheckpointError(f"{name}: truncated or corrupted index file (index block out of range)")
    index = _block_entries(_read_block(data, idx_off, idx_size, name), name)
    out = []
    for _sep, handle in index:
        off, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        out.extend(_block_entries(_read_block(data, off, size, name), name))
    return out


# ================================================================================================
# TF tensor bundle (OpenAI GPT-2 checkpoints)
# ================================================================================================
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
              9: np.int64, 10: np.bool_, 14: "bfloat16", 17: np.uint16, 19: np.float16,
              22: np.uint32, 23: np.uint64}


def _bundle_prefix(src: Path) -> Path:
    """The checkpoint prefix (path without .index) for a directory, .index file or prefix."""
    if src.is_dir():
        ckpt = src / "checkpoint"
        if ckpt.is_file():
            m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', ckpt.read_text(errors="replace"), re.M)
            if m:
                p = Path(m.group(1))
                p = p if p.is_absolute() else src / p
                if Path(f"{p}.index").is_file():
                    return p
                p = src / Path(m.group(1)).name
                if Path(f"{p}.index").is_file():
                    return p
        if (src / "model.ckpt.index").is_file():
            return src / "model.ckpt"
        idx = sorted(src.glob("*.index"))
        if len(idx) == 1:
            return idx[0].with_suffix("")
        raise CheckpointError(f"{src}: no single TF checkpoint .index file found")
    s = str(src)
    return Path(s[:-len(".index")]) if s.endswith(".index") else src


def read_tf_index(index_path: PathLike) -> tuple[dict, dict[str, dict]]:
    """Parse a bundle .index: (header {num_shards, endianness}, {tensor name: entry dict})."""
    header = None
    entries = {}
    for key, value in read_sstable(index_path):
        if key == b"":
            f = _proto_fields(value)
            header = {"num_shards": f.get(1, [1])[-1], "endianness": f.get(2, [0])[-1]}
            continue
        f = _proto_fields(value)
        shape = []
        if 2 in f:
            sf = _proto_fields(f[2][-1])
            if sf.get(3, [0])[-1]:
                raise CheckpointError(f"{index_path}: tensor {key.decode(errors='replace')!r} has unknown rank")
            for d in sf.get(2, []):
                size = _proto_fields(d).get(1, [0])[-1]
                shape.append(size - (1 << 64) if size >= 1 << 63 else size)
        name = key.decode("utf-8", errors="replace")
        if 7 in f:
            raise CheckpointError(f"{index_path}: tensor {name!r} is partitioned (slices); not supported")
        entries[name] = {
            "dtype": f.get(1, [0])[-1], "shape": tuple(shape), "shard_id": f.get(3, [0])[-1],
            "offset": f.get(4, [0])[-1], "size": f.get(5, [0])[-1],
            "crc32c": struct.unpack("<I", f[6][-1])[0] if 6 in f else None,
        }
    if header is None:
        raise CheckpointError(f"{index_path}: missing bundle header entry (not a TF checkpoint index?)")
    return header, entries


def read_tf_bundle(src: PathLike, *, names: Optional[Iterable[str]] = None,
                   verify: bool = True) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `names`) from a TF checkpoint dir/prefix/.index, verifying crc32c."""
    prefix = _bundle_prefix(Path(src))
    index_path = Path(f"{prefix}.index")
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: TF checkpoint index not found")
    header, entries = read_tf_index(index_path)
    if header["endianness"] not in (0, 1):
        raise CheckpointError(f"{index_path}: unknown endianness {header['endianness']}")
    num_shards = max(1, int(header["num_shards"]))
    order = "<" if header["endianness"] == 0 else ">"
    wanted = list(entries) if names is None else list(names)
    out: dict[str, torch.Tensor] = {}
    files: dict[int, tuple] = {}
    try:
        for name in wanted:
            if name not in entries:
                raise CheckpointError(f"{index_path}: tensor {name!r} not in checkpoint")
            e = entries[name]
            if e["shard_id"] not in files:
                dpath = Path(f"{prefix}.data-{e['shard_id']:05d}-of-{num_shards:05d}")
                if not dpath.is_file():
                    raise CheckpointError(f"{dpath}: TF checkpoint data file not found")
                files[e["shard_id"]] = (dpath, open(dpath, "rb"), dpath.stat().st_size)
            dpath, fh, fsize = files[e["shard_id"]]
            np_dtype = _TF_DTYPES.get(e["dtype"])
            if np_dtype is None:
                raise CheckpointError(f"tensor {name!r} has unsupported TF dtype {e['dtype']}")
            itemsize = 2 if np_dtype == "bfloat16" else np.dtype(np_dtype).itemsize
            numel = int(np.prod(e["shape"], dtype=np.int64)) if e["shape"] else 1
            if e["size"] != numel * itemsize:
                raise CheckpointError(f"tensor {name!r}: index says {e['size']} bytes but shape "
                                      f"{list(e['shape'])} needs {numel * itemsize} (corrupted index)")
            if e["offset"] + e["size"] > fsize:
                raise CheckpointError(f"{dpath}: truncated data file (tensor {name!r} needs bytes "
                                      f"{e['offset']}..{e['offset'] + e['size']}, file has {fsize})")
            buf = bytearray(e["size"])
            fh.seek(e["offset"])
            if fh.readinto(buf) != e["size"]:
                raise CheckpointError(f"{dpath}: truncated data file while reading tensor {name!r}")
            if verify and e["crc32c"] is not None:
                got = crc32c(buf)
                if got != unmask_crc(e["crc32c"]):
                    raise CheckpointError(f"{dpath}: crc32c mismatch for tensor {name!r} (stored "
                                          f"{unmask_crc(e['crc32c']):08x}, computed {got:08x}): "
                                          "the data file is corrupted")
            if np_dtype == "bfloat16":
                arr = np.frombuffer(buf, dtype=np.dtype(np.int16).newbyteorder(order)).astype(np.int16)
                t = torch.from_numpy(arr).view(torch.bfloat16)
            else:
                arr = np.frombuffer(buf, dtype=np.dtype(np_dtype).newbyteorder(order))
                if order == ">":
                    arr = arr.astype(np.dtype(np_dtype).newbyteorder("<"))
                t = torch.from_numpy(arr)
            out[name] = t.reshape(e["shape"])
    finally:
        for _, fh, _ in files.values():
            fh.close()
    return out


# ================================================================================================
# Reading tensors from files and directories
# ================================================================================================
def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Raw tensors of a .safetensors file or a torch .bin/.pt/.pth file (weights_only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file (truncated or corrupted?): "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:   # pickle.UnpicklingError for anything but plain tensors/containers
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0]) if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "UnpicklingError" in type(e).__name__:
            raise CheckpointError(f"{path}: refused to load: the file holds Python objects other than "
                                  f"tensors and weights_only=True loading rejected it ({msg[:200]})") from e
        raise CheckpointError(f"{path}: unreadable torch checkpoint (truncated or corrupted?): {msg[:200]}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _hf_weight_files(d: Path) -> list[Path]:
    """Weight files of an HF-layout directory, safetensors preferred."""
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    idx = d / "model.safetensors.index.json"
    if idx.is_file():
        shards = sorted(set(_read_json(idx).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{idx}: empty weight_map")
        return [d / s for s in shards]
    if (d / "pytorch_model.bin").is_file():
        return [d / "pytorch_model.bin"]
    idx = d / "pytorch_model.bin.index.json"
    if idx.is_file():
        return [d / s for s in sorted(set(_read_json(idx).get("weight_map", {}).values()))]
    return []


def _is_tf_dir(d: Path) -> bool:
    return (d / "hparams.json").is_file() and any(d.glob("*.index"))


def load_state_dict_any(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors in minigpt layout from any supported file or directory (no config, no model)."""
    return load_checkpoint(path, need_config=False)[1]


def _config_from_hparams(h: dict) -> GPTConfig:
    try:
        return _named(GPTConfig(n_layer=h["n_layer"], n_head=h["n_head"], n_embd=h["n_embd"],
                                block_size=h["n_ctx"], vocab_size=h["n_vocab"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"hparams.json: invalid or incomplete ({e!r}); needs n_vocab, n_ctx, "
                              "n_embd, n_head, n_layer") from e


def _named(cfg: GPTConfig) -> GPTConfig:
    """Give a config the preset's name when its shape is exactly a preset's."""
    if cfg.name == "custom":
        for name, p in PRESETS.items():
            if (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == \
                    (p["n_layer"], p["n_head"], p["n_embd"], 50257, 1024):
                cfg.name = name
    return cfg


def _config_from_json(path: Path) -> GPTConfig:
    try:
        return _named(GPTConfig.from_hf_dict(_read_json(path)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable GPT-2 config ({e})") from e


def _infer_config(sd: dict, n_head: Optional[int], origin: str) -> GPTConfig:
    """Config from tensor shapes (minigpt layout). n_head defaults to n_embd // 64."""
    try:
        vocab_size, n_embd = sd["transformer.wte.weight"].shape
        block_size = sd["transformer.wpe.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{origin}: missing tensor {e.args[0]}; cannot infer the model shape") from e
    layers = {int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))}
    n_layer = max(layers) + 1 if layers else 0
    if n_head is None:
        if n_embd % 64:
            raise CheckpointError(f"{origin}: cannot infer n_head for n_embd={n_embd}; pass n_head= "
                                  "or put a config.json next to the weights")
        n_head = n_embd // 64
    try:
        return _named(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                vocab_size=vocab_size))
    except ValueError as e:
        raise CheckpointError(f"{origin}: inferred config is invalid ({e})") from e


def load_checkpoint(src: PathLike, *, n_head: Optional[int] = None, need_config: bool = True,
                    cache: Optional[PathLike] = None, download: bool = True
                    ) -> tuple[Optional[GPTConfig], dict[str, torch.Tensor]]:
    """Resolve `src` (see module docstring) -> (GPTConfig, state dict in minigpt layout)."""
    path = Path(src).expanduser() if isinstance(src, (str, os.PathLike)) else None
    if path is None:
        raise CheckpointError(f"unsupported checkpoint source of type {type(src).__name__}")
    if not path.exists():
        if isinstance(src, str) and src.removeprefix("openai-community/") in PRESETS:
            src = src.removeprefix("openai-community/")
            d = download_preset(src, cache, allowed=download)   # returns at once when cached
            return load_checkpoint(d, n_head=n_head, need_config=need_config)
        if Path(f"{path}.index").is_file():                         # a TF checkpoint prefix
            return _load_tf(path)
        if isinstance(src, str) and os.sep not in src and "/" not in src and not src.startswith("."):
            raise CheckpointError(f"unknown checkpoint source {src!r}: not an existing path nor a preset "
                                  f"({', '.join(PRESETS)})")
        raise CheckpointError(f"checkpoint path not found: {path}")

    if path.is_file():
        if path.suffix == ".index":
            return _load_tf(path)
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise CheckpointError(f"{path}: unknown checkpoint file type (expected .safetensors, .bin, "
                                  ".pt, .pth or a TF .index)")
        sd = hf_to_minigpt(read_tensors(path))
        cfg_path = path.parent / "config.json"
        if not need_config:
            return None, sd
        if n_head is None and cfg_path.is_file():
            cfg = _config_from_json(cfg_path)
        else:
            cfg = _infer_config(sd, n_head, str(path))
        return cfg, sd

    # a directory
    files = _hf_weight_files(path)
    if files:
        sd = {}
        for f in files:
            sd.update(read_tensors(f))
        sd = hf_to_minigpt(sd)
        if not need_config:
            return None, sd
        if (path / "config.json").is_file():
            cfg = _config_from_json(path / "config.json")
            if n_head is not None and n_head != cfg.n_head:
                raise CheckpointError(f"{path}: n_head={n_head} contradicts config.json (n_head={cfg.n_head})")
        else:
            cfg = _infer_config(sd, n_head, str(path))
        return cfg, sd
    if _is_tf_dir(path) or any(path.glob("*.index")):
        return _load_tf(path)
    present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "empty"
    raise CheckpointError(f"{path}: no checkpoint found (expected config.json + model.safetensors / "
                          f"pytorch_model.bin, or hparams.json + model.ckpt.index; found: {present})")


def _load_tf(src: Path) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    prefix = _bundle_prefix(src)
    hp = prefix.parent / "hparams.json"
    tensors = read_tf_bundle(prefix)
    sd = openai_to_minigpt(tensors)
    if hp.is_file():
        cfg = _config_from_hparams(_read_json(hp))
    else:
        cfg = _infer_config(sd, None, str(prefix))
    return cfg, sd


# ================================================================================================
# Building the model strictly from a state dict
# ================================================================================================
def model_from_state_dict(cfg: GPTConfig, sd: dict, *, dtype: Optional[torch.dtype] = None,
                          device=None, origin: str = "checkpoint", consume: bool = False):
    """A GPT with every parameter taken from `sd` (minigpt layout); strict about keys and shapes.

    Floating tensors are cast to `dtype` (default float32), moved to `device` and made contiguous;
    the model is in eval mode. consume=True pops tensors from `sd` as it goes (lower peak memory).
    """
    from .model import GPT

    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and k != "lm_head.weight"]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{origin}: missing tensors {', '.join(missing[:3])}{more} for a "
                              f"{cfg.n_layer}-layer model")
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise CheckpointError(f"{origin}: unexpected tensors {', '.join(unexpected[:3])}{more} "
                              f"(config says n_layer={cfg.n_layer})")
    new_sd = {}
    for k, ref in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"{origin}: tensor {k} has shape {list(t.shape)} but the config "
                                  f"(n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, vocab_size={cfg.vocab_size}, "
                                  f"block_size={cfg.block_size}) needs {list(ref.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{origin}: tensor {k} has non-floating dtype {t.dtype}")
        if consume:
            del sd[k]
        new_sd[k] = t.to(device=device, dtype=dtype).contiguous()
        del t
    new_sd["lm_head.weight"] = new_sd["transformer.wte.weight"]
    model.load_state_dict(new_sd, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight          # keep the tie after assign
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()


def load_model(src, *, dtype: Optional[torch.dtype] = None, device=None, n_head: Optional[int] = None,
               cache_dir: Optional[PathLike] = None, download: bool = True):
    """Load a GPT from a preset, HF dir/file, OpenAI TF checkpoint or save_pretrained dir.

    dtype:     floating dtype of the parameters (default float32).
    device:    where to put them (default cpu).
    n_head:    for a bare weights file without config.json (default n_embd // 64).
    cache_dir: preset cache (default $MINIGPT_HOME or ~/.cache/minigpt).
    download:  allow downloading a missing preset.
    """
    cfg, sd = load_checkpoint(src, n_head=n_head, cache=cache_dir, download=download)
    return model_from_state_dict(cfg, sd, dtype=dtype, device=device, origin=str(src), consume=True)


# ================================================================================================
# Saving
# ================================================================================================
def atomic_write(path: Path, writer) -> None:
    """Write `path` through `writer(tmp_path)` into a temp file of this process's own in the same
    folder, then rename it into place: readers see the old file or the whole new one, never a
    part, and concurrent writers (DDP ranks) never share a temp file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_model(model, out_dir: PathLike) -> None:
    """Write config.json + model.safetensors in the HF Hub layout (Conv1D weights, prefixed keys,
    no lm_head) so that transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads it. Atomic."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    expected = {"lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight",
                "transformer.ln_f.weight", "transformer.ln_f.bias"}
    extra = [k for k in sd if k not in expected and not re.fullmatch(
        r"transformer\.h\.\d+\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)", k)]
    if extra:
        raise CheckpointError(f"model has non-GPT-2 tensors ({', '.join(extra[:3])}); merge LoRA "
                              "weights first (merge_lora) or save the adapter with save_adapter")
    tensors = {k: v.detach().to("cpu") for k, v in minigpt_to_hf(sd).items()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    cfg = model.config.to_hf_dict()
    dt = str(model.dtype).replace("torch.", "")
    cfg.setdefault("dtype", dt)
    cfg.setdefault("torch_dtype", dt)
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    atomic_write(out / "config.json", lambda p: Path(p).write_text(text, encoding="utf-8"))


# ================================================================================================
# Presets: local cache and one-time download
# ================================================================================================
HUB_URL = "https://huggingface.co"
PRESET_FILES = ("config.json", "model.safetensors")


def cache_dir() -> Path:
    """$MINIGPT_HOME, default ~/.cache/minigpt."""
    return Path(os.environ.get("MINIGPT_HOME") or Path.home() / ".cache" / "minigpt").expanduser()


def preset_dir(name: str, cache: Optional[PathLike] = None) -> Path:
    return (Path(cache).expanduser() if cache is not None else cache_dir()) / name


def is_preset_cached(name: str, cache: Optional[PathLike] = None) -> bool:
    d = preset_dir(name, cache)
    return all((d / f).is_file() for f in PRESET_FILES)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("MINIGPT_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_url() -> str:
    return (os.environ.get("MINIGPT_HUB_URL") or os.environ.get("HF_ENDPOINT") or HUB_URL).rstrip("/")


def _urlopen(url: str, timeout: float = 30.0):
    """Module-level so tests can replace it; urllib only."""
    req = urllib.request.Request(url, headers={"User-Agent": "minigpt"})
    return urllib.request.urlopen(req, timeout=timeout)


def _download(url: str, dest: Path, desc: str) -> None:
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: str) -> None:
        with _urlopen(url) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            n = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=os.environ.get("MINIGPT_NO_PROGRESS") == "1") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if total is not None and n != total:
                raise CheckpointError(f"download of {url} stopped after {n} of {total} bytes")
    atomic_write(dest, fetch)


def download_preset(name: str, cache: Optional[PathLike] = None, *, allowed: bool = True) -> Path:
    """Download <hub>/<name>/resolve/main/{config.json,model.safetensors} into the cache once."""
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    d = preset_dir(name, cache)
    if is_preset_cached(name, cache):
        return d
    hint = (f"download it once while online, set MINIGPT_HOME to a directory holding {name}/config.json "
            f"and {name}/model.safetensors, or pass a local checkpoint directory")
    if not allowed or _offline():
        raise CheckpointError(f"preset {name!r} is not cached in {d} and downloads are disabled "
                              f"(offline mode); {hint}")
    base = _hub_url()
    for fname in PRESET_FILES:
        if (d / fname).is_file():
            continue
        url = f"{base}/{name}/resolve/main/{fname}"
        try:
            _download(url, d / fname, f"{name}/{fname}")
        except CheckpointError as e:
            raise CheckpointError(f"preset {name!r}: {e}; {hint}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise CheckpointError(f"preset {name!r} is not cached in {d} and downloading {url} failed "
                                  f"({reason}); {hint}") from e
    return d
