"""How the next token is chosen: `SamplingConfig` (validated, shared by generate, chat, the engine
and the commands) and `sample_next` (logits -> token ids), with its repetition penalty and top-p.

Order (as in Hugging Face): repetition penalty -> temperature -> top-k -> top-p. temperature 0
means greedy (argmax after the repetition penalty; top-k/top-p are then moot). Extreme arguments
are computed safely, never as NaN: a row whose scaled logits overflow the float range (a
temperature such as 1e-300, or a repetition penalty such as 1e-300 that sends seen logits to inf)
samples from its top logits only, the limit of sampling as temperature -> 0 (greedy, ties drawn).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import ConfigError

__all__ = ["SamplingConfig", "check_sampling", "parse_number", "sample_next", "apply_repetition_penalty"]
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


# --- picking tokens ------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face repetition penalty: for tokens already seen, divide positive logits
    by `penalty` and multiply negative ones by it.

    logits: (B, V). seen: (B, V) bool mask of seen tokens, or (B, N) token ids (duplicates fine).
    Returns a new (B, V) tensor.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype == torch.bool:
        return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def _top_p_drop(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token (probabilities sorted descending) falls outside the nucleus. As in HF:
    a token is dropped when the mass of the tokens ranked above it is >= top_p; the top one
    always stays."""
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop[:, 0] = False
    return drop


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest top-k (k = 64, 256, ...) of `probs` (B, V) that holds mass >= top_p in every
    row, hence the whole nucleus: exact, and far cheaper than sorting 50k logits."""
    k, V = 64, probs.size(-1)
    while True:
        vals, ids = probs.topk(min(k, V), dim=-1)                         # (B, k), descending
        if k >= V or bool((vals.sum(dim=-1) >= top_p).all()):
            return vals, ids
        k *= 4


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, each row whose largest scaled logit is not finite (overflow) replaced
    by 0 at its top logits and -inf elsewhere: greedy, the temperature -> 0 limit, instead of NaN
    probabilities. Rows that scale fine are returned bit for bit (no host sync either way)."""
    scaled = logits / temperature
    bad = ~torch.isfinite(scaled.amax(dim=-1, keepdim=True))                  # (B, 1)
    top = torch.where(logits == logits.amax(dim=-1, keepdim=True), 0.0, float("-inf"))
    return torch.where(bad, top, scaled)


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                seen: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token for every row. logits (B, V) -> token ids (B,).

    seen: tokens to penalise when repetition_penalty != 1 (see apply_repetition_penalty).
    temperature <= 0 is greedy. top_k / top_p (nucleus) restrict sampling, in that order, as
    HF's warpers do; top_k=1 is greedy. generator: a torch.Generator for reproducible sampling.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = _scaled(logits, temperature)
    use_top_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, ids = logits.topk(top_k, dim=-1)                            # (B, k), descending
        probs = vals.softmax(dim=-1)
    elif use_top_p:
        probs, ids = _nucleus_candidates(logits.softmax(dim=-1), top_p)
    else:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    if use_top_p:
        probs = probs.masked_fill(_top_p_drop(probs, top_p), 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)             # (B, 1), index into ids
    return ids.gather(1, choice).squeeze(1)
