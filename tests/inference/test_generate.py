"""Decoding tests. Reference: transformers' GPT2LMHeadModel on identical random weights."""
from __future__ import annotations

import copy
import io

import pytest
import tiny
import torch
import torch.nn as nn
import torch.nn.functional as F

import minigpt.inference.decode_weights as decode_weights
from minigpt import GPTConfig, get_tokenizer
from minigpt.errors import ConfigError
from minigpt.inference.decode_weights import (
    CertifiedArgmax,
    DecodeLinear,
    dequantize_int4,
    fp16_kernel,
    prepare_for_decoding,
    quantize_int4,
)
from minigpt.inference.generate import generate, stream, stream_text
from minigpt.inference.sampling import _top_p_drop, apply_repetition_penalty, sample_next

transformers = pytest.importorskip("transformers")

V = 50257
EOT = 50256
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=128)


def hf_to_minigpt(hf) -> dict:
    """HF GPT2LMHeadModel state dict -> minigpt keys (Conv1D (in, out) -> Linear (out, in))."""
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        sd[k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k] = v
    return sd


@pytest.fixture(scope="module")
def models():
    """(hf, minigpt) tiny GPT-2s with the same weights, re-initialised N(0, 0.2): far from
    uniform, strongly nonlinear, so greedy paths are sensitive to any numerical slip."""
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=TINY["n_layer"], n_head=TINY["n_head"],
                                     n_embd=TINY["n_embd"], n_positions=TINY["block_size"],
                                     vocab_size=V)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    m = tiny.gpt(**TINY, seed=None)                # its own init is overwritten by HF's weights
    missing, unexpected = m.load_state_dict(hf_to_minigpt(hf), strict=False)
    assert not unexpected and not [k for k in missing if k != "lm_head.weight"]
    return hf, m


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from 2 threads, and OpenMP stalls badly on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V - 1, (n,), generator=g) for n in lengths]


def left_pad(seqs, pad=EOT):
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    return idx, mask


def hf_generate(hf, idx, mask=None, **kw):
    mask = torch.ones_like(idx) if mask is None else mask
    with torch.no_grad():
        return hf.generate(idx, attention_mask=mask, pad_token_id=EOT, **kw)


# --- parity with transformers ---------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 5, 17])
def test_greedy_matches_hf_batch1(models, n):
    hf, m = models
    idx = prompts([n], seed=n)[0][None]
    ours = generate(m, idx, 24)
    ref = hf_generate(hf, idx, do_sample=False, max_new_tokens=24)
    assert ours.shape == (1, n + 24)
    assert torch.equal(ours, ref)
    assert len(set(ours[0, n:].tolist())) >= 3, "greedy output is trivially constant"


def test_greedy_matches_hf_left_padded_batch(models):
    hf, m = models
    idx, mask = left_pad(prompts([3, 11, 7, 1]))
    ours = generate(m, idx, 20, attention_mask=mask)
    ref = hf_generate(hf, idx, mask, do_sample=False, max_new_tokens=20)
    assert torch.equal(ours, ref)


def test_repetition_penalty_generate_matches_hf(models):
    hf, m = models
    idx = prompts([6], seed=3)[0][None]
    ours = generate(m, idx, 24, repetition_penalty=1.8)
    ref = hf_generate(hf, idx, do_sample=False, max_new_tokens=24, repetition_penalty=1.8)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, generate(m, idx, 24))          # the penalty changed something


def test_eos_matches_hf(models):
    hf, m = models
    idx, mask = left_pad(prompts([4, 9]))
    free = generate(m, idx, 16, attention_mask=mask)
    eos = int(free[0, idx.size(1) + 3])                         # row 0 hits it at step 3
    ours = generate(m, idx, 16, attention_mask=mask, eos_token_id=eos)
    ref = hf_generate(hf, idx, mask, do_sample=False, max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(ours, ref)
    T = idx.size(1)
    first = (free[0, T:] == eos).nonzero()[0].item()
    assert ours[0, T + first] == eos and (ours[0, T + first + 1:] == EOT).all()


# --- KV cache ---------------------------------------------------------------------------------

def test_kv_cache_matches_naive_loop(models):
    _, m = models
    idx = prompts([9], seed=4)[0][None]
    seq = idx.clone()
    with torch.no_grad():
        for _ in range(20):                                       # no cache: full re-run per token
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(m, idx, 20), seq)

    # logits of the cached steps equal the full forward's logits at every position
    with torch.no_grad():
        full = m(seq)
        caches = m.new_caches(1, seq.size(1))
        steps = [m(seq[:, :9], caches=caches, last_only=True)[:, -1]]
        for t in range(9, seq.size(1)):
            steps.append(m(seq[:, t:t + 1], caches=caches, start=t)[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 8:-1], rtol=1e-4, atol=1e-4)


