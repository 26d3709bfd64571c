"""Exact log-probabilities of given token sequences: the prompt scoring behind `/v1/completions`
with `echo` and behind the lm-evaluation-harness model class (minigpt.inference.harness).

    scorer = Scorer(model)                      # before prepare_for_decoding / for_decoding
    [s] = scorer.score([ids], top=1)
    s.logprobs[i]    # log p(ids[i + 1] | ids[:i + 1]), for i in 0 .. len(ids) - 2
    s.top[i]         # [(token id, log p)] of the `top` likeliest tokens after ids[:i + 1]

Scoring always runs the fp32 model, whatever the server decodes with: `Scorer` keeps an fp32
twin of the model made when it is built, a copy of the module tree that shares every tensor
(no second copy of the weights), so swapping decoding weights into the model later (fp16, int8,
... by prepare_for_decoding) leaves the twin's plain fp32 layers in place. Quantized layers
(NF4 / int8 bases, minigpt.model.quant) are scored through their weights dequantized to fp32.
Sequences are batched by length, right-padded (causal attention: padding after a sequence does
not change its positions), and the head runs in row chunks with fp32 log-softmax.
"""
from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.quant import QuantLinear

__all__ = ["Scorer", "Scored", "fp32_twin"]


@dataclass
class Scored:
    """One sequence's scores: logprobs[i] of token i + 1, top[i] the likeliest tokens after token i
    (len(tokens) entries with next_token=True: the last is the distribution after the sequence)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


class _Fp32Dequant(nn.Module):
    """A quantized layer computed as x @ W^T + b with W dequantized to fp32 at every call."""

    def __init__(self, layer: QuantLinear):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.dense(torch.float32)
        b = None if self.layer.bias is None else self.layer.bias.float()
        return F.linear(x.float(), w, b).to(x.dtype)


def fp32_twin(module: nn.Module) -> nn.Module:
    """A copy of `module`'s tree that shares its parameters and buffers: later swaps of submodules
    in `module` (decoding weights) do not reach it. Quantized layers become exact fp32 products of
    their dequantized weights (without any fp16 copy decoding caches)."""
    if isinstance(module, QuantLinear):
        layer = _shallow(module)
        layer._dense = None                                   # densify()'s fp16 copy: not ours
        return _Fp32Dequant(layer)
    twin = _shallow(module)
    twin._modules = {name: None if child is None else fp32_twin(child) for name, child in module._modules.items()}
    return twin


def _shallow(module: nn.Module) -> nn.Module:
    twin = copy.copy(module)
    twin._parameters, twin._buffers = dict(module._parameters), dict(module._buffers)
    return twin


class Scorer:
    """Log-probabilities of token sequences under the fp32 twin of `model` (see the module docstring).
    batch_tokens: padded tokens per forward; chunk: head rows per fp32 log-softmax. Thread-safe
    (one batch at a time)."""

    def __init__(self, model: nn.Module, batch_tokens: int = 8192, chunk: int = 256):
        if batch_tokens < 1 or chunk < 1:
            raise ConfigError(f"batch_tokens and chunk must be >= 1, got {batch_tokens}, {chunk}")
        self.model = fp32_twin(model).eval()
        self.context_length = model.context_length
        self.vocab_size = model.config.vocab_size
        self.batch_tokens, self.chunk = batch_tokens, chunk
        self._lock = threading.Lock()

    @torch.no_grad()
    def score(self, seqs: Sequence[Sequence[int]], top: int = 0, next_token: bool = False,
              batch_size: int = 64) -> list[Scored]:
        """Scored for each sequence (at least one token each). next_token: also the distribution
        after the last token (the forward then runs on the whole sequence, which must fit the
        context; without it the last token is a target only, so context + 1 tokens fit)."""
        fits = self.context_length + (0 if next_token else 1)
        for s in seqs:
            if not 1 <= len(s) <= fits:
                raise ConfigError(f"a sequence of {len(s)} tokens cannot be scored: 1..{fits} tokens fit the "
                                  f"model's context of {self.context_length}")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        out: list = [None] * len(seqs)
        with self._lock:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False         # fp32 products on GPUs too
            try:
                i = 0
                while i < len(order):
                    width = len(seqs[order[i]]) - (0 if next_token else 1)
                    n = max(1, min(batch_size, self.batch_tokens // max(1, width)))
                    group = order[i:i + n]
                    for j, scored in zip(group, self._batch([seqs[j] for j in group], top, next_token)):
                        out[j] = scored
                    i += n
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32
        return out

    def _batch(self, seqs: list, top: int, next_token: bool) -> list[Scored]:
        """One forward over right-padded inputs; the head and log-softmax over the real rows only."""
        inputs = [list(s) if next_token else list(s[:-1]) for s in seqs]
        width = max(len(x) for x in inputs)
        if width == 0:                                         # single tokens without next_token: nothing to score
            return [Scored([], []) for _ in seqs]
        device = next(self.model.parameters()).device
        x = torch.tensor([a + [0] * (width - len(a)) for a in inputs], dtype=torch.long, device=device)
        h = self.model.hidden_states(x)                                          # (B, T, C)
        rows = torch.cat([torch.arange(len(a)) + b * width for b, a in enumerate(inputs)]).to(device)
        h = h.reshape(-1, h.size(-1)).index_select(0, rows)                       # (N, C) real positions
        targets = torch.tensor([t for s, a in zip(seqs, inputs) for t in (list(s[1:len(a) + 1]) + [0])[:len(a)]],
                               dtype=torch.long, device=device)                  # (N,) the next token (0 past the end)
        picked, top_v, top_i = [], [], []
        for s in range(0, h.size(0), self.chunk):
            logp = self.model.lm_head(h[s:s + self.chunk]).float().log_softmax(-1)   # (n, V)
            picked.append(logp.gather(1, targets[s:s + self.chunk, None])[:, 0])
            if top:
                v, ix = logp.topk(min(top, logp.size(-1)), dim=-1)
                top_v.append(v)
                top_i.append(ix)
        lp = torch.cat(picked).tolist()
        tv = torch.cat(top_v).tolist() if top else None
        ti = torch.cat(top_i).tolist() if top else None
        out, at = [], 0
        for s, a in zip(seqs, inputs):
            n = len(a)
            tops = [list(zip(ti[k], tv[k])) for k in range(at, at + n)] if top else [[] for _ in range(n)]
            out.append(Scored(lp[at:at + len(s) - 1], tops))
            at += n
        return out
