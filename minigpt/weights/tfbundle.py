"""Reader of TensorFlow tensor bundles (OpenAI's GPT-2 checkpoints), without TensorFlow.

A bundle is <prefix>.index, a LevelDB-format table (crc-checked blocks, optionally snappy
compressed) of BundleEntryProto messages, plus <prefix>.data-NNNNN-of-NNNNN shards of raw tensor
bytes, each tensor checked against its masked CRC-32C. `read_tf_bundle(src)` takes a checkpoint
directory, a `.index` file or a prefix and returns {TF name: tensor}; openai_to_minigpt
(minigpt.weights.keymap) maps the names. CRC-32C is vectorised with numpy, or taken from the optional
google_crc32c / crc32c packages when installed.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

PathLike = str | os.PathLike

__all__ = [
    "bundle_prefix",
    "crc32c",
    "mask_crc",
    "read_sstable",
    "read_tf_bundle",
    "read_tf_index",
    "unmask_crc",
]


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
    # optional speed-ups, used only when installed; a missing or broken package falls back to numpy
    with contextlib.suppress(Exception):
        import google_crc32c  # type: ignore

        if getattr(google_crc32c, "implementation", "c") == "c":
            return lambda data, value=0: google_crc32c.extend(value, bytes(memoryview(data)))
    with contextlib.suppress(Exception):
        import crc32c as _c  # type: ignore

        return lambda data, value=0: _c.crc32c(memoryview(data), value)
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


def bundle_prefix(src: PathLike) -> Path:
    """The checkpoint prefix (path without .index) for a directory, .index file or prefix."""
    src = Path(src)
    if src.is_dir():
        ckpt = src / "checkpoint"
        if ckpt.is_file():
            m = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', ckpt.read_text(errors="replace"), re.MULTILINE)
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


def read_tf_bundle(src: PathLike, *, names: Iterable[str] | None = None,
                   verify: bool = True) -> dict[str, torch.Tensor]:
    """Read tensors (all, or `names`) from a TF checkpoint dir/prefix/.index, verifying crc32c."""
    prefix = bundle_prefix(src)
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
    with contextlib.ExitStack() as stack:                   # closes every opened shard
        for name in wanted:
            if name not in entries:
                raise CheckpointError(f"{index_path}: tensor {name!r} not in checkpoint")
            e = entries[name]
            if e["shard_id"] not in files:
                dpath = Path(f"{prefix}.data-{e['shard_id']:05d}-of-{num_shards:05d}")
                if not dpath.is_file():
                    raise CheckpointError(f"{dpath}: TF checkpoint data file not found")
                files[e["shard_id"]] = (dpath, stack.enter_context(open(dpath, "rb")), dpath.stat().st_size)
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
    return out
