"""Test-only writer of TensorFlow's tensor-bundle checkpoint format (no TensorFlow needed).

Writes <prefix>.index (a LevelDB-format table: prefix-compressed data blocks with restart arrays,
an index block, an empty metaindex block, 5-byte block trailers with masked crc32c, and the 48-byte
footer with the table magic) whose values are BundleEntryProto messages, plus
<prefix>.data-00000-of-00001 with the raw little-endian tensor bytes.

Deliberately independent of minigpt.weights.tfbundle: its own bitwise crc32c, protobuf encoder and
snappy compressor, so the reader is checked against a second implementation.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# ---- crc32c: plain bit-at-a-time definition (slow; fine for small test files) -------------------


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---- protobuf encoding -----------------------------------------------------------------------


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field_varint(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value) if value else b""   # proto3 omits zero defaults


def _field_bytes(num: int, value: bytes) -> bytes:
    return varint((num << 3) | 2) + varint(len(value)) + value


def _field_fixed32(num: int, value: int) -> bytes:
    return varint((num << 3) | 5) + struct.pack("<I", value)


TF_DTYPE = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3,
            np.dtype(np.float16): 19, np.dtype(np.int64): 9}


def bundle_entry(dtype: int, shape, offset: int, size: int, crc: int, shard_id: int = 0) -> bytes:
    shape_msg = b"".join(_field_bytes(2, _field_varint(1, d) if d else b"") for d in shape)
    return (_field_varint(1, dtype) + _field_bytes(2, shape_msg) + _field_varint(3, shard_id)
            + _field_varint(4, offset) + _field_varint(5, size) + _field_fixed32(6, crc))


def bundle_header(num_shards: int = 1) -> bytes:
    version = _field_varint(1, 1)                      # VersionDef.producer = 1
    return _field_varint(1, num_shards) + _field_bytes(3, version)


# ---- snappy (greedy, 4-byte hash matches; only to exercise the reader's decompressor) ----------


def snappy_compress(data: bytes) -> bytes:
    out = bytearray(varint(len(data)))
    lit_start, i, seen = 0, 0, {}

    def literal(a, b):
        while a < b:
            n = min(b - a, 60)
            out.append((n - 1) << 2)
            out.extend(data[a:a + n])
            a += n

    while i + 4 <= len(data):
        key = data[i:i + 4]
        j = seen.get(key)
        seen[key] = i
        if j is not None and 0 < i - j < 65536:
            n = 4
            while i + n < len(data) and data[j + n] == data[i + n] and n < 64:
                n += 1
            literal(lit_start, i)
            out.append(((n - 1) << 2) | 2)             # copy with 2-byte offset
            out.extend(struct.pack("<H", i - j))
            i += n
            lit_start = i
        else:
            i += 1
    literal(lit_start, len(data))
    return bytes(out)


# ---- LevelDB table ------------------------------------------------------------------------------


def _block(entries: list[tuple[bytes, bytes]], restart_interval: int) -> bytes:
    buf, restarts, last = bytearray(), [], b""
    for n, (k, v) in enumerate(entries):
        if n % restart_interval == 0:
            restarts.append(len(buf))
            shared = 0
        else:
            shared = 0
            while shared < min(len(k), len(last)) and k[shared] == last[shared]:
                shared += 1
        buf += varint(shared) + varint(len(k) - shared) + varint(len(v)) + k[shared:] + v
        last = k
    if not restarts:
        restarts = [0]
    for r in restarts:
        buf += struct.pack("<I", r)
    buf += struct.pack("<I", len(restarts))
    return bytes(buf)


def write_table(path: Path, items: list[tuple[bytes, bytes]], *, block_size: int = 4096,
                restart_interval: int = 16, snappy: bool = False) -> None:
    items = sorted(items)
    out = bytearray()

    def emit(contents: bytes) -> bytes:
        kind = 0
        if snappy:
            contents, kind = snappy_compress(contents), 1
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents)
        out.append(kind)
        out.extend(struct.pack("<I", masked_crc32c(contents + bytes([kind]))))
        return handle

    index, pending, size = [], [], 0
    for k, v in items:
        pending.append((k, v))
        size += len(k) + len(v) + 8
        if size >= block_size:
            index.append((pending[-1][0], emit(_block(pending, restart_interval))))
            pending, size = [], 0
    if pending:
        index.append((pending[-1][0], emit(_block(pending, restart_interval))))
    meta_handle = emit(_block([], restart_interval))
    index_handle = emit(_block(index, 1))
    footer = meta_handle + index_handle
    footer += b"\x00" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
    out.extend(footer)
    path.write_bytes(bytes(out))


def write_bundle(prefix, tensors: dict[str, np.ndarray], *, block_size: int = 4096,
                 restart_interval: int = 16, snappy: bool = False) -> dict[str, tuple[int, int]]:
    """Write <prefix>.index + <prefix>.data-00000-of-00001; returns {name: (offset, size)}."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    data = bytearray()
    items = [(b"", bundle_header())]
    spans = {}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        spans[name] = (len(data), len(raw))
        items.append((name.encode(), bundle_entry(TF_DTYPE[arr.dtype], arr.shape, len(data), len(raw),
                                                  masked_crc32c(raw))))
        data += raw
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))
    write_table(Path(f"{prefix}.index"), items, block_size=block_size,
                restart_interval=restart_interval, snappy=snappy)
    return spans


def hf_to_openai(hf_state_dict: dict) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel state dict (Conv1D weights) -> OpenAI TF names and shapes."""
    out = {}
    for k, v in hf_state_dict.items():
        k = k.removeprefix("transformer.")
        if k.endswith(("attn.bias", "attn.masked_bias")) and ".attn.c_" not in k or k.startswith("lm_head"):
            continue
        a = v.detach().cpu().float().numpy()
        if k in ("wte.weight", "wpe.weight"):
            out[f"model/{k.split('.')[0]}"] = a
            continue
        parts = k.split(".")
        if parts[0] == "ln_f":
            out[f"model/ln_f/{'g' if parts[1] == 'weight' else 'b'}"] = a
            continue
        assert parts[0] == "h", k
        i, mod, leaf = parts[1], parts[2:-1], parts[-1]
        if mod[0].startswith("ln_"):
            name = f"model/h{i}/{mod[0]}/{'g' if leaf == 'weight' else 'b'}"
        else:
            name = f"model/h{i}/{'/'.join(mod)}/{'w' if leaf == 'weight' else 'b'}"
            if leaf == "weight":
                a = a[None]                              # Conv1D (in, out) -> [1, in, out]
        out[name] = a
    return out


def write_openai_checkpoint(out_dir, hf_model, *, snappy: bool = False, block_size: int = 4096,
                            restart_interval: int = 16) -> dict[str, tuple[int, int]]:
    """An OpenAI-style GPT-2 dir (hparams.json, checkpoint, model.ckpt.*) from an HF model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = hf_model.config
    (out_dir / "hparams.json").write_text(json.dumps(dict(
        n_vocab=c.vocab_size, n_ctx=c.n_positions, n_embd=c.n_embd, n_head=c.n_head, n_layer=c.n_layer)))
    (out_dir / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n'
                                        'all_model_checkpoint_paths: "model.ckpt"\n')
    return write_bundle(out_dir / "model.ckpt", hf_to_openai(hf_model.state_dict()),
                        block_size=block_size, restart_interval=restart_interval, snappy=snappy)
