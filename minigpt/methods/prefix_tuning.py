"""Prefix tuning and prompt tuning: trainable virtual tokens in front of every sequence.

Both attach to `GPT.kv_prefix`: a module with `num_virtual_tokens` (P) and `layer_kv(model)`, each
layer's virtual-token keys and values, (1, H, P, D) each. The model puts them in front of the real
tokens' keys/values (in the static KV cache when decoding) and numbers the real tokens from P, as
PEFT does for GPT-2, so generation, chat and the server work unchanged (at block_size - P tokens).

    PrefixConfig(num_virtual_tokens=20).apply(model)                  # keys/values of every layer
    PrefixConfig(20, projection=True).apply(model)                     # ... made by a small MLP
    PromptConfig(20, init="text", init_text="Answer briefly.").apply(model)   # input embeddings

Prefix tuning: a (P, n_layer*2*C) table. Row p holds, for each layer l, the key of virtual token p in
columns [2l*C, (2l+1)*C) and its value in [(2l+1)*C, (2l+2)*C), each head-major (H, D): PEFT's
ordering. With projection (PEFT's reparameterisation) the table is computed from an embedding (P, C):
Linear(C, h) -> tanh -> Linear(h, n_layer*2*C), h = encoder_hidden_size (default n_embd).

Prompt tuning: P trainable input embeddings (P, C) at positions 0..P-1 (random N(0, 1) as PEFT, or
the token embeddings of an init text, repeated or cut to P). No virtual token sees a real one, so
their keys/values are computed once per forward (a batch-1 pass through the blocks, with the
model's dropout, differentiable) and used as a prefix: the outputs of prepending them to the input.

On disk: PEFT's layout (`peft.PeftModel.from_pretrained(GPT2LMHeadModel, dir)` reads it):
adapter_config.json (peft_type PREFIX_TUNING / PROMPT_TUNING) and adapter_model.safetensors holding
`prompt_embeddings`: the (P, n_layer*2*C) prefix table or the (P, C) prompt. PEFT stores a projected
prefix as the table it produces (the MLP is not kept); minigpt writes that table too, plus the MLP
under `minigpt_prefix_encoder.*` keys, which PEFT ignores and minigpt reads back (exact resume). A
projected prefix without those keys (PEFT-written) loads as its fixed table, trainable as a table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..errors import AdapterError, ConfigError
from .files import ADAPTER_CONFIG_NAME
from .table import NAMES, method_of

__all__ = ["PrefixTuning", "PromptTuning", "PrefixConfig", "PromptConfig", "attached", "save", "load",
           "remove", "method_config", "text_init_embeddings", "MLP_KEY_PREFIX"]

MLP_KEY_PREFIX = "minigpt_prefix_encoder."       # minigpt's extra tensors: the projected prefix's MLP
PROMPT_INITS = ("random", "text")


# --- the modules --------------------------------------------------------------------------------

class PrefixTuning(nn.Module):
    """Trainable keys/values of P virtual tokens in every layer (see the module docstring)."""

    adapter_method = "prefix"                # what minigpt.methods.table.method_of reads
    adapter_title = NAMES["prefix"]

    def __init__(self, n_layer: int, n_head: int, n_embd: int, num_virtual_tokens: int,
                 projection: bool = False, encoder_hidden_size: Optional[int] = None, device=None):
        super().__init__()
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.num_virtual_tokens, self.projection = num_virtual_tokens, bool(projection)
        self.encoder_hidden_size = encoder_hidden_size or n_embd
        P, width = num_virtual_tokens, n_layer * 2 * n_embd
        if self.projection:
            h = self.encoder_hidden_size
            self.embedding = nn.Parameter(torch.randn(P, n_embd, device=device))            # (P, C)
            self.transform = nn.Sequential(nn.Linear(n_embd, h, device=device), nn.Tanh(),
                                           nn.Linear(h, width, device=device))
        else:
            self.prompt_embeddings = nn.Parameter(torch.randn(P, width, device=device))     # (P, L*2*C)

    def prefixes(self) -> torch.Tensor:
        """The (P, n_layer*2*C) table of keys/values (what PEFT saves as prompt_embeddings)."""
        return self.transform(self.embedding) if self.projection else self.prompt_embeddings

    def layer_kv(self, model=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (1, H, P, D)."""
        P, L = self.num_virtual_tokens, self.n_layer
        kv = self.prefixes().view(P, 2 * L, self.n_head, -1).permute(1, 2, 0, 3)          # (2L, H, P, D)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(L)]

    def extra_repr(self) -> str:
        mlp = f", projection=True, encoder_hidden_size={self.encoder_hidden_size}" if self.projection else ""
        return f"num_virtual_tokens={self.num_virtual_tokens}, n_layer={self.n_layer}{mlp}"


