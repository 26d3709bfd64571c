"""LoRA: parameter counts, key names, merge round trips, and PEFT as the independent reference."""
from __future__ import annotations

import contextlib
import json
import math
import warnings

import pytest
import tiny
import torch
import torch.nn as nn

from minigpt import GPT, GPTConfig, lm_loss
from minigpt.data.instruct import Collator
from minigpt.methods.lora import (
    LoRALinear,
    add_lora,
    count_parameters,
    load_adapter,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    read_adapter_config,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from minigpt.model.linear import is_linear

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=101)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# --- helpers -------------------------------------------------------------------------------

def tiny_gpt(seed=0, **over) -> GPT:
    """All weights N(0, 0.2), LayerNorm gains included."""
    return tiny.gpt(**{**TINY, **over}, seed=seed, std=0.2, ln_mean=0.0)


def hf_gpt2(seed=0, **over):
    """A transformers GPT2LMHeadModel with std-0.2 random weights (dropout off)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = {**TINY, **over}
    cfg = GPT2Config(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                     n_positions=c["block_size"], vocab_size=c["vocab_size"], resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=True)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    return hf.eval()


def minigpt_from_hf(hf) -> GPT:
    """Copy HF GPT-2 weights into minigpt: Conv1D (in, out) -> Linear (out, in)."""
    c = hf.config
    m = GPT(GPTConfig(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
                      vocab_size=c.vocab_size))
    sd = {}
    for k, v in hf.state_dict().items():
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        sd[k] = v.t().contiguous() if k.endswith(CONV1D) else v
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    assert m.lm_head.weight is m.transformer.wte.weight
    return m.eval()


def randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def ids(seed=0, B=2, T=12, V=TINY["vocab_size"]):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def peft_model_from_dir(hf, d):
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(hf, str(d)).eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


# --- parameter counts and structure ----------------------------------------------------------

def _meta_gpt2():
    with torch.device("meta"):
        return GPT(GPTConfig.from_name("gpt2"))


def test_gpt2_counts_c_attn():
    m = add_lora(_meta_gpt2(), r=8, alpha=16, targets=("c_attn",))
    trainable, total = count_parameters(m)
    assert trainable == 294_912
    assert total == 124_734_720
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 294_912
    assert m.lm_head.weight is m.transformer.wte.weight


@pytest.mark.parametrize("targets,expected", [
    (("c_attn", "c_proj", "c_fc"), 12 * 8 * ((768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768))),
    (("attn.c_proj",), 12 * 8 * (768 + 768)),
    (("mlp.c_proj",), 12 * 8 * (3072 + 768)),
    (("q", "v"), 12 * 8 * (768 + 2 * 768)),
    (("lm_head",), 8 * (768 + 50257)),
])
def test_gpt2_counts_other_targets(targets, expected):
    m = add_lora(_meta_gpt2(), r=8, alpha=16, targets=targets)
    trainable, total = count_parameters(m)
    assert trainable == expected
    assert total == 124_439_808 + expected
    assert m.lm_head.weight is m.transformer.wte.weight


def test_c_proj_matches_both_projections():
    m = add_lora(tiny_gpt(), targets="c_proj")
    assert sorted(lora_layers(m)) == [f"transformer.h.{i}.{p}.c_proj" for i in range(2) for p in ("attn", "mlp")]


def test_keys_preserved_and_base_frozen():
    m = tiny_gpt()
    plain_keys = list(m.state_dict())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    base_params = {n: p for n, p in m.named_parameters()}
    add_lora(m, r=4, alpha=8, targets=("c_attn", "c_fc"))
    keys = list(m.state_dict())
    lora_keys = [k for k in keys if ".lora_" in k]
    assert [k for k in keys if ".lora_" not in k] == plain_keys
    assert sorted(lora_keys) == sorted(f"transformer.h.{i}.{mod}.lora_{ab}" for i in range(2)
                                       for mod in ("attn.c_attn", "mlp.c_fc") for ab in "AB")
    layer = m.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear)
    assert layer.weight is base_params["transformer.h.0.attn.c_attn.weight"]
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    for n, p in m.named_parameters():
        assert p.requires_grad == (".lora_" in n), n
    for k, v in m.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert set(lora_state_dict(m)) == set(lora_keys)


def test_lora_a_init_matches_nn_linear_bound():
    m = add_lora(tiny_gpt(), r=64, targets=("c_fc",))
    A = m.transformer.h[0].mlp.c_fc.lora_A
    bound = 1 / math.sqrt(32)     # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound


def test_zero_b_gives_base_logits():
    m = tiny_gpt()
    x = ids()
    with torch.no_grad():
        base = m(x)
        add_lora(m, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc", "lm_head"))
        assert torch.equal(m(x), base)


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=-1), dict(r=2.5), dict(alpha=0), dict(alpha=-1.0),
                                dict(dropout=1.0), dict(dropout=-0.1), dict(targets=("nope",)),
                                dict(targets=()), dict(targets=("c_attn", "q")), dict(targets=("ln_1",))])
def test_add_lora_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        add_lora(tiny_gpt(), **kw)


def test_add_lora_twice_rejected():
    m = add_lora(tiny_gpt(), targets=("c_attn",))
    with pytest.raises(ValueError, match="already"):
        add_lora(m, targets=("c_attn",))


# --- merge / unmerge / unload ------------------------------------------------------------------

def test_merge_unmerge_round_trip():
    m = tiny_gpt()
    add_lora(m, r=4, alpha=8, dropout=0.1, targets=("c_attn", "c_proj", "c_fc"))
    randomize_lora(m)
    x = ids()
    w0 = {n: l.weight.detach().clone() for n, l in lora_layers(m).items()}
    with torch.no_grad():
        lora_out = m(x)
        merge_lora(m)
        assert all(l.merged for l in lora_layers(m).values())
        merged_out = m(x)
        for n, l in lora_layers(m).items():      # weights really changed by B A * scaling
            assert torch.allclose(l.weight, w0[n] + (l.lora_B @ l.lora_A) * l.scaling, atol=1e-6)
        assert torch.allclose(merged_out, lora_out, atol=1e-5, rtol=0)
        assert (merged_out - lora_out).abs().max() < 1e-5
        with pytest.raises(RuntimeError):
            m.transformer.h[0].attn.c_attn.merge()
        unmerge_lora(m)
        for n, l in lora_layers(m).items():
            assert (l.weight - w0[n]).abs().max() <= 1e-6
            assert not l.merged
        assert torch.allclose(m(x), lora_out, atol=1e-6)


def test_merged_model_is_plain_gpt2():
    m = tiny_gpt()
    plain_keys = list(m.state_dict())
    add_lora(m, r=4, alpha=8, targets=("c_attn", "mlp.c_proj"))
    randomize_lora(m)
    x = ids()
    with torch.no_grad():
        lora_out = m(x)
    out = merge_and_unload(m)
    assert out is m
    assert list(m.state_dict()) == plain_keys
    assert not lora_layers(m)
    assert is_linear(m.transformer.h[0].attn.c_attn)
    assert m.lm_head.weight is m.transformer.wte.weight
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert torch.allclose(m(x), lora_out, atol=1e-5)
    # loads into a fresh plain GPT with strict key checking
    fresh = GPT(m.config)
    fresh.load_state_dict(m.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), lora_out, atol=1e-5)


def test_remove_without_merge_restores_base():
    m = tiny_gpt()
    x = ids()
    with torch.no_grad():
        base = m(x)
    add_lora(m, targets=("c_attn", "lm_head"))
    randomize_lora(m)
    remove_lora(m, merge=False)
    assert not lora_layers(m)
    assert m.lm_head.weight is m.transformer.wte.weight
    with torch.no_grad():
        assert torch.equal(m(x), base)


def test_lora_disabled_context():
    m = tiny_gpt()
    x = ids()
    with torch.no_grad():
        base = m(x)
        add_lora(m, targets=("c_attn", "c_fc"))
        randomize_lora(m)
        adapted = m(x)
        with lora_disabled(m):
            assert torch.equal(m(x), base)
        assert torch.equal(m(x), adapted)


def test_lm_head_lora_keeps_tie_and_refuses_merge():
    m = tiny_gpt()
    wte = m.transformer.wte.weight
    add_lora(m, r=4, alpha=8, targets=("lm_head",))
    assert isinstance(m.lm_head, LoRALinear)
    assert m.lm_head.weight is wte and m.transformer.wte.weight is wte
    assert "lm_head.weight" in m.state_dict() and "lm_head.lora_A" in m.state_dict()
    randomize_lora(m)
    x = ids()
    with torch.no_grad():   # the LoRA changes only the output side: embeddings untouched
        h = m.transformer.ln_f(m.transformer.h[1](m.transformer.h[0](
            m.transformer.wte(x) + m.transformer.wpe(torch.arange(x.size(1))))))
        expected = h @ wte.T + (h @ m.lm_head.lora_A.T @ m.lm_head.lora_B.T) * 2.0
        assert torch.allclose(m(x), expected, atol=1e-5)
    with pytest.raises(ValueError, match="wte"):
        merge_lora(m)
    assert not m.lm_head.merged


def test_qkv_slices_only_touch_selected_outputs():
    m = tiny_gpt()
    add_lora(m, r=4, alpha=8, targets=("q", "v"))
    layer = m.transformer.h[0].attn.c_attn
    assert layer.lora_B.shape == (64, 4) and layer.out_slices == (True, False, True)
    randomize_lora(m)
    d = layer.delta_weight()
    assert torch.count_nonzero(d[32:64]) == 0
    assert torch.count_nonzero(d[:32]) > 0 and torch.count_nonzero(d[64:]) > 0
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (layer.weight + d).T + layer.bias, atol=1e-5)


# --- adapters vs PEFT -------------------------------------------------------------------------

@pytest.mark.parametrize("targets,rslora", [(("c_attn",), False), (("c_attn", "c_proj", "c_fc"), False),
                                            (("c_attn", "mlp.c_proj"), True), (("q", "v"), False)])
def test_minigpt_adapter_loads_in_peft(tmp_path, targets, rslora):
    hf = hf_gpt2()
    m = minigpt_from_hf(hf)
    plain = minigpt_from_hf(hf)      # (PeftModel.from_pretrained modifies hf in place)
    x = ids()
    with torch.no_grad():
        assert torch.allclose(m(x), hf_logits(hf, x), atol=1e-4)   # same base
    add_lora(m, r=4, alpha=8, dropout=0.05, targets=targets, use_rslora=rslora)
    randomize_lora(m)
    m.eval()
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="tiny-gpt2")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.05
    assert cfg["fan_in_fan_out"] is True and cfg["use_rslora"] is rslora
    assert cfg["base_model_name_or_path"] == "tiny-gpt2"
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 4)

    with torch.no_grad():
        ours = m(x)
        base = hf_logits(hf, x)
    pm = peft_model_from_dir(hf, tmp_path / "ad")
    theirs = hf_logits(pm, x)
    assert (ours - base).abs().max() > 1e-2          # the adapter really changes the output
    assert (ours - theirs).abs().max() < 1e-4

    # and minigpt reads its own adapter back into a plain model (round trip)
    m2 = load_adapter(plain, tmp_path / "ad")
    m2.eval()
    with torch.no_grad():
        assert torch.allclose(m2(x), ours, atol=1e-5)
    assert count_parameters(m2) == count_parameters(m)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_minigpt(tmp_path, rslora):
    from peft import LoraConfig, get_peft_model
    hf = hf_gpt2(seed=3)
    m = minigpt_from_hf(hf)
    x = ids(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                           fan_in_fan_out=True, lora_dropout=0.0, use_rslora=rslora,
                                           task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    theirs = hf_logits(pm, x)
    pm.save_pretrained(str(tmp_path / "peft"))

    load_adapter(m, tmp_path / "peft")
    m.eval()
    layer = m.transformer.h[1].mlp.c_fc
    assert isinstance(layer, LoRALinear) and layer.r == 4
    assert layer.scaling == pytest.approx(8 / 2 if rslora else 8 / 4)
    assert sorted(lora_layers(m)) == sorted(f"transformer.h.{i}.{t}" for i in range(2)
                                            for t in ("attn.c_attn", "mlp.c_fc"))
    with torch.no_grad():
        ours = m(x)
    assert (ours - theirs).abs().max() < 1e-4
    with torch.no_grad():
        remove_lora(m, merge=False)
        assert (m(x) - ours).abs().max() > 1e-2      # B was non-zero: the adapter mattered


def test_lm_head_adapter_matches_peft(tmp_path):
    hf = hf_gpt2(seed=4)
    m = minigpt_from_hf(hf)
    add_lora(m, r=4, alpha=8, targets=("c_attn", "lm_head"))
    randomize_lora(m)
    m.eval()
    save_adapter(m, tmp_path / "ad")
    x = ids(2)
    with torch.no_grad():
        ours = m(x)
    pm = peft_model_from_dir(hf, tmp_path / "ad")
    assert (ours - hf_logits(pm, x)).abs().max() < 1e-4
    assert m.lm_head.weight is m.transformer.wte.weight


def test_load_adapter_key_variants(tmp_path):
    """Keys with a `.default` adapter name and/or without the base_model.model. prefix."""
    from safetensors.torch import load_file, save_file
    m = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_attn",))
    randomize_lora(m)
    save_adapter(m, tmp_path / "a")
    sd = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    x = ids()
    with torch.no_grad():
        ref = m.eval()(x)
    for variant, rename in [("default", lambda k: k.replace(".weight", ".default.weight")),
                            ("noprefix", lambda k: k[len("base_model.model."):])]:
        d = tmp_path / variant
        d.mkdir()
        (d / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
        save_file({rename(k): v for k, v in sd.items()}, str(d / "adapter_model.safetensors"))
        m2 = load_adapter(tiny_gpt(), d).eval()
        with torch.no_grad():
            assert torch.allclose(m2(x), ref, atol=1e-6)


def test_load_adapter_into_existing_lora_layers(tmp_path):
    m = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_attn",))
    randomize_lora(m, seed=7)
    save_adapter(m, tmp_path / "a")
    m2 = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_attn",))
    load_adapter(m2, tmp_path / "a")
    for k, v in lora_state_dict(m).items():
        assert torch.equal(lora_state_dict(m2)[k], v)
    m3 = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_fc",))
    with pytest.raises(ValueError, match="LoRA layers"):
        load_adapter(m3, tmp_path / "a")


def test_adapter_for_other_shape_is_rejected(tmp_path):
    m = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_attn",))
    save_adapter(m, tmp_path / "a")
    other = tiny_gpt(n_embd=48)
    keys_before = list(other.state_dict())
    with pytest.raises(ValueError) as e:
        load_adapter(other, tmp_path / "a")
    msg = str(e.value)
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in msg
    assert "(2, 32)" in msg and "(2, 48)" in msg
    assert list(other.state_dict()) == keys_before        # nothing was modified
    deeper = tiny_gpt(n_layer=1)
    with pytest.raises(ValueError, match="transformer.h.1"):
        load_adapter(deeper, tmp_path / "a")


def test_adapter_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_gpt(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_gpt(), tmp_path / "empty")
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(tiny_gpt(), tmp_path / "cfgonly")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="IA3"):
        read_adapter_config(tmp_path / "ia3")


def test_save_adapter_is_atomic_and_requires_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_adapter(tiny_gpt(), tmp_path / "x")
    m = add_lora(tiny_gpt(), r=2, alpha=4, targets=("c_attn",))
    save_adapter(m, tmp_path / "a")
    save_adapter(m, tmp_path / "a")               # overwriting works, no temp files left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json",
                                                                  "adapter_model.safetensors"]
    merge_lora(m)
    with pytest.raises(ValueError, match="unmerge"):
        save_adapter(m, tmp_path / "b")


# --- a short LoRA training run ---------------------------------------------------------------

@pytest.mark.parametrize("autocast", [False, True])
def test_layer_output_and_gradients_match_the_formula(autocast):
    """y = x W^T + b + (x A^T) B^T s, written out with plain ops as the reference: output, the
    gradients of A, B and x (frozen base), in fp32 and under CPU bf16 autocast (where the update's
    matmul runs in bf16 like the reference's)."""
    torch.manual_seed(0)
    base = nn.Linear(24, 36)
    for p in base.parameters():
        p.requires_grad_(False)
    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 0.3)
    x = torch.randn(3, 5, 24, requires_grad=True)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        y = layer(x)
    g = torch.randn(y.shape, dtype=y.dtype)
    grads = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), g)
    A, B = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    with ctx:
        ref = torch.nn.functional.linear(x2, base.weight, base.bias) + ((x2 @ A.t()) * layer.scaling) @ B.t()
    ref_grads = torch.autograd.grad(ref, (x2, A, B), g)
    assert y.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref, **tol)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)
    assert not torch.equal(grads[1], torch.zeros_like(grads[1]))


