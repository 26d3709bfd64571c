"""LoRA and DoRA for minigpt's GPT: apply them to a model, merge, unmerge, remove (the layer itself
is minigpt.methods.lora_layer.LoRALinear; adapter folders in PEFT's layout are
minigpt.methods.lora_files; everything public of both is importable from here too).

    add_lora(model, r=8, alpha=16, dropout=0.05, targets=("c_attn",))  # freezes everything else
    LoRAConfig(r=8, use_dora=True).apply(model)      # or method_config("dora", r=8)
    merge_lora(model); unmerge_lora(model)           # W' = W + scaling B A (DoRA: rescaled rows) and back
    remove_lora(model, merge=True)                   # == merge_and_unload: a plain GPT again
    save_adapter(model, dir); load_adapter(model, dir)

Targets match module names by suffix on a dot boundary, as PEFT does with a list of names:
"c_attn", "c_proj" (attention and MLP), "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head".
The pseudo-targets "q", "k", "v" put LoRA on chosen slices of the fused c_attn only (lora_B then
covers just those output rows; not with DoRA, whose row norms span the whole layer).
On a GPT-Neo the attention is "q_proj", "k_proj", "v_proj", "out_proj" (GPT-2's names are refused
there); the default targets are the model's (DEFAULT_TARGETS, PEFT's: c_attn on GPT-2, q_proj and
v_proj on GPT-Neo).

lm_head is tied to transformer.wte. A LoRA on lm_head keeps the tie (its `weight` *is* the wte
Parameter) and changes only the output projection, exactly like PEFT. Merging it would also change
the input embeddings, so `merge_lora` refuses to merge a tied lm_head (`remove_lora(merge=False)`
drops it instead).

This module is minigpt.methods's "lora" and "dora" method: attached, save, load, method_config,
merge_and_unload, plain_weights.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..model.quant import QuantLinear
from .files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .lora_files import load, load_adapter, read_adapter_config, save, save_adapter
from .lora_layer import LORA_METHODS, QKV, LoRALinear, attached, check_hparams, lora_layers
from .surgery import (
    GPT_NEO_TARGETS,
    arch_of,
    check_arch_targets,
    count_parameters,
    find_targets,
    layer_functions,
    name_matches,
    set_module,
    split_targets,
)
from .table import NAMES

__all__ = [
    "LoRAConfig", "LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "remove_lora", "merge_and_unload",
    "lora_layers", "lora_parameters", "lora_disabled", "lora_state_dict", "load_lora_state_dict", "lora_pairs",
    "plain_weights", "save_adapter", "load_adapter", "read_adapter_config", "count_parameters",
    "attached", "save", "load", "method_config",
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "KNOWN_TARGETS", "DEFAULT_TARGETS",
]

KNOWN_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head", "q", "k", "v")
DEFAULT_TARGETS = {"gpt2": ("c_attn",), "gpt_neo": ("q_proj", "v_proj")}      # per arch: PEFT's defaults


@dataclass
class LoRAConfig:
    """LoRA / DoRA hyperparameters, validated: what `add_lora` takes and a fine-tune records.
    targets: module-name suffixes and/or q, k, v (see add_lora); comma-separated strings are split.
        None: the model's default (DEFAULT_TARGETS), GPT-2's until `apply` meets a GPT-Neo.
    use_dora: weight-decomposed LoRA (a magnitude per output row; not with q, k, v)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Optional[tuple[str, ...]] = None
    rslora: bool = False
    use_dora: bool = False
    flags: Sequence[str] = field(default=("LoRA rank r", "LoRA alpha", "LoRA dropout"), repr=False,
                                 compare=False)        # what error messages call r, alpha, dropout
    model_default: bool = field(default=False, init=False, repr=False, compare=False)   # targets not given

    def __post_init__(self) -> None:
        check_hparams(self.r, self.alpha, self.dropout, self.flags)
        self.model_default = self.targets is None
        self.targets = split_targets(DEFAULT_TARGETS["gpt2"] if self.targets is None else self.targets)
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
        """add_lora with these settings (freezes the rest of the model). Default targets become the
        model's own (GPT-Neo: q_proj, v_proj), recorded in `targets`."""
        if self.model_default:
            self.targets = DEFAULT_TARGETS[arch_of(model)]
        return add_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                        use_rslora=self.rslora, use_dora=self.use_dora)

    def describe(self) -> str:
        """One line, e.g. "DoRA r=8 alpha=16 on c_attn"."""
        extra = ", rsLoRA" if self.rslora else ""
        return f"{NAMES[self.method]} r={self.r} alpha={self.alpha:g} on {', '.join(self.targets)}{extra}"


