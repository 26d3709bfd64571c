"""LoRA and DoRA for minigpt's GPT, with adapters saved and read in PEFT's on-disk layout.

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

    add_lora(model, r=8, alpha=16, dropout=0.05, targets=("c_attn",))  # freezes everything else
    LoRAConfig(r=8, use_dora=True).apply(model)      # or method_config("dora", r=8)
    merge_lora(model); unmerge_lora(model)           # W' as above and back
    remove_lora(model, merge=True)                   # == merge_and_unload: a plain GPT again
    save_adapter(model, dir); load_adapter(model, dir)

Targets match module names by suffix on a dot boundary, as PEFT does with a list of names:
"c_attn", "c_proj" (attention and MLP), "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head".
The pseudo-targets "q", "k", "v" put LoRA on chosen slices of the fused c_attn only (lora_B then
covers just those output rows; not with DoRA, whose row norms span the whole layer). PEFT has no
such option for GPT-2's fused projection; on save the adapter is written as an ordinary c_attn
adapter whose lora_B rows for the other slices are zero, which PEFT loads with identical outputs,
and the slice choice is kept in the safetensors metadata (`minigpt_qkv`) so minigpt reads it back
with the smaller shape.

lm_head is tied to transformer.wte. A LoRA on lm_head keeps the tie (its `weight` *is* the wte
Parameter) and changes only the output projection, exactly like PEFT. Merging it would also change
the input embeddings, so `merge_lora` refuses to merge a tied lm_head (`remove_lora(merge=False)`
drops it instead).

On-disk layout (PEFT, readable by `peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`):
adapter_config.json (peft_type LORA, use_dora) and adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` [r, in], `...lora_B.weight` [out, r] and, for DoRA,
`...lora_magnitude_vector` [out]. The files themselves are read and written by minigpt.methods.

This module is minigpt.methods's "lora" and "dora" method: attached, save, load, method_config,
merge_and_unload.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdapterError, ConfigError
from ..model.quant import QuantLinear
from . import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    NAMES,
    PEFT_PREFIX,
    adapter_method,
    base_name,
    count_parameters,
    read_config,
    read_tensors,
    write_adapter,
)

__all__ = [
    "LoRAConfig", "LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "remove_lora", "merge_and_unload",
    "lora_layers", "lora_parameters", "lora_disabled", "lora_state_dict", "load_lora_state_dict",
    "save_adapter", "load_adapter", "read_adapter_config", "count_parameters",
    "attached", "save", "load", "method_config",
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "KNOWN_TARGETS",
]

KNOWN_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head", "q", "k", "v")
_QKV = ("q", "k", "v")
_METHODS = ("lora", "dora")


class LoRALinear(nn.Module):
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

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, out_slices: Optional[Sequence[bool]] = None, use_dora: bool = False):
        super().__init__()
        _check_hparams(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quant = base if isinstance(base, QuantLinear) else None
        self.use_dora = bool(use_dora)
        if self.use_dora and self.quant is not None:
            raise ConfigError("DoRA on a quantized (nf4/int8) base is not supported: use LoRA there, or DoRA "
                              "on a full-precision base")
        self.weight = None if self.quant is not None else base.weight   # (out, in), same Parameter
        self.bias = base.bias                                      # (out,) or None
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
        self.merged = False
        self.enabled = True
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
    def _device(self) -> torch.device:
        return self.quant.codes.device if self.quant is not None else self.weight.device

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
        if self.merged:
            raise RuntimeError("LoRA layer is already merged")
        if self.quant is not None:
            raise ConfigError("cannot merge LoRA into a quantized (nf4/int8) base: load the base in full "
                              "precision, load the adapter there and merge")
        w = self.weight.data.float() + self.delta_weight()                  # (out, in)
        if self.use_dora:
            self.dora_factor = self.lora_magnitude.detach().float() / torch.linalg.norm(w, dim=1)   # (out,)
            w = self.dora_factor[:, None] * w
        self.weight.data = w.to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge() up to floating-point rounding (DoRA divides by the factor kept from merge)."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        w = self.weight.data.float()
        if self.use_dora:
            w = w / self.dora_factor[:, None]
            self.dora_factor = None
        self.weight.data = (w - self.delta_weight()).to(self.weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant(x) if self.quant is not None else F.linear(x, self.weight, self.bias)   # (..., out)
        if self.merged or not self.enabled:
            return y
        if self.use_dora:
            return self._dora_forward(x, y)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        u = F.linear(h, self.lora_A) * self.scaling                        # (..., r): scale the small side
        if self.out_slices is None and u.dtype == y.dtype:
            # y + u B^T as one addmm: no (..., out) temporaries for the update, its scaling and the sum
            return torch.addmm(y.reshape(-1, self.out_features), u.reshape(-1, self.r),
                               self.lora_B.t()).view(y.shape)
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
            base = F.linear(h, self.weight)                                # the dropped-out input, no bias
        else:
            base = y if self.bias is None else y - self.bias
        return y + ((scale - 1) * base + scale * lora * self.scaling).to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's weight/bias Parameters (LoRA part dropped); the
        QuantLinear itself for a quantized base."""
        if self.quant is not None:
            return self.quant
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
             f"alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
        if self.use_dora:
            s += ", use_dora=True"
        if self.out_slices is not None:
            s += f", out_slices={self.out_slices}"
        return s