def test_left_padded_rows_equal_alone(models):
    _, m = models
    seqs = prompts([2, 13, 6], seed=5)
    # pad with a token the short row would pick next: if padding counted as "seen" by the
    # repetition penalty, that row would change
    pad = int(generate(m, seqs[0][None], 1)[0, -1])
    idx, mask = left_pad(seqs, pad=pad)
    for kw in (dict(), dict(repetition_penalty=1.5)):
        batch = generate(m, idx, 18, attention_mask=mask, **kw)
        for i, s in enumerate(seqs):
            alone = generate(m, s[None], 18, **kw)
            assert torch.equal(batch[i, idx.size(1):], alone[0, len(s):]), (i, kw)


def test_static_cache_is_not_reallocated(models, monkeypatch):
    _, m = models
    from minigpt.model import gpt as model_mod
    made = []
    orig = model_mod.KVCache.__init__

    def counting_init(self, *a, **k):
        made.append(1)
        orig(self, *a, **k)
    monkeypatch.setattr(model_mod.KVCache, "__init__", counting_init)
    generate(m, prompts([5])[0][None], 30)
    assert len(made) == m.config.n_layer                         # one cache per layer, once


# --- sampling -----------------------------------------------------------------------------------

def test_top_k1_and_tiny_top_p_equal_greedy(models):
    _, m = models
    idx = prompts([7], seed=6)[0][None]
    greedy = generate(m, idx, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(generate(m, idx, 16, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(generate(m, idx, 16, temperature=1.0, top_p=1e-6, generator=g), greedy)
    assert torch.equal(generate(m, idx, 16, temperature=0.7, top_k=40, top_p=1e-6, generator=g),
                       greedy)


def test_seeded_sampling_reproducible(models):
    _, m = models
    idx, mask = left_pad(prompts([5, 8], seed=7))
    kw = dict(temperature=1.3, top_k=200, top_p=0.95, attention_mask=mask)
    a = generate(m, idx, 24, generator=torch.Generator().manual_seed(123), **kw)
    b = generate(m, idx, 24, generator=torch.Generator().manual_seed(123), **kw)
    c = generate(m, idx, 24, generator=torch.Generator().manual_seed(124), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(m, idx, 24, attention_mask=mask))   # it did sample


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 100, generator=g) * 3
    ids = torch.randint(0, 100, (3, 30), generator=g)               # with duplicates
    ref = RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, ids, 1.7), ref, rtol=0, atol=0)
    seen = torch.zeros(3, 100, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.7), ref, rtol=0, atol=0)
    assert torch.equal(sample_next(logits, repetition_penalty=1.7, seen=seen), ref.argmax(-1))
    assert not torch.equal(ref, logits)


def test_top_p_and_top_k_support_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 60, generator=g) * 2
    for top_p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        probs, ids = logits.softmax(-1).sort(-1, descending=True)
        drop = _top_p_drop(probs, top_p)
        assert torch.equal(drop.scatter(1, ids, drop), torch.isinf(ref)), top_p
        gen = torch.Generator().manual_seed(3)                      # top-p alone: sampled support
        draws = torch.stack([sample_next(logits, temperature=1.0, top_p=top_p, generator=gen)
                             for _ in range(300)], 1)
        for row in range(2):
            _assert_draws_fill_support(draws[row], ref[row])
    # sampled tokens stay inside HF's top-k + top-p support, and cover it
    ref = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, logits.clone()))
    gen = torch.Generator().manual_seed(2)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_k=10, top_p=0.8, generator=gen)
                         for _ in range(400)], 1)
    for row in range(2):
        _assert_draws_fill_support(draws[row], ref[row])


