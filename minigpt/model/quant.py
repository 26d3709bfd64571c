"""Quantized base models in pure PyTorch: NF4 (QLoRA) and int8 weights, frozen, on CPU and CUDA.

`quantize_model(model, "nf4" | "int8")` (or `GPT.from_pretrained(src, quantize=...)`) turns every
nn.Linear of the transformer blocks (c_attn, attn.c_proj, c_fc, mlp.c_proj; GPT-Neo: q_proj, k_proj,
v_proj, out_proj, c_fc, c_proj) into a `QuantLinear`;
the embeddings, the tied head, LayerNorms and biases stay in full precision.

* nf4: the 4-bit NormalFloat code of the QLoRA paper (Dettmers et al. 2023): 16 values, quantiles
  of N(0, 1) with an exact zero, scaled by the absmax of each block of 64 weights; two codes per
  byte. Double quantisation: the per-block absmax values are stored as int8 around their mean,
  with one fp32 scale per block of 256 (symmetric linear 8-bit; the paper uses an 8-bit float
  there). Weights whose count is not a multiple of 64 are padded, never refused.
  Bytes per weight: 0.5 + 1/64 + 4/(64*256) ~ 0.516.
* int8: symmetric per-output-channel int8 with an fp32 scale per row (1 byte + 4/in_features).

Training: forward and backward dequantise the weight on the fly, in the compute dtype, and never
keep it (a custom autograd function recomputes it in backward), so the peak holds one layer's
dense weight at a time; the base gets no gradient (LoRA layers on top do). Inference on CPU: int8
decoding steps (at most 16 rows, no autograd) use torch's weight-only int8 kernel (what
prepare_for_decoding's int8 mode uses); minigpt.inference.decode_weights.for_decoding gives NF4
layers dense fp16 copies for fast decoding (the memory of fp16, the numbers of NF4).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = ["NF4_CODE", "QUANT_MODES", "QuantLinear", "quantize_model", "cast_unquantized", "is_quantized",
           "quant_bytes", "nf4_quantize", "nf4_dequantize"]

QUANT_MODES = ("nf4", "int8")
BLOCK, ABSMAX_BLOCK = 64, 256
# The 16 NF4 values as published with QLoRA (bitsandbytes' table), ascending, exact 0 and +-1.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


# --- NF4 ------------------------------------------------------------------------------------------

def nf4_quantize(w: torch.Tensor) -> dict:
    """Any float tensor -> NF4 state: packed codes (uint8, two per byte: even index in the low
    nibble), double-quantised absmax (int8 codes, fp32 scale per 256 blocks, fp32 mean), shape."""
    flat = w.detach().float().reshape(-1)
    n = flat.numel()
    flat = F.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)                          # (blocks, 64)
    absmax = flat.abs().amax(dim=1)                                              # (blocks,)
    normed = flat / absmax.clamp(min=1e-12)[:, None]
    code = NF4_CODE.to(flat.device)
    mid = (code[1:] + code[:-1]) / 2                                             # nearest value
    q = torch.bucketize(normed, mid).to(torch.uint8).view(-1)                    # (blocks * 64,)
    packed = q[0::2] | (q[1::2] << 4)
    mean = absmax.mean()
    c = F.pad(absmax - mean, (0, -absmax.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    scale = c.abs().amax(dim=1).clamp(min=1e-12) / 127.0                         # (blocks / 256,)
    amq = torch.round(c / scale[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:absmax.numel()]
    return {"codes": packed, "absmax_q": amq, "absmax_scale": scale, "absmax_mean": mean.reshape(1),
            "numel": n}


def _pair_table(dtype: torch.dtype, device) -> torch.Tensor:
    """(256, 2): a packed byte -> its two values (low nibble first): one lookup per byte."""
    code = NF4_CODE.to(device, dtype)
    return torch.stack([code.repeat(16), code.repeat_interleave(16)], dim=1)


def nf4_dequantize(state: dict, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight of an NF4 state, in `dtype`."""
    packed = state["codes"]
    pairs = _pair_table(dtype, packed.device).index_select(0, packed.int())     # (blocks * 32, 2)
    amq = state["absmax_q"]
    groups = F.pad(amq.float(), (0, -amq.numel() % ABSMAX_BLOCK)).view(-1, ABSMAX_BLOCK)
    absmax = (groups * state["absmax_scale"][:, None] + state["absmax_mean"]).view(-1)[:amq.numel()]   # (blocks,)
    w = pairs.view(-1, BLOCK).mul_(absmax.to(dtype)[:, None])                    # (blocks, 64)
    return w.view(-1)[:state["numel"]].view(shape)


