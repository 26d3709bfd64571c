"""GGUF export for llama.cpp: any minigpt GPT-2 (base, fine-tuned, LoRA/DoRA/IA3 merged) as a model
file, LoRA adapters as llama.cpp LoRA GGUFs.

Layout for architecture "gpt2" (minigpt.weights.gguf.vocab names the tensors): `output.weight` only
when the head is not tied to token_embd (llama.cpp reuses token_embd otherwise). minigpt's Linear
weights are (out, in), which is ggml's [in, out]: written as they are (Hugging Face's Conv1D
(in, out) is transposed by keymap long before this module sees it). Matrices are stored in the
chosen dtype; biases and LayerNorm vectors stay f32 (as llama.cpp's own converter does); a q8_0
matrix whose rows are not a multiple of 32 long is stored f16 instead. The weights come from
minigpt.methods.plain_state_dict: a mergeable method's update folded in (or left out), the model
untouched.

LoRA adapters (llama.cpp's format): general.type = "adapter", adapter.type = "lora",
adapter.lora.alpha; per adapted matrix `<tensor>.lora_a` = lora_A (r, in) -> ggml [in, r] and
`<tensor>.lora_b` = lora_B (out, r) -> ggml [r, out]; llama.cpp adds (alpha / r) * B (A x). No
transposition is needed for minigpt's (out, in) layout (llama.cpp's converter transposes GPT-2
LoRA pairs for Conv1D; doing that to already-Linear pairs would be wrong).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ...data.templates import Template
from ...errors import CheckpointError, ConfigError
from ...methods import plain_state_dict
from ...methods.lora import lora_pairs
from ...methods.surgery import is_tied
from ...model.config import GPTConfig
from ...model.quant import is_quantized
from .format import DTYPES, F16, F32, PathLike, TensorToWrite, write_gguf
from .vocab import gguf_name, tokenizer_metadata

__all__ = ["export_gguf", "export_lora_gguf"]

_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}          # llama.cpp's LLAMA_FTYPE_*


def _check_shapes(model, sd: dict) -> GPTConfig:
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, GPTConfig) or not hasattr(model, "transformer"):
        raise ConfigError(f"export_gguf needs a minigpt GPT, got {type(model).__name__}")
    c, n = cfg.n_embd, cfg.n_layer
    want = {"transformer.wte.weight": (cfg.vocab_size, c), "transformer.wpe.weight": (cfg.block_size, c),
            "transformer.ln_f.weight": (c,), "transformer.ln_f.bias": (c,), "lm_head.weight": (cfg.vocab_size, c)}
    for i in range(n):
        for part, shape in (("ln_1", (c,)), ("attn.c_attn", (3 * c, c)), ("attn.c_proj", (c, c)), ("ln_2", (c,)),
                            ("mlp.c_fc", (4 * c, c)), ("mlp.c_proj", (c, 4 * c))):
            w = f"transformer.h.{i}.{part}"
            want[f"{w}.weight"] = shape
            want[f"{w}.bias"] = (shape[0],)
    extra = sorted(set(sd) - set(want))
    if extra:
        more = f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""
        raise ConfigError(f"the model has tensors that GPT-2 in llama.cpp has no place for: "
                          f"{', '.join(extra[:3])}{more} (a quantized or adapted model: export the plain weights)")
    for k, shape in want.items():
        if k not in sd:
            raise ConfigError(f"the model lacks {k}; not a GPT-2 model")
        if tuple(sd[k].shape) != shape or not sd[k].is_floating_point():
            raise ConfigError(f"{k} has shape {list(sd[k].shape)} ({sd[k].dtype}); GPT-2 of this config needs "
                              f"{list(shape)} floats")
    return cfg


def _check_gpt2(model) -> None:
    arch = getattr(getattr(model, "config", None), "arch", "gpt2")
    if arch != "gpt2":
        raise ConfigError(f"GGUF export supports GPT-2 only: llama.cpp has no {arch} (GPT-Neo) architecture")


def _tensor_type(t: torch.Tensor, dtype: str) -> int:
    if t.dim() == 1:
        return F32                                  # biases and LayerNorms: f32, as llama.cpp's converter
    if dtype == "q8_0" and t.shape[-1] % 32:
        return F16                                  # rows must be whole q8_0 blocks
    return DTYPES[dtype]


def _check_dtype(dtype: str, allowed=tuple(DTYPES)) -> str:
    if dtype not in allowed:
        raise ConfigError(f"dtype must be one of {', '.join(allowed)}, got {dtype!r}")
    return dtype


def export_gguf(model, path: PathLike, dtype: str = "f16", *, template: Union[str, Template, None] = None,
                name: Optional[str] = None, merge: bool = True) -> Path:
    """Write `model` (a minigpt GPT) as a llama.cpp GGUF v3 file of architecture gpt2.

    dtype:    f32 | f16 | bf16 | q8_0 for the matrices (vectors stay f32).
    template: the chat template to embed as tokenizer.chat_template (default alpaca).
    name:     general.name (default: the config's name).
    merge:    LoRA layers are folded into the weights (True) or left out (False: the base model,
              for use with export_lora_gguf's adapter). The model itself is not changed.
    An untied head (lm_head not the token embedding) is written as output.weight.
    """
    _check_dtype(dtype)
    _check_gpt2(model)
    if is_quantized(model):
        raise CheckpointError("a quantized (nf4/int8) model cannot be exported: load it without quantize= "
                              "(a QLoRA adapter applies to the full-precision base) and export that")
    sd = plain_state_dict(model, merge)
    cfg = _check_shapes(model, sd)
    head, wte = sd.pop("lm_head.weight"), sd["transformer.wte.weight"]
    tied = head.data_ptr() == wte.data_ptr() or torch.equal(head, wte)
    meta = {
        "general.architecture": "gpt2",
        "general.type": "model",
        "general.name": name or (cfg.name if cfg.name != "custom" else "minigpt"),
        "general.file_type": _FILE_TYPE[dtype],
        "general.quantization_version": 2,
        "gpt2.context_length": cfg.block_size,
        "gpt2.embedding_length": cfg.n_embd,
        "gpt2.feed_forward_length": 4 * cfg.n_embd,
        "gpt2.block_count": cfg.n_layer,
        "gpt2.attention.head_count": cfg.n_head,
        "gpt2.attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon),
        **tokenizer_metadata(cfg.vocab_size, template),
    }
    order = ["transformer.wte.weight", "transformer.wpe.weight"]
    order += [k for k in sd if k.startswith("transformer.h.")]
    order += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    tensors = [TensorToWrite(gguf_name(k), sd[k], _tensor_type(sd[k], dtype)) for k in order]
    if not tied:
        tensors.append(TensorToWrite("output.weight", head, _tensor_type(head, dtype)))
    return write_gguf(path, meta, tensors)


def export_lora_gguf(model, path: PathLike, dtype: str = "f32", *, name: Optional[str] = None) -> Path:
    """Write the (unmerged) LoRA layers of `model` as a llama.cpp LoRA adapter GGUF, for
    `llama-cli -m base.gguf --lora adapter.gguf` (base.gguf: export_gguf(model, ..., merge=False)).

    llama.cpp scales each pair by alpha / r with one alpha per file: the adapter's alpha when all
    layers share alpha / r (rsLoRA: alpha * sqrt(r)), else each layer's scaling is folded into
    lora_b and alpha is 0 (llama.cpp then scales by 1). dtype: f32 | f16 | bf16.
    """
    _check_dtype(dtype, ("f32", "f16", "bf16"))
    _check_gpt2(model)
    pairs = lora_pairs(model)
    if not pairs:
        raise ConfigError("the model has no LoRA layers to export (load an adapter with load_adapter first)")
    products = {scaling * A.shape[0] for A, _, scaling in pairs.values()}     # alpha of each layer (rank r)
    alpha = products.pop() if len(products) == 1 else 0.0
    tensors = []
    for mod, (A, B, scaling) in pairs.items():
        if is_tied(model, model.get_submodule(mod)):
            raise ConfigError(f"{mod}: llama.cpp cannot apply a LoRA on GPT-2's tied output head")
        base = gguf_name(f"{mod}.weight")
        b = B.float()
        if alpha == 0.0:
            b = b * scaling
        tensors += [TensorToWrite(f"{base}.lora_a", A, DTYPES[dtype]),
                    TensorToWrite(f"{base}.lora_b", b, DTYPES[dtype])]
    cfg = model.config
    meta = {"general.architecture": "gpt2", "general.type": "adapter",
            "general.name": name or (cfg.name if cfg.name != "custom" else "minigpt") + "-lora",
            "adapter.type": "lora", "adapter.lora.alpha": float(alpha)}
    return write_gguf(path, meta, tensors)
