"""Decode-time weights: the forms of a Linear weight that decoding reads fastest.

    prepare_for_decoding(model, "int8")     # every nn.Linear -> DecodeLinear, in place, for good
    for_decoding(quantized_model)           # the same speed for a quantize_model base (CPU)

`DecodeLinear` holds one weight as fp32 (oneDNN-prepacked), fp16, bf16, int8, w8a8 or int4
(`quantize_int4` / `dequantize_int4`); `CertifiedArgmax` picks greedy tokens of an fp32 head from an
fp16 copy with the fp32 result. generate/stream (minigpt.inference.generate) use both for the
length of one call on a plain fp32 CPU model (`_packed_linears`, `_swapped`, `_greedy_head`).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.linear import is_linear
from ..model.quant import QuantLinear
from .sampling import SamplingConfig

__all__ = ["DECODE_MODES", "DecodeLinear", "CertifiedArgmax", "prepare_for_decoding", "quantize_int4",
           "dequantize_int4", "for_decoding", "densify", "fp16_kernel"]


# --- the weights -------------------------------------------------------------------------------
#
# Decoding one token reads every weight once, so on a CPU the time per token is the weights' bytes
# divided by the memory bandwidth that the matmul kernel achieves for a (1, in) x (in, out) product.
# Measured on 2 AVX-512 cores, idle (GPT-2 124M, all Linear layers + tied head, one token;
# streaming memory itself runs at ~45 GB/s):
#   fp32 F.linear 28 ms | fp32 (in, out) addmm 22 ms | fp32 oneDNN-prepacked 14 ms
#   bf16 F.linear 9.3 ms | bf16 oneDNN-prepacked 5.9 ms | fp16 F.linear 5.6 ms (44 GB/s)
#   int8 _weight_int8pack_mm 4.1 ms (compute-bound) | int4 _weight_int4pack_mm_for_cpu 2.25 ms
# The rest of a decode step (LayerNorms, attention over the cache, casts, Python) adds ~1.3-1.9 ms.
# torch.compile of the step (generate(compile=True)) saves only ~4% on CPU after 5-20 s of
# compiling, so it is opt-in (it is what gives CUDA graphs on a GPU).
# Bytes read per token for GPT-2 124M: 123.5M Linear + head weights (the head is 38.6M of them):
#   fp32 494 MB, fp16/bf16 247 MB, int8 124 MB, int4 62 MB + 15 MB of scales and zeros
#   (+ the KV cache: 74 KB per cached position in fp32).

DECODE_MODES = ("fp32", "fp16", "bf16", "int8", "w8a8", "int4")
_COMPUTE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                  "int8": torch.bfloat16, "w8a8": torch.float32, "int4": torch.bfloat16}
INT4_GROUP = 32                                                       # weights per int4 scale/zero


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation of `weight` (N, K) in groups of `group_size` along K.

    Returns (q, scales_and_zeros): q (N, K) int32 in [0, 15] and (K / group_size, N, 2) float32
    holding each group's scale and zero, such that w ~= (q - 8) * scale + zero (the layout of
    torch's int4 matmul kernels). Round to nearest: |w - dequant| <= scale / 2.
    """
    N, K = weight.shape
    if K % group_size:
        raise ConfigError(f"int4 needs in_features divisible by {group_size}, got {K}")
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)                              # (N, K/g, 1)
    q = torch.round((w - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale                                                 # value of q = 8
    sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()        # (K/g, N, 2)
    return q, sz


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int = INT4_GROUP) -> torch.Tensor:
    """Inverse of quantize_int4: (N, K) float32 weights (bf16-rounded scales and zeros as stored)."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)                          # (N, K/g, 2)
    w = (q.reshape(N, K // group_size, group_size).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(N, K)


def _int8_scale(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 scale of a (out, in) weight: max |w| of the row / 127."""
    return weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0


@functools.lru_cache(maxsize=None)
def _has_vnni() -> bool:
    """Whether the CPU has 8-bit dot-product instructions (AVX512-VNNI or AVX-VNNI). Without them the
    integer kernels multiply u8 x s8 pairs into saturating 16-bit sums, so w8a8's activations use 7
    bits (reduce_range); with them the full 8 bits (half the rounding error, same speed)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(caps.get("avx512_vnni") or caps.get("avx_vnni"))


def fp16_kernel() -> str:
    """The one-row fp16 kernel of this CPU: "torch" (F.linear on fp16 inputs: torch's fp16 GEMV, which
    widens both the weight and the input for every dot product) or "fbgemm" (fbgemm's fp16 GEMM,
    `quantized::linear_dynamic_fp16`: fp16 weights packed once, fp32 inputs and outputs).
    MINIGPT_FP16_GEMV=torch|fbgemm forces it; auto (the default) takes fbgemm where torch's kernels
    are AVX2 ones: on a 2-core AVX2 EPYC (Zen 3) it reads GPT-2's body at 18.7 GB/s against 15.8 and
    its head at 24.7 against 17.4, where on the AVX-512 EPYC torch's kernel was the faster."""
    choice = os.environ.get("MINIGPT_FP16_GEMV", "auto").strip().lower()
    if choice not in ("auto", "torch", "fbgemm"):
        raise ConfigError(f"MINIGPT_FP16_GEMV must be auto, torch or fbgemm, got {choice!r}")
    has = "fbgemm" in torch.backends.quantized.supported_engines
    if choice == "fbgemm" and not has:
        raise ConfigError("MINIGPT_FP16_GEMV=fbgemm: this torch build has no fbgemm")
    return "fbgemm" if has and (choice == "fbgemm" or (choice == "auto" and _avx2_kernels())) else "torch"


def _avx2_kernels() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX2"


def _fp16_gemv(weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """y = x @ fp16(weight).T + bias with this CPU's fp16 kernel, for 2-D fp32 x -> fp32 y (fp32
    accumulation; torch's kernel also rounds x and y to fp16)."""
    if weight.device.type == "cpu" and fp16_kernel() == "fbgemm":
        packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float(), bias)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    w16 = weight.detach().half()
    b16 = None if bias is None else bias.half()
    return lambda x: F.linear(x.half(), w16, b16).float()


GREEDY_HEAD_MIN_TOKENS = 32   # greedy calls this long pick tokens through CertifiedArgmax (fp32 heads, CPU)


class CertifiedArgmax:
    """Greedy picks of an fp32 head that read half its bytes and return the fp32 head's pick.

    The head is the largest single read of a decoding step (GPT-2 124M: 154 MB of its 494 MB in
    fp32). Greedy decoding needs only the argmax, and a row can be ruled out without its exact
    logit. With w~ = fp16(w), h~ = fp16(h) and a_i the fp16 GEMV's output (fp32 accumulation over C
    terms, then rounded to fp16; fbgemm's kernel takes h itself and skips the rounding, within the
    same bound), Cauchy-Schwarz gives |h.w_i - a_i| <= |h| |w_i - w~_i| +
    (|h - h~| + (g + 2^-10) |h|) |w~_i| + 2^-24 <= s, with s taken at the largest |w_i - w~_i| and
    |w~_i| of the head (g bounds the fp32 accumulation, 2^-10 |h| |w~_i| the rounding to fp16, 2^-24
    its subnormals). The row with the largest a_i has an exact logit >= max a - s, so no row with
    a_i < max a - 2 s is the argmax; the rest (a handful) get their fp32 logits and the first
    maximum among them is the pick, as argmax over the full fp32 logits. Per token that is the
    fp16 GEMV plus four passes over the V logits (cast, max, compare, nonzero).
    """

    def __init__(self, weight: torch.Tensor):                       # (V, C) fp32 head
        with torch.no_grad():
            self.weight = weight.detach()
            self.approx = _fp16_gemv(self.weight)                  # (B, C) fp32 -> (B, V) fp32
            widened = self.weight.half().float()
            self.max_err = float((self.weight - widened).norm(dim=1).max())     # max |w_i - w~_i|
            self.max_norm = float(widened.norm(dim=1).max()) * (1 + 1e-3)       # max |w~_i|, rounded up
        self.gamma = 4 * self.weight.size(1) * 2.0 ** -24

    def __call__(self, h: torch.Tensor) -> torch.Tensor:             # (B, C) fp32 -> (B,) ids
        approx = self.approx(h)                                      # (B, V)
        norm = h.norm(dim=1, keepdim=True)                           # (B, 1)
        off = (h - h.half().float()).norm(dim=1, keepdim=True)
        slack = (norm * (1 + 1e-3)) * self.max_err + (off + (self.gamma + 2.0 ** -10) * norm) * self.max_norm
        floor = approx.amax(dim=1, keepdim=True) - 2 * (slack + 2.0 ** -24)
        if not bool(torch.isfinite(floor).all()):                   # fp16 overflow, or NaN states
            return F.linear(h, self.weight).argmax(dim=1)
        picks = []
        for b, alive in enumerate(approx >= floor):                 # rows that may be the argmax
            ids = alive.nonzero().squeeze(1)                        # ascending: ties go to the first
            picks.append(ids[(self.weight[ids] @ h[b]).argmax()])
        return torch.stack(picks)


def _greedy_head(model, sampling: SamplingConfig, max_new_tokens: int, compile: bool,
                 pack: bool) -> Optional[CertifiedArgmax]:
    """The certified greedy head for a plain greedy call on a CPU model whose head is fp32 (an
    nn.Linear, or prepare_for_decoding's "fp32" head, which keeps its rows); None otherwise."""
    if (not pack or compile or max_new_tokens < GREEDY_HEAD_MIN_TOKENS or sampling.temperature > 0
            or sampling.repetition_penalty != 1.0):
        return None
    head = getattr(model, "lm_head", None)
    if isinstance(head, DecodeLinear):
        rows = getattr(head, "rows", None)
        if rows is None:
            return None
        if getattr(head, "greedy", None) is None:                  # prepared models keep theirs
            head.greedy = CertifiedArgmax(rows)
        return head.greedy
    if is_linear(head) and head.bias is None and head.weight.dtype == torch.float32 \
            and head.weight.device.type == "cpu":
        return CertifiedArgmax(head.weight)
    return None


class DecodeLinear(nn.Module):
    """Inference-only stand-in for nn.Linear that stores its weight in the form decoding reads
    fastest. Activations stay fp32 (the residual stream, LayerNorms, attention and KV cache are
    untouched); only the weights change, and each product is cast back to the input's dtype.

    fp32: oneDNN-prepacked weight (exact fp32 maths, ~1.8x the bandwidth of F.linear);
          falls back to an (in, out) copy and addmm where oneDNN packing is unavailable.
    bf16: oneDNN-prepacked bf16 weight (plain (out, in) F.linear as the fallback), bf16 inputs.
    fp16: weight in fp16 (out, in), F.linear on fp16 inputs (torch's fp16 GEMV, fp32 accumulation);
          where fp16_kernel() says fbgemm, the fp16 weight packed for fbgemm's fp16 GEMM on fp32
          inputs (kind "fbgemm_fp16": the same weights, fp32 activations and outputs).
    int8: symmetric per-output-channel int8 weight with bf16 scales (round to nearest),
          torch._weight_int8pack_mm on bf16 inputs.
    w8a8: the same int8 weights, and the activations quantised to 8 bits at every call (per
          tensor, dynamic; 7 bits on CPUs without VNNI, see _has_vnni): torch's dynamic quantized
          linear (fbgemm/oneDNN integer dot products), the like-for-like kernel of llama.cpp's
          q8_0. CPU only.
    int4: asymmetric 4-bit weight in groups of 32 input features, bf16 scale and zero per group
          (see quantize_int4), packed for torch._weight_int4pack_mm_for_cpu, bf16 inputs; rows
          are padded to a multiple of 16 as the kernel needs (the padding is sliced off).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str):
        super().__init__()
        if mode not in DECODE_MODES:
            raise ConfigError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        self.mode, self.out_features, self.in_features = mode, weight.size(0), weight.size(1)
        weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float().clone()
        self.kind = mode
        if mode in ("fp32", "bf16"):
            dt = torch.float32 if mode == "fp32" else torch.bfloat16
            self.bias = None if bias is None else self.bias.to(dt)
            try:                                                           # oneDNN's blocked layout
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dt).contiguous(), 1)
                self.kind = "mkldnn"
            except (RuntimeError, AttributeError):
                if mode == "fp32":
                    self.weight, self.kind = weight.t().contiguous(), "addmm"      # (in, out)
                else:
                    self.weight = weight.to(dt).contiguous()                        # (out, in)
        elif mode == "fp16" and weight.device.type == "cpu" and fp16_kernel() == "fbgemm":
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, self.bias)    # fp16 inside
            self.weight, self.kind = None, "fbgemm_fp16"
        elif mode == "fp16":
            self.weight = weight.half().contiguous()                       # (out, in)
            self.bias = None if bias is None else self.bias.half()
        elif mode == "int8":
            scale = _int8_scale(weight)                                    # (out,)
            self.weight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scale = scale.to(torch.bfloat16)
        elif mode == "w8a8":
            if weight.device.type != "cpu" or not torch.backends.quantized.supported_engines:
                raise ConfigError("w8a8 decoding weights need a CPU model and a torch quantized engine")
            scale = _int8_scale(weight).double()                           # (out,), as int8's
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():          # torch marks its quantized tensors deprecated
                warnings.simplefilter("ignore", UserWarning)
                q = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, self.bias)     # engine-packed int8
            self.weight, self.reduce_range = None, not _has_vnni()
        else:
            if weight.device.type != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
                raise ConfigError("int4 decoding weights need a CPU model and torch >= 2.6")
            pad = -self.out_features % 16                                   # kernel: rows % 16 == 0
            q, sz = quantize_int4(F.pad(weight, (0, 0, 0, pad)))
            self.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)   # packed (out+pad, in/2)
            self.scale = sz.to(torch.bfloat16)                              # (in/32, out+pad, 2)
        self.dtype = torch.float32 if self.kind == "fbgemm_fp16" else _COMPUTE_DTYPE[mode]   # inputs' dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (..., in) -> (..., out)
        kind = self.kind
        if kind == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")
            return y.to(x.dtype)
        if kind == "addmm":
            y = x.reshape(-1, self.in_features) @ self.weight
            return (y if self.bias is None else y.add_(self.bias)).view(*x.shape[:-1], -1)
        if kind == "int8":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                          self.weight, self.scale).view(*x.shape[:-1], -1)
            return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)  # fp32 + bf16
        if kind == "w8a8":
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed,
                                                   self.reduce_range)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        if kind == "fbgemm_fp16":                                      # any number of rows
            y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features).float(), self.packed)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        if kind == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                  self.weight, INT4_GROUP, self.scale)
            y = y[:, :self.out_features].view(*x.shape[:-1], -1)
            return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)
        if kind == "fp16" and x.numel() > 8 * self.in_features:
            # many rows (prefill): fp16 GEMMs cost about one GEMV per row on CPUs without native
            # fp16 units; fp16 -> fp32 is exact, so widen the weight and use the fp32 GEMM
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)

    def row_call(self, rows: int) -> Optional[tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype]]:
        """(kernel, dtype) for `rows` single-token rows, or None where forward is the call: the bare
        kernel of the fp32/bf16 oneDNN, fp16 (torch or fbgemm), w8a8 and (with a bias, unpadded) int8/int4 modes,
        taking 2-D inputs already in `dtype` and returning its own output dtype, so that a caller
        (minigpt.inference.decode_step) can skip the casts and reshapes forward makes around every
        product where they cancel. Same numbers as forward."""
        w, b = self.weight, self.bias
        if self.kind == "mkldnn":
            return (lambda x: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")), self.dtype
        if self.kind == "fp16" and rows <= 8:                          # forward's one-row path
            return (lambda x: F.linear(x, w, b)), self.dtype
        if self.kind == "w8a8":                                        # fp32 in and out, any shape
            packed, reduce_range = self.packed, self.reduce_range
            return (lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range)), torch.float32
        if self.kind == "fbgemm_fp16":
            packed = self.packed
            return (lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)), torch.float32
        if self.kind in ("int8", "int4") and b is not None and self.weight.size(0) == self.out_features:
            s = self.scale                                             # 2-D bf16 in, fp32 out (+ bias)
            if self.kind == "int8":
                return (lambda x: torch.add(b, torch._weight_int8pack_mm(x, w, s))), torch.bfloat16
            return (lambda x: torch.add(b, torch._weight_int4pack_mm_for_cpu(x, w, INT4_GROUP, s))), torch.bfloat16
        return None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def prepare_for_decoding(model, mode: str = "fp16"):
    """Swap every nn.Linear of `model` (and the tied head) for a DecodeLinear, in place.

    mode: "fp32" (same maths and tokens, prepacked), "fp16", "bf16", "int8" (weight-only,
    per-output-channel scales), "w8a8" (the int8 weights with 8-bit dynamic activations, as
    llama.cpp's q8_0; CPU) or "int4" (weight-only, groups of 32; CPU). Measured by
    benchmarks/decode.py (GPT-2 124M, batch 1, 2 threads, AVX-512) vs transformers' fp32 generate
    in the same run: fp32 1.8x, fp16 3.5x, bf16 3.5x, int8 4.5x, int4 6.5x (fp32 to int8 gave
    transformers' greedy tokens exactly; int4 costs +0.003 bits/byte on held-out text for a
    trained model). generate/stream on a plain fp32 CPU model use the "fp32" packing on their own,
    for the length of each call (see _packed_linears); the modes here are for keeping it.
    Returns the model, which is now for inference only: generate/stream/model(idx) work, but it
    has no trainable Linear weights and should not be saved (keep the original or reload it).
    Embeddings, LayerNorms, attention and the KV cache stay in fp32, and so do virtual tokens
    (model.kv_prefix: prefix/prompt tuning, computed once per call). Call it after moving the
    model to its device, and after merge_lora if it has LoRA adapters.
    """
    if mode not in DECODE_MODES:
        raise ConfigError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    targets = []
    for name, parent, attr, mod in _linear_slots(model):
        if hasattr(mod, "lora_A"):                                       # minigpt.methods.lora.LoRALinear
            if not getattr(mod, "merged", False):
                raise ConfigError(f"{name} carries an unmerged LoRA adapter: call "
                                 f"minigpt.methods.lora.merge_lora(model) before prepare_for_decoding")
            targets.append((parent, attr, mod))
        elif isinstance(mod, nn.Linear):
            targets.append((parent, attr, mod))
    for parent, attr, lin in targets:
        packed = DecodeLinear(lin.weight, lin.bias, mode)
        if mode == "fp32" and parent is model and attr == "lm_head" and lin.bias is None:
            packed.rows = lin.weight.detach()           # (tied to wte: no copy) for greedy picks
        setattr(parent, attr, packed)
    model.eval()
    model.requires_grad_(False)
    return model


# --- per call: generate/stream on a plain fp32 CPU model --------------------------------------

PACK_MIN_TOKENS = 16      # generate/stream repack fp32 CPU weights for calls of at least this many tokens


def _packed_linears(model, max_new_tokens: int, compile: bool, skip_head: bool = False) -> Optional[list]:
    """[(parent, attribute, plain nn.Linear, packed DecodeLinear)] for the fp32 nn.Linear layers of a
    CPU model, or None where packing does not pay or does not apply.

    oneDNN's blocked fp32 layout reads weights ~1.8x faster than F.linear for one-row products (the
    same fp32 maths: prepare_for_decoding's "fp32" mode); the packed copies live for one call only,
    so the model and its weights stay as they are (trainable, saveable). Packing costs about one
    pass over the weights, so short calls, compiled steps and other devices or dtypes skip it.
    """
    if compile or max_new_tokens < PACK_MIN_TOKENS or not isinstance(model, nn.Module):
        return None
    found = [(parent, attr, mod) for _, parent, attr, mod in _linear_slots(model)
             if is_linear(mod) and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32
             and not (skip_head and parent is model and attr == "lm_head")]        # (greedy: not called)
    if not found:
        return None
    with torch.no_grad():
        return [(parent, attr, mod, DecodeLinear(mod.weight, mod.bias, "fp32")) for parent, attr, mod in found]


def _linear_slots(model) -> list:
    """[(name, parent module, attribute, module)] for every module of `model` outside kv_prefix
    (virtual tokens: computed once per call and kept exact), for swapping Linear layers in place."""
    out = []
    for name, mod in model.named_modules():
        if name == "kv_prefix" or name.startswith("kv_prefix."):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        out.append((name, parent, name.rpartition(".")[2], mod))
    return out


@contextlib.contextmanager
def _swapped(packs: Optional[list]):
    """The packed layers in place of the plain ones for the duration of one decoding step."""
    if not packs:
        yield
        return
    for parent, attr, _, packed in packs:
        setattr(parent, attr, packed)
    try:
        yield
    finally:
        for parent, attr, plain, _ in packs:
            setattr(parent, attr, plain)


# --- quantized bases (minigpt.model.quant) --------------------------------------------------------

def densify(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Cache a dense copy of every NF4 layer's weight in `dtype` (inference: fast CPU decoding at
    the memory of `dtype`; the numbers are still NF4's). int8 layers keep their own kernel."""
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.mode == "nf4":
            m._dense = m.dense(torch.float32).to(dtype)
    return model


def for_decoding(model: nn.Module) -> str:
    """CPU inference on a quantized base at the speed of prepare_for_decoding: NF4 blocks get dense
    fp16 copies (densify), and the tied head a decoding copy (fp16 for nf4, int8 per channel for
    int8); the input embeddings keep their own full-precision weight. Returns what it did."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    if not modes:
        raise ConfigError("for_decoding needs a quantized model (quantize_model)")
    head = "fp16" if "nf4" in modes else "int8"
    if "nf4" in modes:
        densify(model)
    model.lm_head = DecodeLinear(model.lm_head.weight, None, head)
    return f"{'/'.join(sorted(modes))} blocks{' (dense fp16 copies)' if 'nf4' in modes else ''}, {head} head"