def _assert_draws_fill_support(draws, ref_logits):
    """Every draw lies in the reference's support; every likely (>= 3%) supported token shows up."""
    support = set(torch.isfinite(ref_logits).nonzero().flatten().tolist())
    likely = set((ref_logits.softmax(-1) >= 0.03).nonzero().flatten().tolist())
    drawn = set(draws.tolist())
    assert drawn <= support and likely <= drawn, (drawn, support)


# --- eos, stop strings, streaming -----------------------------------------------------------

def test_eos_stops_early_batch1(models):
    _, m = models
    idx = prompts([6], seed=8)[0][None]
    free = generate(m, idx, 20)
    eos = int(free[0, 6 + 4])
    first = (free[0, 6:] == eos).nonzero()[0].item()
    out = generate(m, idx, 20, eos_token_id=[12345, eos])
    assert torch.equal(out, free[:, :6 + first + 1])             # ends with eos, shorter output
    assert list(stream(m, idx, 20, eos_token_id=eos)) == free[0, 6:6 + first + 1].tolist()


def test_stream_yields_generate_tokens(models):
    _, m = models
    idx = prompts([5], seed=9)[0][None]
    assert list(stream(m, idx, 20)) == generate(m, idx, 20)[0, 5:].tolist()
    kw = dict(temperature=0.9, top_k=50, repetition_penalty=1.2)
    a = list(stream(m, idx[0].tolist(), 20, generator=torch.Generator().manual_seed(5), **kw))
    b = generate(m, idx, 20, generator=torch.Generator().manual_seed(5), **kw)[0, 5:].tolist()
    assert a == b


def test_too_long_raises(models):
    _, m = models
    with pytest.raises(ValueError, match=r"longer than the model's context length \(block_size=128\)"):
        generate(m, torch.zeros(1, 129, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"100 tokens \+ max_new_tokens=40 = 140 exceeds .*block_size=128"):
        generate(m, torch.zeros(1, 100, dtype=torch.long), 40)
    with pytest.raises(ValueError, match="context length"):
        stream(m, [0] * 100, 40)                                 # raised at call, not first next()
    assert generate(m, torch.zeros(1, 100, dtype=torch.long), 28).shape == (1, 128)


def test_output_is_a_normal_tensor(models):
    _, m = models
    out = generate(m, prompts([4])[0][None], 3)
    assert not out.is_inference() and not torch.is_inference_mode_enabled()


class Scripted(nn.Module):
    """Test double with GPT's decoding interface that emits a fixed token script."""

    def __init__(self, script, block_size=256):
        super().__init__()
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=block_size)
        self.script = list(script)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.prompt_len = 0

    @property
    def device(self):
        return self.anchor.device

    def new_caches(self, batch_size, max_len):
        return [None]

    def forward(self, idx, *, pos=None, mask=None, caches=None, start=0, last_only=False):
        if start == 0:
            self.prompt_len = idx.size(1)
        k = start + idx.size(1) - self.prompt_len                 # how many tokens produced so far
        logits = torch.zeros(idx.size(0), 1, V)
        logits[:, :, self.script[min(k, len(self.script) - 1)]] = 10.0
        return logits


def test_stream_text_multibyte_and_stop_marker():
    tok = get_tokenizer()
    text = "Olá 😀 ñ 日本語 done.\n### Human: more"
    script = tok.encode(text)
    pieces_bytes = [tok.decode_single_token_bytes(t) for t in script]
    assert any(_not_utf8(b) for b in pieces_bytes), "the test needs a character split across tokens"
    assert len(tok.encode("\n### Human:")) > 1                    # marker spans several tokens
    pieces = list(stream_text(Scripted(script), tok, [0, 1, 2], 60))
    assert "".join(pieces) == "Olá 😀 ñ 日本語 done.\n"
    assert len(pieces) > 3                                       # streamed, not one lump
    assert all("\ufffd" not in p and "#" not in p for p in pieces)


