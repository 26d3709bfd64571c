"""LoRA / DoRA adapter folders in PEFT's layout: minigpt.methods's "lora" and "dora" save and load.

On disk (readable by `peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`): adapter_config.json
(peft_type LORA, use_dora, r, lora_alpha, target_modules, ...) and adapter_model.safetensors with
keys `base_model.model.<module>.lora_A.weight` [r, in], `...lora_B.weight` [out, r] and, for DoRA,
`...lora_magnitude_vector` [out]. PEFT has no q/k/v slices of GPT-2's fused c_attn: such an adapter
is written as an ordinary c_attn adapter whose lora_B rows for the other slices are zero (PEFT
loads it with identical outputs), and the slice choice is kept in the safetensors metadata
(`minigpt_qkv`) so minigpt reads it back with the smaller shape. Reading accepts PEFT's variants
(with or without the base_model.model. prefix and the `.default` adapter name, rank_pattern /
alpha_pattern) and checks everything against the model before touching it. The two files
themselves are read and written by minigpt.methods.files.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from ..model.quant import QuantLinear
from .files import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    adapter_method,
    read_config,
    read_method_config,
    read_tensors,
    save_with,
)
from .files import load_adapter as load_any
from .lora_layer import LORA_METHODS, QKV, LoRALinear, attached, lora_layers
from .surgery import adapter_target, arch_of, loaded_layers, name_matches, set_module, suffix_targets

__all__ = ["save", "save_adapter", "read_adapter_config", "load", "load_adapter"]


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
        "target_modules": suffix_targets(model, layers), "exclude_modules": None,
        "fan_in_fan_out": arch_of(model) == "gpt2",   # GPT-2's HF layers are Conv1D (in, out), GPT-Neo's Linear
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
            meta["minigpt_qkv"] = "".join(c for c, on in zip(QKV, m.out_slices) if on)
    return config, tensors, meta


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout; returns the dir."""
    return save_with(save, model, out_dir, base_model_name_or_path)


def _check_config(cfg: dict, where: str) -> None:
    """What minigpt's LoRA does not do: bias training, LoRA biases, extra trained modules."""
    if cfg.get("lora_bias", False):
        raise AdapterError(f"{where}: lora_bias={cfg['lora_bias']!r} is not supported by minigpt")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save={cfg['modules_to_save']!r} is not supported")


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of a LoRA/DoRA adapter folder, checked for what minigpt supports."""
    d, cfg = read_method_config(adapter_dir, LORA_METHODS)
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
        if name_matches(module, key):
            return val
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return val
        except re.error:
            pass
    return default


def _layer_plan(model: nn.Module, name: str, ab: dict, cfg: dict, dora: bool, qkv_meta: Optional[str]) -> tuple:
    """Check one adapted module against the model; (name, module, tensors, r, alpha, slices)."""
    mod = adapter_target(model, name, f"{PEFT_PREFIX}{name}.lora_A.weight", LoRALinear)
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
    slices = tuple(c in qkv_meta for c in QKV) if qkv_meta and name_matches(name, "c_attn") else None
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
    existing = loaded_layers(model, LoRALinear, mods, "before load_adapter")
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
            set_module(model, name, mod)
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
    if adapter_method(d, read_config(d)) not in LORA_METHODS:
        return load_any(model, d, freeze=freeze)
    cfg = read_adapter_config(d)
    tensors, meta = read_tensors(d)
    return load(model, d, cfg, tensors, meta, freeze=freeze)
