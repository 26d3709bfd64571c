"""Sliding-window perplexity and bits per byte of a text: the fixed-length method of the transformers
docs ("Perplexity of fixed-length models"), batched, in fp32.

The text's tokens are cut into windows of `window` tokens that start every `stride` tokens; each
token is scored once, in the first window that reaches it, with up to window - 1 tokens of context:
the window [begin, end) scores tokens max(prev_end, begin + 1) .. end - 1, prev_end being where the
window before it ended (so the text's first token, and with stride == window each window's first
token, have no prediction). The last window ends at the text's end and may be shorter.

    perplexity    = exp(total NLL / tokens scored)
    bits_per_byte = total NLL (nats) / ln 2 / UTF-8 bytes of the text

Faster than the docs' loop on the same numbers: windows of equal length run as one batch, the head
runs only on the scored positions (half of them at stride = window / 2) in row chunks (no
(window, vocab) logits, no log-softmax over unscored rows), and on a CPU the fp32 Linear weights
are oneDNN-prepacked for the call (the same fp32 maths, minigpt.inference.decode_weights).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..model.linear import is_linear

__all__ = ["sliding_windows", "sliding_window_perplexity"]


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """[(begin, end, first)]: window i holds tokens [begin, end) and scores tokens [first, end)."""
    if n_tokens < 2:
        raise ConfigError(f"the text must hold at least 2 tokens to score one, got {n_tokens}")
    if window < 2:
        raise ConfigError(f"the window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"the stride must be between 1 and the window ({window} tokens), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _head(model) -> nn.Module:
    """The output head to score with in fp32: the tied head's weight oneDNN-prepacked on a CPU, the
    model's own head elsewhere (its outputs are cast to fp32)."""
    head = model.lm_head
    if is_linear(head) and head.weight.device.type == "cpu" and head.bias is None:
        from ..inference.decode_weights import DecodeLinear

        return DecodeLinear(head.weight.float(), None, "fp32")
    return head


def _packed_body(model):
    """The model's fp32 CPU Linear layers swapped for prepacked copies while the context is open."""
    from ..inference.decode_weights import PACK_MIN_TOKENS, _packed_linears, _swapped

    if not isinstance(model, nn.Module) or not hasattr(model, "lm_head"):
        return contextlib.nullcontext()
    return _swapped(_packed_linears(model, PACK_MIN_TOKENS, compile=False, skip_head=True))


def _nll_sum(head: nn.Module, h: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """Sum over rows of -log softmax(head(h))[y], in fp32 logits, `chunk` rows at a time. h (N, C), y (N,)."""
    total = 0.0
    for s in range(0, h.size(0), chunk):
        logits = head(h[s:s + chunk]).float()                                   # (n, V)
        rows = torch.arange(logits.size(0), device=logits.device)
        picked = logits[rows, y[s:s + chunk]]                                   # (n,)
        total += float((torch.logsumexp(logits, dim=-1) - picked).double().sum())
    return total


def _score_group(model, head, data: torch.Tensor, group: list, device, chunk: int) -> float:
    """NLL (nats) of the scored tokens of windows that all have the same length, in one forward."""
    length = group[0][1] - group[0][0]
    x = torch.stack([data[b:e] for b, e, _ in group]).to(device)                 # (b, L)
    h = model.hidden_states(x)                                                   # (b, L, C)
    rows, targets = [], []
    for i, (b, e, first) in enumerate(group):
        # the hidden state at window position p predicts the token at p + 1
        rows.append(torch.arange(first - b - 1, e - b - 1) + i * length)
        targets.append(data[first:e])
    rows_t = torch.cat(rows).to(device)
    y = torch.cat(targets).to(device)
    h = h.reshape(-1, h.size(-1)).index_select(0, rows_t).float()                # (n, C)
    return _nll_sum(head, h, y, chunk)


@torch.no_grad()
def sliding_window_perplexity(model, text: Optional[str] = None, *, tokens: Optional[Sequence[int]] = None,
                              window: Optional[int] = None, stride: Optional[int] = None, batch_size: int = 8,
                              device=None, progress: bool = False, chunk: int = 512) -> dict:
    """Perplexity and bits per byte of `text` (or of a token sequence) under `model`.

    window: tokens per window (default: the model's context); stride: tokens between window starts
    (default: half the window). batch_size: windows per forward. progress: a tqdm bar on stderr.
    Returns {"perplexity", "bits_per_byte", "tokens" (scored), "nll" (nats, summed), "bytes",
    "window", "stride", "windows"}. Raises ConfigError for a text under 2 tokens, a window larger
    than the model's context or under 2, a stride outside 1..window.
    """
    from tqdm.auto import tqdm

    from ..data.tokenizer import get_tokenizer

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    tok = get_tokenizer()
    ids = list(tokens) if tokens is not None else tok.encode_ordinary(text)
    nbytes = len(text.encode("utf-8")) if text is not None else len(tok.decode_bytes(ids))
    context = model.context_length
    window = context if window is None else window
    if window > context:
        raise ConfigError(f"the window ({window} tokens) is longer than the model's context ({context})")
    stride = max(1, window // 2) if stride is None else stride
    spans = sliding_windows(len(ids), window, stride)
    device = device or next(model.parameters()).device
    data = torch.tensor(ids, dtype=torch.long)
    was_training = model.training
    model.eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False          # fp32 products on GPUs too (the trainer allows TF32)
    head = _head(model)
    nll, n = 0.0, 0
    bar = tqdm(total=sum(e - f for _, e, f in spans), unit="tok", disable=not progress, desc="perplexity")
    try:
        with _packed_body(model):
            for s in range(0, len(spans), batch_size):
                batch = spans[s:s + batch_size]
                for length in sorted({e - b for b, e, _ in batch}, reverse=True):   # full windows together
                    group = [w for w in batch if w[1] - w[0] == length]
                    nll += _score_group(model, head, data, group, device, chunk)
                    scored = sum(e - f for _, e, f in group)
                    n += scored
                    bar.update(scored)
                    bar.set_postfix(ppl=f"{math.exp(min(nll / n, 700)):.3f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ppl = math.exp(nll / n) if nll / n < 700 else math.inf
    return {"perplexity": ppl, "bits_per_byte": nll / math.log(2) / max(1, nbytes), "tokens": n,
            "nll": nll, "bytes": nbytes, "window": window, "stride": stride, "windows": len(spans)}
