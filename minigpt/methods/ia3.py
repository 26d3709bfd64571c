"""IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale chosen layers' activations.

`IA3Linear` replaces an `nn.Linear` in place of it and keeps its `weight` / `bias` names (like
minigpt.methods.lora.LoRALinear), adding one vector `...ia3_l`, initialised to ones (a no-op):

    other targets:        y = (x W^T + b) * l         l: (out,)  the output, bias included
    feedforward targets:  y = (x * l) W^T + b         l: (in,)   the input (the MLP's hidden units)

GPT-2 defaults (PEFT's): targets c_attn and mlp.c_proj, feedforward mlp.c_proj; GPT-Neo's (PEFT's):
q_proj, v_proj and mlp.c_proj, feedforward mlp.c_proj (DEFAULTS). Merging is exact
(up to rounding): W <- W * l per output row and b <- b * l, or W <- W * l per input column.

    cfg = IA3Config()                       # or method_config("ia3", targets=..., feedforward=...)
    cfg.apply(model)                        # adds the layers, freezes the rest
    save_adapter(model, dir); load_adapter(model, dir)
    merge_and_unload(model)                 # a plain GPT again

On-disk layout (PEFT, readable by `peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`):
adapter_config.json (peft_type IA3, target_modules, feedforward_modules, fan_in_fan_out true for
GPT-2's Conv1D layers, false for GPT-Neo's nn.Linear) and
adapter_model.safetensors with `base_model.model.<module>.ia3_l`: [out, 1], or [1, in] for
feedforward modules (the same shapes for HF's Conv1D layers).

This module is minigpt.methods's "ia3" method: attached, save, load, method_config, merge_and_unload,
plain_weights. The layer surgery it shares with LoRA is minigpt.methods.surgery.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from .files import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PEFT_PREFIX, read_method_config, read_tensors, save_with
from .surgery import (
    GPT_NEO_TARGETS,
    WrappedLinear,
    adapter_target,
    arch_of,
    check_arch_targets,
    find_targets,
    layer_functions,
    loaded_layers,
    name_matches,
    set_module,
    split_targets,
    suffix_targets,
    wrapped_layers,
)
from .table import NAMES

__all__ = ["IA3Config", "IA3Linear", "add_ia3", "ia3_layers", "ia3_parameters", "merge_ia3", "unmerge_ia3",
           "remove_ia3", "merge_and_unload", "plain_weights", "save_adapter", "load_adapter", "attached", "save",
           "load", "method_config", "DEFAULT_TARGETS", "DEFAULT_FEEDFORWARD", "DEFAULTS", "KNOWN_TARGETS"]

DEFAULT_TARGETS = ("c_attn", "mlp.c_proj")
DEFAULT_FEEDFORWARD = ("mlp.c_proj",)
DEFAULTS = {"gpt2": (DEFAULT_TARGETS, DEFAULT_FEEDFORWARD),              # per arch: (targets, feedforward),
            "gpt_neo": (("q_proj", "v_proj", "mlp.c_proj"), ("mlp.c_proj",))}   # PEFT's (c_proj: the MLP's)
KNOWN_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head")


class IA3Linear(WrappedLinear):
    """An nn.Linear whose output (or, feedforward, input) is scaled by a learned vector `ia3_l`.

    base:        the nn.Linear; its Parameters are reused, so names and ties hold. Or a frozen
                 minigpt.model.quant.QuantLinear (kept as `quant`, run as is, never merged into).
    feedforward: scale the input (ia3_l (in,)) instead of the output (ia3_l (out,)).
    """

    adapter_method = "ia3"                   # what minigpt.methods.table.method_of reads
    adapter_title = NAMES["ia3"]
    kind, merge_what, api = "IA3", "IA3 scaling", "ia3"   # for minigpt.methods.surgery: messages, function names

    def __init__(self, base: nn.Linear, feedforward: bool = False):
        super().__init__(base)                  # weight, bias (or quant), merged, enabled
        self.feedforward = bool(feedforward)
        dtype = torch.float32 if self.quant is not None else self.weight.dtype
        n = self.in_features if self.feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(n, device=self._device, dtype=dtype))   # (in,) or (out,)
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            return self.base_forward(x)
        if self.feedforward:
            return self.base_forward((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))   # (..., in) scaled
        y = self.base_forward(x)                                                  # (..., out)
        return (y * self.ia3_l).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the scaling into W (and b for output scaling); forward then runs the plain layer."""
        self.check_merge()
        self._scale(self.ia3_l.detach().float())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the scaling out again (exact up to rounding; refused where a scale is zero)."""
        self.check_merge(merge=False)
        l = self.ia3_l.detach().float()
        if bool((l == 0).any()):
            raise ConfigError("cannot unmerge an IA3 layer with zero scales: the merged weights lost those rows")
        self._scale(1.0 / l)
        self.merged = False

    def scaled(self, s: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) in float32 with the vector `s` folded in: columns for a feedforward layer
        (its input), rows and bias otherwise (its output); the layer itself is unchanged."""
        w = self.weight.detach().float()                                          # (out, in)
        w = w * (s[None, :] if self.feedforward else s[:, None])
        b = None if self.bias is None else self.bias.detach().float()
        return w, (b if self.feedforward or b is None else b * s)

    def weights(self, merged: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) in float32 with the scaling folded in (merged) or out (the base)."""
        if merged == self.merged:
            return self.weight.detach().float(), None if self.bias is None else self.bias.detach().float()
        l = self.ia3_l.detach().float()
        return self.scaled(l if merged else 1.0 / l)

    def _scale(self, s: torch.Tensor) -> None:
        w, b = self.scaled(s)
        self.weight.data = w.to(self.weight.dtype)
        if b is not None:
            self.bias.data = b.to(self.bias.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"feedforward={self.feedforward}, merged={self.merged}")


# --- config and applying ----------------------------------------------------------------------

@dataclass
class IA3Config:
    """IA3 settings, validated. targets: module-name suffixes (dot boundary, like LoRA's);
    feedforward: those of them scaled at their input; each must name (a narrowing of) a target.
    None: the model's default (DEFAULTS), GPT-2's until `apply` meets a GPT-Neo."""

    targets: Optional[tuple[str, ...]] = None
    feedforward: Optional[tuple[str, ...]] = None
    model_default: tuple[bool, bool] = field(default=(False, False), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.model_default = (self.targets is None, self.feedforward is None)
        self.targets = split_targets(DEFAULT_TARGETS if self.targets is None else self.targets)
        self.feedforward = split_targets(DEFAULT_FEEDFORWARD if self.feedforward is None else self.feedforward)
        if not self.targets:
            raise ConfigError("IA3 targets must name at least one module")
        bad = [f for f in self.feedforward if not any(name_matches(f, t) for t in self.targets)]
        if bad:
            raise ConfigError(f"IA3 feedforward module(s) {bad} are not among the targets {list(self.targets)}")

    @property
    def method(self) -> str:
        return "ia3"

    def to_dict(self) -> dict:
        return {"targets": list(self.targets), "feedforward": list(self.feedforward)}

    def apply(self, model: nn.Module) -> nn.Module:
        """add_ia3 with these settings (freezes the rest of the model). Defaults become the model's
        own (GPT-Neo: q_proj, v_proj, mlp.c_proj), recorded in `targets` / `feedforward`."""
        targets, feedforward = DEFAULTS[arch_of(model)]
        if self.model_default[0]:
            self.targets = targets
        if self.model_default[1]:
            self.feedforward = feedforward
        return add_ia3(model, targets=self.targets, feedforward=self.feedforward)

    def describe(self) -> str:
        """One line, e.g. "IA3 on c_attn, mlp.c_proj (inputs of mlp.c_proj)"."""
        ff = f" (inputs of {', '.join(self.feedforward)})" if self.feedforward else ""
        return f"IA3 on {', '.join(self.targets)}{ff}"


def method_config(method: str = "ia3", **kw) -> IA3Config:
    """minigpt.methods's entry: IA3Config from targets, feedforward (None = default)."""
    if method != "ia3":
        raise ConfigError(f"minigpt.methods.ia3 provides ia3, not {method!r}")
    unknown = sorted(set(kw) - {"targets", "feedforward"})
    if unknown:
        raise ConfigError(f"IA3 has no setting {', '.join(unknown)} (it takes targets, feedforward)")
    return IA3Config(**{k: v for k, v in kw.items() if v is not None})


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """{module name: IA3Linear} for every IA3 layer in the model."""
    return wrapped_layers(model, IA3Linear)


def ia3_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The IA3 vectors (what an optimizer should get)."""
    return [m.ia3_l for m in ia3_layers(model).values()]


def attached(model: nn.Module) -> Optional[str]:
    """minigpt.methods's probe: "ia3" when the model has IA3 layers, else None."""
    return "ia3" if ia3_layers(model) else None


def add_ia3(model: nn.Module, targets: Optional[Iterable[str]] = None,
            feedforward: Optional[Iterable[str]] = None, freeze: bool = True) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in an IA3Linear (feedforward ones scale
    their input); with `freeze`, everything else is frozen. Returns the model (in place).
    None: the model's default targets / feedforward modules (DEFAULTS)."""
    arch = arch_of(model)
    check_arch_targets(model, split_targets(targets or ()), "IA3")
    cfg = IA3Config(DEFAULTS[arch][0] if targets is None else targets,
                    DEFAULTS[arch][1] if feedforward is None else feedforward)
    found = find_targets(model, cfg.targets, IA3Linear, "IA3", KNOWN_TARGETS if arch == "gpt2" else GPT_NEO_TARGETS)
    ff = {n for n in found if any(name_matches(n, f) for f in cfg.feedforward)}
    unused = [f for f in cfg.feedforward if not any(name_matches(n, f) for n in found)]
    if unused:
        raise ConfigError(f"IA3 feedforward module(s) {unused} match no targeted module")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in found:
        set_module(model, name, IA3Linear(model.get_submodule(name), feedforward=name in ff))
    return model


# merge_ia3, unmerge_ia3, remove_ia3(model, merge=True), merge_and_unload (= remove_ia3 merging):
# every IA3 layer at once; merging is refused for the tied lm_head
merge_ia3, unmerge_ia3, remove_ia3, merge_and_unload = layer_functions(IA3Linear)


def plain_weights(model: nn.Module, sd: dict[str, torch.Tensor], merge: bool) -> None:
    """In a copy `sd` of the model's state dict: the ia3_l vectors dropped and each scaled layer's
    weight (and bias) replaced by its float32 value with the scaling folded in (merge) or out."""
    for name, m in ia3_layers(model).items():
        sd.pop(f"{name}.ia3_l")
        sd[f"{name}.weight"], bias = m.weights(merged=merge)
        if bias is not None:
            sd[f"{name}.bias"] = bias


# --- adapter folders (minigpt.methods's protocol) -----------------------------------------------

def save(model: nn.Module, base_model_name_or_path: Optional[str] = None
         ) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(adapter_config.json dict, PEFT-keyed tensors, metadata) of the model's IA3 layers."""
    layers = ia3_layers(model)
    if not layers:
        raise ConfigError("model has no IA3 layers to save (apply IA3Config() or load_adapter first)")
    if any(m.merged for m in layers.values()):
        raise ConfigError("unmerge the IA3 layers (unmerge_ia3) before saving the adapter")
    ff = {n for n, m in layers.items() if m.feedforward}
    ff_targets = suffix_targets(model, ff, avoid=[n for n in layers if n not in ff])
    targets = suffix_targets(model, set(layers) - ff) + ff_targets
    config = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "inference_mode": True, "target_modules": targets,
              "feedforward_modules": ff_targets, "exclude_modules": None,
              "fan_in_fan_out": arch_of(model) == "gpt2",   # GPT-2's HF layers are Conv1D, GPT-Neo's Linear
              "init_ia3_weights": True, "modules_to_save": None}
    tensors = {f"{PEFT_PREFIX}{n}.ia3_l": m.ia3_l.detach().view((1, -1) if m.feedforward else (-1, 1))
               for n, m in layers.items()}                     # (1, in) feedforward, (out, 1) otherwise
    return config, tensors, {}


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's IA3 layout; returns the dir."""
    return save_with(save, model, out_dir, base_model_name_or_path)


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.ia3_l(?:\.(?P<adapter>[^.]+))?$")


