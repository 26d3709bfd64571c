"""Tensor-name maps from checkpoint layouts to minigpt's and back.

minigpt's layout: `transformer.`-prefixed HF names, nn.Linear (out, in) weights, no
`lm_head.weight` (tied to wte). Each conversion is a key map plus a list of transposes: the four
per-block projection weights in CONV1D_WEIGHTS are (in, out) in HF (Conv1D) and OpenAI TF files
and (out, in) here. GPT-Neo (HF GPTNeoForCausalLM: `attn.attention.{q,k,v,out}_proj`, nn.Linear
everywhere) has no transposes; a state dict is GPT-Neo's when it holds such keys (is_gpt_neo).

* hf_to_minigpt / minigpt_to_hf: HF GPT-2 and GPT-Neo state dicts, with or without the
  `transformer.` prefix; the `attn.bias` / `attn.masked_bias` buffers (GPT-Neo:
  `attn.attention.bias` / `.masked_bias`; IGNORED_HF_KEYS) and the tied lm_head are dropped.
* openai_to_minigpt: OpenAI TF names (model/h0/attn/c_attn/w [1, in, out], model/ln_f/g, ...).
"""
from __future__ import annotations

import re

import torch

from ..errors import CheckpointError

__all__ = [
    "CONV1D_WEIGHTS",
    "IGNORED_HF_KEYS",
    "hf_to_minigpt",
    "is_conv1d_weight",
    "is_gpt_neo",
    "minigpt_to_hf",
    "openai_to_minigpt",
]

# Weights that HF stores as Conv1D (in, out) and minigpt as nn.Linear (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers found in Hub files (causal mask, masked-bias constant): dropped on load.
IGNORED_HF_KEYS = ("attn.bias", "attn.masked_bias", "attn.attention.bias", "attn.attention.masked_bias")
_IGNORED_RE = re.compile(r"(?:^|\.)h\.\d+\.attn\.(?:attention\.)?(?:bias|masked_bias)$")
_NEO_RE = re.compile(r"(?:^|\.)h\.\d+\.attn\.attention\.(?:q|k|v|out)_proj\.")

# optimizer / bookkeeping variables that may sit next to the weights in a TF checkpoint
_TF_IGNORED = ("global_step", "beta1_power", "beta2_power")
_TF_IGNORED_SUFFIXES = ("/Adam", "/Adam_1")
_TF_LEAF = {"g": "weight", "b": "bias", "w": "weight"}


def is_conv1d_weight(key: str) -> bool:
    """True for the keys whose HF tensor is (in, out) and minigpt tensor is (out, in)."""
    return key.endswith(CONV1D_WEIGHTS) and ".h." in f".{key}"


def is_gpt_neo(keys) -> bool:
    """True when state-dict keys are GPT-Neo's (separate attn.attention.q_proj/k_proj/v_proj/out_proj)."""
    return any(_NEO_RE.search(k) for k in keys)


def _transposed(key: str, t: torch.Tensor, neo: bool = False) -> torch.Tensor:
    """The transposes: (in, out) <-> (out, in) for GPT-2's Conv1D weights, other tensors (and all
    of GPT-Neo's) as they are."""
    return t.t() if not neo and is_conv1d_weight(key) and t.dim() == 2 else t


# --- key maps (None: the tensor is dropped) ------------------------------------------------------
def _hf_key(key: str, drop_buffers: bool) -> str | None:
    if drop_buffers and _IGNORED_RE.search(key):
        return None
    return key if key.startswith("transformer.") else f"transformer.{key}"


def _openai_key(name: str) -> str | None:
    if name in _TF_IGNORED or name.endswith(_TF_IGNORED_SUFFIXES):
        return None
    parts = name.split("/")
    if parts[0] == "model" and len(parts) >= 2:
        if parts[1] in ("wte", "wpe") and len(parts) == 2:
            return f"transformer.{parts[1]}.weight"
        if parts[1] == "ln_f" and len(parts) == 3 and parts[2] in ("g", "b"):
            return f"transformer.ln_f.{_TF_LEAF[parts[2]]}"
        m = re.fullmatch(r"h(\d+)", parts[1])
        if m and len(parts) in (4, 5) and parts[-1] in _TF_LEAF:
            return f"transformer.h.{int(m.group(1))}.{'.'.join(parts[2:-1])}.{_TF_LEAF[parts[-1]]}"
    raise CheckpointError(f"unexpected tensor {name!r} in the OpenAI checkpoint")


# --- conversions ----------------------------------------------------------------------------------
def hf_to_minigpt(state_dict: dict, *, drop_buffers: bool = True) -> dict:
    """HF GPT-2 or GPT-Neo state dict (prefixed or not) -> minigpt layout.

    Adds the `transformer.` prefix where missing, transposes GPT-2's Conv1D weights, drops the
    attention-mask buffers and `lm_head.weight` (tied; it must equal wte when present). Keys it
    does not know (e.g. LoRA tensors) are passed through with the prefix rule applied.
    """
    out = {}
    lm_head = None
    neo = is_gpt_neo(state_dict)
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            lm_head = v
            continue
        key = _hf_key(k, drop_buffers)
        if key is not None:
            out[key] = _transposed(key, v, neo)
    if lm_head is not None:
        wte = out.get("transformer.wte.weight")
        if wte is not None and (wte.shape != lm_head.shape or not torch.equal(wte, lm_head)):
            raise CheckpointError("lm_head.weight differs from transformer.wte.weight; minigpt only "
                                  "supports models with tied input/output embeddings")
    return out


def minigpt_to_hf(state_dict: dict, *, prefix: bool = True) -> dict:
    """minigpt state dict -> HF Hub layout: GPT-2's Conv1D (in, out) weights (GPT-Neo's as they
    are), no lm_head, contiguous.

    With prefix=False the `transformer.` prefix is stripped (the original Hub file layout).
    """
    out = {}
    neo = is_gpt_neo(state_dict)
    for k, v in state_dict.items():
        if k == "lm_head.weight":
            continue
        v = _transposed(k, v, neo)
        if not prefix and k.startswith("transformer."):
            k = k[len("transformer."):]
        out[k] = v.contiguous()
    return out


def openai_to_minigpt(tensors: dict) -> dict:
    """OpenAI TF names (model/h0/attn/c_attn/w [1, in, out], model/ln_f/g, ...) -> minigpt layout.

    Optimizer and bookkeeping variables (global_step, .../Adam) are dropped; any other unknown
    name raises CheckpointError.
    """
    out = {}
    for name, t in tensors.items():
        key = _openai_key(name)
        if key is None:
            continue
        if name.endswith("/w") and t.dim() == 3 and t.shape[0] == 1:   # a [1, in, out] conv kernel
            t = t[0]
        out[key] = _transposed(key, t)
    return out