def method_config(method: str = "lora", **kw) -> LoRAConfig:
    """minigpt.methods's entry: LoRAConfig for "lora" or "dora" from r, alpha, dropout, targets, rslora
    (None = default)."""
    if method not in LORA_METHODS:
        raise ConfigError(f"minigpt.methods.lora provides {' and '.join(LORA_METHODS)}, not {method!r}")
    allowed = ("r", "alpha", "dropout", "targets", "rslora")
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ConfigError(f"{NAMES[method]} has no setting {', '.join(unknown)} (it takes {', '.join(allowed)})")
    return LoRAConfig(**{k: v for k, v in kw.items() if v is not None}, use_dora=method == "dora")


def _normalise_targets(targets) -> tuple[tuple[str, ...], Optional[tuple[bool, bool, bool]]]:
    """Split user targets into module-name targets and an optional q/k/v selection for c_attn."""
    targets = split_targets(targets)
    if not targets:
        raise ConfigError("LoRA targets must name at least one module")
    qkv = tuple(t in targets for t in QKV)
    names = tuple(t for t in targets if t not in QKV)
    if any(qkv):
        if any(name_matches("attn.c_attn", t) for t in names):
            raise ConfigError("give either 'c_attn' or some of 'q', 'k', 'v' as LoRA targets, not both")
        names = names + ("c_attn",)
        return names, (None if all(qkv) else qkv)
    return names, None


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


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             targets: Union[str, Iterable[str], None] = None, use_rslora: bool = False,
             freeze: bool = True, use_dora: bool = False) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear; freeze the rest.

    targets: module-name suffixes ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc",
             "lm_head") and/or "q", "k", "v" for slices of the fused c_attn; also a
             comma-separated string. GPT-Neo: "q_proj", "k_proj", "v_proj", "out_proj", "c_fc",
             "c_proj", "lm_head". None: the model's default (DEFAULT_TARGETS).
             use_dora: DoRA layers. Returns the model (modified in place).
    """
    check_hparams(r, alpha, dropout)
    arch = arch_of(model)
    targets = DEFAULT_TARGETS[arch] if targets is None else split_targets(targets)
    check_arch_targets(model, targets, "LoRA")
    names, qkv = _normalise_targets(targets)
    if use_dora and qkv is not None:
        raise ConfigError("DoRA cannot adapt slices (q, k, v) of c_attn; target c_attn instead")
    found = find_targets(model, names, LoRALinear, "LoRA", KNOWN_TARGETS if arch == "gpt2" else GPT_NEO_TARGETS)
    if use_dora and any(isinstance(model.get_submodule(n), QuantLinear) for n in found):
        raise ConfigError("DoRA on a quantized (nf4/int8) base is not supported: use LoRA there, or DoRA "
                          "on a full-precision base")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in found:
        base = model.get_submodule(name)
        slices = qkv if (qkv is not None and name_matches(name, "c_attn")) else None
        set_module(model, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                           out_slices=slices, use_dora=use_dora))
    return model


# merge_lora, unmerge_lora (W' as in minigpt.methods.lora_layer and back), remove_lora(model, merge=True)
# (plain nn.Linear layers again, the update merged or dropped) and merge_and_unload (= remove_lora
# merging): every LoRA/DoRA layer at once; merging is refused for the tied lm_head
merge_lora, unmerge_lora, remove_lora, merge_and_unload = layer_functions(LoRALinear)


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


# --- the update as plain tensors ------------------------------------------------------------

def lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{module name: (A (r, in), B (out, r), scaling)} of every LoRA layer, in name order: the layer
    adds scaling * x A^T B^T (B with zero rows outside q/k/v slices). Refused for a DoRA layer (its
    update is no such pair) and for a merged one."""
    pairs = {}
    for name, m in sorted(lora_layers(model).items()):
        if m.use_dora:
            raise ConfigError(f"{name} is a DoRA layer: a llama.cpp LoRA GGUF holds plain LoRA pairs only; "
                              "export the model with the adapter merged instead")
        if m.merged:
            raise ConfigError(f"{name} is merged; unmerge_lora(model) before exporting the adapter")
        pairs[name] = (m.lora_A.detach(), m.full_lora_B().detach(), m.scaling)
    return pairs


def plain_weights(model: nn.Module, sd: dict[str, torch.Tensor], merge: bool) -> None:
    """In a copy `sd` of the model's state dict: the LoRA/DoRA tensors dropped and each adapted
    weight replaced by its float32 value with the update folded in (merge) or left out (the base).
    Refused for an unmerged update on the tied output head (it would change the embeddings too)."""
    for name, m in lora_layers(model).items():
        for extra in ("lora_A", "lora_B", "lora_magnitude"):
            sd.pop(f"{name}.{extra}", None)
        if merge and not m.merged and m.weight is model.transformer.wte.weight:
            raise ConfigError(f"{name} has a LoRA update on the tied output head; merging it would "
                              "change the token embeddings too, so it cannot be exported (train the "
                              "adapter without lm_head)")
        sd[f"{name}.weight"] = m.merged_weight() if merge else m.base_weight()
