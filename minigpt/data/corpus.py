"""Pretraining data: the embedded corpus, tokenising text once into cached uint16 memmaps
(`train.bin`, `val.bin` + a small JSON manifest), and `TokenDataset` over them. Batches are a pure
function of (seed, step, micro), which is what makes resumed runs repeat an uninterrupted run
exactly. Instruction data lives in minigpt.data.records (reading) and minigpt.data.instruct (batches).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from ..fileio import atomic_write
from .tokenizer import get_tokenizer

EMBEDDED_CORPUS = "shakespeare"
TOKENS_VERSION = "2"     # in the cache key: 2 = the whole text's tokens (1 split blank lines differently)
# Where a non-space character meets a run of ASCII whitespace that holds a blank line. GPT-2's
# pre-tokeniser never joins the two sides of such a point (whitespace only ever leads a pre-token)
# and looks neither behind nor past it, so text cut there tokenises exactly as the whole text.
_PARAGRAPH_START = re.compile(r"(?<=\S)(?=[ \t\r\n]*\n\n)")
PIECE_CHARS = 1 << 20    # characters a piece is tokenised in (memory stays smooth)


def embedded_corpus_text() -> str:
    """The packaged public-domain corpus: Shakespeare's works (about 5 MB)."""
    raw = resources.files("minigpt").joinpath("assets/shakespeare.txt.gz").read_bytes()
    return gzip.decompress(raw).decode("utf-8")


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: folder contains no .txt files")
        return files
    return [path]


def _fingerprint(data: Optional[str]) -> str:
    """Cache key for a data source: its name, sizes and modification times."""
    if data is None:
        h = hashlib.sha1(resources.files("minigpt").joinpath("assets/shakespeare.txt.gz").read_bytes())
        h.update(TOKENS_VERSION.encode())
        return EMBEDDED_CORPUS + "-" + h.hexdigest()[:12]
    p = Path(data)
    h = hashlib.sha1(f"{p.resolve()}:{TOKENS_VERSION}".encode())
    for f in _text_files(p) if p.suffix != ".bin" else [p]:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return p.stem + "-" + h.hexdigest()[:12]


def _write_tokens(path: Path, ids: np.ndarray) -> None:
    atomic_write(path, lambda tmp: ids.astype(np.uint16).tofile(tmp))


def _pieces(text: str):
    """`text` in pieces of PIECE_CHARS characters or more, cut only at _PARAGRAPH_START points."""
    start = 0
    while len(text) - start > PIECE_CHARS and (cut := _PARAGRAPH_START.search(text, start + PIECE_CHARS)):
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _tokenize_texts(texts, desc: str) -> np.ndarray:
    """Tokenise an iterable of (name, text) documents, separated by <|endoftext|>. Each document's
    tokens are those of encoding it whole (large ones in pieces: memory stays smooth)."""
    tok = get_tokenizer()
    chunks = []
    for _name, text in tqdm(texts, desc=desc, unit="file", leave=False):
        pieces = list(_pieces(text))
        for i in range(0, len(pieces), 8):
            for x in tok.encode_ordinary_batch(pieces[i: i + 8], num_threads=2):
                chunks.append(np.asarray(x, dtype=np.uint16))
        chunks.append(np.asarray([tok.eot_token], dtype=np.uint16))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


def check_data_source(data: Optional[str], flag: str = "--data") -> None:
    """Refuse, before any work, a data path that is missing, empty, or neither a regular file
    nor a folder (a device or FIFO such as /dev/zero would be read forever)."""
    if data is None:
        return
    p = Path(data).expanduser()
    if not p.exists():
        raise DataError(f"{flag} {data}: no such file or folder")
    if not (p.is_file() or p.is_dir()):
        raise DataError(f"{flag} {data}: not a regular file or a folder")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{flag} {data}: file is empty")
    if p.is_dir():
        _text_files(p)                                   # a folder must hold .txt files