def test_stream_text_eos_holdback_release_and_close():
    tok = get_tokenizer()
    # '#'s that never become a marker must still come out; eos ends the stream
    script = tok.encode("a ## b ### Hum c") + [EOT] + tok.encode("never")
    assert "".join(stream_text(Scripted(script), tok, [0], 60)) == "a ## b ### Hum c"
    # the whole stop marker at the very end of the budget is still withheld
    script = tok.encode("ok ### Instruction:")
    assert "".join(stream_text(Scripted(script), tok, [0], len(script))) == "ok "
    # interrupting: close() after the first piece, cleanly, with no inference mode leaking out
    it = stream_text(Scripted(tok.encode("one two three four five six")), tok, [0], 30)
    first = next(it)
    assert first and not torch.is_inference_mode_enabled()
    it.close()
    assert next(it, None) is None


def test_generate_stop_strings():
    tok = get_tokenizer()
    script = tok.encode("alpha beta STOP gamma delta")
    out = generate(Scripted(script), torch.zeros(1, 2, dtype=torch.long), 20, stop=["STOP", "zzz"],
                   tokenizer=tok)
    new = out[0, 2:].tolist()
    assert tok.decode(new).endswith("STOP") and new == script[:len(new)]
    script = tok.encode("hello world and more")                   # stop spans two tokens
    out = generate(Scripted(script), torch.zeros(1, 1, dtype=torch.long), 20, stop="hello wo",
                   tokenizer=tok)
    assert out[0, 1:].tolist() == tok.encode("hello world")
    with pytest.raises(ValueError, match="tokenizer"):
        generate(Scripted(script), torch.zeros(1, 2, dtype=torch.long), 5, stop="x")


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# --- prepare_for_decoding -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def prepared(models):
    _, m = models
    return {mode: prepare_for_decoding(copy.deepcopy(m), mode)
            for mode in ("fp32", "fp16", "bf16", "int8", "w8a8", "int4")}


def test_prepared_fp32_is_exact(models, prepared):
    _, m = models
    fast = prepared["fp32"]
    assert all(not isinstance(x, nn.Linear) for x in fast.modules())
    idx, mask = left_pad(prompts([3, 10], seed=11))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), m(idx), rtol=1e-5, atol=1e-4)
    assert torch.equal(generate(fast, idx, 20, attention_mask=mask), generate(m, idx, 20, attention_mask=mask))


def test_prepared_fp32_fallback_without_onednn(models, monkeypatch):
    _, m = models

    def unavailable(*a, **k):
        raise RuntimeError("no oneDNN")
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", unavailable)
    fast = prepare_for_decoding(copy.deepcopy(m), "fp32")
    assert {x.kind for x in fast.modules() if isinstance(x, DecodeLinear)} == {"addmm"}
    idx = prompts([6], seed=12)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), m(idx), rtol=1e-5, atol=1e-4)
    assert torch.equal(generate(fast, idx, 16), generate(m, idx, 16))
    slow_bf16 = prepare_for_decoding(copy.deepcopy(m), "bf16")
    assert {x.kind for x in slow_bf16.modules() if isinstance(x, DecodeLinear)} == {"bf16"}
    with torch.no_grad():
        ref = m(idx)
        assert (slow_bf16(idx) - ref).abs().max() < 2e-2 * ref.abs().max()


@pytest.mark.parametrize("mode,tol", [("fp16", 2e-3), ("bf16", 2e-2), ("int8", 3e-2), ("w8a8", 6e-2),
                                      ("int4", 0.25)])
def test_prepared_reduced_precision_is_close(models, prepared, mode, tol):
    _, m = models
    fast = prepared[mode]
    idx = prompts([20], seed=13)[0][None]                         # 20 rows: fp16's prefill path
    with torch.no_grad():
        ref, got = m(idx), fast(idx)
        one = torch.cat([fast(idx[:, :t + 1])[:, -1:] for t in range(3)], 1)   # 1-row path
    scale = ref.abs().max()
    assert (got - ref).abs().max() < tol * scale
    assert (one - ref[:, :3]).abs().max() < tol * scale
    assert got.dtype == torch.float32
    # decoding works and mostly agrees with fp32 greedy on this sharp (std 0.2) model
    out = generate(fast, idx, 16)[0, 20:]
    assert (out == generate(m, idx, 16)[0, 20:]).float().mean() >= (0.25 if mode == "int4" else 0.5)


