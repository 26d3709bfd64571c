"""Spelling-shared embedding updates: a token the corpus has a few times learns from the tokens
that share its letters.

A GPT-2 trained from scratch on a small corpus sees most of its tokens rarely: on the embedded
Shakespeare, the held-out verse spends ~40% of its bits on tokens the corpus has fewer than 100
times (9-13 nats each), and their (tied) embedding rows get few updates. `Spelling` trains the
embedding W (V, C) as if it were E + F P: F (V, buckets) holds each token's character 1-3 grams
(hashed into `buckets`; a row has norm 1) and P (buckets, C) is learnt, so an update for one token
moves every token that shares its n-grams. It does so without changing the model: P is a zero
parameter of its own AdamW group (no weight decay); before each optimizer step its gradient is
F^T dL/dW (the reparametrised gradient), after the step its update is folded into W (W += F P,
P = 0). Between steps the model is an ordinary GPT-2 whose embedding is E + F P; checkpoints hold W
and, in the optimizer's state, P's moments, and `total` (the sum of every folded P), so resume is
exact. Rows outside `rows` (e.g. the tied unseen tokens of SeenVocab) are left alone in training.

The tokens the corpus never has share one tied row u (SeenVocab) and so one, uniform, share of the
probability. `filled` gives each of them a row from its spelling instead: u + UNSEEN_SCALE * F_j
total, the spelling part a seen token with the same n-grams would have, shrunk by half (at full
scale the filled rows take too much of the probability mass). The head never reads those rows
in training (it reads u), so filling them changes nothing there; the saved model has them, and so do
held-out evaluations: on the 750-step default, -0.02 bits/byte on both held-out texts and -0.008 on
the validation split.

Measured on the 5-minute default (README, "Quickstart"): -0.04 to -0.05 bits/byte on both held-out
texts at equal steps, for ~15 ms of a ~270 ms step (two sparse products over the seen rows).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from typing import Iterator, Optional

import torch

__all__ = ["Spelling", "spelling_features", "SPELLING_BUCKETS"]

SPELLING_BUCKETS = 8192
SPELLING_LR_SCALE = 4.0   # P's learning rate / the schedule's (800-step default runs: 1x -0.04, 4x -0.047 bits/byte)
UNSEEN_SCALE = 0.5        # unseen rows: u + this * F_j total (750 steps, 1645 / Paradise Regained bits/byte:
#                           0 2.586 / 2.301, 0.25 2.568 / 2.286, 0.5 2.561 / 2.280, 0.75 2.565 / 2.283)
NGRAMS = (1, 2, 3)


def spelling_features(token_bytes: list[bytes], buckets: int = SPELLING_BUCKETS) -> torch.Tensor:
    """(len(token_bytes), buckets) sparse CSR float32: row i spreads 1/sqrt(n) over the buckets of the
    n distinct character 1-3 grams of token i, with its start and end marked (b"\\x02" ... b"\\x03")."""
    crow, col, val = [0], [], []
    for b in token_bytes:
        marked = b"\x02" + b + b"\x03"
        grams = {marked[i:i + n] for n in NGRAMS for i in range(len(marked) - n + 1)} - {b"\x02", b"\x03"}
        hashed = sorted({zlib.crc32(g) % buckets for g in grams})
        col += hashed
        val += [1.0 / math.sqrt(len(hashed))] * len(hashed)
        crow.append(len(col))
    with warnings.catch_warnings():                  # torch calls its sparse CSR tensors beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(torch.tensor(crow), torch.tensor(col, dtype=torch.long),
                                       torch.tensor(val), (len(token_bytes), buckets))


def _token_features(ids: list[int], buckets: int) -> torch.Tensor:
    """spelling_features of GPT-2 token ids (an id past the tokenizer's vocabulary: no bytes)."""
    from ..data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    return spelling_features([tok.decode_single_token_bytes(i) if i < tok.n_vocab else b"" for i in ids], buckets)


class Spelling:
    """The spelling-shared updates of `weight` (V, C), the model's (tied) embedding Parameter, on
    the token ids `rows` (default: every token the tokenizer has). Give param_groups() to the
    optimizer; call gradient() after backward (and clipping) and before the optimizer step, fold()
    after it (the Trainer does, with `spelling=`)."""

    def __init__(self, weight: torch.Tensor, rows: Optional[torch.Tensor] = None, buckets: int = SPELLING_BUCKETS):
        from ..data.tokenizer import get_tokenizer

        n = min(weight.size(0), get_tokenizer().n_vocab)
        rows = torch.arange(n) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        rows = rows[rows < n]
        self.weight, self.buckets = weight, buckets
        self.rows = rows
        self.F = _token_features(rows.tolist(), buckets)                          # (R, buckets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.Ft = self.F.to_sparse_coo().t().coalesce().to_sparse_csr()       # (buckets, R)
        self.P = torch.nn.Parameter(torch.zeros(buckets, weight.size(1), dtype=weight.dtype))
        self.total = torch.zeros(buckets, weight.size(1))          # every folded P, summed (fp32)
        self._unseen_F: Optional[torch.Tensor] = None               # features of the filled rows, once
        self.to(weight.device)

    def to(self, device) -> "Spelling":
        """Features, P and total on `device` (before the optimizer is built; returns self)."""
        self.rows, self.F, self.Ft = self.rows.to(device), self.F.to(device), self.Ft.to(device)
        self.P = torch.nn.Parameter(self.P.detach().to(device))
        self.total = self.total.to(device)
        return self

    def param_groups(self) -> list[dict]:
        return [{"params": [self.P], "weight_decay": 0.0, "lr_scale": SPELLING_LR_SCALE}]

    @torch.no_grad()
    def gradient(self) -> None:
        """P.grad = F^T dL/dW over the rows (from W's gradient as it is now: summed, clipped)."""
        g = self.weight.grad
        self.P.grad = None if g is None else torch.sparse.mm(self.Ft, g.index_select(0, self.rows).float()).to(g.dtype)

    @torch.no_grad()
    def fold(self) -> None:
        """W += F P on the rows, P = 0: the step's update of P, now part of the embedding."""
        self.weight.index_add_(0, self.rows, torch.sparse.mm(self.F, self.P.float()).to(self.weight.dtype))
        self.total += self.P.float()
        self.P.zero_()

    @torch.no_grad()
    def fill(self, vocab) -> tuple[torch.Tensor, torch.Tensor]:
        """Give the unseen tokens of `vocab` (a SeenVocab whose rows are tied) rows from their
        spelling: u + UNSEEN_SCALE * F_j total, u the shared row (its representative keeps it).
        Returns (the filled row ids, u)."""
        rows = vocab.unseen[1:].to(self.weight.device)                      # all but the representative
        if self._unseen_F is None:
            self._unseen_F = _token_features(rows.tolist(), self.buckets).to(self.weight.device)
        u = self.weight[vocab.rep].clone()
        self.weight[rows] = u + (UNSEEN_SCALE * torch.sparse.mm(self._unseen_F, self.total)).to(u.dtype)
        return rows, u

    @contextlib.contextmanager
    def filled(self, vocab) -> Iterator[None]:
        """The rows of `fill` while the block runs (an evaluation, a save), tied again afterwards,
        bit for bit as before."""
        rows, u = self.fill(vocab)
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight[rows] = u
