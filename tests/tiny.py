"""Tiny models and tiny runs for the tests: one builder for small random GPTs, one for train.py flags.

Imported as `from tiny import ...` or `import tiny` (pytest puts tests/ on sys.path: the folder has
no __init__.py, so its conftest.py and test files are imported with their folder prepended).

gpt() reproduces what the test files used to write out by hand, in the same order of RNG calls:
    torch.manual_seed(seed)            (skipped with seed=None: the caller's RNG state goes on)
    GPT(GPTConfig(...))                (GPT-2's own init, N(0, 0.02), draws from the global RNG)
    .eval()                            (unless train=True)
    redraw every parameter N(0, std)   (only with std set; LayerNorm gains N(ln_mean, std), or left
                                        at 1 with ln_mean=None; named_parameters() order)
    .to(dtype)                         (only with dtype set)
so a test that builds its model through here gets bit-identical weights to the old hand-written code.
"""
from __future__ import annotations

from typing import Optional

import torch

from minigpt import GPT, GPTConfig


def config(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 64, vocab_size: int = 50257,
           **extra) -> GPTConfig:
    """GPTConfig of a tiny GPT-2: 2 layers, 2 heads, 64 dims, context 64, GPT-2's vocabulary."""
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                     **extra)


def gpt(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 64, vocab_size: int = 50257, *,
        seed: Optional[int] = 0, std: Optional[float] = None, ln_mean: Optional[float] = 1.0,
        train: bool = False, dtype: Optional[torch.dtype] = None, **extra) -> GPT:
    """A tiny random GPT (see the module docstring for the exact recipe).

    seed: torch.manual_seed before building (None: do not reseed).
    std: redraw all weights from N(0, std) after GPT-2's init (None: keep GPT-2's init). Larger
        weights give confident, varied logits; GPT-2's 0.02 gives near-uniform ones.
    ln_mean: the mean LayerNorm gains are redrawn around (1.0: gains near 1; 0.0: drawn like every
        other weight; None: gains left at exactly 1). Only with std.
    train: leave the model in training mode (default: eval()).
    extra: other GPTConfig fields (dropout, layer_norm_epsilon, name).
    """
    if seed is not None:
        torch.manual_seed(seed)
    m = GPT(config(n_layer, n_head, n_embd, block_size, vocab_size, **extra))
    if not train:
        m.eval()
    if std is not None:
        with torch.no_grad():
            for name, p in m.named_parameters():
                gain = ".ln_" in name and name.endswith("weight")
                if gain and ln_mean is None:
                    continue
                p.normal_(ln_mean if gain else 0.0, std)
    if dtype is not None:
        m.to(dtype)
    return m


def flags(**kw) -> list[str]:
    """Command-line flags from keywords, in the order given: n_layer=2 -> ["--n-layer", "2"];
    True -> the bare flag; None or False -> left out. Values are str()'d (pass "3e-3" as a string
    to keep that spelling)."""
    out: list[str] = []
    for k, v in kw.items():
        if v is None or v is False:
            continue
        out += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return out


def train_flags(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, block_size: int = 32, batch_size: int = 4,
                eval_batches: int = 1, samples: int = 0, threads: int = 1, **more) -> list[str]:
    """train.py flags of a tiny, fast, deterministic run: the model shape and batch, no samples, one
    thread, then `more` in the order given (e.g. log_interval=1, precision="fp32", device="cpu")."""
    return flags(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, batch_size=batch_size,
                 eval_batches=eval_batches, samples=samples, threads=threads, **more)
