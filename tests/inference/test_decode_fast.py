"""The lean decoding step (minigpt.inference.decode_step) against the model's own forward, for every
decoding mode: the same hidden states bit for bit and the same caches, greedy tokens equal to the
exact fp32 path (the plain model's forward, no packing), logits close to the exact ones, and the
model's forward used wherever the lean step does not apply."""
from __future__ import annotations

import copy
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn
from tiny import gpt as tiny_gpt

import minigpt.inference.generate as gen
from minigpt.inference.decode_step import LeanStep, lean_step
from minigpt.inference.decode_weights import DECODE_MODES, DecodeLinear, prepare_for_decoding
from minigpt.inference.generate import generate, stream
from minigpt.methods import IA3Config, LoRAConfig, PrefixConfig

# fp16 twice, once with each of its kernels (decode_weights.fp16_kernel: torch's GEMV, fbgemm's GEMM)
FP16 = ("fp16:torch", "fp16:fbgemm")
MODES = ("plain",) + tuple(m for mode in DECODE_MODES for m in (FP16 if mode == "fp16" else (mode,)))
# how far each mode's logits may be from the exact fp32 ones, relative to their largest magnitude
# (measured on this 3-layer model: 1.1e-6, 2.8e-3, 2.3e-2, 6.3e-2, 0.11, 0.48), and how many of its 40
# greedy tokens must equal the exact path's (int4 parts after 9 here)
LOGIT_TOL = {"plain": 1e-5, "fp32": 1e-5, "fp16:torch": 5e-3, "fp16:fbgemm": 5e-3, "bf16": 4e-2, "int8": 0.1,
             "w8a8": 0.2, "int4": 0.6}
AGREE = {"int4": 5}


def prepare(model, mode: str):
    """prepare_for_decoding(model, "fp16") with the kernel a "fp16:<kernel>" mode names."""
    mode, _, kernel = mode.partition(":")
    with mock.patch.dict(os.environ, {"MINIGPT_FP16_GEMV": kernel or "auto"}):
        return prepare_for_decoding(model, mode)


@pytest.fixture(scope="module")
def exact():
    """A confident tiny GPT-2 (3 layers, 4 heads, 512 tokens; std 0.3: wide top-1 margins)."""
    return tiny_gpt(n_layer=3, n_head=4, n_embd=64, block_size=64, vocab_size=512, seed=3, std=0.3)


@pytest.fixture(scope="module")
def models(exact):
    return {mode: exact if mode == "plain" else prepare(copy.deepcopy(exact), mode) for mode in MODES}


def test_each_fp16_kernel_is_in_place(models):
    kinds = {mode: {x.kind for x in models[mode].modules() if isinstance(x, DecodeLinear)} for mode in FP16}
    assert kinds == {"fp16:torch": {"fp16"}, "fp16:fbgemm": {"fbgemm_fp16"}}


