"""Training losses. `lm_loss` (in model.py) works on logits; the fused head + cross-entropy here
never materialises the (B*T, vocab) logits in fp32, which is most of a small model's step on CPU."""
from __future__ import annotations

import torch
import torch.nn as nn


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = "cuda" if t.is_cuda else "cpu"
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ w.T, y) over y != ignore_index, computed in row chunks.

    Gradients are formed chunk by chunk during the forward pass (softmax - onehot), so peak
    memory is one chunk of logits instead of all of them.
    """

    @staticmethod
    def forward(ctx, h, w, y, ignore_index: int, chunk: int, dtype: torch.dtype):
        # h (N, C), w (V, C), y (N,)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        valid = y != ignore_index
        n_valid = valid.sum().clamp(min=1)
        wc = w.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for s in range(0, h.size(0), chunk):
            hs, ys, vs = h[s:s + chunk].to(dtype), y[s:s + chunk], valid[s:s + chunk]
            logp = torch.log_softmax(hs @ wc.t(), dim=-1, dtype=torch.float32)   # (n, V)
            rows = torch.arange(len(ys), device=h.device)
            total -= (logp[rows, ys.clamp(min=0)] * vs).sum()
            if need_grad:
                p = torch.exp(logp, out=torch.empty_like(logp, dtype=dtype))    # softmax (n, V)
                p[rows, ys.clamp(min=0)] -= 1.0                                 # - onehot
                if not bool(vs.all()):
                    p[~vs] = 0
                if grad_h is not None:
                    grad_h[s:s + chunk] = p @ wc
                if grad_w is not None:
                    grad_w.add_(p.t() @ hs)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0), n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = g / n_valid
        gh = (grad_h * scale).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100, chunk: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` without full logits.

    hidden (B, T, C), weight (V, C), targets (B, T) -> scalar. Matmuls run in the autocast dtype
    when autocast is on; the softmax is always fp32.
    """
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.reshape(-1),
                                         ignore_index, chunk, dtype)


class CausalLMLoss(nn.Module):
    """Wraps a GPT so that forward(x, y) -> mean loss; the unit that DDP/compile wrap in training."""

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model, self.fused = model, fused

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_lm_loss(self.model.hidden_states(x), self.model.lm_head.weight, y)
        from .model import lm_loss
        return lm_loss(self.model(x), y)
