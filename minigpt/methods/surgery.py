"""Module surgery that LoRA/DoRA and IA3 share: find the linear layers a method targets, wrap them,
merge the wrappers into their weights and back, unwrap them, and count parameters.

    find_targets(model, ("c_attn", "mlp.c_proj"), IA3Linear, "IA3", known)   # names, checked
    set_module(model, "transformer.h.0.attn.c_attn", wrapper)                # put a module there
    merge_layers / unmerge_layers / remove_layers(model, IA3Linear)          # every such layer at once
    merge_ia3, unmerge_ia3, remove_ia3, merge_and_unload = layer_functions(IA3Linear)   # a method's names

Targets match module names by suffix on a dot boundary (`name_matches`), as PEFT matches a list
of names. A GPT-Neo (config.arch "gpt_neo") has q_proj, k_proj, v_proj, out_proj in place of GPT-2's
fused c_attn and attn.c_proj (`arch_of`, `check_arch_targets`; its MLP is c_fc, c_proj as GPT-2's).
`WrappedLinear` is the part of a wrapper layer that stands in for the nn.Linear: it holds
the base layer's `weight` / `bias` Parameters themselves (state-dict names and the lm_head/wte tie
kept) or, on a quantized base, the frozen QuantLinear as `quant`.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from ..model.linear import Linear, linear
from ..model.quant import QuantLinear

__all__ = ["WrappedLinear", "GPT_NEO_TARGETS", "arch_of", "check_arch_targets",
           "name_matches", "split_targets", "set_module", "find_targets", "suffix_targets",
           "is_tied", "adapter_target", "loaded_layers", "wrapped_layers", "merge_layers", "unmerge_layers",
           "remove_layers", "layer_functions", "count_parameters"]


class WrappedLinear(nn.Module):
    """The nn.Linear inside a wrapper layer (LoRALinear, IA3Linear): `weight` / `bias` are the base
    layer's Parameters (not copies), or `quant` is the base's QuantLinear (then `weight` is None).
    Subclasses add their own parameters and `merge` / `unmerge`, and name themselves: kind (the
    layer, in messages), merge_what (what merging folds in), api (their functions' suffix: "lora"
    for merge_lora, unmerge_lora, remove_lora)."""

    kind = merge_what = api = "adapter"

    def __init__(self, base: nn.Module):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quant = base if isinstance(base, QuantLinear) else None
        self.weight = None if self.quant is not None else base.weight   # (out, in), same Parameter
        self.bias = base.bias                                           # (out,) or None
        self.merged = False
        self.enabled = True

    @property
    def _device(self) -> torch.device:
        return self.quant.codes.device if self.quant is not None else self.weight.device

    def check_merge(self, merge: bool = True) -> None:
        """Refuse merging a merged layer (or unmerging an unmerged one), and merging into a quantized base."""
        if merge == self.merged:
            raise RuntimeError(f"{self.kind} layer is {'already' if merge else 'not'} merged")
        if merge and self.quant is not None:
            raise ConfigError(f"cannot merge {self.kind} into a quantized (nf4/int8) base: load the base in full "
                              "precision, load the adapter there and merge")

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone: (..., in) -> (..., out)."""
        return self.quant(x) if self.quant is not None else linear(x, self.weight, self.bias)

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear sharing this layer's weight/bias Parameters (the wrapper's own part
        dropped); the QuantLinear itself for a quantized base."""
        if self.quant is not None:
            return self.quant
        lin = Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


GPT_NEO_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
_GPT2_ATTENTION = ("c_attn", "attn.c_attn", "attn.c_proj", "q", "k", "v")     # fused c_attn, its slices, its output


def arch_of(model: nn.Module) -> str:
    """"gpt2" or "gpt_neo": the architecture of a minigpt GPT (its config.arch)."""
    return getattr(getattr(model, "config", None), "arch", "gpt2")


def check_arch_targets(model: nn.Module, targets: Sequence[str], what: str) -> None:
    """On a GPT-Neo, refuse GPT-2's attention targets (c_attn, its q/k/v slices, attn.c_proj) in one
    line that names GPT-Neo's modules."""
    if arch_of(model) != "gpt_neo":
        return
    bad = [t for t in targets if t in _GPT2_ATTENTION]
    if bad:
        raise ConfigError(f"{what} target(s) {', '.join(bad)} are GPT-2's fused attention, which GPT-Neo does not "
                          "have; GPT-Neo's modules are q_proj, k_proj, v_proj, out_proj (attention) and c_fc, "
                          "c_proj (MLP)")


def name_matches(name: str, target: str) -> bool:
    """True when module `name` is `target` or ends with "." + target."""
    return name == target or name.endswith("." + target)


def split_targets(targets) -> tuple[str, ...]:
    """Module-name targets from a string ("a,b c") or a sequence of such strings."""
    items = [targets] if isinstance(targets, str) else list(targets)
    return tuple(t for item in items for t in re.split(r"[,\s]+", item) if t)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `model` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_targets(model: nn.Module, names: Sequence[str], wrapper: type, what: str,
                 known: Sequence[str]) -> list[str]:
    """Names of the modules matched (by dotted suffix) by `names`: each must be an nn.Linear (or a
    QuantLinear) not yet wrapped in `wrapper`, and every target must match one (ConfigError; the
    message lists the `known` targets)."""
    found: list[str] = []
    matched: set[str] = set()
    for name, mod in model.named_modules():
        hits = [t for t in names if name_matches(name, t)]
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