def _prompts(B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_lean_step_is_the_forward_bit_for_bit(models, mode):
    """Several steps of 2 rows: the lean step's hidden states and KV caches equal the model's forward
    on twin caches, exactly."""
    m = models[mode]
    idx = _prompts(2, 7, seed=1)
    with torch.inference_mode():
        ours, ref = m.new_caches(2, 20), m.new_caches(2, 20)
        m(idx, caches=ours)
        m(idx, caches=ref)
        step = lean_step(m, ours)
        assert isinstance(step, LeanStep)
        tok = idx[:, -1]
        for start in range(7, 12):
            h = step(tok, start)
            want = m.hidden_states(tok[:, None], caches=ref, start=start)
            assert h.shape == (2, 1, 64) and torch.equal(h, want), (mode, start)
            tok = m.lm_head(h)[:, -1].float().argmax(-1)
        for a, b in zip(ours, ref):
            assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


@pytest.mark.parametrize("mode", FP16 + ("w8a8", "int8", "int4"))
def test_bare_kernels_are_forward_without_the_casts(models, mode):
    """The kernels the lean step calls (DecodeLinear.row_call: 2-D input in the kernel's dtype) give
    forward's numbers, widened exactly where forward casts back; every weight layer has one."""
    m = models[mode]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    for layer in (m.transformer.h[0].attn.c_attn, m.transformer.h[1].mlp.c_fc):
        kernel, dtype = layer.row_call(2)
        with torch.inference_mode():
            got, want = kernel(x.to(dtype)), layer(x[:, None])[:, 0]
        assert got.float().equal(want) and want.abs().max() > 0, mode


def _exact_greedy(m, idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and their logits by full forwards of the exact fp32 model (no cache, no packing)."""
    ids, logits = idx, []
    with torch.no_grad():
        for _ in range(n):
            last = m(ids)[:, -1]
            logits.append(last)
            ids = torch.cat([ids, last.argmax(-1, keepdim=True)], 1)
    return ids, torch.stack(logits, 1)


def _lean_logits(m, tokens: torch.Tensor, T: int) -> torch.Tensor:
    """Logits (1, n, V) of `m` decoding `tokens` (1, T + n) after a T-token prompt: prefill, then the
    lean step fed the given tokens (teacher forcing)."""
    with torch.inference_mode():
        caches = m.new_caches(1, tokens.size(1))
        out = [m(tokens[:, :T], caches=caches, last_only=True)[:, -1]]
        step = lean_step(m, caches)
        out += [m.lm_head(step(tokens[:, t], t))[:, -1] for t in range(T, tokens.size(1) - 1)]
    return torch.stack(out, 1).float()


@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_equal_the_exact_path_and_logits_are_close(exact, models, mode, monkeypatch):
    """Greedy tokens of every mode equal the exact fp32 path's (full forwards of the plain model, no
    cache, no packing) on this confident model, and fed those tokens, the lean step's logits are
    within the mode's tolerance of the exact ones. The model's own forward (pack=False) gives the
    lean step's tokens exactly."""
    m, T, n = models[mode], 9, 40
    idx = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(2))
    want, want_logits = _exact_greedy(exact, idx, n)
    steps = []
    real = gen.lean_step
    monkeypatch.setattr(gen, "lean_step", lambda *a: steps.append(real(*a)) or steps[-1])
    got = generate(m, idx, n)
    assert isinstance(steps[0], LeanStep), "an unpadded call decodes with the lean step"
    k = T + AGREE.get(mode, n)
    assert torch.equal(got[:, :k], want[:, :k]), mode
    assert torch.equal(generate(m, idx, n, pack=False), got)             # the model's own forward
    err = (_lean_logits(m, want, T) - want_logits).abs().max()
    assert err <= LOGIT_TOL[mode] * want_logits.abs().max(), (mode, err)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_adapted_layers_take_the_lean_step(exact, method):
    """Unmerged LoRA / IA3 layers sit in the weight slots: the lean step calls them, same maths."""
    cfg = LoRAConfig(r=4, targets=("c_attn", "c_proj", "c_fc")) if method == "lora" else IA3Config()
    m = cfg.apply(copy.deepcopy(exact))
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)                      # a trained-looking update
    m.eval()
    idx = _prompts(1, 6, seed=8)
    with torch.inference_mode():
        ours, ref = m.new_caches(1, 9), m.new_caches(1, 9)
        m(idx, caches=ours)
        m(idx, caches=ref)
        step = lean_step(m, ours)
        assert step is not None
        for start in range(6, 9):
            assert torch.equal(step(idx[:, start - 6], start),
                               m.hidden_states(idx[:, start - 6:start - 5], caches=ref, start=start))
    assert torch.equal(generate(m, idx, 20), generate(m, idx, 20, pack=False))


@pytest.mark.parametrize("mode", FP16)
def test_batch_rows_equal_each_row_alone(models, mode):
    m = models[mode]
    idx = _prompts(3, 6, seed=4)
    out = generate(m, idx, 12)
    for b in range(3):
        assert torch.equal(out[b:b + 1], generate(m, idx[b:b + 1], 12))


def test_stream_and_sampling_take_the_lean_step(exact):
    idx = _prompts(1, 5, seed=5)
    assert list(stream(exact, idx, 20)) == generate(exact, idx, 20)[0, 5:].tolist()
    kw = dict(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.3)
    a = generate(exact, idx, 20, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(exact, idx, 20, generator=torch.Generator().manual_seed(7), pack=False, **kw)
    assert torch.equal(a, b)


def test_models_the_lean_step_does_not_cover(exact):
    """lean_step declines GPT-Neo, adapters, hooks, virtual tokens and replaced blocks; generate
    then decodes with the model's forward."""
    idx = _prompts(1, 6, seed=6)
    want = generate(exact, idx, 10, pack=False)

    hooked = copy.deepcopy(exact)
    hooked.transformer.h[1].mlp.register_forward_hook(lambda mod, inp, out: out * 2)
    caches = hooked.new_caches(1, 16)
    assert lean_step(hooked, caches) is None
    assert torch.equal(generate(hooked, idx, 10), generate(hooked, idx, 10, pack=False))
    assert not torch.equal(generate(hooked, idx, 10), want)               # the hook does act

    adapted = copy.deepcopy(exact)
    adapted.transformer.h[0].attn_adapter = nn.Identity()
    assert lean_step(adapted, adapted.new_caches(1, 16)) is None and torch.equal(generate(adapted, idx, 10), want)

    prefixed = PrefixConfig(3).apply(copy.deepcopy(exact))
    assert lean_step(prefixed, prefixed.new_caches(1, 16)) is None
    assert torch.equal(generate(prefixed, idx, 10), generate(prefixed, idx, 10, pack=False))

    neo = tiny_gpt(seed=0, std=0.2, arch="gpt_neo", window_size=4)
    assert lean_step(neo, neo.new_caches(1, 16)) is None


def test_cache_overflow_is_refused(exact):
    with torch.inference_mode():
        caches = exact.new_caches(1, 4)
        step = lean_step(exact, caches)
        with pytest.raises(ValueError, match="KV cache holds 4 positions"):
            step(torch.tensor([1]), 4)
