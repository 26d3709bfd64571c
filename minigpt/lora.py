"""LoRA for minigpt's GPT, with adapters saved and read in PEFT's on-disk layout.

`LoRALinear` replaces an `nn.Linear` *in place of it* and keeps its parameter names: the wrapped
layer's `weight` / `bias` Parameters are held directly, so state-dict keys such as
`transformer.h.0.attn.c_attn.weight` stay what they were, and the adapter adds
`...c_attn.lora_A` [r, in] and `...c_attn.lora_B` [out, r]:

    y = x W^T + b + dropout(x) A^T B^T * scaling,    scaling = alpha / r  (alpha / sqrt(r): rsLoRA)

A is Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B is zero, so a fresh adapter is a no-op.

    add_lora(model, r=8, alpha=16, dropout=0.05, targets=("c_attn",))  # freezes everything else
    merge_lora(model); unmerge_lora(model)           # W += B A * scaling and back
    remove_lora(model, merge=True)                   # == merge_and_unload: a plain GPT again
    save_adapter(model, dir); load_adapter(model, dir)

Targets match module names by suffix on a dot boundary, as PEFT does with a list of names:
"c_attn", "c_proj" (attention and MLP), "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head".
The pseudo-targets "q", "k", "v" put LoRA on chosen slices of the fused c_attn only (lora_B then
covers just those output rows). PEFT has no such option for GPT-2's fused projection; on save the
adapter is written as an ordinary c_attn adapter whose lora_B rows for the other slices are zero,
which PEFT loads with identical outputs, and the slice choice is kept in the safetensors metadata
(`minigpt_qkv`) so minigpt reads it back with the smaller shape.

lm_head is tied to transformer.wte. A LoRA on lm_head keeps the tie (its `weight` *is* the wte
Parameter) and changes only the output projection, exactly like PEFT. Merging it would also change
the input embeddings, so `merge_lora` refuses to merge a tied lm_head (`remove_lora(merge=False)`
drops it instead).

On-disk layout (PEFT, readable by `peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)`):
adapter_config.json and adapter_model.safetensors with keys
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
"""
from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import AdapterError, ConfigError
from .fileio import atomic_write
from .quant import QuantLinear