def test_decode_linear_int8_quantisation():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    q = DecodeLinear(w, b, "int8")
    assert q.weight.dtype == torch.int8 and q.weight.abs().max() == 127
    deq = q.weight.float() * q.scale.float()[:, None]
    assert (deq - w).abs().max() <= (w.abs().amax(1) / 127).max() * 0.51 + 1e-2  # half a step (+bf16 scale)
    x = torch.randn(5, 32, generator=g)
    torch.testing.assert_close(q(x), x @ w.t() + b, rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="mode"):
        DecodeLinear(w, b, "fp8")


def test_fp16_kernel_choice(monkeypatch):
    """fbgemm's fp16 GEMM where torch's kernels are AVX2 ones, torch's fp16 GEMV elsewhere; the
    environment forces either, and a wrong value is refused before any weight is touched."""
    monkeypatch.delenv("MINIGPT_FP16_GEMV", raising=False)
    for avx2, want in ((True, "fbgemm"), (False, "torch")):
        monkeypatch.setattr(decode_weights, "_avx2_kernels", lambda avx2=avx2: avx2)
        assert fp16_kernel() == want
    for choice in ("torch", "fbgemm"):
        monkeypatch.setenv("MINIGPT_FP16_GEMV", choice)
        assert fp16_kernel() == choice
    monkeypatch.setenv("MINIGPT_FP16_GEMV", "mkl")
    with pytest.raises(ConfigError, match="MINIGPT_FP16_GEMV must be auto, torch or fbgemm, got 'mkl'"):
        DecodeLinear(torch.randn(8, 16), None, "fp16")


@pytest.mark.parametrize("kernel", ["torch", "fbgemm"])
def test_decode_linear_fp16_kernels_read_the_same_fp16_weights(monkeypatch, kernel):
    """Both fp16 kernels multiply by the weights rounded to fp16 (to nearest, as Tensor.half) with fp32
    accumulation; torch's also rounds the input and output to fp16, fbgemm's keeps them fp32."""
    monkeypatch.setenv("MINIGPT_FP16_GEMV", kernel)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g) * 0.3, torch.randn(48, generator=g)
    q = DecodeLinear(w, b, "fp16")
    assert q.kind == ("fbgemm_fp16" if kernel == "fbgemm" else "fp16")
    x = torch.randn(5, 64, generator=g)
    if kernel == "fbgemm":
        unpacked = torch.ops.quantized.linear_unpack_fp16(q.packed)[0]
        assert torch.equal(unpacked, w.half().float())
        want = (x.double() @ w.half().double().t() + b.double()).float()
        torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5)
    else:
        assert torch.equal(q(x), F.linear(x.half(), w.half(), b.half()).float())
    assert q(x[None]).shape == (1, 5, 48) and q(x).dtype == torch.float32
    assert (q(x) - (x @ w.t() + b)).abs().max() < 1e-2                 # fp16's rounding, no more


def test_decode_linear_w8a8_quantises_weights_and_activations():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    q = DecodeLinear(w, b, "w8a8")
    x = torch.randn(5, 32, generator=g)
    ref = x @ w.t() + b
    err = (q(x) - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max()          # approximate (8-bit activations), not exact
    assert q(x[None]).shape == (1, 5, 48) and q(x).dtype == torch.float32
    # the weights are the int8 mode's: the same per-channel rounding
    deq = torch.ops.quantized.linear_unpack(q.packed)[0].dequantize()
    i8 = DecodeLinear(w, b, "int8")
    torch.testing.assert_close(deq, i8.weight.float() * (w.abs().amax(1) / 127)[:, None], rtol=0, atol=1e-6)


def test_generate_packs_a_plain_model_for_the_call_only(models, monkeypatch):
    """generate/stream on a plain fp32 CPU model use packed fp32 weights (same tokens as greedy
    argmax over full forwards), and leave the model's own Linear modules in place between steps."""
    _, m = models
    plain = {n: x for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    calls = []
    real = DecodeLinear.forward
    monkeypatch.setattr(DecodeLinear, "forward", lambda self, x: calls.append(1) or real(self, x))
    idx = prompts([5], seed=21)[0][None]
    out = generate(m, idx, 16)
    assert calls, "16 new tokens: the packed layers should be used"
    ids = idx
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, m(ids)[:, -1:].argmax(-1)], 1)      # the plain layers, no cache
    assert torch.equal(out, ids)
    calls.clear()
    generate(m, idx, 8)
    assert not calls, "short calls skip packing"
    assert torch.equal(generate(m, idx, 16, pack=False), out) and not calls     # opt-out, same tokens
    it = stream(m, idx, 20)
    next(it)
    assert {n: x for n, x in m.named_modules() if isinstance(x, nn.Linear)} == plain   # between steps
    it.close()
    m.train()
    generate(m, idx, 16)
    assert m.training and {n: x for n, x in m.named_modules() if isinstance(x, nn.Linear)} == plain
    m.eval()


