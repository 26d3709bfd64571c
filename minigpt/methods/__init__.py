"""Parameter-efficient fine-tuning: one front door for every method minigpt has.

    method   module                          on disk: adapter_config.json "peft_type"
    lora     minigpt.methods.lora            LORA                     (PEFT layout)
    dora     minigpt.methods.lora            LORA with use_dora=true  (PEFT layout)
    ia3      minigpt.methods.ia3             IA3                      (PEFT layout)
    prefix   minigpt.methods.prefix_tuning   PREFIX_TUNING            (PEFT layout)
    prompt   minigpt.methods.prefix_tuning   PROMPT_TUNING            (PEFT layout)
    adapter  minigpt.methods.adapter         BOTTLENECK               (minigpt's own, same two files)

    cfg = method_config("ia3")              # or IA3Config(...), LoRAConfig(use_dora=True), ...
    cfg.apply(model)                        # adds the method's layers, freezes the rest
    save_adapter(model, "out")              # adapter_config.json + adapter_model.safetensors
    load_adapter(plain_model, "out")        # any method, chosen by adapter_config.json
    merge_and_unload(model)                 # lora, dora, ia3: a plain GPT again; others: AdapterError
    plain_state_dict(model)                 # GPT-2's parameters with the update folded in, model untouched

Every method module provides the same functions; this module dispatches to the one the method
table names (minigpt.methods.table.implementation):
    method_config(method, **kw) -> config object with .apply(model)
    save(model, base_model_name_or_path) -> (adapter_config dict, tensors, safetensors metadata)
    load(model, adapter_dir, config dict, tensors, metadata, freeze) -> model  (in place)
    attached(model) -> Optional[str]            whether the model carries the module's method
    merge_and_unload(model) -> model            (mergeable methods only)
    plain_weights(model, state dict, merge)     (mergeable methods only: edits the copy in place)
Which method a model carries (method_of) is read from its layers' `adapter_method` attribute.
Where things live: the method table (names, titles, PEFT types, flags, learning rates) and
method_of in .table; the two files, and loading any folder, in .files; the layer surgery LoRA and
IA3 share in .surgery. This module re-exports the methods' main public names.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from .adapter import AdapterConfig, BottleneckAdapter
from .files import (
    ADAPTER_BIN_NAME,
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PEFT_PREFIX,
    adapter_method,
    base_name,
    load_adapter,
    read_config,
    read_tensors,
    save_with,
    write_adapter,
)
from .ia3 import IA3Config, IA3Linear, add_ia3, merge_ia3, remove_ia3, unmerge_ia3
from .lora import LoRAConfig, LoRALinear, add_lora, merge_lora, remove_lora, unmerge_lora
from .prefix_tuning import PrefixConfig, PromptConfig
from .surgery import count_parameters
from .table import MERGEABLE, METHODS, NAMES, PEFT_TYPES, TABLE, implementation, method_of

__all__ = ["METHODS", "MERGEABLE", "NAMES", "PEFT_TYPES", "TABLE", "method_config", "method_of", "adapter_method",
           "save_adapter", "load_adapter", "merge_and_unload", "plain_state_dict", "count_parameters",
           "read_config", "read_tensors", "write_adapter", "base_name", "PEFT_PREFIX", "ADAPTER_CONFIG_NAME",
           "ADAPTER_WEIGHTS_NAME", "ADAPTER_BIN_NAME", "LoRAConfig", "LoRALinear", "add_lora", "merge_lora",
           "unmerge_lora", "remove_lora", "IA3Config", "IA3Linear", "add_ia3", "merge_ia3", "unmerge_ia3",
           "remove_ia3", "PrefixConfig", "PromptConfig", "AdapterConfig", "BottleneckAdapter", "adapters_disabled",
           "hold_frozen_matrices"]


def method_config(method: str, **kw):
    """The method's config object (defaults + kw), validated; `.apply(model)` attaches it."""
    return implementation(method).method_config(method, **kw)


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the attached method's adapter folder (PEFT's layout where PEFT has the method)."""
    method = method_of(model)
    if method is None:
        raise ConfigError("model has no adapter to save (attach a method, e.g. method_config('lora').apply(model))")
    return save_with(implementation(method).save, model, out_dir, base_model_name_or_path)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the attached method into the weights: a plain GPT again (lora, dora, ia3). Methods that
    add virtual tokens or modules cannot be merged: AdapterError, one line."""
    method = method_of(model)
    if method is None:
        return model
    if method not in MERGEABLE:
        raise AdapterError(f"{NAMES[method]} cannot be merged into the weights (it adds "
                           f"{'virtual tokens' if method in ('prefix', 'prompt') else 'modules'}); "
                           "keep the adapter folder and load it on its base")
    return implementation(method).merge_and_unload(model)


def plain_state_dict(model: nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """GPT-2's parameters of `model` (minigpt names), the model left unchanged: a LoRA, DoRA or IA3
    update folded into its weights (merge) or left out (merge=False: the base). Methods that add
    virtual tokens or modules have no such form (ConfigError); neither has a LoRA on the tied head
    with merge (it would change the token embeddings too)."""
    method = method_of(model)
    if method is not None and method not in MERGEABLE:
        raise ConfigError(f"a {NAMES[method]} model adds virtual tokens or modules that llama.cpp cannot apply "
                          "and that do not merge into GPT-2's weights; GGUF export needs a full fine-tune or "
                          "a LoRA, DoRA or IA3 adapter")
    sd = dict(model.state_dict())
    if method is not None:
        implementation(method).plain_weights(model, sd, merge)
    return sd


def hold_frozen_matrices(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weight matrices of a base under a parameter-efficient method (2-D, not the
    embeddings, so not the tied head) in `dtype`; returns how many. Under autocast to `dtype` the
    same values reach every matmul as from fp32 weights (autocast casts them to exactly these each
    step), without the per-step casts and with half their memory; run such a model under autocast."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.dim() == 2 and p.is_floating_point() and id(p) not in embeddings:
                p.data, n = p.data.to(dtype), n + 1
    return n


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Context manager: run `model` as its base, whatever method it carries: LoRA, DoRA and IA3
    layers skip their update, bottleneck adapters and virtual tokens (prefix, prompt tuning) are
    taken off, and all is put back on exit. A plain model runs as it is. Merged layers cannot be
    switched off (ConfigError: unmerge first). What DPO's reference pass uses (no second copy)."""
    layers = [m for m in model.modules() if hasattr(m, "adapter_method") and hasattr(m, "enabled")]
    if any(getattr(m, "merged", False) for m in layers):
        raise ConfigError("cannot switch off merged adapter layers; unmerge them first")
    slots = [(b, name) for b in model.modules() for name in ("attn_adapter", "mlp_adapter")
             if getattr(b, name, None) is not None]
    if getattr(model, "kv_prefix", None) is not None:
        slots.append((model, "kv_prefix"))
    saved_flags, saved_mods = [m.enabled for m in layers], [getattr(o, n) for o, n in slots]
    for m in layers:
        m.enabled = False
    for o, n in slots:
        setattr(o, n, None)
    try:
        yield model
    finally:
        for m, e in zip(layers, saved_flags):
            m.enabled = e
        for (o, n), mod in zip(slots, saved_mods):
            setattr(o, n, mod)