# --- the layer ------------------------------------------------------------------------------------

class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantised in forward and, for backward, either dequantised again or
    (layer.save_dense, set under gradient checkpointing) kept from the recomputed forward: there
    the checkpoint holds it only from a block's recomputation to the end of its backward."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        kind = x.device.type
        dt = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype   # compute dtype
        w = layer.dense(dt)
        ctx.save_for_backward(w if layer.save_dense else None)
        return F.linear(x.to(dt), w, None if bias is None else bias.to(dt))

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ (w.to(g.dtype) if w is not None else ctx.layer.dense(g.dtype)), None, None


class QuantLinear(nn.Module):
    """A frozen nn.Linear stored as NF4 or int8 (see the module docstring). Same in/out features
    and `bias`; no `weight` Parameter (the codes are buffers)."""

    def __init__(self, linear: nn.Linear, mode: str):
        super().__init__()
        if mode not in QUANT_MODES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
        self.mode, self.in_features, self.out_features = mode, linear.in_features, linear.out_features
        w = linear.weight.detach()
        if mode == "nf4":
            st = nf4_quantize(w)
            self.numel = st.pop("numel")
            for k, v in st.items():
                self.register_buffer(k, v)
        else:
            scale = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0          # (out,)
            self.register_buffer("codes", torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self._dense: Optional[torch.Tensor] = None         # decode_weights.densify()'s cache
        self.save_dense = False                                # set by GPT.gradient_checkpointing

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantised (out, in) weight in `dtype`."""
        if self._dense is not None:
            return self._dense.to(dtype)
        if self.mode == "nf4":
            return nf4_dequantize({"codes": self.codes, "absmax_q": self.absmax_q, "absmax_scale": self.absmax_scale,
                                   "absmax_mean": self.absmax_mean, "numel": self.numel},
                                  (self.out_features, self.in_features), dtype)
        return (self.codes.to(dtype) * self.scale.to(dtype)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (..., in) -> (..., out)
        if self._dense is not None:
            b = None if self.bias is None else self.bias.to(self._dense.dtype)
            return F.linear(x.to(self._dense.dtype), self._dense, b).to(x.dtype)
        if (self.mode == "int8" and x.device.type == "cpu" and not torch.is_grad_enabled()
                and x.numel() <= 16 * self.in_features and hasattr(torch, "_weight_int8pack_mm")):
            # decoding (a few rows, no autograd): torch's weight-only int8 GEMV on bf16 inputs
            if getattr(self, "_scale_bf16", None) is None or self._scale_bf16.device != self.scale.device:
                self._scale_bf16 = self.scale.to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.codes,
                                          self._scale_bf16).view(*x.shape[:-1], -1)
            return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)     # fp32 + bf16 -> fp32
        return _DequantLinear.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


# --- whole models ---------------------------------------------------------------------------------

def _block_linears(model: nn.Module):
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith("transformer.h."):
            yield name, mod


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace every nn.Linear of the transformer blocks with a frozen QuantLinear (in place).
    A fine-tuning method's layers (any module with an `adapter_title`, see minigpt.methods.table)
    must be merged or removed first; the rest of the model is frozen too."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    adapted = next((m for m in model.modules() if hasattr(m, "adapter_title")), None)
    if adapted is not None:
        raise ConfigError(f"quantize the base before adding {adapted.adapter_title} layers (or merge them first)")
    for name, lin in list(_block_linears(model)):
        parent, _, child = name.rpartition(".")
        q = QuantLinear(lin, mode)
        q.save_dense = bool(getattr(model, "gradient_checkpointing", False))
        setattr(model.get_submodule(parent), child, q)
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantized = mode
    return model


def cast_unquantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store the rest of a quantized base (embeddings and the tied head, LayerNorms, biases) in
    `dtype` too, as a bf16 base would hold them (QLoRA with bf16 compute); the codes and their
    scales keep their own types, LoRA factors stay fp32."""
    for mod in model.modules():
        if hasattr(mod, "lora_A"):
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def quant_bytes(model: nn.Module) -> dict:
    """Bytes of the model state: total, and how much of it is quantized weights."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    quant = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                for b in m.buffers(recurse=False))
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return {"total": total, "quantized_weights": quant, "quantized_params": weights,
            "bytes_per_quantized_param": quant / weights if weights else math.nan}