# --- applying LoRA to a model ---------------------------------------------------------------

def _check_hparams(r, alpha, dropout, names: Sequence[str] = ("LoRA rank r", "LoRA alpha", "LoRA dropout")) -> None:
    """The one check of LoRA hyperparameters; `names` are what the messages call them (flags)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{names[0]} must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"{names[1]} must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{names[2]} must be in [0, 1), got {dropout!r}")


def split_targets(targets) -> tuple[str, ...]:
    """Module-name targets from a string ("a,b c") or a sequence of such strings."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return tuple(t for item in items for t in re.split(r"[,\s]+", item) if t)


@dataclass
class LoRAConfig:
    """LoRA / DoRA hyperparameters, validated: what `add_lora` takes and a fine-tune records.
    targets: module-name suffixes and/or q, k, v (see add_lora); comma-separated strings are split.
    use_dora: weight-decomposed LoRA (a magnitude per output row; not with q, k, v)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("c_attn",)
    rslora: bool = False
    use_dora: bool = False
    flags: Sequence[str] = field(default=("LoRA rank r", "LoRA alpha", "LoRA dropout"), repr=False,
                                 compare=False)        # what error messages call r, alpha, dropout

    def __post_init__(self) -> None:
        _check_hparams(self.r, self.alpha, self.dropout, self.flags)
        self.targets = split_targets(self.targets)
        _, qkv = _normalise_targets(self.targets)
        self.rslora, self.use_dora = bool(self.rslora), bool(self.use_dora)
        if self.use_dora and qkv is not None:
            raise ConfigError("DoRA cannot adapt slices (q, k, v) of c_attn (its magnitude rescales whole output "
                              "rows); target c_attn instead")

    @property
    def method(self) -> str:
        """"dora" or "lora": the minigpt.methods method name."""
        return "dora" if self.use_dora else "lora"

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "rslora": self.rslora, "use_dora": self.use_dora}

    def apply(self, model: nn.Module) -> nn.Module:
        """add_lora with these settings (freezes the rest of the model)."""
        return add_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                        use_rslora=self.rslora, use_dora=self.use_dora)

    def describe(self) -> str:
        """One line, e.g. "DoRA r=8 alpha=16 on c_attn"."""
        extra = ", rsLoRA" if self.rslora else ""
        return f"{NAMES[self.method]} r={self.r} alpha={self.alpha:g} on {', '.join(self.targets)}{extra}"


def method_config(method: str = "lora", **kw) -> LoRAConfig:
    """minigpt.methods's entry: LoRAConfig for "lora" or "dora" from r, alpha, dropout, targets, rslora
    (None = default)."""
    if method not in _METHODS:
        raise ConfigError(f"minigpt.methods.lora provides {' and '.join(_METHODS)}, not {method!r}")
    allowed = ("r", "alpha", "dropout", "targets", "rslora")
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"{NAMES[method]} has no setting {', '.join(unknown)} (it takes {', '.join(allowed)})")
    return LoRAConfig(**{k: v for k, v in kw.items() if v is not None}, use_dora=method == "dora")


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _normalise_targets(targets) -> tuple[tuple[str, ...], Optional[tuple[bool, bool, bool]]]:
    """Split user targets into module-name targets and an optional q/k/v selection for c_attn."""
    targets = split_targets(targets)
    if not targets:
        raise ConfigError("LoRA targets must name at least one module")
    qkv = tuple(t in targets for t in _QKV)
    names = tuple(t for t in targets if t not in _QKV)
    if any(qkv):
        if any(_name_matches("attn.c_attn", t) for t in names):
            raise ConfigError("give either 'c_attn' or some of 'q', 'k', 'v' as LoRA targets, not both")
        names = names + ("c_attn",)
        return names, (None if all(qkv) else qkv)
    return names, None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, names: Sequence[str], wrapper: type, what: str,
                 known: Sequence[str] = KNOWN_TARGETS) -> list[str]:
    """Names of the modules matched (by dotted suffix) by `names`: each must be an nn.Linear (or a
    QuantLinear) not yet wrapped in `wrapper`, and every target must match one (ConfigError)."""
    found: list[str] = []
    matched: set[str] = set()
    for name, mod in model.named_modules():
        hits = [t for t in names if _name_matches(name, t)]
        if not hits:
            continue
        if isinstance(mod, wrapper):
            raise ConfigError(f"{name} already has a {what} layer")
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise ConfigError(f"{what} target {hits[0]!r} matched {name}, a {type(mod).__name__}, not an nn.Linear")
        matched.update(hits)
        found.append(name)
    missing = [t for t in names if t not in matched]
    if not found or missing:
        raise ConfigError(f"{what} target(s) {missing or list(names)} match no module; "
                          f"known targets: {', '.join(known)}")
    return found


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} for every LoRA (or DoRA) layer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def attached(model: nn.Module) -> Optional[str]:
    """minigpt.methods's probe: "dora" or "lora" when the model has LoRA layers, else None."""
    layers = lora_layers(model).values()
    if not layers:
        return None
    return "dora" if any(m.use_dora for m in layers) else "lora"


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Context manager: run the model as its base (LoRA updates skipped; merged layers unaffected)."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable merged LoRA layers; unmerge_lora(model) first")
    prev = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, prev):
            m.enabled = e