def suffix_targets(model: nn.Module, chosen, avoid: Sequence[str] = ()) -> list[str]:
    """target_modules for an adapter config: the shortest dotted suffix of each chosen module name
    that selects (dot boundary) only chosen modules among all of the model's, which is what PEFT will
    match on load, and that no name in `avoid` ends with (PEFT matches IA3's feedforward_modules by
    plain str.endswith)."""
    chosen = set(chosen)
    all_names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for name in sorted(chosen):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            t = ".".join(parts[-k:])
            if (all(n in chosen for n in all_names if name_matches(n, t))
                    and not any(a.endswith(t) for a in avoid)):
                break
        if t not in out:
            out.append(t)
    return out


def adapter_target(model: nn.Module, name: str, key: str, wrapper: type) -> nn.Module:
    """The module `name` an adapter's tensor `key` is for: a linear layer, plain or already in a
    `wrapper`; AdapterError (naming the key) when the model has no such module or another kind."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"adapter targets {name!r}, which this model does not have (key {key})") from None
    if not isinstance(mod, (nn.Linear, QuantLinear, wrapper)):
        raise AdapterError(f"adapter targets {name!r}, a {type(mod).__name__}, not a linear layer")
    return mod


def loaded_layers(model: nn.Module, cls: type, names, when: str) -> dict[str, nn.Module]:
    """The model's `cls` layers before an adapter for the modules `names` is loaded into it: none,
    or exactly those and unmerged (AdapterError otherwise; `when` ends the unmerge hint)."""
    existing = wrapped_layers(model, cls)
    if any(m.merged for m in existing.values()):
        raise AdapterError(f"model has merged {cls.kind} layers; unmerge_{cls.api}(model) {when}")
    if existing and set(existing) != set(names):
        raise AdapterError(f"model already has {cls.kind} layers {sorted(existing)[:3]}... that differ from the "
                           f"adapter's {sorted(names)[:3]}...; load it into a plain model instead")
    return existing


def is_tied(model: nn.Module, layer: nn.Module) -> bool:
    """True when `layer`'s weight is the model's token embedding (the tied lm_head)."""
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    return wte is not None and getattr(layer, "weight", None) is wte.weight


def wrapped_layers(model: nn.Module, cls: type) -> dict[str, nn.Module]:
    """{module name: layer} for every `cls` layer (e.g. LoRALinear) in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def merge_layers(model: nn.Module, cls: type) -> nn.Module:
    """Merge every unmerged `cls` layer (LoRA, DoRA, IA3) into its weight; refused for a layer on
    the tied lm_head (merging would change the input embeddings too)."""
    layers = wrapped_layers(model, cls)
    for name, m in layers.items():
        if not m.merged and is_tied(model, m):
            raise ConfigError(f"{name} shares its weight with transformer.wte; merging its {cls.merge_what} would "
                              "change the input embeddings too. Keep it as an adapter, or drop it with "
                              f"remove_{cls.api}(model, merge=False)")
    for m in layers.values():
        if not m.merged:
            m.merge()
    return model


def unmerge_layers(model: nn.Module, cls: type) -> nn.Module:
    """Take every merged `cls` layer's update out of its weight again."""
    for m in wrapped_layers(model, cls).values():
        if m.merged:
            m.unmerge()
    return model


def remove_layers(model: nn.Module, cls: type, merge: bool) -> nn.Module:
    """Replace each `cls` layer by a plain nn.Linear sharing its Parameters (merged first when
    `merge`, else each update dropped); every parameter trainable again, the tie intact."""
    layers = wrapped_layers(model, cls)
    if merge:
        merge_layers(model, cls)
    for name, m in layers.items():
        if not merge and m.merged:
            m.unmerge()
        set_module(model, name, m.to_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def layer_functions(cls: type):
    """(merge_X, unmerge_X, remove_X, merge_and_unload) for the `cls` layers (X = cls.api): the
    functions minigpt.methods.lora and .ia3 offer, each acting on every such layer of a model."""
    kind, x = cls.kind, cls.api

    def merge(model: nn.Module) -> nn.Module:
        return merge_layers(model, cls)

    def unmerge(model: nn.Module) -> nn.Module:
        return unmerge_layers(model, cls)

    def remove(model: nn.Module, merge: bool = True) -> nn.Module:
        return remove_layers(model, cls, merge)

    def merge_and_unload(model: nn.Module) -> nn.Module:
        return remove_layers(model, cls, True)

    docs = {f"merge_{x}": f"Fold every (unmerged) {kind} update into its layer's weight (refused for the tied "
                          f"lm_head). Undo with unmerge_{x}.",
            f"unmerge_{x}": f"Take every merged {kind} update out of its layer's weight again.",
            f"remove_{x}": f"Replace every {cls.__name__} by a plain nn.Linear (merging the update first when "
                           f"`merge`).\n\nThe returned model has exactly a plain GPT's state-dict keys, the "
                           f"lm_head/wte tie intact, and every parameter trainable again. With merge=False the "
                           f"{kind} updates are discarded (and a merged layer is unmerged first).",
            "merge_and_unload": f"PEFT's name for remove_{x}(model, merge=True): a plain GPT again."}
    fns = (merge, unmerge, remove, merge_and_unload)
    for fn, (name, doc) in zip(fns, docs.items()):
        fn.__name__, fn.__qualname__, fn.__doc__ = name, name, doc
    return fns


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) Parameters count once."""
    ps = list(model.parameters())    # nn.Module.parameters() already de-duplicates tied tensors
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)
