"""The fine-tuning methods, once: one record per method, everything else derives from it.

    TABLE["ia3"].title            "IA3"              what messages call it
    TABLE["ia3"].peft_type        "IA3"              adapter_config.json's peft_type
    TABLE["ia3"].module           "ia3"              the module under minigpt.methods that implements it
    TABLE["ia3"].mergeable        True               folds into GPT-2's weights (merge_and_unload)
    TABLE["ia3"].quantizable      True               trains on a quantized (nf4/int8) base
    TABLE["ia3"].flags            ("ia3_targets", ...)   its `minigpt finetune` options
    TABLE["ia3"].lr, .small_base_lr                  default peak learning rates (see default_lr)

The method on a model is read from its modules: every method's layer or module class carries
`adapter_method` (the name here) and `adapter_title` (the title), so neither this module nor
minigpt.model.quant has to import the method modules to recognise them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from ..errors import AdapterError, ConfigError

__all__ = ["Method", "TABLE", "METHODS", "MERGEABLE", "QUANTIZABLE", "NAMES", "PEFT_TYPES", "FULL_FINETUNE_LR",
           "SMALL_BASE_PARAMS", "default_lr", "implementation", "method_of"]

_LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora")


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. lr: default peak learning rate on a pretrained base of at least
    SMALL_BASE_PARAMS parameters; small_base_lr: on a smaller one (e.g. train.py's 7M model)."""

    name: str
    title: str
    peft_type: str
    module: str
    mergeable: bool
    quantizable: bool
    flags: tuple[str, ...]
    lr: float
    small_base_lr: float


# Learning rates: lora 2e-4 is the seed-000 recipe, the others the usual rates for these methods;
# small bases need larger steps (measured: benchmarks/finetune_lr.py -> results/finetune_lr.json).
TABLE: dict[str, Method] = {m.name: m for m in (
    Method("lora", "LoRA", "LORA", "lora", True, True, _LORA_FLAGS, 2e-4, 3e-3),
    Method("dora", "DoRA", "LORA", "lora", True, False, _LORA_FLAGS, 2e-4, 3e-3),
    Method("ia3", "IA3", "IA3", "ia3", True, True, ("ia3_targets", "ia3_feedforward"), 3e-3, 3e-1),
    Method("prefix", "prefix-tuning", "PREFIX_TUNING", "prefix_tuning", False, True,
           ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size"), 1e-2, 3e-1),
    Method("prompt", "prompt-tuning", "PROMPT_TUNING", "prefix_tuning", False, True,
           ("num_virtual_tokens", "prompt_init", "prompt_init_text"), 3e-2, 1e-1),
    Method("adapter", "bottleneck-adapter", "BOTTLENECK", "adapter", False, True,
           ("adapter_size", "adapter_placement", "adapter_nonlinearity"), 1e-3, 3e-3),
)}

METHODS = tuple(TABLE)
MERGEABLE = tuple(m.name for m in TABLE.values() if m.mergeable)
QUANTIZABLE = tuple(m.name for m in TABLE.values() if m.quantizable)
NAMES = {m.name: m.title for m in TABLE.values()}
PEFT_TYPES = {m.name: m.peft_type for m in TABLE.values()}
FULL_FINETUNE_LR = 2e-4              # full fine-tuning (no method), on any base
SMALL_BASE_PARAMS = 100_000_000      # bases below this many parameters get small_base_lr


def default_lr(method: Optional[str], n_params: int) -> float:
    """The default peak learning rate of `method` (None: full fine-tuning) on a base of n_params."""
    if method is None:
        return FULL_FINETUNE_LR
    return TABLE[method].small_base_lr if n_params < SMALL_BASE_PARAMS else TABLE[method].lr


def implementation(method: str):
    """The module that implements `method` (imported on first use; the table only names it)."""
    if method not in TABLE:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__package__}.{TABLE[method].module}")


def method_of(model: nn.Module) -> Optional[str]:
    """The parameter-efficient method attached to `model`, or None for a plain model (LoRA and DoRA
    layers together count as DoRA); several methods at once: AdapterError."""
    on = {m.adapter_method for m in model.modules() if hasattr(m, "adapter_method")}
    if "dora" in on:
        on.discard("lora")
    found = [name for name in METHODS if name in on]
    if len(found) > 1:
        raise AdapterError(f"model carries several methods at once ({', '.join(found)}); minigpt saves one")
    return found[0] if found else None