def _own_params(m: LoRALinear) -> tuple[nn.Parameter, ...]:
    return (m.lora_A, m.lora_B, m.lora_magnitude) if m.use_dora else (m.lora_A, m.lora_B)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B (and DoRA magnitude) Parameters: what an optimizer should get."""
    return [p for m in lora_layers(model).values() for p in _own_params(m)]


def is_tied(model: nn.Module, layer: nn.Module) -> bool:
    """True when `layer`'s weight is the model's token embedding (the tied lm_head)."""
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    return wte is not None and getattr(layer, "weight", None) is wte.weight


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             targets: Union[str, Iterable[str]] = ("c_attn",), use_rslora: bool = False,
             freeze: bool = True, use_dora: bool = False) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear; freeze the rest.

    targets: module-name suffixes ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc",
             "lm_head") and/or "q", "k", "v" for slices of the fused c_attn; also a
             comma-separated string. use_dora: DoRA layers. Returns the model (modified in place).
    """
    _check_hparams(r, alpha, dropout)
    names, qkv = _normalise_targets(targets)
    if use_dora and qkv is not None:
        raise ConfigError("DoRA cannot adapt slices (q, k, v) of c_attn; target c_attn instead")
    found = find_targets(model, names, LoRALinear, "LoRA")
    if use_dora and any(isinstance(model.get_submodule(n), QuantLinear) for n in found):
        raise ConfigError("DoRA on a quantized (nf4/int8) base is not supported: use LoRA there, or DoRA "
                          "on a full-precision base")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in found:
        base = model.get_submodule(name)
        slices = qkv if (qkv is not None and _name_matches(name, "c_attn")) else None
        _set_module(model, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                            out_slices=slices, use_dora=use_dora))
    return model


def merge_layers(model: nn.Module, layers: dict[str, nn.Module], what: str, remover: str) -> nn.Module:
    """Merge every unmerged wrapper layer (LoRA, DoRA, IA3) into its weight; refused for a layer on
    the tied lm_head (merging would change the input embeddings too)."""
    for name, m in layers.items():
        if not m.merged and is_tied(model, m):
            raise ConfigError(f"{name} shares its weight with transformer.wte; merging its {what} would "
                              "change the input embeddings too. Keep it as an adapter, or drop it with "
                              f"{remover}(model, merge=False)")
    for m in layers.values():
        if not m.merged:
            m.merge()
    return model


