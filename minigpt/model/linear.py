"""fp32 matrix products on the CPU through oneDNN where it beats torch's default BLAS.

torch runs an fp32 `F.linear` / `torch.mm` on the CPU with MKL. On AMD CPUs MKL takes its AVX2
kernels even where the CPU has AVX-512, while oneDNN (also in every torch CPU build) uses the
AVX-512 ones: measured on a 2-core AMD EPYC with AVX-512, 2 threads, 1024 rows (GFLOP/s, MKL ->
oneDNN): GPT-2's c_attn 180 -> 216, c_fc 173 -> 211, the 50,257-wide head 122 -> 179; the
backward's input gradient (dY @ W) 181-201 -> 205-222; the weight gradient (dY^T @ X) no faster
(left to MKL). With oneDNN capped at AVX2 its input-gradient products were slower than MKL's, so
the choice is per CPU (`onednn_linear_wins`), deterministic (the same kernels every run, so a
resumed run computes what an uninterrupted one does), and `MINIGPT_GEMM=mkl|onednn|auto` overrides it.

`linear(x, w, b)` is F.linear with that choice; `Linear` is an nn.Linear that calls it (same
parameters, same state-dict keys). Products too small for oneDNN's fixed ~15 us a call, autocast
(bf16 products already go to oneDNN) and torch.compile (which picks its own kernels) keep F.linear.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["onednn_linear_wins", "uses_onednn", "linear", "mm_nt", "Linear", "is_linear"]

MIN_MACS = 1 << 22        # below this many multiply-adds (rows counted as >= 16), F.linear is faster


@functools.lru_cache(maxsize=None)
def onednn_linear_wins() -> bool:
    """Whether fp32 products go to oneDNN: MINIGPT_GEMM=onednn|mkl forces it; auto (the default)
    picks oneDNN on AMD CPUs whose torch kernels run AVX-512 (MKL gives them its AVX2 kernels)."""
    choice = os.environ.get("MINIGPT_GEMM", "auto").strip().lower()
    if not torch.backends.mkldnn.is_available() or choice == "mkl":
        return False
    if choice == "onednn":
        return True
    return _cpu_vendor() == "AuthenticAMD" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def uses_onednn(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `linear(x, w)` / `mm_nt(x, w)` run on oneDNN."""
    if x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or not onednn_linear_wins():
        return False
    rows = x.numel() // max(x.size(-1), 1)
    return max(rows, 16) * w.size(0) * w.size(1) >= MIN_MACS


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T + b on oneDNN (w may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class _Linear(torch.autograd.Function):
    """F.linear with the forward and the input gradient on oneDNN, the weight gradient on MKL."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
        return _onednn(x, w, b)                                          # (rows, out)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(gy, w.t())                                      # (rows, in) = gy @ w
        if ctx.needs_input_grad[1]:
            gw = gy.t() @ x                                              # (out, in)
        if ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        return gx, gw, gb


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b), on oneDNN where it is the faster fp32 kernel on this CPU."""
    if not uses_onednn(x, w):
        return F.linear(x, w, b)
    # 2-D inside the Function: its output is then no view, so callers may update it in place
    y = _Linear.apply(x.reshape(-1, x.size(-1)), w, b)                   # (rows, out)
    return y.view(*x.shape[:-1], w.size(0))


def mm_nt(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (n, k) @ w (m, k)^T without autograd (w may be a transposed view), into `out` when given
    (oneDNN's result is copied there: pass no `out` to keep oneDNN's own tensor)."""
    if not uses_onednn(a, w):
        return torch.mm(a, w.t(), out=out)
    y = _onednn(a, w)
    return y if out is None else out.copy_(y)


class Linear(nn.Linear):
    """nn.Linear whose product goes through `linear` (same parameters and state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_linear(m: nn.Module) -> bool:
    """A plain linear layer: nn.Linear or Linear, not a subclass that adds anything."""
    return type(m) in (nn.Linear, Linear)
