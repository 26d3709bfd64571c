"""The lean decoding step: one new token per row of a GPT-2 model through its KV caches, with as
little work as possible outside the matrix-vector products.

Decoding a token is bandwidth-bound: every weight is read once, and on a CPU the rest of the
step (LayerNorms, attention over the cache, casts, Python) is overhead. The model's own forward
pays for its generality there: a module call per sublayer, dropout no-ops, the cache's slicing
logic, mask and prefix checks, and in the fp16/bf16 modes a cast to and from the weights' dtype
around every product. `LeanStep` computes the same numbers (its hidden states are bit for bit
the model's) from references taken once per call: per layer the LayerNorm parameters, the four
weight layers (the bare kernel of a DecodeLinear or nn.Linear, else the module's forward) and the
cache buffers. Per token: one embedding sum, then per layer LayerNorm, fused qkv, two in-place
cache writes, one fused attention over the cache (F.scaled_dot_product_attention, a single query
over the written positions), the output projection, LayerNorm, the MLP and the two residual adds;
an fp16/bf16 product's output is not cast back where the next op widens it exactly anyway (the
cache writes, the residual adds) or rounds it to the same value (GELU), four casts a layer fewer.

It applies to plain GPT-2 stacks (minigpt.model.gpt.Block with CausalSelfAttention and MLP, no
adapters, virtual tokens or hooks); any module in a weight slot works (DecodeLinear, LoRA, IA3,
quantized layers). generate/stream use it for unpadded, uncompiled calls; `lean_step` returns
None where it does not apply, and the model's forward is used instead.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.gpt import GPT, MLP, Block, CausalSelfAttention, KVCache
from ..model.linear import is_linear
from .decode_weights import DecodeLinear

__all__ = ["LeanStep", "lean_step"]


def _fast_call(mod: nn.Module, rows: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """The cheapest call of a weight layer with the model's numbers, taking its input in whatever
    dtype it comes: F.linear for a plain nn.Linear (weight and bias bound now); a DecodeLinear's
    bare kernel (row_call: its output stays in the kernel's dtype, widened exactly by the fp32
    residual stream); else the module's forward (no hook machinery: lean_step refuses hooked
    models), which takes and returns the residual stream's `dtype`."""
    if is_linear(mod):
        w, b = mod.weight, mod.bias
        return _cast_in(lambda x: F.linear(x, w, b), w.dtype)
    bare = mod.row_call(rows) if type(mod) is DecodeLinear and dtype == torch.float32 else None
    return _cast_in(*bare) if bare is not None else _cast_in(mod.forward, dtype)


def _cast_in(kernel: Callable[[torch.Tensor], torch.Tensor], dt: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """kernel, its input cast to `dt` where it is not already (a no-op .to is still a dispatch)."""
    return lambda x: kernel(x if x.dtype is dt else x.to(dt))


_attend = F.scaled_dot_product_attention


def _plain_block(block: nn.Module) -> bool:
    return (type(block) is Block and type(block.attn) is CausalSelfAttention and type(block.mlp) is MLP
            and block.attn_adapter is None and block.mlp_adapter is None
            and type(block.ln_1) is nn.LayerNorm and type(block.ln_2) is nn.LayerNorm)


def _hooked(model: nn.Module) -> bool:
    glob = nn.modules.module
    if any(getattr(glob, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules())


def lean_step(model, caches: list[KVCache]) -> Optional["LeanStep"]:
    """A LeanStep over `model` and its `caches` (made by model.new_caches), or None where the model
    is not a plain GPT-2 stack (GPT-Neo, adapters, virtual tokens, hooks, replaced modules).
    Call it while the layers to decode with are in place: it keeps references to them."""
    if type(model) is not GPT or model.config.arch != "gpt2" or model.kv_prefix is not None:
        return None
    tr = model.transformer
    if (type(tr.wte) is not nn.Embedding or type(tr.wpe) is not nn.Embedding
            or type(tr.ln_f) is not nn.LayerNorm or not all(_plain_block(b) for b in tr.h)):
        return None
    if len(caches) != len(tr.h) or any(c.offset for c in caches) or _hooked(model):
        return None
    return LeanStep(model, caches)


class LeanStep:
    """step(tok (B,) ids, start) -> (B, 1, n_embd) final hidden states of the tokens written at
    position `start` of every row (the caches hold positions 0..start-1), the caches updated:
    model.hidden_states(tok[:, None], caches=caches, start=start), computed leanly."""

    def __init__(self, model: GPT, caches: list[KVCache]):
        cfg = model.config
        tr = model.transformer
        self.n_embd, self.n_head, self.head_dim = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.wte, self.wpe = tr.wte.weight, tr.wpe.weight
        self.ln_f = (tr.ln_f.weight, tr.ln_f.bias, tr.ln_f.eps)
        self.max_len = caches[0].k.size(2)
        B, dt = caches[0].k.size(0), tr.wte.weight.dtype
        self.layers = []
        for block, cache in zip(tr.h, caches):
            a, m = block.attn, block.mlp
            self.layers.append((block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, _fast_call(a.c_attn, B, dt),
                                cache.k, cache.v, _fast_call(a.c_proj, B, dt), block.ln_2.weight, block.ln_2.bias,
                                block.ln_2.eps, _fast_call(m.c_fc, B, dt), _fast_call(m.c_proj, B, dt)))

    def __call__(self, tok: torch.Tensor, start: int) -> torch.Tensor:
        if not 0 <= start < self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write position {start}")
        B, C, H, D = tok.size(0), self.n_embd, self.n_head, self.head_dim
        shape, end = (C,), start + 1
        x = self.wte.index_select(0, tok) + self.wpe[start]                          # (B, C)
        # a product's output stays in its kernel's dtype (fp16/bf16 modes) where the next op takes it
        # as it is: the cache writes and the residual adds widen exactly, GELU rounds once either way
        for w1, b1, e1, qkv_proj, k_buf, v_buf, out_proj, w2, b2, e2, fc, proj in self.layers:
            qkv = qkv_proj(torch.layer_norm(x, shape, w1, b1, e1)).view(B, 3, H, 1, D)
            k_buf.narrow(2, start, 1).copy_(qkv[:, 1])                           # (B, H, 1, D) in place
            v_buf.narrow(2, start, 1).copy_(qkv[:, 2])
            q = qkv[:, 0] if qkv.dtype is k_buf.dtype else qkv[:, 0].to(k_buf.dtype)
            y = _attend(q, k_buf.narrow(2, 0, end), v_buf.narrow(2, 0, end))     # (B, H, 1, D)
            x = x + out_proj(y.transpose(1, 2).reshape(B, C))
            h = fc(torch.layer_norm(x, shape, w2, b2, e2))
            x = x + proj(F.gelu(h, approximate="tanh"))
        w, b, eps = self.ln_f
        return torch.layer_norm(x, shape, w, b, eps).view(B, 1, C)
