"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for minigpt's GPT.

A small residual MLP on a sublayer's output, before the block's residual sum:

    h = sublayer(x)                                   # attention or MLP output, (B, T, C)
    h = h + up(act(down(h))) * scaling                # down: C -> size, up: size -> C
    x = x + h

placement "houlsby": after attention and after the MLP of every block; "pfeiffer": after the MLP
only. `up` starts at zero, so a fresh adapter is the identity (the base model unchanged).
The adapters sit in the blocks' `attn_adapter` / `mlp_adapter` slots (minigpt.model.gpt.Block); the
base's parameter names are untouched.

PEFT has no such method, so the format is minigpt's own, in PEFT's two files:
adapter_config.json
    {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "format_version": 1,
     "base_model_name_or_path": ..., "bottleneck_size": 64, "placement": "houlsby",
     "locations": ["attn", "mlp"], "non_linearity": "relu", "scaling": 1.0, "dropout": 0.0,
     "num_layers": 12, "hidden_size": 768}
adapter_model.safetensors, per block i and location L in locations:
    transformer.h.{i}.{L}_adapter.down.weight [size, C]   .down.bias [size]
    transformer.h.{i}.{L}_adapter.up.weight   [C, size]   .up.bias   [C]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import AdapterError, ConfigError
from .table import NAMES

__all__ = ["BottleneckAdapter", "AdapterConfig", "adapter_modules", "PLACEMENTS", "NON_LINEARITIES"]

PLACEMENTS = {"houlsby": ("attn", "mlp"), "pfeiffer": ("mlp",)}
NON_LINEARITIES = {"relu": F.relu, "gelu": lambda x: F.gelu(x, approximate="tanh"), "tanh": torch.tanh,
                   "silu": F.silu}
FORMAT_VERSION = 1


class BottleneckAdapter(nn.Module):
    """h -> h + up(act(down(dropout(h)))) * scaling; down (size, C), up (C, size), up zero-initialised."""

    adapter_method = "adapter"               # what minigpt.methods.table.method_of reads
    adapter_title = NAMES["adapter"]

    def __init__(self, n_embd: int, size: int, non_linearity: str = "relu", scaling: float = 1.0,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(n_embd, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, n_embd, device=device, dtype=dtype)
        self.non_linearity, self.scaling = non_linearity, float(scaling)
        self.act = NON_LINEARITIES[non_linearity]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:                  # (..., C) -> (..., C)
        z = self.act(self.down(self.dropout(h).to(self.down.weight.dtype)))  # (..., size)
        return h + (self.up(z) * self.scaling).to(h.dtype)


@dataclass
class AdapterConfig:
    """Bottleneck adapter settings, validated. size: the bottleneck width; placement: houlsby
    (after attention and MLP) or pfeiffer (after the MLP only)."""

    size: int = 64
    placement: str = "houlsby"
    non_linearity: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"adapter size must be a positive integer, got {self.size!r}")
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"adapter placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ConfigError(f"adapter non-linearity must be one of {', '.join(NON_LINEARITIES)}, "
                              f"got {self.non_linearity!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"adapter dropout must be in [0, 1), got {self.dropout!r}")
        if not float(self.scaling) > 0:
            raise ConfigError(f"adapter scaling must be > 0, got {self.scaling!r}")

    method = "adapter"

    @property
    def locations(self) -> tuple[str, ...]:
        return PLACEMENTS[self.placement]

    def to_dict(self) -> dict:
        return {"size": self.size, "placement": self.placement, "non_linearity": self.non_linearity,
                "scaling": self.scaling, "dropout": self.dropout}

    def describe(self) -> str:
        return f"bottleneck adapters ({self.placement}: after {' and '.join(self.locations)}) of size {self.size}"

    def apply(self, model: nn.Module, freeze: bool = True) -> nn.Module:
        """Put an adapter after each chosen sublayer of every block; with `freeze` the rest is frozen."""
        if attached(model):
            raise ConfigError("model already has bottleneck adapters")
        if freeze:
            model.requires_grad_(False)
        ref = model.transformer.wte.weight
        dtype = ref.dtype if ref.dtype.is_floating_point else torch.float32
        for block in model.transformer.h:
            for loc in self.locations:
                setattr(block, f"{loc}_adapter", BottleneckAdapter(
                    model.config.n_embd, self.size, self.non_linearity, self.scaling, self.dropout,
                    device=ref.device, dtype=dtype).train(model.training))
        return model


def adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    """{module name: BottleneckAdapter} of every adapter in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


# --- the method protocol (minigpt.methods) ------------------------------------------------------

def method_config(method: str = "adapter", **kw) -> AdapterConfig:
    return AdapterConfig(**{k: v for k, v in kw.items() if v is not None})


def attached(model: nn.Module) -> Optional[str]:
    return "adapter" if adapter_modules(model) else None


def _config_of(model: nn.Module) -> AdapterConfig:
    mods = adapter_modules(model)
    locs = tuple(sorted({n.rsplit(".", 1)[-1].removesuffix("_adapter") for n in mods}))
    placement = next((p for p, where in PLACEMENTS.items() if tuple(sorted(where)) == locs), None)
    kinds = {(m.down.out_features, m.non_linearity, m.scaling, getattr(m.dropout, "p", 0.0)) for m in mods.values()}
    if placement is None or len(kinds) != 1 or len(mods) != len(PLACEMENTS[placement]) * model.config.n_layer:
        raise ConfigError("the model's bottleneck adapters do not follow one placement and size")
    size, act, scaling, dropout = kinds.pop()
    return AdapterConfig(size, placement, act, scaling, dropout)


def save(model: nn.Module, base_model_name_or_path: Optional[str]):
    """(adapter_config dict, tensors, metadata) in the format of this module's docstring."""
    cfg = _config_of(model)
    config = {"peft_type": "BOTTLENECK", "task_type": "CAUSAL_LM", "format_version": FORMAT_VERSION,
              "base_model_name_or_path": base_model_name_or_path, "bottleneck_size": cfg.size,
              "placement": cfg.placement, "locations": list(cfg.locations), "non_linearity": cfg.non_linearity,
              "scaling": cfg.scaling, "dropout": cfg.dropout, "num_layers": model.config.n_layer,
              "hidden_size": model.config.n_embd}
    tensors = {f"{name}.{k}": t for name, m in adapter_modules(model).items() for k, t in m.state_dict().items()}
    return config, tensors, {}


def _read_settings(cfg: dict, where) -> AdapterConfig:
    if cfg.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise AdapterError(f"{where}: bottleneck format_version {cfg['format_version']} is newer than this "
                           f"minigpt reads ({FORMAT_VERSION})")
    try:
        return AdapterConfig(cfg.get("bottleneck_size"), cfg.get("placement"), cfg.get("non_linearity", "relu"),
                             cfg.get("scaling", 1.0), cfg.get("dropout", 0.0))
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{where}: {e}") from None


def load(model: nn.Module, adapter_dir, cfg: dict, tensors: dict, meta: dict, freeze: bool = True) -> nn.Module:
    """Add the folder's adapters to a plain model (or overwrite the same ones in place) and load them."""
    where = f"{adapter_dir}/adapter_config.json"
    settings = _read_settings(cfg, where)
    n_layer, C = model.config.n_layer, model.config.n_embd
    for key, have in (("num_layers", n_layer), ("hidden_size", C)):
        if cfg.get(key, have) != have:
            raise AdapterError(f"{where}: adapter for {key}={cfg[key]}, the model has {have} "
                               "(an adapter for another base model?)")
    existing = adapter_modules(model)
    if existing and _config_of(model) != settings:
        raise AdapterError(f"model's bottleneck adapters differ from those of {adapter_dir}")
    probe = nn.Module()
    probe.transformer = nn.Module()
    probe.transformer.h = nn.ModuleList(nn.Module() for _ in range(n_layer))
    for block in probe.transformer.h:
        for loc in settings.locations:
            setattr(block, f"{loc}_adapter", BottleneckAdapter(C, settings.size, settings.non_linearity))
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        bad = sorted(set(got) ^ set(expected)) or sorted(k for k in got if got[k] != expected[k])
        raise AdapterError(f"{adapter_dir}: adapter tensors do not match the config (first difference: {bad[0]})")
    if not existing:
        settings.apply(model, freeze=freeze)
    mods = adapter_modules(model)
    with torch.no_grad():
        for key, t in tensors.items():
            name, _, leaf = key.rpartition(".")
            mod_name, _, sub = name.rpartition(".")
            getattr(mods[mod_name], sub).get_parameter(leaf).copy_(t)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Drop every bottleneck adapter (the base model again)."""
    for block in model.transformer.h:
        block.attn_adapter = None
        block.mlp_adapter = None
    return model