def unmerge_layers(model: nn.Module, layers: dict[str, nn.Module]) -> nn.Module:
    """Take every merged wrapper layer's update out of its weight again."""
    for m in layers.values():
        if m.merged:
            m.unmerge()
    return model


def remove_layers(model: nn.Module, layers: dict[str, nn.Module], merge: bool, merge_fn) -> nn.Module:
    """Replace each wrapper layer by a plain nn.Linear sharing its Parameters (merge_fn(model) first
    when `merge`, else each update dropped); every parameter trainable again, the tie intact."""
    if merge:
        merge_fn(model)
    for name, m in layers.items():
        if not merge and m.merged:
            m.unmerge()
        _set_module(model, name, m.to_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every (unmerged) LoRA update into its base weight. Undo with unmerge_lora."""
    return merge_layers(model, lora_layers(model), "LoRA", "remove_lora")


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take every merged LoRA update out of its base weight again."""
    return unmerge_layers(model, lora_layers(model))


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear (merging the update first when `merge`).

    The returned model has exactly a plain GPT's state-dict keys, the lm_head/wte tie intact, and
    every parameter trainable again. With merge=False the LoRA updates are discarded (and a merged
    layer is unmerged first).
    """
    return remove_layers(model, lora_layers(model), merge, merge_lora)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's name for remove_lora(model, merge=True)."""
    return remove_lora(model, merge=True)


# --- state dicts --------------------------------------------------------------------------

def _own_names(m: LoRALinear) -> tuple[str, ...]:
    return ("lora_A", "lora_B", "lora_magnitude") if m.use_dora else ("lora_A", "lora_B")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """minigpt-named tensors: {"<module>.lora_A": [r, in], "<module>.lora_B": [out', r]} and,
    for DoRA, "<module>.lora_magnitude": [out]."""
    return {f"{name}.{k}": getattr(m, k).detach() for name, m in lora_layers(model).items() for k in _own_names(m)}


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a lora_state_dict() into a model with the same LoRA layers (shapes checked)."""
    layers = lora_layers(model)
    expected = {f"{n}.{k}" for n, m in layers.items() for k in _own_names(m)}
    if set(sd) != expected:
        miss, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ConfigError(f"LoRA state dict does not match the model's LoRA layers "
                          f"(missing {miss[:4]}, unexpected {extra[:4]})")
    for name, m in layers.items():
        for k in _own_names(m):
            p, t = getattr(m, k), sd[f"{name}.{k}"]
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(f"{name}.{k}: adapter has shape {tuple(t.shape)}, model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)


# --- adapter folders (minigpt.methods's protocol) -----------------------------------------------

def adapter_targets(model: nn.Module, layers: Iterable[str]) -> list[str]:
    """target_modules for a config: the shortest suffix of each adapted module's name that selects
    exactly adapted modules among all of the model's (what PEFT will match on load)."""
    layers = set(layers)
    all_names = [n for n, _ in model.named_modules() if n]
    targets: list[str] = []
    for name in sorted(layers):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            t = ".".join(parts[-k:])
            if all(n in layers for n in all_names if _name_matches(n, t)):
                break
        if t not in targets:
            targets.append(t)
    return targets


def save(model: nn.Module, base_model_name_or_path: Optional[str] = None
         ) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json dict, PEFT-keyed tensors, safetensors metadata) of the model's LoRA/DoRA
    layers. lora_B is written with full rows (q/k/v slices: zero rows elsewhere, kept in metadata)."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA layers to save (call add_lora or load_adapter first)")
    hp = {(m.r, m.alpha, m.dropout_p, m.use_rslora, m.use_dora) for m in layers.values()}
    if len(hp) != 1:
        raise ConfigError(f"LoRA layers disagree on r/alpha/dropout/rslora/use_dora: {sorted(hp)}")
    r, alpha, dropout, rslora, dora = hp.pop()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": adapter_targets(model, layers), "exclude_modules": None,
        "fan_in_fan_out": True,              # GPT-2's HF layers are Conv1D (weights (in, out))
        "bias": "none", "use_rslora": rslora, "use_dora": dora, "lora_bias": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors, meta = {}, {}
    for name, m in layers.items():
        if m.merged:
            raise ConfigError("unmerge the LoRA layers (unmerge_lora) before saving the adapter")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach()            # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.full_lora_B().detach()     # (out, r)
        if m.use_dora:
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude.detach()   # (out,)
        if m.out_slices is not None:
            meta["minigpt_qkv"] = "".join(c for c, on in zip(_QKV, m.out_slices) if on)
    return config, tensors, meta


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout; returns the dir."""
    return write_adapter(out_dir, *save(model, base_name(model, base_model_name_or_path)))


def _check_config(cfg: dict, where: str) -> None:
    """What minigpt's LoRA does not do: bias training, LoRA biases, extra trained modules."""
    if cfg.get("lora_bias", False):
        raise AdapterError(f"{where}: lora_bias={cfg['lora_bias']!r} is not supported by minigpt")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={cfg['modules_to_save']!r} is not supported")


