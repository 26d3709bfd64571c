"""Model configuration: one dataclass, named presets, HF config.json round trip.

One model, two architectures (`arch`): "gpt2" (GPT-2: fused c_attn with bias, scores scaled by
1/sqrt(head_dim), global attention) and "gpt_neo" (EleutherAI's GPT-Neo: separate q_proj/k_proj/
v_proj without bias and out_proj, unscaled scores, layers alternating global attention and local
attention over the last `window_size` positions). Both: learned positions, pre-LayerNorm blocks,
tanh-GELU MLP of 4 * n_embd, tied head, GPT-2's tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

from ..errors import ConfigError

ARCHS = ("gpt2", "gpt_neo")
ATTENTION_TYPES = ("global", "local")

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # EleutherAI's GPT-Neo (HF: EleutherAI/gpt-neo-*): context 2048, global/local layers, window 256
    "gpt-neo-125m": dict(n_layer=12, n_head=12, n_embd=768, block_size=2048, arch="gpt_neo"),
    "gpt-neo-1.3B": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048, arch="gpt_neo"),
    "gpt-neo-2.7B": dict(n_layer=32, n_head=20, n_embd=2560, block_size=2048, arch="gpt_neo"),
}
_NEO_FIELDS = ("arch", "window_size", "attention_layers")     # left out of a GPT-2 config's to_dict


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT-2 or GPT-Neo model. Defaults are GPT-2 small (124M).

    arch: "gpt2" or "gpt_neo" (see the module docstring). GPT-Neo only: window_size (keys a local
    layer sees, the query's own included) and attention_layers ("global" | "local" per layer;
    None: alternating, global first, as every GPT-Neo checkpoint)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    name: str = "custom"
    arch: str = "gpt2"
    window_size: int = 256
    attention_layers: Optional[tuple[str, ...]] = None

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
        self._check_arch()

    def _check_arch(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"GPTConfig.arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        w = self.window_size
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise ConfigError(f"GPTConfig.window_size must be a positive integer, got {w!r}")
        if self.arch == "gpt2":
            if self.attention_layers is not None and any(t != "global" for t in self.attention_layers):
                raise ConfigError("GPTConfig.attention_layers: GPT-2 has global attention only (arch='gpt_neo' "
                                  "has local layers)")
            self.attention_layers = None
            return
        layers = self.attention_layers
        if layers is None:
            layers = [ATTENTION_TYPES[i % 2] for i in range(self.n_layer)]
        if isinstance(layers, str) or len(layers) != self.n_layer or any(t not in ATTENTION_TYPES for t in layers):
            raise ConfigError(f"GPTConfig.attention_layers must give 'global' or 'local' for each of the "
                              f"{self.n_layer} layers, got {layers!r}")
        self.attention_layers = tuple(layers)

    def local_layer(self, i: int) -> bool:
        """True when layer i attends over the last window_size positions only (GPT-Neo's local layers)."""
        return self.attention_layers is not None and self.attention_layers[i] == "local"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name: gpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt-neo-125m, gpt-neo-1.3B, gpt-neo-2.7B."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.arch == "gpt2":                       # GPT-2's dict as it always was
            for k in _NEO_FIELDS:
                d.pop(k)
        elif d["attention_layers"] is not None:
            d["attention_layers"] = list(d["attention_layers"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # --- Hugging Face config.json (GPT2Config) ---------------------------------------------
    def to_hf_dict(self) -> dict:
        if self.arch == "gpt_neo":
            return self._to_hf_neo_dict()
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
        """Read a GPT2Config- or GPTNeoConfig-style dict (also accepts our own to_dict() output)."""
        model_type = d.get("model_type")
        if model_type == "gpt_neo":
            return cls._from_hf_neo_dict(d)
        if model_type not in (None, "gpt2"):
            raise ConfigError(f"model_type {model_type!r} is not supported: minigpt loads gpt2 and gpt_neo models")
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

    # --- Hugging Face config.json (GPTNeoConfig) ------------------------------------------
    def _to_hf_neo_dict(self) -> dict:
        return {
            "architectures": ["GPTNeoForCausalLM"],
            "model_type": "gpt_neo",
            "activation_function": "gelu_new",
            "attention_types": compact_attention_types(self.attention_layers),
            "window_size": self.window_size,
            "max_position_embeddings": self.block_size,
            "hidden_size": self.n_embd,
            "num_layers": self.n_layer,
            "num_heads": self.n_head,
            "intermediate_size": None,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_dropout": self.dropout,
            "embed_dropout": self.dropout,
            "attention_dropout": self.dropout,
            "initializer_range": 0.02,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "tie_word_embeddings": True,
            "minigpt_name": self.name,
        }

    @classmethod
    def _from_hf_neo_dict(cls, d: dict) -> "GPTConfig":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"unsupported activation_function {act!r} (GPT-Neo uses tanh GELU, gelu_new)")
        hidden = d["hidden_size"]
        if d.get("intermediate_size") not in (None, 4 * hidden):
            raise ConfigError(f"unsupported intermediate_size {d['intermediate_size']} (must be 4 * hidden_size)")
        if d.get("tie_word_embeddings", True) is False:
            raise ConfigError("tie_word_embeddings=false is not supported (minigpt ties the head to wte)")
        layers = d.get("attention_layers")
        if layers is None:
            layers = expand_attention_types(d.get("attention_types", [[["global", "local"], 12]]))
        return cls(
            n_layer=d["num_layers"],
            n_head=d["num_heads"],
            n_embd=hidden,
            block_size=d.get("max_position_embeddings", 2048),
            vocab_size=d["vocab_size"],
            dropout=d.get("resid_dropout", 0.0),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            name=d.get("minigpt_name", d.get("_name_or_path") or "custom") or "custom",
            arch="gpt_neo",
            window_size=d.get("window_size", 256),
            attention_layers=tuple(layers),
        )


def expand_attention_types(types) -> list[str]:
    """HF's compact [[["global", "local"], 12]] -> the per-layer list (pattern repeated n times)."""
    try:
        return [t for pattern, n in types for _ in range(n) for t in pattern]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"attention_types must look like [[['global', 'local'], 12]], got {types!r}") from e


def compact_attention_types(layers) -> list:
    """The per-layer list -> HF's compact form: the shortest pattern that repeats to the whole list."""
    layers = list(layers)
    n = len(layers)
    for p in range(1, n + 1):
        if n % p == 0 and layers == layers[:p] * (n // p):
            return [[layers[:p], n // p]]
    return [[layers, 1]]