__all__ = [
    "LoRAConfig", "LoRALinear", "add_lora", "merge_lora", "unmerge_lora", "remove_lora", "merge_and_unload",
    "lora_layers", "lora_parameters", "lora_disabled", "lora_state_dict", "load_lora_state_dict",
    "save_adapter", "load_adapter", "read_adapter_config", "count_parameters",
    "ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "KNOWN_TARGETS",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_BIN_NAME = "adapter_model.bin"       # older PEFT releases; read only
PEFT_PREFIX = "base_model.model."
KNOWN_TARGETS = ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc", "lm_head", "q", "k", "v")
_QKV = ("q", "k", "v")


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update, keeping the base layer's `weight`/`bias` names.

    base:         the nn.Linear to adapt; its Parameters are reused (not copied), so ties hold.
                  Or a frozen minigpt.quant.QuantLinear (QLoRA): kept as `quant`, run as is, never
                  merged into (merge into the full-precision base instead).
    r, alpha:     rank and scale; scaling = alpha / r, or alpha / sqrt(r) when use_rslora.
    dropout:      dropout on the LoRA input path only.
    out_slices:   optional tuple of booleans splitting out_features into equal chunks (e.g.
                  (True, False, True) for q and v of a fused qkv projection); lora_B then has only
                  the selected rows and the update is zero elsewhere. None = all outputs.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, out_slices: Optional[Sequence[bool]] = None):
        super().__init__()
        _check_hparams(r, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.quant = base if isinstance(base, QuantLinear) else None
        self.weight = None if self.quant is not None else base.weight   # (out, in), same Parameter
        self.bias = base.bias                                      # (out,) or None
        self.r, self.alpha, self.use_rslora = int(r), alpha, bool(use_rslora)
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.out_slices: Optional[tuple[bool, ...]] = None
        n_out = self.out_features
        if out_slices is not None:
            out_slices = tuple(bool(s) for s in out_slices)
            k = len(out_slices)
            if k == 0 or self.out_features % k or not any(out_slices):
                raise ConfigError(f"out_slices {out_slices} must split {self.out_features} outputs into "
                                  f"equal chunks and select at least one")
            if not all(out_slices):
                self.out_slices = out_slices
                chunk = self.out_features // k
                idx = torch.cat([torch.arange(i * chunk, (i + 1) * chunk)
                                 for i, on in enumerate(out_slices) if on])
                self.register_buffer("lora_out_idx", idx.to(self._device), persistent=False)
                n_out = idx.numel()
        factory = dict(device=self._device, dtype=torch.float32 if self.quant is not None else self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))   # (r, in)
        self.lora_B = nn.Parameter(torch.empty(n_out, self.r, **factory))              # (out', r)
        self.merged = False
        self.enabled = True
        self.reset_lora_parameters()
        self.train(base.training)                                  # inherit train/eval mode

    @property
    def _device(self) -> torch.device:
        return self.quant.codes.device if self.quant is not None else self.weight.device

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- the update as a dense (out, in) matrix --------------------------------------------
    def full_lora_B(self) -> torch.Tensor:
        """lora_B expanded to (out_features, r), zero rows for unselected slices."""
        if self.out_slices is None:
            return self.lora_B
        full = self.lora_B.new_zeros(self.out_features, self.r)
        return full.index_copy(0, self.lora_out_idx, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in float32, shape (out_features, in_features)."""
        return (self.full_lora_B().float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W += B A * scaling (computed in float32). A merged layer's forward skips the LoRA path."""
        if self.merged:
            raise RuntimeError("LoRA layer is already merged")
        if self.quant is not None:
            raise ConfigError("cannot merge LoRA into a quantized (nf4/int8) base: load the base in full "
                              "precision, load the adapter there and merge")
        self.weight.data = (self.weight.data.float() + self.delta_weight()).to(self.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W -= B A * scaling: undoes merge() up to floating-point rounding."""
        if not self.merged:
            raise RuntimeError("LoRA layer is not merged")
        self.weight.data = (self.weight.data.float() - self.delta_weight()).to(self.weight.dtype)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.quant(x) if self.quant is not None else F.linear(x, self.weight, self.bias)   # (..., out)
        if self.merged or not self.enabled:
            return y
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        u = F.linear(h, self.lora_A) * self.scaling                        # (..., r): scale the small side
        if self.out_slices is None and u.dtype == y.dtype:
            # y + u B^T as one addmm: no (..., out) temporaries for the update, its scaling and the sum
            return torch.addmm(y.reshape(-1, self.out_features), u.reshape(-1, self.r),
                               self.lora_B.t()).view(y.shape)
        d = F.linear(u, self.lora_B)                                       # (..., out')
        if self.out_slices is not None:
            d = d.new_zeros(*d.shape[:-1], self.out_features).index_copy(-1, self.lora_out_idx, d)
        return y + d.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's weight/bias Parameters (LoRA part dropped); the
        QuantLinear itself for a quantized base."""
        if self.quant is not None:
            return self.quant
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta")
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
             f"alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
        if self.out_slices is not None:
            s += f", out_slices={self.out_slices}"
        return s


# --- applying LoRA to a model ---------------------------------------------------------------

def _check_hparams(r, alpha, dropout, names: Sequence[str] = ("LoRA rank r", "LoRA alpha", "LoRA dropout")) -> None:
    """The one check of LoRA hyperparameters; `names` are what the messages call them (flags)."""
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{names[0]} must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"{names[1]} must be > 0, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{names[2]} must be in [0, 1), got {dropout!r}")


@dataclass
class LoRAConfig:
    """LoRA hyperparameters, validated: what `add_lora` takes and a fine-tune records.
    targets: module-name suffixes and/or q, k, v (see add_lora); comma-separated strings are split."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("c_attn",)
    rslora: bool = False
    flags: Sequence[str] = field(default=("LoRA rank r", "LoRA alpha", "LoRA dropout"), repr=False,
                                 compare=False)        # what error messages call r, alpha, dropout

    def __post_init__(self) -> None:
        _check_hparams(self.r, self.alpha, self.dropout, self.flags)
        items = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        self.targets = tuple(t for item in items for t in re.split(r"[,\s]+", item) if t)
        _normalise_targets(self.targets)

    def to_dict(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "rslora": self.rslora}

    def apply(self, model: nn.Module) -> nn.Module:
        """add_lora with these settings."""
        return add_lora(model, r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                        use_rslora=self.rslora)


def _name_matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _normalise_targets(targets) -> tuple[tuple[str, ...], Optional[tuple[bool, bool, bool]]]:
    """Split user targets into module-name targets and an optional q/k/v selection for c_attn."""
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    targets = tuple(targets)
    if not targets:
        raise ConfigError("LoRA targets must name at least one module")
    qkv = tuple(t in targets for t in _QKV)
    names = tuple(t for t in targets if t not in _QKV)
    if any(qkv):
        if any(_name_matches("attn.c_attn", t) for t in names):
            raise ConfigError("give either 'c_attn' or some of 'q', 'k', 'v' as LoRA targets, not both")
        names = names + ("c_attn",)
        return names, (None if all(qkv) else qkv)
    return names, None


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} for every LoRA layer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Context manager: run the model as its base (LoRA updates skipped; merged layers unaffected)."""
    layers = list(lora_layers(model).values())
    if any(m.merged for m in layers):
        raise ConfigError("cannot disable merged LoRA layers; unmerge_lora(model) first")
    prev = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(layers, prev):
            m.enabled = e


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B Parameters (what an optimizer should get)."""
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) Parameters count once."""
    ps = list(model.parameters())    # nn.Module.parameters() already de-duplicates tied tensors
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def _is_tied(model: nn.Module, layer: nn.Module) -> bool:
    wte = getattr(getattr(model, "transformer", None), "wte", None)
    return wte is not None and getattr(layer, "weight", None) is wte.weight


def add_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.05,
             targets: Union[str, Iterable[str]] = ("c_attn",), use_rslora: bool = False,
             freeze: bool = True) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear; freeze the rest.

    targets: module-name suffixes ("c_attn", "c_proj", "attn.c_proj", "mlp.c_proj", "c_fc",
             "lm_head") and/or "q", "k", "v" for slices of the fused c_attn; also a
             comma-separated string. Returns the model (modified in place).
    """
    _check_hparams(r, alpha, dropout)
    names, qkv = _normalise_targets(targets)
    found: list[str] = []
    matched_targets: set[str] = set()
    for name, mod in list(model.named_modules()):
        hits = [t for t in names if _name_matches(name, t)]
        if not hits:
            continue
        if isinstance(mod, LoRALinear):
            raise ConfigError(f"{name} already has a LoRA layer")
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            raise ConfigError(f"LoRA target {hits[0]!r} matched {name}, a {type(mod).__name__}, "
                              "not an nn.Linear")
        matched_targets.update(hits)
        found.append(name)
    missing = [t for t in names if t not in matched_targets]
    if not found or missing:
        raise ConfigError(f"LoRA target(s) {missing or list(names)} match no module; "
                          f"known targets: {', '.join(KNOWN_TARGETS)}")
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    for name in found:
        base = model.get_submodule(name)
        slices = qkv if (qkv is not None and _name_matches(name, "c_attn")) else None
        _set_module(model, name, LoRALinear(base, r=r, alpha=alpha, dropout=dropout,
                                            use_rslora=use_rslora, out_slices=slices))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every (unmerged) LoRA update into its base weight. Undo with unmerge_lora."""
    layers = lora_layers(model)
    for name, m in layers.items():
        if not m.merged and _is_tied(model, m):
            raise ConfigError(f"{name} shares its weight with transformer.wte; merging its LoRA would "
                              "change the input embeddings too. Keep it as an adapter, or drop it with "
                              "remove_lora(model, merge=False)")
    for m in layers.values():
        if not m.merged:
            m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Subtract every merged LoRA update from its base weight again."""
    for m in lora_layers(model).values():
        if m.merged:
            m.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear (merging the update first when `merge`).

    The returned model has exactly a plain GPT's state-dict keys, the lm_head/wte tie intact, and
    every parameter trainable again. With merge=False the LoRA updates are discarded (and a merged
    layer is unmerged first).
    """
    if merge:
        merge_lora(model)
    for name, m in lora_layers(model).items():
        if not merge and m.merged:
            m.unmerge()
        _set_module(model, name, m.to_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's name for remove_lora(model, merge=True)."""
    return remove_lora(model, merge=True)


# --- state dicts --------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """minigpt-named LoRA tensors: {"<module>.lora_A": [r, in], "<module>.lora_B": [out', r]}."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a lora_state_dict() into a model with the same LoRA layers (shapes checked)."""
    layers = lora_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    if set(sd) != expected:
        miss, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ConfigError(f"LoRA state dict does not match the model's LoRA layers "
                          f"(missing {miss[:4]}, unexpected {extra[:4]})")
    for name, m in layers.items():
        for ab in "AB":
            p, t = getattr(m, f"lora_{ab}"), sd[f"{name}.lora_{ab}"]
            if tuple(t.shape) != tuple(p.shape):
                raise ConfigError(f"{name}.lora_{ab}: adapter has shape {tuple(t.shape)}, "
                                  f"model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)


def _peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PEFT-keyed tensors (lora_B expanded to full rows) and safetensors metadata."""
    tensors, qkv = {}, None
    for name, m in lora_layers(model).items():
        if m.merged:
            raise ConfigError("unmerge the LoRA layers (unmerge_lora) before saving the adapter")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.full_lora_B().detach().contiguous()
        if m.out_slices is not None:
            qkv = "".join(c for c, on in zip(_QKV, m.out_slices) if on)
    meta = {"format": "pt"}
    if qkv is not None:
        meta["minigpt_qkv"] = qkv
    return tensors, meta


# --- adapter directories ------------------------------------------------------------------

def _adapter_targets(model: nn.Module) -> list[str]:
    """target_modules for the config: the shortest suffix of each LoRA module name that selects
    exactly the same set of modules as before (what PEFT will match on load)."""
    layers = set(lora_layers(model))
    all_names = [n for n, _ in model.named_modules() if n]
    targets: list[str] = []
    for name in sorted(layers):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            t = ".".join(parts[-k:])
            if all(n in layers for n in all_names if _name_matches(n, t)):
                break
        if t not in targets:
            targets.append(t)
    return targets


def save_adapter(model: nn.Module, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout; returns the dir."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("model has no LoRA layers to save (call add_lora or load_adapter first)")
    hp = {(m.r, m.alpha, m.dropout_p, m.use_rslora) for m in layers.values()}
    if len(hp) != 1:
        raise ConfigError(f"LoRA layers disagree on r/alpha/dropout/rslora: {sorted(hp)}")
    r, alpha, dropout, rslora = hp.pop()
    if base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "name", None)
        base_model_name_or_path = name if name and name != "custom" else None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _adapter_targets(model),
        "exclude_modules": None,
        "fan_in_fan_out": True,              # GPT-2's HF layers are Conv1D (weights (in, out))
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors, meta = _peft_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=meta))

    def write_json(p):
        with open(p, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(out / ADAPTER_CONFIG_NAME, write_json)
    return out


def read_adapter_config(adapter_dir) -> dict:
    """adapter_config.json of an adapter directory, checked for what minigpt supports."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {str(d)!r} does not exist")
    cfg_path = d / ADAPTER_CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: not a LoRA adapter directory "
                                f"(expected {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, ok in (("use_dora", False), ("lora_bias", False)):
        if cfg.get(key, ok) != ok:
            raise AdapterError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by minigpt")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{cfg_path}: modules_to_save={cfg['modules_to_save']!r} is not supported")
    return cfg


