"""An adapter folder's two files, for every method: adapter_config.json and adapter_model.safetensors.

    cfg = read_config(d)                     # the JSON as a dict (one-line errors)
    adapter_method(d, cfg)                   # "lora", "dora", "ia3", ... from its peft_type
    tensors, meta = read_tensors(d)          # safetensors (or an older PEFT .bin, weights-only)
    write_adapter(d, cfg, tensors, meta)     # both files, each written atomically
    load_adapter(model, d)                   # any method's folder into `model` (minigpt.methods's entry)
    save_with(ia3.save, model, d)            # a method module's save, written (its save_adapter)
    read_method_config(d, ("ia3",))          # (folder, config) of a folder that must hold that method

Keys of PEFT-layout tensors start with PEFT_PREFIX ("base_model.model."). The method modules build
and parse the contents; this module only moves them to and from disk and hands a read folder to
the method it holds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import AdapterError
from ..fileio import atomic_write
from .table import NAMES, PEFT_TYPES, implementation, method_of

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "ADAPTER_BIN_NAME", "PEFT_PREFIX", "read_config",
           "adapter_method", "read_tensors", "write_adapter", "base_name", "load_adapter", "save_with",
           "read_method_config"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"         # older PEFT releases; read only
PEFT_PREFIX = "base_model.model."


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


def save_with(save, model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter folder a method module's `save(model, base name)` describes; returns it."""
    return write_adapter(out_dir, *save(model, base_name(model, base_model_name_or_path)))


def read_method_config(adapter_dir, methods: tuple[str, ...]) -> tuple[Path, dict]:
    """(folder, adapter_config.json dict) of a folder that holds one of `methods`; a folder of
    another method is refused naming both."""
    d = Path(adapter_dir)
    cfg = read_config(d)
    found = adapter_method(d, cfg)
    if found not in methods:
        wanted = " or ".join(f"{NAMES[m]} ({m})" for m in methods)
        raise AdapterError(f"{d} holds a {NAMES[found]} adapter ({found}), not {wanted}; "
                           "load it with minigpt.methods.load_adapter")
    return d, cfg


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
    return implementation(found).load(model, d, cfg, tensors, meta, freeze=freeze)
