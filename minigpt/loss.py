"""Training losses. `lm_loss` (in model.py) works on logits; the fused head + cross-entropy here
never materialises the (B*T, vocab) logits in fp32, which is most of a small model's step on CPU."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = "cuda" if t.is_cuda else "cpu"
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ w.T, y) over y != ignore_index, computed in row chunks.

    Gradients are formed chunk by chunk during the forward pass (softmax - onehot), so peak
    memory is one chunk of logits instead of all of them: a single (chunk, V) buffer holds the
    logits, then the log-probabilities (in place), then the probabilities (plus an fp32 buffer for
    the softmax when the matmuls run in bf16/fp16). Rows whose target is ignore_index never enter
    the matmuls.
    """

    @staticmethod
    def forward(ctx, h, w, y, ignore_index: int, chunk: int, dtype: torch.dtype, workspace: Optional[dict]):
        # h (N, C), w (V, C), y (N,)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = y != ignore_index
        n_valid = valid.sum().clamp(min=1)
        keep = None
        if not bool(valid.all()):
            # ignored positions (padding, masked prompts) add no loss and no gradient: leave their
            # rows out of the head matmuls altogether
            keep = valid.nonzero().squeeze(1)
            hk, yk = h.index_select(0, keep), y.index_select(0, keep)            # (n_valid, C)
        else:
            hk, yk = h, y
        wc = w.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_hk = torch.empty(hk.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = None                     # fp32 (V, C): the first chunk's product, later ones added
        # one (chunk, V) buffer for all chunks: logits, then log-probs in place, then probs. The
        # softmax is fp32 at least: bf16/fp16 logits are copied into a second, fp32 buffer
        sm_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        rows_max = min(chunk, hk.size(0))
        buf = _scratch(workspace, "logits", rows_max, w.size(0), dtype, h.device)
        buf_sm = buf if sm_dtype == dtype else _scratch(workspace, "softmax", rows_max, w.size(0), sm_dtype, h.device)
        for s in range(0, hk.size(0), chunk):
            hs, ys = hk[s:s + chunk].to(dtype), yk[s:s + chunk]
            n = hs.size(0)
            logits = torch.mm(hs, wc.t(), out=buf[:n])                              # (n, V)
            logp = logits if buf_sm is buf else buf_sm[:n].copy_(logits)
            torch.log_softmax(logp, dim=-1, out=logp)                             # in place
            rows = torch.arange(n, device=h.device)
            total -= logp[rows, ys].sum()
            if need_h or need_w:
                p = logp.exp_()                                                    # softmax (n, V)
                p[rows, ys] -= 1.0                                                 # - onehot
                if p is not logits:
                    p = logits.copy_(p)                                            # matmul dtype
                if need_h:
                    if p.dtype == grad_hk.dtype:
                        torch.mm(p, wc, out=grad_hk[s:s + n])
                    else:
                        grad_hk[s:s + n] = p @ wc
                if need_w:
                    if grad_w is None:
                        grad_w = (p.t() @ hs).float()                                  # no zero fill
                    elif p.dtype == grad_w.dtype:
                        grad_w.addmm_(p.t(), hs)
                    else:
                        grad_w.add_(p.t() @ hs)
        if need_w and grad_w is None:                                      # every target ignored
            grad_w = torch.zeros_like(w, dtype=torch.float32)
        grad_h = grad_hk
        if need_h and keep is not None:
            grad_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device).index_copy_(0, keep, grad_hk)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0), n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = g / n_valid
        gh = (grad_h * scale).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None


def _scratch(workspace: Optional[dict], name: str, rows: int, cols: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A (rows, cols) scratch buffer, kept in `workspace` between calls when one is given: the
    (chunk, vocab) buffers are hundreds of MB, and allocating them afresh every step makes the
    kernel fault their pages in again (~0.1-0.3 s a step on a CPU)."""
    if workspace is None:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    t = workspace.get(name)
    if t is None or t.dtype != dtype or t.device != device or t.size(1) != cols or t.size(0) < rows:
        workspace[name] = t = torch.empty(rows, cols, dtype=dtype, device=device)
    return t[:rows]


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100, chunk: int = 1024,
                  workspace: Optional[dict] = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` without full logits.

    hidden (B, T, C), weight (V, C), targets (B, T) -> scalar. Matmuls run in the autocast dtype
    when autocast is on; the softmax is always fp32. workspace: a dict that keeps the
    (chunk, V) scratch buffers from one call to the next (CausalLMLoss passes its own).
    """
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.reshape(-1),
                                         ignore_index, chunk, dtype, workspace)


class CausalLMLoss(nn.Module):
    """Wraps a GPT so that forward(x, y) -> mean loss; the unit that DDP/compile wrap in training."""

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model, self.fused = model, fused
        self.workspace: dict = {}               # the fused loss's scratch buffers, reused every step

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_lm_loss(self.model.hidden_states(x), self.model.lm_head.weight, y,
                                 workspace=self.workspace)
        from .model import lm_loss
        return lm_loss(self.model(x), y)