def test_short_lora_training_lowers_masked_loss():
    V = 64
    m = tiny_gpt(vocab_size=V)
    with torch.no_grad():           # LayerNorms back to identity, random std-0.2 matrices
        for n, p in m.named_parameters():
            if ".ln_" in n:
                p.fill_(1.0 if n.endswith("weight") else 0.0)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    add_lora(m, r=8, alpha=16, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))
    g = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(16):     # task: after the separator (1), repeat the prompt with every id + 1
        prompt = torch.randint(3, V - 1, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        resp = [t + 1 for t in prompt]
        seq = prompt + [1] + resp + [2]
        examples.append({"input_ids": seq, "labels": [-100] * (len(prompt) + 1) + resp + [2]})
    batch = Collator(pad_id=0)(examples)
    assert batch["input_ids"].shape == batch["labels"].shape
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    m.train()
    losses = []
    for _ in range(60):
        loss = lm_loss(m(batch["input_ids"]), batch["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for k, v in m.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k


def test_method_protocol_through_minigpt_peft(tmp_path):
    """lora as minigpt.methods's method: probe, config, save/load through the front door (q/v slices kept)."""
    from minigpt.methods import load_adapter as peft_load
    from minigpt.methods import lora, method_config, method_of
    from minigpt.methods import save_adapter as peft_save
    m = tiny_gpt()
    assert lora.attached(m) is None and method_of(m) is None
    cfg = method_config("lora", r=2, alpha=4, targets=("q", "v"), dropout=None)
    assert cfg.method == "lora" and cfg.dropout == 0.05 and cfg.to_dict()["use_dora"] is False
    assert cfg.describe() == "LoRA r=2 alpha=4 on q, v"
    cfg.apply(m)
    assert lora.attached(m) == "lora" and method_of(m) == "lora"
    randomize_lora(m)
    peft_save(m, tmp_path / "a")
    m2 = peft_load(tiny_gpt(), tmp_path / "a", method="lora")
    assert m2.transformer.h[0].attn.c_attn.out_slices == (True, False, True)
    x = ids()
    with torch.no_grad():
        assert torch.equal(m2.eval()(x), m.eval()(x))
    with pytest.raises(ValueError, match="dora"):
        lora.method_config("ia3")