@pytest.mark.parametrize("kernel", ["torch", "fbgemm"])
def test_certified_argmax_is_the_fp32_argmax_even_on_near_ties(monkeypatch, kernel):
    """The greedy pick from the fp16 copy of the head, certified, equals argmax over fp32 logits:
    also where rows differ by about fp16's resolution and on exact duplicates (first index); with
    either fp16 kernel."""
    monkeypatch.setenv("MINIGPT_FP16_GEMV", kernel)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5000, 64, generator=g) * 0.3
    d = 3e-4 * torch.randn(10, 64, generator=g)                     # ~1 fp16 step, 1e4 fp32 steps
    d -= (d @ w[99])[:, None] * w[99] / w[99].dot(w[99])            # (orthogonal to w[99])
    w[100:110] = w[99] + d                                          # fp16 cannot tell these apart
    w[200] = w[201] = w[4000]                                       # exact ties: the first index wins
    head = CertifiedArgmax(w)
    h = torch.randn(64, 64, generator=g) * 3
    h[:20] = w[99] * 40 + torch.randn(20, 64, generator=g)         # near-ties decided by 1e-6 rows
    h[20:30] = w[4000] * 40                                         # the tie of rows 200, 201, 4000
    picks = head(h)
    ref = (h @ w.t()).argmax(dim=1)
    assert torch.equal(picks, ref)
    assert set(picks[:20].tolist()) <= set(range(99, 110)) and (picks[20:30] == 200).all()
    assert len(set(picks[:20].tolist())) > 1                        # the small differences decided
    fp16 = F.linear(h.half(), w.half()).float().argmax(dim=1)
    assert (fp16[:20] != ref[:20]).any()                           # which fp16 alone gets wrong
    big = h[:3] * 1e5                                               # beyond fp16's range: fp32 logits
    assert torch.equal(head(big), (big @ w.t()).argmax(dim=1))


def test_greedy_generate_reads_the_half_head_and_gives_the_fp32_tokens(models, monkeypatch):
    """Greedy calls of >= 32 tokens pick through CertifiedArgmax (plain and prepared fp32 models):
    the same tokens as argmax over full fp32 forwards; sampling and short calls use the logits."""
    _, m = models
    calls = []
    real = CertifiedArgmax.__call__
    monkeypatch.setattr(CertifiedArgmax, "__call__", lambda self, h: calls.append(1) or real(self, h))
    idx = prompts([5, 9], seed=4)[0][None]
    out = generate(m, idx, 40)
    assert len(calls) == 40
    ids = idx
    with torch.no_grad():
        for _ in range(40):
            ids = torch.cat([ids, m(ids)[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)
    calls.clear()
    generate(m, idx, 40, temperature=0.7, generator=torch.Generator().manual_seed(0))
    generate(m, idx, 16)
    assert not calls
    p = prepare_for_decoding(copy.deepcopy(m), "fp32")
    assert torch.equal(generate(p, idx, 40), out) and len(calls) == 40
    assert p.lm_head.greedy is not None                            # kept for the next call
    seqs = prompts([3, 7], seed=8)                                  # a left-padded batch, row by row
    batch, mask = left_pad(seqs)
    both = generate(m, batch, 33, attention_mask=mask)
    for row, seq in zip(both, seqs):
        alone = generate(m, seq[None], 33, pack=False)              # logits and sample_next
        assert torch.equal(row[-33:], alone[0, -33:])


def test_decode_linear_int4_quantisation():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)   # 40 rows: padded to 48
    w[3, :32] = 0.5                                                          # a constant group
    q, sz = quantize_int4(w)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15 and sz.shape == (2, 40, 2)
    step = sz[..., 0].t().repeat_interleave(32, dim=1)                       # (40, 64) group scales
    assert ((dequantize_int4(q, sz) - w).abs() <= step / 2 + 1e-6).all()     # round to nearest
    torch.testing.assert_close(dequantize_int4(q, sz)[3, :32], w[3, :32], rtol=0, atol=1e-6)
    lin = DecodeLinear(w, b, "int4")
    x = torch.randn(5, 64, generator=g)
    got = lin(x)
    assert got.shape == (5, 40) and got.dtype == torch.float32
    # the packed kernel computes x @ dequant(q, bf16 scales/zeros)^T (+ bias) up to bf16 rounding
    ref = x.bfloat16().float() @ dequantize_int4(q, lin.scale[:, :40]).t() + b
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=5e-2)
    assert (got - (x @ w.t() + b)).abs().max() < 0.1 * (x @ w.t()).abs().max()
    with pytest.raises(ValueError, match="divisible by 32"):
        DecodeLinear(torch.randn(8, 48), None, "int4")


