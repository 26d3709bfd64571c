"""Evaluation helpers: mean loss over batches and bits per byte on any text."""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.tokenizer import get_tokenizer
from ..errors import ConfigError


@torch.no_grad()
def evaluate_loss(model, batches: Iterable, device=None, autocast=None, loss_fn=None) -> dict:
    """Token-weighted mean next-token loss (nats), accuracy and bits per byte over (x, y) batches.

    Positions where y == -100 are ignored. Returns {"loss", "acc", "bpb", "tokens"}.
    loss_fn: a module over `model` with forward(x, y) -> mean loss (e.g. the Trainer's
    CausalLMLoss: the chunked head, no (B, T, vocab) logits); the loss then comes from it, and
    "acc", which needs the logits, is left out.
    """
    tok = get_tokenizer()
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, correct, n, nbytes = 0.0, 0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        keep = y != -100
        k = int(keep.sum())
        with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
            if loss_fn is not None:
                total += loss_fn(x, y).item() * k
            else:
                logits = model(x)                                      # (B, T, V)
                total += F.cross_entropy(logits.float()[keep], y[keep], reduction="sum").item()
                correct += (logits.argmax(-1)[keep] == y[keep]).sum().item()
        n += k
        nbytes += len(tok.decode_bytes(y[keep].tolist()))
    model.train(was_training)
    out = {"loss": total / n, "acc": correct / n, "bpb": total / math.log(2) / max(1, nbytes), "tokens": n} \
        if n else {"loss": float("nan"), "acc": float("nan"), "bpb": float("nan"), "tokens": 0}
    if loss_fn is not None:
        del out["acc"]
    return out


@torch.no_grad()
def evaluate_bpb(model, text: Optional[str] = None, *, tokens: Optional[Sequence[int]] = None,
                 block_size: Optional[int] = None, batch_size: int = 8, max_tokens: Optional[int] = None,
                 device=None) -> dict:
    """Bits per UTF-8 byte of `text` (or of a token sequence) under `model`.

    The text is cut into non-overlapping windows of `block_size` tokens; every token but the first
    is predicted from the window it falls in. bpb = sum(loss in bits) / bytes of the predicted text,
    so models with different tokenizers can be compared. Returns {"bpb", "loss", "tokens", "bytes"}.
    """
    tok = get_tokenizer()
    ids = list(tokens) if tokens is not None else tok.encode_ordinary(text)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise ConfigError("need at least two tokens to evaluate bits per byte")
    T = block_size or model.config.block_size
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    data = torch.tensor(ids, dtype=torch.long)
    n_full = (len(ids) - 1) // T
    windows = [(i * T, T) for i in range(n_full)]
    if (len(ids) - 1) % T:
        windows.append((n_full * T, (len(ids) - 1) % T))
    nats, nbytes, ntok = 0.0, 0, 0
    for b0 in range(0, len(windows), batch_size):
        group = windows[b0: b0 + batch_size]
        for length in sorted({n for _, n in group}):   # full windows batch together; the tail alone
            rows = [s for s, n in group if n == length]
            x = torch.stack([data[s: s + length] for s in rows])           # (b, t)
            y = torch.stack([data[s + 1: s + length + 1] for s in rows])   # (b, t)
            logits = model(x.to(device))                                   # (b, t, V)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten().to(device),
                                    reduction="sum").item()
            nbytes += len(tok.decode_bytes(y.flatten().tolist()))
            ntok += y.numel()
    model.train(was_training)
    return {"bpb": nats / math.log(2) / nbytes, "loss": nats / ntok, "tokens": ntok, "bytes": nbytes}
