"""How the next token is chosen: `SamplingConfig` (validated, shared by generate, chat and the
commands) and `sample_next`.

Order (as in Hugging Face): repetition penalty -> temperature -> top-k -> top-p. temperature 0
means greedy (argmax after the repetition penalty; top-k/top-p are then moot).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError

__all__ = ["SamplingConfig", "check_sampling", "parse_number"]
NAMES = ("temperature", "top_k", "top_p", "repetition_penalty")


def _number(name: str, v: Any, kind: type) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {v!r}")
    if kind is int and not float(v).is_integer():
        raise ConfigError(f"{name} must be an integer, got {v!r}")
    return kind(v)


def parse_number(name: str, value: Any, kind: type) -> Any:
    """A number of type `kind` from a number or its text (as typed after chat's /set)."""
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10) if kind is int else float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    return _number(name, value, kind)


def check_sampling(name: str, v: Any) -> Any:
    """One sampling argument, checked and normalised (top_k 0 -> None).
    Raises ConfigError naming the argument."""
    if name == "temperature":
        v = _number(name, v, float)
        if v < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {v:g}")
        return v
    if name == "top_k":
        if v is None:
            return None
        v = _number(name, v, int)
        if v < 0:
            raise ConfigError(f"top_k must be >= 0 (0 or None = off), got {v}")
        return v or None
    if name == "top_p":
        if v is None:
            return None
        v = _number(name, v, float)
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {v:g}")
        return v
    if name == "repetition_penalty":
        v = _number(name, v, float)
        if v <= 0:
            raise ConfigError(f"repetition_penalty must be > 0 (1 = off), got {v:g}")
        return v
    raise ConfigError(f"unknown sampling argument {name!r}")


@dataclass
class SamplingConfig:
    """temperature 0 = greedy; top_k None = off; top_p None or 1 = off; repetition_penalty 1 = off."""

    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in NAMES:
            setattr(self, name, check_sampling(name, getattr(self, name)))