def _not_lora(d: Path, found: str) -> AdapterError:
    return AdapterError(f"{d} holds a {NAMES[found]} adapter ({found}), not LoRA (lora) or DoRA (dora); "
                        "load it with minigpt.methods.load_adapter")


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of a LoRA/DoRA adapter folder, checked for what minigpt supports."""
    d = Path(adapter_dir)
    cfg = read_config(d)
    found = adapter_method(d, cfg)
    if found not in _METHODS:
        raise _not_lora(d, found)
    _check_config(cfg, str(d / ADAPTER_CONFIG_NAME))
    return cfg


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])"
                       r"(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_magnitude_vector"
                             r"(?:\.(?!weight$)(?P<adapter>[^.]+))?(?:\.weight)?$")


def _parse_adapter_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": tensor, "B": tensor[, "M": magnitude]}} from PEFT-style keys (with or without
    the base_model.model. prefix and the `.default` adapter name); other keys are ignored."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key) or _PEFT_MAGNITUDE.match(key)
        if m is None:
            if "lora_" in key and not key.endswith("base_layer.weight"):
                raise AdapterError(f"{where}: unsupported adapter tensor {key!r}")
            continue                           # e.g. base_layer weights PEFT saves for lm_head
        adapters.add(m["adapter"])
        mods.setdefault(m["module"], {})[m.groupdict().get("ab") or "M"] = t
    if len(adapters) > 1:
        raise AdapterError(f"{where}: several adapters in one file ({sorted(a or '' for a in adapters)})")
    if not mods:
        raise AdapterError(f"{where}: no lora_A/lora_B tensors found")
    for mod, ab in mods.items():
        if not {"A", "B"} <= set(ab):
            raise AdapterError(f"{where}: {mod} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return mods


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module by suffix or regex."""
    for key, val in (pattern or {}).items():
        if _name_matches(module, key):
            return val
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return val
        except re.error:
            pass
    return default


