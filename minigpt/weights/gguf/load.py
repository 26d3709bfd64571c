"""GGUF import: a llama.cpp GPT-2 file as (GPTConfig, state dict) for minigpt.weights.checkpoint.

Reads f32, f16, bf16 and q8_0 tensors (dequantized to float32), checks the architecture (gpt2),
the shapes' metadata and the tokenizer (GPT-2's BPE only), and renames the tensors to minigpt's
layout. This side of the package needs nothing of minigpt.methods.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import CheckpointError, ConfigError
from ...model.config import GPTConfig
from .format import GGUFFile, PathLike, read_gguf
from .vocab import gpt2_vocab, minigpt_name

__all__ = ["load_gguf_checkpoint"]


def _meta(g: GGUFFile, key: str, kind: type = int):
    if key not in g.metadata:
        raise CheckpointError(f"{g.path}: metadata {key} is missing; not a complete GPT-2 GGUF")
    v = g.metadata[key]
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise CheckpointError(f"{g.path}: metadata {key} = {v!r} is not a number")
    return v


def _gguf_config(g: GGUFFile) -> GPTConfig:
    arch = g.metadata.get("general.architecture")
    if g.metadata.get("general.type") == "adapter":
        raise CheckpointError(f"{g.path}: a GGUF LoRA adapter, not a model (load the base model and the "
                              "adapter's PEFT folder instead)")
    if arch != "gpt2":
        raise CheckpointError(f"{g.path}: architecture {arch!r} is not GPT-2 (minigpt reads general.architecture "
                              "'gpt2' only)")
    n_embd = _meta(g, "gpt2.embedding_length")
    ff = _meta(g, "gpt2.feed_forward_length")
    if ff != 4 * n_embd:
        raise CheckpointError(f"{g.path}: feed_forward_length {ff} is not 4 x embedding_length ({n_embd})")
    if "token_embd.weight" not in g.tensors:
        raise CheckpointError(f"{g.path}: tensor token_embd.weight is missing")
    try:
        return GPTConfig(n_layer=_meta(g, "gpt2.block_count"), n_head=_meta(g, "gpt2.attention.head_count"),
                         n_embd=n_embd, block_size=_meta(g, "gpt2.context_length"),
                         vocab_size=g.tensors["token_embd.weight"].shape[0],
                         layer_norm_epsilon=float(str(np.float32(_meta(g, "gpt2.attention.layer_norm_epsilon",
                                                                       float)))))   # 1e-05, not 9.99e-06
    except ConfigError as e:
        raise CheckpointError(f"{g.path}: {e}") from e


def _check_tokenizer(g: GGUFFile) -> None:
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    ours = gpt2_vocab()[0]
    if g.metadata.get("tokenizer.ggml.model") != "gpt2" or list(tokens[:len(ours)]) != list(ours):
        raise CheckpointError(f"{g.path}: its tokenizer is not GPT-2's BPE (minigpt only has GPT-2's), so "
                              "its token ids would mean other text")


def load_gguf_checkpoint(path: PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, float32 state dict in minigpt layout) of a GGUF GPT-2 file (f32, f16, bf16 or
    q8_0 tensors). An output.weight equal to token_embd (llama.cpp's converter writes one) is
    dropped; a different one is an untied head, which minigpt's GPT does not have."""
    g = read_gguf(path)
    cfg = _gguf_config(g)
    _check_tokenizer(g)
    sd = {}
    for name in g.tensors:
        key = minigpt_name(name)
        if key is None:
            raise CheckpointError(f"{g.path}: tensor {name} is not part of GPT-2")
        sd[key] = g.tensor(name)
    head = sd.pop("lm_head.weight", None)
    if head is not None:
        wte = sd["transformer.wte.weight"]
        if head.shape != wte.shape or not torch.allclose(head, wte, rtol=0, atol=1e-2 * float(wte.abs().max())):
            raise CheckpointError(f"{g.path}: output.weight differs from token_embd.weight (an untied head); "
                                  "minigpt's GPT ties the output head to the token embedding")
    return cfg, sd