def _read_adapter_tensors(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        from .checkpoint import read_tensors
        from .errors import CheckpointError
        try:                                 # weights_only loading; refuses pickled code
            return read_tensors(bin_), {}
        except CheckpointError as e:
            raise AdapterError(str(e)) from e
    raise FileNotFoundError(f"{st} not found: adapter directory has no weights "
                            f"({ADAPTER_WEIGHTS_NAME} or {ADAPTER_BIN_NAME})")


_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])"
                       r"(?:\.(?P<adapter>[^.]+))?\.weight$")


def _parse_adapter_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": tensor, "B": tensor}} from PEFT-style keys (with or without the
    base_model.model. prefix and the `.default` adapter name); other keys are ignored."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    adapters = set()
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            if "lora_" in key and not key.endswith("base_layer.weight"):
                raise AdapterError(f"{where}: unsupported adapter tensor {key!r}")
            continue                           # e.g. base_layer weights PEFT saves for lm_head
        adapters.add(m["adapter"])
        mods.setdefault(m["module"], {})[m["ab"]] = t
    if len(adapters) > 1:
        raise AdapterError(f"{where}: several adapters in one file ({sorted(a or '' for a in adapters)})")
    if not mods:
        raise AdapterError(f"{where}: no lora_A/lora_B tensors found")
    for mod, ab in mods.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: {mod} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return mods


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module by suffix or regex."""
    for key, val in (pattern or {}).items():
        if _name_matches(module, key):
            return val
        try:
            if re.fullmatch(rf"(.*\.)?{key}", module):
                return val
        except re.error:
            pass
    return default


def load_adapter(model: nn.Module, adapter_dir, freeze: bool = True) -> nn.Module:
    """Load a minigpt- or PEFT-written LoRA adapter into `model` (in place; returned).

    On a plain model the LoRA layers named by the adapter's weights are added first (r from the
    tensors, lora_alpha / lora_dropout / use_rslora / alpha_pattern from adapter_config.json) and,
    with `freeze`, everything else is frozen. A model that already has LoRA layers must have the
    same set (same names, shapes); their values are overwritten. Shapes are checked against the
    model: an adapter for a differently sized base raises ValueError naming the key and both shapes.
    """
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    tensors, meta = _read_adapter_tensors(d)
    mods = _parse_adapter_tensors(tensors, str(d / ADAPTER_WEIGHTS_NAME))
    qkv_meta = meta.get("minigpt_qkv")
    alpha0 = cfg.get("lora_alpha", 8)
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    rslora = bool(cfg.get("use_rslora", False))

    existing = lora_layers(model)
    if any(m.merged for m in existing.values()):
        raise AdapterError("model has merged LoRA layers; unmerge_lora(model) before load_adapter")
    if existing and set(existing) != set(mods):
        raise AdapterError(f"model already has LoRA layers {sorted(existing)[:3]}... that differ from "
                           f"the adapter's {sorted(mods)[:3]}...; load it into a plain model instead")

    # validate everything before modifying the model
    plan = []
    for name, ab in sorted(mods.items()):
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"adapter targets {name!r}, which this model does not have "
                               f"(key {PEFT_PREFIX}{name}.lora_A.weight)") from None
        if not isinstance(mod, (nn.Linear, QuantLinear, LoRALinear)):
            raise AdapterError(f"adapter targets {name!r}, a {type(mod).__name__}, not a linear layer")
        A, B = ab["A"], ab["B"]
        out_f, in_f = mod.out_features, mod.in_features
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{name}: inconsistent LoRA shapes lora_A {tuple(A.shape)}, "
                               f"lora_B {tuple(B.shape)}")
        r = A.shape[0]
        if tuple(A.shape) != (r, in_f):
            raise AdapterError(f"shape mismatch for {PEFT_PREFIX}{name}.lora_A.weight: adapter has "
                               f"{tuple(A.shape)}, model expects {(r, in_f)} (adapter for another base model?)")
        if tuple(B.shape) != (out_f, r):
            raise AdapterError(f"shape mismatch for {PEFT_PREFIX}{name}.lora_B.weight: adapter has "
                               f"{tuple(B.shape)}, model expects {(out_f, r)} (adapter for another base model?)")
        slices = None
        if qkv_meta and _name_matches(name, "c_attn"):
            slices = tuple(c in qkv_meta for c in _QKV)
        r_cfg = _pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", r))
        if r_cfg != r:
            raise AdapterError(f"{name}: adapter_config.json says r={r_cfg} but lora_A has {r} rows")
        alpha = _pattern_value(cfg.get("alpha_pattern"), name, alpha0)
        if isinstance(mod, LoRALinear):
            if mod.r != r or mod.out_slices != (None if slices is None or all(slices) else slices):
                raise AdapterError(f"{name}: model's LoRA layer (r={mod.r}) differs from the adapter's (r={r})")
        plan.append((name, mod, A, B, r, alpha, slices))

    if freeze and not existing:
        for p in model.parameters():
            p.requires_grad_(False)
    for name, mod, A, B, r, alpha, slices in plan:
        if isinstance(mod, (nn.Linear, QuantLinear)):
            mod = LoRALinear(mod, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, out_slices=slices)
            _set_module(model, name, mod)
        else:
            mod.alpha, mod.use_rslora = alpha, rslora
            mod.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        with torch.no_grad():
            mod.lora_A.copy_(A)
            mod.lora_B.copy_(B if mod.out_slices is None else B.index_select(0, mod.lora_out_idx.cpu()))
    return model