def _layer_plan(model: nn.Module, name: str, ab: dict, cfg: dict, dora: bool, qkv_meta: Optional[str]) -> tuple:
    """Check one adapted module against the model; (name, module, tensors, r, alpha, slices)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"adapter targets {name!r}, which this model does not have "
                           f"(key {PEFT_PREFIX}{name}.lora_A.weight)") from None
    if not isinstance(mod, (nn.Linear, QuantLinear, LoRALinear)):
        raise AdapterError(f"adapter targets {name!r}, a {type(mod).__name__}, not a linear layer")
    A, B, M = ab["A"], ab["B"], ab.get("M")
    out_f, in_f = mod.out_features, mod.in_features
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise AdapterError(f"{name}: inconsistent LoRA shapes lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}")
    r = A.shape[0]
    for key, t, want in (("lora_A.weight", A, (r, in_f)), ("lora_B.weight", B, (out_f, r)),
                         ("lora_magnitude_vector", M, (out_f,))):
        if t is not None and tuple(t.shape) != want:
            raise AdapterError(f"shape mismatch for {PEFT_PREFIX}{name}.{key}: adapter has {tuple(t.shape)}, "
                               f"model expects {want} (adapter for another base model?)")
    if dora != (M is not None):
        raise AdapterError(f"{name}: adapter_config.json says use_dora={dora} but the weights "
                           f"{'lack' if dora else 'have'} {PEFT_PREFIX}{name}.lora_magnitude_vector")
    if dora and isinstance(getattr(mod, "quant", mod), QuantLinear):
        raise AdapterError(f"{name}: a DoRA adapter cannot be loaded on a quantized (nf4/int8) base; load the "
                           "base in full precision")
    slices = tuple(c in qkv_meta for c in _QKV) if qkv_meta and _name_matches(name, "c_attn") else None
    r_cfg = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", r))
    if r_cfg != r:
        raise AdapterError(f"{name}: adapter_config.json says r={r_cfg} but lora_A has {r} rows")
    alpha = _pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8))
    if isinstance(mod, LoRALinear):
        if mod.r != r or mod.out_slices != (None if slices is None or all(slices) else slices):
            raise AdapterError(f"{name}: model's LoRA layer (r={mod.r}) differs from the adapter's (r={r})")
    return name, mod, (A, B, M), r, alpha, slices


def load(model: nn.Module, adapter_dir, cfg: dict, tensors: dict[str, torch.Tensor], meta: dict[str, str],
         freeze: bool = True) -> nn.Module:
    """minigpt.methods's entry: put a read LoRA/DoRA adapter into `model` (in place; returned).

    On a plain model the layers named by the adapter's weights are added first (r from the tensors,
    lora_alpha / lora_dropout / use_rslora / use_dora / alpha_pattern from the config) and, with
    `freeze`, everything else is frozen. A model that already has LoRA layers must have the same set
    (names, shapes, LoRA vs DoRA); their values are copied into the existing Parameters, so an
    optimizer holding them stays valid. Everything is checked before the model is touched."""
    d = Path(adapter_dir)
    where = str(d / ADAPTER_WEIGHTS_NAME)
    _check_config(cfg, str(d / ADAPTER_CONFIG_NAME))
    mods = _parse_adapter_tensors(tensors, where)
    dora = bool(cfg.get("use_dora", False))
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    rslora = bool(cfg.get("use_rslora", False))
    existing = lora_layers(model)
    if any(m.merged for m in existing.values()):
        raise AdapterError("model has merged LoRA layers; unmerge_lora(model) before load_adapter")
    if existing and set(existing) != set(mods):
        raise AdapterError(f"model already has LoRA layers {sorted(existing)[:3]}... that differ from "
                           f"the adapter's {sorted(mods)[:3]}...; load it into a plain model instead")
    if existing and any(m.use_dora != dora for m in existing.values()):
        have = "DoRA" if attached(model) == "dora" else "LoRA"
        raise AdapterError(f"model carries {have} layers but {d} is a {'DoRA' if dora else 'LoRA'} adapter; "
                           "load it into a plain model instead")
    plan = [_layer_plan(model, name, ab, cfg, dora, meta.get("minigpt_qkv")) for name, ab in sorted(mods.items())]
    if freeze and not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, mod, (A, B, M), r, alpha, slices in plan:
        if isinstance(mod, (nn.Linear, QuantLinear)):
            mod = LoRALinear(mod, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, out_slices=slices,
                             use_dora=dora)
            _set_module(model, name, mod)
        else:
            mod.alpha, mod.use_rslora = alpha, rslora
            mod.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B if mod.out_slices is None else B.index_select(0, mod.lora_out_idx.cpu()))
            if dora:
                mod.lora_magnitude.copy_(M)
    return model


def load_adapter(model: nn.Module, adapter_dir, freeze: bool = True) -> nn.Module:
    """Load a minigpt- or PEFT-written LoRA or DoRA adapter folder into `model` (in place; returned);
    see `load`. A folder of another method (IA3, prefix, ...) is handed to minigpt.methods.load_adapter,
    so any method's folder loads here; on a model that already carries LoRA layers it is refused
    naming both methods. An adapter for a differently sized base raises AdapterError (a ValueError)
    naming the key and both shapes."""
    d = Path(adapter_dir)
    if adapter_method(d, read_config(d)) not in _METHODS:
        from . import load_adapter as load_any
        return load_any(model, d, freeze=freeze)
    cfg = read_adapter_config(d)
    tensors, meta = read_tensors(d)
    return load(model, d, cfg, tensors, meta, freeze=freeze)