def prepare_data(data: Optional[str], cache_dir: str | os.PathLike, val_fraction: float = 0.05) -> Path:
    """Tokenise `data` once into `cache_dir/<key>/{train,val}.bin`; returns that folder.

    data: None for the embedded corpus, a .txt file, a folder of .txt files, or a pre-tokenised
    uint16 .bin file (its last `val_fraction` becomes the validation split).
    """
    check_data_source(data)
    if not 0.0 < val_fraction < 0.5:
        raise DataError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    out = Path(cache_dir) / _fingerprint(data)
    if (out / "meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    if data is not None and Path(data).suffix == ".bin":
        if Path(data).stat().st_size % 2:
            raise DataError(f"{data}: not a uint16 token file (odd byte count)")
        ids = np.fromfile(data, dtype=np.uint16)
        if ids.size and int(ids.max()) >= 50257:
            raise DataError(f"{data}: token id {int(ids.max())} is outside GPT-2's vocabulary")
    else:
        if data is None:
            docs = [(EMBEDDED_CORPUS, embedded_corpus_text())]
        else:
            docs = []
            for f in _text_files(Path(data)):
                try:
                    docs.append((str(f), f.read_text(encoding="utf-8")))
                except UnicodeDecodeError as e:
                    raise DataError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        ids = _tokenize_texts(docs, desc="tokenising")
    n_val = max(1, int(len(ids) * val_fraction))
    if len(ids) - n_val < 2 or n_val < 2:
        raise DataError(f"{data}: only {len(ids)} tokens, too few to train on")
    _write_tokens(out / "train.bin", ids[:-n_val])
    _write_tokens(out / "val.bin", ids[-n_val:])
    meta = {"source": data or EMBEDDED_CORPUS, "train_tokens": int(len(ids) - n_val), "val_tokens": int(n_val)}
    atomic_write(out / "meta.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return out


@dataclass
class TokenDataset:
    """Fixed-length windows from a uint16 token file: for training (`batch`) the file's windows in a
    shuffled order, epoch after epoch, and consecutive ones for evaluation (`sequential`).

    Training windows are T + 1 tokens at stride T (neighbours share one token: the last target of
    one is the first input of the next), every epoch its own order and its own offset in [0, T)
    (both seeded by (seed, epoch)), so a run sees each token once per epoch and a run shorter than
    an epoch never repeats one. (Windows at random starts see 1 - exp(-e) of the text in e epochs:
    56% of it in the 0.82 epochs of a 595-step default run, some of it twice, where the shuffled
    epoch sees 82%; two seeds: -0.016 to -0.026 bits/byte on both held-out texts, README "What was
    tried".) `batch` is a pure function of (step, micro), so resume and any number of processes
    see the same data; micro-batch m of grad_accum (the micro-batches of all processes) holds rows
    m * B ... (m + 1) * B - 1 of the step's B * grad_accum, the same rows as one micro-batch of
    B * grad_accum."""

    path: Path
    block_size: int
    batch_size: int = 16
    seed: int = 0
    grad_accum: int = 1

    def __post_init__(self):
        self.tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        T, N = self.block_size, len(self.tokens)
        if N <= T + 1:
            raise DataError(f"{self.path}: {N} tokens, fewer than block_size+1 "
                            f"({T + 1}); lower --block-size")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be positive")
        self.windows = max(1, (N - T) // T)                        # per epoch, whatever its offset
        self.max_offset = min(T - 1, N - 1 - self.windows * T)
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of one epoch; the last two are kept."""
        if epoch not in self._epochs:
            g = np.random.default_rng([self.seed, epoch, 1])
            if len(self._epochs) >= 2:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (int(g.integers(0, self.max_offset + 1)), g.permutation(self.windows))
        return self._epochs[epoch]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Micro-batch `micro` of optimizer step `step`: x, y LongTensors (B, T) and the token count."""
        if not 0 <= micro < self.grad_accum:
            raise ValueError(f"micro-batch {micro} of a dataset made for grad_accum {self.grad_accum}")
        T, B = self.block_size, self.batch_size
        starts = []
        for i in range((step * self.grad_accum + micro) * B, (step * self.grad_accum + micro + 1) * B):
            offset, order = self._epoch(i // self.windows)
            starts.append(offset + int(order[i % self.windows]) * T)
        idx = np.array(starts)[:, None] + np.arange(T + 1)[None, :]
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))   # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:], chunk.size(0) * T

    def sequential(self, batch_size: int, max_batches: Optional[int] = None):
        """Non-overlapping windows in order (for evaluation): yields x, y (B, T)."""
        T = self.block_size
        n = (len(self.tokens) - 1) // T
        if max_batches is not None:
            n = min(n, max_batches * batch_size)
        for b0 in range(0, n, batch_size):
            rows = range(b0, min(n, b0 + batch_size))
            chunk = torch.from_numpy(np.stack([self.tokens[r * T: r * T + T + 1] for r in rows]).astype(np.int64))
            yield chunk[:, :-1], chunk[:, 1:]

