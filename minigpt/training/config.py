"""What a training run does: `TrainConfig` (every setting, validated; its field names are the
training commands' flags) and `lr_at`, the learning-rate schedule (linear warmup, then cosine,
linear or constant).

    cfg = TrainConfig(out_dir="out", max_steps=1000, lr=1e-3, schedule="cosine")
    lr_at(0, cfg)                                        # the first step's learning rate
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from ..device import PRECISIONS
from ..errors import ConfigError
from .optim import OPTIMIZERS

__all__ = ["TrainConfig", "SCHEDULES", "lr_at", "warmup_for"]

SCHEDULES = ("cosine", "linear", "constant")
_POSITIVE = ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "keep_last")
_NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip", "save_interval", "min_lr")


@dataclass
class TrainConfig:
    """What the Trainer does; field names are the training commands' flags (TrainConfig.from_args)."""

    out_dir: str = "out"
    max_steps: int = 1000
    batch_size: int = 16            # per device, per micro-step
    grad_accum: int = 1             # micro-steps per optimizer step (over all ranks)
    lr: float = 1e-3
    min_lr: Optional[float] = None  # default lr / 10 (cosine); 0 for linear
    warmup_steps: int = 100
    schedule: str = "cosine"        # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0          # 0 disables
    eval_interval: int = 200
    log_interval: int = 10
    save_interval: Optional[int] = None   # default: eval_interval
    keep_last: int = 2
    precision: str = "auto"         # auto | fp32 | bf16 | fp16
    compile: bool = False
    device: str = "auto"
    max_bad_steps: int = 5          # consecutive non-finite losses before stopping
    optimizer: str = "adamw"        # adamw | muon (Muon on the hidden matrices, AdamW on the rest)
    muon_lr: Optional[float] = None  # Muon's peak lr (default: optim.MUON_LR_SCALE x lr)

    def __post_init__(self):
        self.validate(self)

    @classmethod
    def validate(cls, obj) -> None:
        """Check the TrainConfig fields that `obj` (a TrainConfig or a command's flags) holds;
        a ConfigError names the flag. None means "default" for the optional ones."""
        def bad(name, rule):
            raise ConfigError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(obj, name)!r}")

        def value(name):
            v = getattr(obj, name, None)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                bad(name, "a finite number")
            return v

        for name in _POSITIVE + ("lr",):
            if hasattr(obj, name) and value(name) is not None and not value(name) > 0:
                bad(name, "> 0")
        for name in _NON_NEGATIVE:
            if value(name) is not None and value(name) < 0:
                bad(name, ">= 0")
        if getattr(obj, "schedule", "cosine") not in SCHEDULES:
            bad("schedule", " or ".join(SCHEDULES))
        if getattr(obj, "precision", "auto") not in PRECISIONS:
            bad("precision", " or ".join(PRECISIONS))
        if getattr(obj, "optimizer", "adamw") not in OPTIMIZERS:
            bad("optimizer", " or ".join(OPTIMIZERS))
        if value("muon_lr") is not None and not value("muon_lr") > 0:
            bad("muon_lr", "> 0")

    @classmethod
    def from_args(cls, args, **overrides) -> "TrainConfig":
        """The settings of a command's parsed flags: every field of the same name, then `overrides`."""
        names = [f.name for f in fields(cls)]
        return cls(**{**{n: getattr(args, n) for n in names if hasattr(args, n)}, **overrides})


def warmup_for(max_steps: int, steps: Optional[int] = None, ratio: Optional[float] = None,
               default_ratio: float = 0.05) -> int:
    """Warmup steps of a `max_steps` run: `steps` as given, else ceil(ratio x max_steps) (transformers'
    warmup_ratio; 0.03 of 500 steps is 15), else round(default_ratio x max_steps), at least 1."""
    if steps is not None:
        return steps
    if ratio is not None:
        return math.ceil(round(ratio * max_steps, 9))      # 0.07 x 100 is 7, not 8
    return max(1, round(default_ratio * max_steps))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    min_lr = cfg.min_lr if cfg.min_lr is not None else (cfg.lr / 10 if cfg.schedule == "cosine" else 0.0)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    frac = min(1.0, frac)
    if cfg.schedule == "linear":
        return cfg.lr + (min_lr - cfg.lr) * frac
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * frac))