class _Recorder:
    """A stand-in KV cache for one attention call: keeps the keys/values it is given (no offset)."""

    offset = 0

    def update(self, start, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = k, v                                                               # (1, H, P, D)
        return k, v


class PromptTuning(nn.Module):
    """Trainable input embeddings of P virtual tokens, used as a KV prefix (see the module docstring).

    init / init_text: how they were initialised (recorded in the adapter's config)."""

    adapter_method = "prompt"
    adapter_title = NAMES["prompt"]

    def __init__(self, n_embd: int, num_virtual_tokens: int, init: str = "random",
                 init_text: Optional[str] = None, device=None):
        super().__init__()
        self.n_embd, self.num_virtual_tokens = n_embd, num_virtual_tokens
        self.init, self.init_text = init, init_text
        self.prompt_embeddings = nn.Parameter(torch.randn(num_virtual_tokens, n_embd, device=device))  # (P, C)

    def layer_kv(self, model) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Run the virtual tokens (positions 0..P-1) through `model`'s blocks once; per layer
        (keys, values), each (1, H, P, D)."""
        tr = model.transformer
        pos = torch.arange(self.num_virtual_tokens, device=tr.wpe.weight.device)
        x = tr.drop(self.prompt_embeddings.to(tr.wpe.weight.dtype)[None] + tr.wpe(pos))   # (1, P, C)
        out, last = [], len(tr.h) - 1
        for i, block in enumerate(tr.h):
            rec = _Recorder()
            if i < last:
                x = block(x, None, rec, 0, None)
            else:                                     # the last layer's keys/values need its attention only
                block.attn(block.ln_1(x), None, rec, 0)
            out.append((rec.k, rec.v))
        return out

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, n_embd={self.n_embd}, init={self.init}"


def text_init_embeddings(model, text: str, num_virtual_tokens: int) -> torch.Tensor:
    """(P, C) float32 copies of the token embeddings of `text` (GPT-2 BPE), repeated or cut to P."""
    from ..data.tokenizer import get_tokenizer

    ids = get_tokenizer().encode(text, allowed_special="all")
    if not ids:
        raise ConfigError("prompt-tuning init text is empty")
    ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    wte = model.transformer.wte.weight
    return wte.detach()[torch.tensor(ids, device=wte.device)].float().clone()


# --- configs ------------------------------------------------------------------------------------

def _check_count(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _check_room(model, P: int, error=ConfigError) -> None:
    block = model.config.block_size
    if P >= block:
        raise error(f"{P} virtual tokens leave no room for real tokens in the model's context of {block} "
                    f"(block_size); use fewer than {block}")


def _attach(model, module: nn.Module, freeze: bool = True):
    """Put `module` on model.kv_prefix; with `freeze`, only its parameters stay trainable."""
    found = method_of(model)
    if found is not None:
        raise ConfigError(f"model already carries {NAMES[found]} ({found}); minigpt attaches one method at a time")
    if getattr(model.config, "arch", "gpt2") != "gpt2":
        raise ConfigError("prefix and prompt tuning are GPT-2 only in minigpt (on GPT-Neo use LoRA, DoRA, IA3 or "
                          "bottleneck adapters)")
    _check_room(model, module.num_virtual_tokens)
    if freeze:
        model.requires_grad_(False)
    model.kv_prefix = module
    module.requires_grad_(True)
    return model


class _VirtualTokenConfig:
    """What PrefixConfig and PromptConfig share: `method` (the minigpt.methods name) and to_dict."""

    method = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PrefixConfig(_VirtualTokenConfig):
    """Prefix tuning: num_virtual_tokens (P); projection: make the prefixes with an MLP (PEFT's
    prefix_projection) of hidden width encoder_hidden_size (None: the model's n_embd)."""

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: Optional[int] = None
    method = "prefix"

    def __post_init__(self) -> None:
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        if not isinstance(self.projection, bool):
            raise ConfigError(f"projection must be true or false, got {self.projection!r}")
        _check_count("encoder_hidden_size", self.encoder_hidden_size, allow_none=True)
        if self.encoder_hidden_size is not None and not self.projection:
            raise ConfigError("encoder_hidden_size is the width of the projection MLP: it needs projection=True")

    def apply(self, model):
        """Attach trainable prefixes to `model` (in place; everything else frozen); returns it."""
        c = model.config
        return _attach(model, PrefixTuning(c.n_layer, c.n_head, c.n_embd, self.num_virtual_tokens,
                                           self.projection, self.encoder_hidden_size, device=model.device))

    def describe(self) -> str:
        mlp = (f", made by an MLP of width {self.encoder_hidden_size or 'n_embd'}" if self.projection else "")
        return f"prefix tuning: {self.num_virtual_tokens} virtual tokens' keys/values in every layer{mlp}"


@dataclass
class PromptConfig(_VirtualTokenConfig):
    """Prompt tuning: num_virtual_tokens (P) trainable input embeddings, initialised at random
    (init="random") or from the token embeddings of init_text (init="text")."""

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: Optional[str] = None
    method = "prompt"

    def __post_init__(self) -> None:
        _check_count("num_virtual_tokens", self.num_virtual_tokens)
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"prompt-tuning init must be one of {', '.join(PROMPT_INITS)}, got {self.init!r}")
        if self.init == "text" and not (isinstance(self.init_text, str) and self.init_text.strip()):
            raise ConfigError("prompt-tuning init 'text' needs a non-empty init_text")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError("init_text is only used with init='text'")

    def apply(self, model):
        """Attach trainable virtual-token embeddings to `model` (in place; everything else frozen)."""
        module = PromptTuning(model.config.n_embd, self.num_virtual_tokens, self.init, self.init_text,
                              device=model.device)
        if self.init == "text":
            with torch.no_grad():
                module.prompt_embeddings.copy_(text_init_embeddings(model, self.init_text, self.num_virtual_tokens))
        return _attach(model, module)

    def describe(self) -> str:
        init = f"initialised from the text {self.init_text!r}" if self.init == "text" else "random init"
        return f"prompt tuning: {self.num_virtual_tokens} virtual input tokens, {init}"


_CONFIGS = {"prefix": PrefixConfig, "prompt": PromptConfig}


def method_config(method: str, **kw) -> Union[PrefixConfig, PromptConfig]:
    """PrefixConfig / PromptConfig for "prefix" / "prompt" (defaults + kw), validated."""
    cls = _CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ConfigError(f"unknown {method}-tuning setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**kw)


# --- the method protocol (minigpt.methods) ------------------------------------------------------------

def attached(model) -> Optional[str]:
    """"prefix" / "prompt" when the model carries that method, else None."""
    mod = getattr(model, "kv_prefix", None)
    if isinstance(mod, PrefixTuning):
        return "prefix"
    if isinstance(mod, PromptTuning):
        return "prompt"
    return None


def remove(model):
    """Drop the virtual tokens: a plain GPT again, every parameter trainable (as remove_lora).
    A model without a prefix or prompt is returned as it is."""
    if attached(model) is None:
        return model
    model.kv_prefix = None
    model.requires_grad_(True)
    return model


def save(model, base_model_name_or_path: Optional[str] = None) -> tuple[dict, dict, dict]:
    """(adapter_config dict, tensors, safetensors metadata) in PEFT's layout."""
    mod, c = model.kv_prefix, model.config
    method = attached(model)
    if method is None:
        raise ConfigError("model has no prefix or prompt to save")
    config = {"peft_type": "PREFIX_TUNING" if method == "prefix" else "PROMPT_TUNING", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path, "revision": None, "inference_mode": True,
              "num_virtual_tokens": mod.num_virtual_tokens, "token_dim": c.n_embd, "num_transformer_submodules": 1,
              "num_attention_heads": c.n_head, "num_layers": c.n_layer, "modules_to_save": None,
              "auto_mapping": None}
    with torch.no_grad():
        if method == "prefix":
            config.update(prefix_projection=mod.projection, encoder_hidden_size=mod.encoder_hidden_size,
                          init_weights=None)
            tensors = {"prompt_embeddings": mod.prefixes().detach().cpu()}                  # (P, L*2*C)
            if mod.projection:                        # + the MLP, for minigpt's exact resume
                tensors.update({MLP_KEY_PREFIX + k: v.detach().cpu() for k, v in mod.state_dict().items()})
        else:
            text = mod.init == "text"
            config.update(prompt_tuning_init="TEXT" if text else "RANDOM",
                          prompt_tuning_init_text=mod.init_text if text else None,
                          tokenizer_name_or_path="gpt2" if text else None, tokenizer_kwargs=None)
            tensors = {"prompt_embeddings": mod.prompt_embeddings.detach().cpu()}           # (P, C)
    return config, tensors, {"minigpt_method": method}


def _check_model_fits(cfg: dict, model, where) -> int:
    """The adapter's P, after checking its shape fields against the model (AdapterError naming them)."""
    c = model.config
    theirs = (cfg.get("num_layers"), cfg.get("token_dim"), cfg.get("num_attention_heads"))
    if theirs != (c.n_layer, c.n_embd, c.n_head):
        raise AdapterError(f"{where}: adapter is for num_layers={theirs[0]}, token_dim={theirs[1]}, "
                           f"num_attention_heads={theirs[2]}; the model has {c.n_layer} layers, n_embd={c.n_embd}, "
                           f"{c.n_head} heads (adapter for another base model?)")
    if (cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                           "(an encoder-decoder adapter); GPT-2 has 1")
    P = cfg.get("num_virtual_tokens")
    if isinstance(P, bool) or not isinstance(P, int) or P < 1:
        raise AdapterError(f"{where}: num_virtual_tokens must be a positive integer, got {P!r}")
    _check_room(model, P, AdapterError)
    return P


def _module_from(model, method: str, cfg: dict, tensors: dict, where) -> nn.Module:
    """A new PrefixTuning / PromptTuning holding the adapter's values (checked against the model)."""
    c, P = model.config, _check_model_fits(cfg, model, where)
    table = tensors.get("prompt_embeddings")
    if table is None:
        raise AdapterError(f"{where}: no prompt_embeddings tensor in the adapter's weights")
    want = (P, c.n_layer * 2 * c.n_embd) if method == "prefix" else (P, c.n_embd)
    if tuple(table.shape) != want:
        raise AdapterError(f"{where}: prompt_embeddings has shape {tuple(table.shape)}, the model expects {want} "
                           f"({P} virtual tokens)")
    mlp = {k[len(MLP_KEY_PREFIX):]: t for k, t in tensors.items() if k.startswith(MLP_KEY_PREFIX)}
    if method == "prompt":
        init = "text" if str(cfg.get("prompt_tuning_init", "RANDOM")).upper() == "TEXT" else "random"
        module = PromptTuning(c.n_embd, P, init, cfg.get("prompt_tuning_init_text") if init == "text" else None,
                              device=model.device)
        values = {"prompt_embeddings": table}
    elif mlp and cfg.get("prefix_projection"):
        hidden = mlp.get("transform.0.weight", torch.empty(0, 0)).shape[0]
        module = PrefixTuning(c.n_layer, c.n_head, c.n_embd, P, True, hidden or None, device=model.device)
        values = mlp
    else:                                             # the table itself (PEFT keeps no MLP)
        module = PrefixTuning(c.n_layer, c.n_head, c.n_embd, P, device=model.device)
        values = {"prompt_embeddings": table}
    _copy_values(module, values, where)
    return module


def _copy_values(module: nn.Module, values: dict, where) -> None:
    """module's tensors := values (same names and shapes, else AdapterError)."""
    own = module.state_dict()
    if set(own) != set(values):
        raise AdapterError(f"{where}: adapter tensors {sorted(values)} do not match the module's {sorted(own)}")
    for k, t in own.items():
        if tuple(values[k].shape) != tuple(t.shape):
            raise AdapterError(f"{where}: {k} has shape {tuple(values[k].shape)}, expected {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(values[k])


def load(model, adapter_dir, cfg: dict, tensors: dict, meta: Optional[dict] = None, freeze: bool = True):
    """Load a PREFIX_TUNING / PROMPT_TUNING adapter (minigpt- or PEFT-written) into `model`, in place.
    A model already carrying the same method gets its values overwritten (exact resume: the
    Parameters stay the same objects, so an optimizer keeps them)."""
    where = Path(adapter_dir) / ADAPTER_CONFIG_NAME
    method = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt"}.get(cfg.get("peft_type"))
    if method is None:
        raise AdapterError(f"{where}: peft_type {cfg.get('peft_type')!r} is not prefix or prompt tuning")
    module = _module_from(model, method, cfg, tensors, where)
    existing = model.kv_prefix
    if existing is None:
        return _attach(model, module, freeze)
    same = type(existing) is type(module) and {k: tuple(v.shape) for k, v in existing.state_dict().items()} == {
        k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not same:
        raise AdapterError(f"{where}: the model's {existing.extra_repr()} differs from the adapter's "
                           f"{module.extra_repr()}; load it into a plain model")
    _copy_values(existing, module.state_dict(), where)
    if method == "prompt":
        existing.init, existing.init_text = module.init, module.init_text
    return model
