"""The LoRA / DoRA layer: `LoRALinear`, an nn.Linear plus a low-rank update (minigpt.methods.lora
applies it to a model, minigpt.methods.lora_files reads and writes its adapters).

`LoRALinear` replaces an `nn.Linear` *in place of it* and keeps its parameter names: the wrapped
layer's `weight` / `bias` Parameters are held directly, so state-dict keys such as
`transformer.h.0.attn.c_attn.weight` stay what they were, and the adapter adds
`...c_attn.lora_A` [r, in] and `...c_attn.lora_B` [out, r]:

    y = x W^T + b + dropout(x) A^T B^T * scaling,    scaling = alpha / r  (alpha / sqrt(r): rsLoRA)

A is Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B is zero, so a fresh adapter is a no-op.

DoRA (weight-decomposed LoRA, Liu et al. 2024; use_dora=True) adds a trainable magnitude
`...lora_magnitude` [out], initialised to the row norms of W + scaling B A, and rescales each
output row of the adapted weight to it:

    W' = m * (W + scaling B A) / ||W + scaling B A||      (norm per output row, treated as a constant)
    y  = x W^T + b + (m/n - 1) * x W^T + (m/n) * dropout(x) A^T B^T * scaling   (n = that norm)

The bias is not rescaled; with dropout active in training the `(m/n - 1) x W^T` term sees the
dropped-out input (PEFT's numerics exactly).

out_slices puts the update on chosen equal slices of the outputs only (the "q", "k", "v" targets:
slices of the fused c_attn); lora_B then covers just those rows (not with DoRA, whose row norms
span the whole layer).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..model.linear import linear
from .surgery import WrappedLinear, wrapped_layers
from .table import NAMES

__all__ = ["LoRALinear", "check_hparams", "lora_layers", "attached", "QKV", "LORA_METHODS"]

QKV = ("q", "k", "v")                 # the pseudo-targets: slices of the fused c_attn
LORA_METHODS = ("lora", "dora")


class LoRALinear(WrappedLinear):
    """An nn.Linear plus a low-rank update, keeping the base layer's `weight`/`bias` names.

    base:         the nn.Linear to adapt; its Parameters are reused (not copied), so ties hold.
                  Or a frozen minigpt.model.quant.QuantLinear (QLoRA): kept as `quant`, run as is, never
                  merged into (merge into the full-precision base instead).
    r, alpha:     rank and scale; scaling = alpha / r, or alpha / sqrt(r) when use_rslora.
    dropout:      dropout on the LoRA input path only.
    out_slices:   optional tuple of booleans splitting out_features into equal chunks (e.g.
                  (True, False, True) for q and v of a fused qkv projection); lora_B then has only
                  the selected rows and the update is zero elsewhere. None = all outputs.
    use_dora:     DoRA: add the magnitude `lora_magnitude` (out,) (see the module docstring).
                  Not on a quantized base, not with out_slices.
    """

    kind = merge_what = "LoRA"               # for minigpt.methods.surgery: messages, function names
    api = "lora"

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, out_slices: Optional[Sequence[bool]] = None, use_dora: bool = False):
        check_hparams(r, alpha, dropout)
        super().__init__(base)                                     # weight, bias (or quant), merged, enabled
        self.use_dora = bool(use_dora)
        if self.use_dora and self.quant is not None:
            raise ConfigError("DoRA on a quantized (nf4/int8) base is not supported: use LoRA there, or DoRA "
                              "on a full-precision base")
        self.r, self.alpha, self.use_rslora = int(r), alpha, bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.out_slices: Optional[tuple[bool, ...]] = None
        n_out = self._init_slices(out_slices)
        factory = dict(device=self._device, dtype=torch.float32 if self.quant is not None else self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(n_out, self.r, **factory))              # (out', r)
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(torch.empty(self.out_features, **factory))   # (out,)
            self.register_buffer("dora_factor", None, persistent=False)   # m / n while merged (out,)
        self.reset_lora_parameters()
        self.train(base.training)                                  # inherit train/eval mode

    def _init_slices(self, out_slices) -> int:
        """Set out_slices / lora_out_idx; returns lora_B's row count."""
        if out_slices is None:
            return self.out_features
        out_slices = tuple(bool(s) for s in out_slices)
        k = len(out_slices)
        if k == 0 or self.out_features % k or not any(out_slices):
            raise ConfigError(f"out_slices {out_slices} must split {self.out_features} outputs into "
                              f"equal chunks and select at least one")
        if all(out_slices):
            return self.out_features
        if self.use_dora:
            raise ConfigError("DoRA cannot adapt slices (q, k, v) of c_attn: its magnitude rescales whole "
                              "output rows of the layer; target c_attn instead")
        self.out_slices = out_slices
        chunk = self.out_features // k
        idx = torch.cat([torch.arange(i * chunk, (i + 1) * chunk) for i, on in enumerate(out_slices) if on])
        self.register_buffer("lora_out_idx", idx.to(self._device), persistent=False)
        return idx.numel()

    @property
    def adapter_method(self) -> str:
        """"dora" or "lora": the method this layer belongs to (minigpt.methods.table)."""
        return "dora" if self.use_dora else "lora"

    @property
    def adapter_title(self) -> str:
        """"DoRA" or "LoRA", for messages."""
        return NAMES[self.adapter_method]

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.use_dora:
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: m = row norms of W + scaling B A (the adapted layer's output is then unchanged)."""
        self.lora_magnitude.copy_(self.weight_norm())

    # --- the update as a dense (out, in) matrix --------------------------------------------
    def full_lora_B(self) -> torch.Tensor:
        """lora_B expanded to (out_features, r), zero rows for unselected slices."""
        if self.out_slices is None:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, self.r)
        return full.index_copy(0, self.lora_out_idx, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in float32, shape (out_features, in_features)."""
        return (self.full_lora_B().float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """DoRA's n: row norms of the unmerged W + scaling B A, float32 (out,), no gradient."""
        return torch.linalg.norm(self.base_weight() + self.delta_weight(), dim=1)

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """The base W in float32 (out, in), as it is without the adapter (also while merged)."""
        if self.quant is not None:
            return self.quant.dense(torch.float32)
        w = self.weight.detach().float()
        if not self.merged:
            return w
        if self.use_dora:
            w = w / self.dora_factor[:, None]
        return w - self.delta_weight()

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The adapted dense weight in float32 (out, in): W + scaling B A, or DoRA's m/n (W + scaling B A)."""
        if self.merged:
            return self.weight.detach().float()
        w = self.base_weight() + self.delta_weight()
        if self.use_dora:
            w = (self.lora_magnitude.float() / torch.linalg.norm(w, dim=1))[:, None] * w
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into W (computed in float32); a merged layer's forward skips the adapter."""
        self.check_merge()
        w = self.weight.data.float() + self.delta_weight()                  # (out, in)
        if self.use_dora:
            self.dora_factor = self.lora_magnitude.detach().float() / torch.linalg.norm(w, dim=1)   # (out,)
            w = self.dora_factor[:, None] * w
        self.weight.data = w.to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() up to floating-point rounding (DoRA divides by the factor kept from merge)."""
        self.check_merge(merge=False)
        w = self.weight.data.float()
        if self.use_dora:
            w = w / self.dora_factor[:, None]
            self.dora_factor = None
        self.weight.data = (w - self.delta_weight()).to(self.weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)                                           # (..., out)
        if self.merged or not self.enabled:
            return y
        if self.use_dora:
            return self._dora_forward(x, y)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        u = F.linear(h, self.lora_A) * self.scaling                        # (..., r): scale the small side
        if self.out_slices is None and u.dtype == y.dtype:
            # y + u B^T as one addmm: no (..., out) temporaries for the update, its scaling and the sum;
            # into y itself when y is F.linear's fresh output (not saved for backward: the base's
            # gradients need its input and weight only), so no second (..., out) tensor either (not
            # under autocast, which casts only for the out-of-place op)
            y2 = y.reshape(-1, self.out_features)
            if self.quant is None and self.lora_B.dtype == y.dtype:
                return y2.addmm_(u.reshape(-1, self.r), self.lora_B.t()).view(y.shape)
            return torch.addmm(y2, u.reshape(-1, self.r), self.lora_B.t()).view(y.shape)
        d = F.linear(u, self.lora_B)                                       # (..., out')
        if self.out_slices is not None:
            d = d.new_zeros(*d.shape[:-1], self.out_features).index_copy(-1, self.lora_out_idx, d)
        return y + d.to(y.dtype)

    def _dora_forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + (m/n - 1) x W^T + (m/n) dropout(x) A^T B^T scaling; n detached, bias not rescaled."""
        scale = (self.lora_magnitude / self.weight_norm().to(self.lora_magnitude.dtype)).view(1, -1)   # (1, out)
        dropout_on = self.training and self.dropout_p > 0
        h = self.lora_dropout(x) if dropout_on else x
        lora = F.linear(F.linear(h.to(self.lora_A.dtype), self.lora_A), self.lora_B)   # (..., out)
        if dropout_on:
            base = linear(h, self.weight)                                # the dropped-out input, no bias
        else:
            base = y if self.bias is None else y - self.bias
        return y + ((scale - 1) * base + scale * lora * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
             f"alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
        if self.use_dora:
            s += ", use_dora=True"
        if self.out_slices is not None:
            s += f", out_slices={self.out_slices}"
        return s


def check_hparams(r, alpha, dropout, names: Sequence[str] = ("LoRA rank r", "LoRA alpha", "LoRA dropout")) -> None:
    """The one check of LoRA hyperparameters; `names` are what the messages call them (flags)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{names[0]} must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"{names[1]} must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{names[2]} must be in [0, 1), got {dropout!r}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} for every LoRA (or DoRA) layer in the model."""
    return wrapped_layers(model, LoRALinear)


def attached(model: nn.Module) -> Optional[str]:
    """minigpt.methods's probe: "dora" or "lora" when the model has LoRA layers, else None."""
    layers = lora_layers(model).values()
    if not layers:
        return None
    return "dora" if any(m.use_dora for m in layers) else "lora"