def _is_feedforward(cfg: dict, name: str) -> bool:
    """PEFT's rule: feedforward_modules as a regex (full match) or a list of plain name endings."""
    ff = cfg.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(f) for f in ff)


def _parse(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """{module: ia3_l tensor} from PEFT-style keys (prefix and `.default` adapter name optional)."""
    mods, adapters = {}, set()
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise AdapterError(f"{where}: unsupported adapter tensor {key!r} (IA3 adapters hold ia3_l vectors)")
        adapters.add(m["adapter"])
        mods[m["module"]] = t
    if len(adapters) > 1:
        raise AdapterError(f"{where}: several adapters in one file ({sorted(a or '' for a in adapters)})")
    if not mods:
        raise AdapterError(f"{where}: no ia3_l tensors found")
    return mods


def _layer_plan(model: nn.Module, name: str, t: torch.Tensor, ff: bool) -> tuple:
    """Check one module against the model; (name, module, vector, feedforward)."""
    mod = adapter_target(model, name, f"{PEFT_PREFIX}{name}.ia3_l", IA3Linear)
    n = mod.in_features if ff else mod.out_features
    want = [(1, n), (n,)] if ff else [(n, 1), (n,)]
    if tuple(t.shape) not in want:
        kind = "feedforward (input scaling)" if ff else "output scaling"
        raise AdapterError(f"shape mismatch for {PEFT_PREFIX}{name}.ia3_l: adapter has {tuple(t.shape)}, the model's "
                           f"{kind} layer expects {want[0]} (adapter for another base model, or feedforward_modules "
                           "does not fit?)")
    if isinstance(mod, IA3Linear) and mod.feedforward != ff:
        raise AdapterError(f"{name}: the model's IA3 layer scales its {'input' if mod.feedforward else 'output'}, "
                           f"the adapter's its {'input' if ff else 'output'}")
    return name, mod, t.reshape(-1), ff


def load(model: nn.Module, adapter_dir, cfg: dict, tensors: dict[str, torch.Tensor], meta: dict[str, str],
         freeze: bool = True) -> nn.Module:
    """minigpt.methods's entry: put a read IA3 adapter into `model` (in place; returned). On a plain
    model the layers are added (with `freeze`, the rest frozen); a model that already has IA3 layers
    must have the same set, and their vectors are copied in place (optimizer references stay valid).
    Everything is checked before the model is touched."""
    d = Path(adapter_dir)
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{d / ADAPTER_CONFIG_NAME}: modules_to_save={cfg['modules_to_save']!r} is not supported")
    mods = _parse(tensors, str(d / ADAPTER_WEIGHTS_NAME))
    existing = loaded_layers(model, IA3Linear, mods, "before loading an adapter")
    plan = [_layer_plan(model, name, t, _is_feedforward(cfg, name)) for name, t in sorted(mods.items())]
    if freeze and not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, mod, t, ff in plan:
        if not isinstance(mod, IA3Linear):
            mod = IA3Linear(mod, feedforward=ff)
            set_module(model, name, mod)
        with torch.no_grad():
            mod.ia3_l.copy_(t)
    return model


def load_adapter(model: nn.Module, adapter_dir, freeze: bool = True) -> nn.Module:
    """Load a minigpt- or PEFT-written IA3 adapter folder into `model` (see `load`); a folder of
    another method is refused naming both."""
    d, cfg = read_method_config(adapter_dir, ("ia3",))
    tensors, meta = read_tensors(d)
    return load(model, d, cfg, tensors, meta, freeze=freeze)
