"""Model configuration: one dataclass, named presets, HF config.json round trip."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from ..errors import ConfigError

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 model. Defaults are GPT-2 small (124M)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    name: str = "custom"

    def __post_init__(self) -> None:
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"GPTConfig.{k} must be a positive integer, got {v!r}")
        for k in ("dropout", "layer_norm_epsilon"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"GPTConfig.{k} must be a finite number, got {v!r}")
            setattr(self, k, float(v))
        if not isinstance(self.name, str):
            raise ConfigError(f"GPTConfig.name must be a string, got {self.name!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"GPTConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # --- Hugging Face config.json (GPT2Config) ---------------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "initializer_range": 0.02,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "minigpt_name": self.name,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> "GPTConfig":
        """Read a GPT2Config-style dict (also accepts our own to_dict() output)."""
        if "n_positions" not in d and "block_size" in d:
            return cls.from_dict(d)
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"unsupported activation_function {act!r} (GPT-2 uses tanh GELU)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ConfigError("unsupported GPT-2 variant (scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn)")
        if d.get("n_inner") not in (None, 4 * d["n_embd"]):
            raise ConfigError(f"unsupported n_inner {d['n_inner']} (must be 4 * n_embd)")
        return cls(
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            n_embd=d["n_embd"],
            block_size=d.get("n_positions", d.get("n_ctx", 1024)),
            vocab_size=d["vocab_size"],
            dropout=d.get("resid_pdrop", 0.0),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            name=d.get("minigpt_name", d.get("_name_or_path") or "custom") or "custom",
        )