def test_prepare_after_merged_lora(models):
    lora = pytest.importorskip("minigpt.methods.lora")
    _, m = models
    m = copy.deepcopy(m)
    lora.add_lora(m, r=4, alpha=8, targets=("c_attn",))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)                                  # a non-trivial adapter
    with pytest.raises(ValueError, match="merge_lora"):
        prepare_for_decoding(copy.deepcopy(m), "fp32")
    lora.merge_lora(m)
    idx = prompts([7], seed=14)[0][None]
    with torch.no_grad():
        ref = m(idx)
        fast = prepare_for_decoding(m, "fp32")
        torch.testing.assert_close(fast(idx), ref, rtol=1e-5, atol=1e-4)


# --- compiled (static-shape) decoding -------------------------------------------------------------

def test_compiled_decoding_matches_eager(models):
    """generate(compile=True) runs each step with static shapes through torch.compile (CUDA graphs
    on a GPU): same tokens as the eager loop, batch 1 and left-padded, and no recompilation for a
    second call of another length in the same cache bucket."""
    _, m = models
    m = copy.deepcopy(m)
    idx = prompts([9], seed=21)[0][None]
    assert torch.equal(generate(m, idx, 20, compile=True), generate(m, idx, 20))
    step = m.__dict__["_compiled_decoding"]["step"]
    caches = m.__dict__["_compiled_decoding"][(1, 64, m.device, m.dtype)]
    assert torch.equal(generate(m, idx, 30, compile=True), generate(m, idx, 30))   # reuses both
    assert m.__dict__["_compiled_decoding"]["step"] is step
    assert m.__dict__["_compiled_decoding"][(1, 64, m.device, m.dtype)] is caches
    buf = io.BytesIO()
    torch.save(copy.deepcopy(m), buf)                 # the compiled state is not part of the model
    assert "_compiled_decoding" not in torch.load(io.BytesIO(buf.getvalue()), weights_only=False).__dict__
    pidx, mask = left_pad(prompts([4, 9], seed=22))
    assert torch.equal(generate(m, pidx, 12, attention_mask=mask, compile=True),
                       generate(m, pidx, 12, attention_mask=mask))
    fast = prepare_for_decoding(copy.deepcopy(m), "fp32")
    if any(getattr(x, "kind", None) == "mkldnn" for x in fast.modules()):   # oneDNN in this build
        with pytest.raises(ValueError, match="oneDNN"):
            generate(fast, idx, 4, compile=True)


def test_compiled_decoding_falls_back_when_compilation_fails(models, monkeypatch):
    """A broken compiler (no C++ toolchain, an unsupported op) costs speed, not the answer."""
    _, m = models
    m = copy.deepcopy(m)

    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    idx = prompts([5], seed=23)[0][None]
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        out = generate(m, idx, 12, compile=True)
    assert torch.equal(out, generate(m, idx, 12))
    assert m.__dict__["_compiled_decoding"]["failed"].startswith("RuntimeError")
