"""Parameter-efficient fine-tuning: one front door for every method minigpt has.

    method   module               on disk: adapter_config.json "peft_type"
    lora     minigpt.methods.lora         LORA                     (PEFT layout)
    dora     minigpt.methods.lora         LORA with use_dora=true  (PEFT layout)
    ia3      minigpt.methods.ia3          IA3                      (PEFT layout)
    prefix   minigpt.methods.prefix_tuning      PREFIX_TUNING            (PEFT layout)
    prompt   minigpt.methods.prefix_tuning      PROMPT_TUNING            (PEFT layout)
    adapter  minigpt.methods.adapter   BOTTLENECK               (minigpt's own, same two files)

    cfg = method_config("ia3")              # or IA3Config(...), LoRAConfig(use_dora=True), ...
    cfg.apply(model)                        # adds the method's layers, freezes the rest
    save_adapter(model, "out")              # adapter_config.json + adapter_model.safetensors
    load_adapter(plain_model, "out")        # any method, chosen by adapter_config.json
    merge_and_unload(model)                 # lora, dora, ia3: a plain GPT again; others: AdapterError

Every method module provides the same functions, which this module dispatches to:
    attached(model) -> Optional[str]            the method on the model (None when none)
    save(model, base_model_name_or_path) -> (adapter_config dict, tensors, safetensors metadata)
    load(model, adapter_dir, config dict, tensors, metadata, freeze) -> model  (in place)
    merge_and_unload(model) -> model            (mergeable methods only)
Shared here: the method table, reading/writing the two files (atomic, one-line errors), counts.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from ..fileio import atomic_write

__all__ = ["METHODS", "MERGEABLE", "PEFT_TYPES", "method_config", "method_of", "adapter_method",
           "save_adapter", "load_adapter", "merge_and_unload", "count_parameters",
           "read_config", "read_tensors", "write_adapter", "PEFT_PREFIX",
           "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"         # older PEFT releases; read only
PEFT_PREFIX = "base_model.model."

METHODS = ("lora", "dora", "ia3", "prefix", "prompt", "adapter")
MERGEABLE = ("lora", "dora", "ia3")
PEFT_TYPES = {"lora": "LORA", "dora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING",
              "prompt": "PROMPT_TUNING", "adapter": "BOTTLENECK"}
NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3", "prefix": "prefix-tuning", "prompt": "prompt-tuning",
         "adapter": "bottleneck-adapter"}
_MODULES = {"lora": "lora", "dora": "lora", "ia3": "ia3", "prefix": "prefix_tuning", "prompt": "prefix_tuning",
            "adapter": "adapter"}


def _impl(method: str):
    if method not in _MODULES:
        raise ConfigError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f".{_MODULES[method]}", __package__)


def method_config(method: str, **kw):
    """The method's config object (defaults + kw), validated; `.apply(model)` attaches it."""
    return _impl(method).method_config(method, **kw)


def method_of(model: nn.Module) -> Optional[str]:
    """The parameter-efficient method attached to `model`, or None for a plain model."""
    found = []
    for module in dict.fromkeys(_MODULES.values()):
        name = importlib.import_module(f".{module}", __package__).attached(model)
        if name is not None:
            found.append(name)
    if len(found) > 1:
        raise AdapterError(f"model carries several methods at once ({', '.join(found)}); minigpt saves one")
    return found[0] if found else None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) Parameters count once."""
    ps = list(model.parameters())    # nn.Module.parameters() already de-duplicates tied tensors
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


# --- the two files --------------------------------------------------------------------------

def read_config(adapter_dir) -> dict:
    """adapter_config.json of an adapter folder as a dict (missing folder/file, bad JSON: one line)."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {str(d)!r} does not exist")
    path = d / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an adapter directory "
                                f"(expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    return cfg


def adapter_method(adapter_dir, cfg: Optional[dict] = None) -> str:
    """The method an adapter folder holds, from its adapter_config.json."""
    cfg = read_config(adapter_dir) if cfg is None else cfg
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type == "LORA":
        return "dora" if cfg.get("use_dora") else "lora"
    for method, t in PEFT_TYPES.items():
        if t == peft_type:
            return method
    raise AdapterError(f"{Path(adapter_dir) / ADAPTER_CONFIG_NAME}: peft_type {peft_type!r} is not supported "
                       f"(minigpt reads {', '.join(sorted(set(PEFT_TYPES.values())))})")


def read_tensors(adapter_dir) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of an adapter folder; .bin (older PEFT) read weights-only."""
    d = Path(adapter_dir)
    st, bin_ = d / ADAPTER_WEIGHTS_NAME, d / ADAPTER_BIN_NAME
    if st.is_file():
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(st), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AdapterError(f"{st}: unreadable adapter weights (truncated or corrupted?): {msg}") from e
    if bin_.is_file():
        from ..errors import CheckpointError
        from ..weights.checkpoint import read_tensors as read_bin
        try:                                 # weights_only loading; refuses pickled code
            return read_bin(bin_), {}
        except CheckpointError as e:
            raise AdapterError(str(e)) from e
    raise FileNotFoundError(f"{st} not found: adapter directory has no weights "
                            f"({ADAPTER_WEIGHTS_NAME} or {ADAPTER_BIN_NAME})")


def write_adapter(out_dir, config: dict, tensors: dict[str, torch.Tensor],
                  metadata: Optional[dict[str, str]] = None) -> Path:
    """Write adapter_model.safetensors, then adapter_config.json, each atomically; returns the folder."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    atomic_write(out / ADAPTER_WEIGHTS_NAME,
                 lambda p: save_file(tensors, p, metadata={"format": "pt", **(metadata or {})}))

    def write_json(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(out / ADAPTER_CONFIG_NAME, write_json)
    return out


def base_name(model: nn.Module, given: Optional[str]) -> Optional[str]:
    """base_model_name_or_path to record: `given`, else the model config's preset name."""
    if given is not None:
        return given
    name = getattr(getattr(model, "config", None), "name", None)
    return name if name and name != "custom" else None


# --- the generic entry points ---------------------------------------------------------------

def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the attached method's adapter folder (PEFT's layout where PEFT has the method)."""
    method = method_of(model)
    if method is None:
        raise ConfigError("model has no adapter to save (attach a method, e.g. method_config('lora').apply(model))")
    config, tensors, meta = _impl(method).save(model, base_name(model, base_model_name_or_path))
    return write_adapter(out_dir, config, tensors, meta)


def load_adapter(model: nn.Module, adapter_dir, method: Optional[str] = None, freeze: bool = True) -> nn.Module:
    """Load any method's adapter folder (minigpt- or PEFT-written) into `model`, in place.

    On a plain model the method's layers are added first (and, with `freeze`, the rest frozen); a
    model that already carries the same method gets its values overwritten (exact resume).
    method: what the caller expects; an adapter of another method is refused naming both."""
    d = Path(adapter_dir)
    cfg = read_config(d)
    found = adapter_method(d, cfg)
    if method is not None and found != method:
        raise AdapterError(f"{d} holds a {NAMES[found]} adapter ({found}), not {NAMES.get(method, method)} "
                           f"({method})")
    on_model = method_of(model)
    if on_model is not None and on_model != found:
        raise AdapterError(f"model already carries {NAMES[on_model]} ({on_model}); cannot load the "
                           f"{NAMES[found]} adapter of {d} into it (load it into a plain model)")
    tensors, meta = read_tensors(d)
    return _impl(found).load(model, d, cfg, tensors, meta, freeze=freeze)


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
    return _impl(method).merge_and_unload(model)
