"""IA3: the layer's maths, merge round trips, parameter counts and adapters in both directions
against PEFT as the independent reference."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
from test_dora import SMALL, hf_from, small_gpt
from test_lora import hf_logits, ids, peft_model_from_dir

from minigpt import GPT, GPTConfig
from minigpt.errors import AdapterError, ConfigError
from minigpt.methods import count_parameters, method_config, method_of
from minigpt.methods import load_adapter as peft_load
from minigpt.methods import merge_and_unload as peft_merge
from minigpt.methods import save_adapter as peft_save
from minigpt.methods.ia3 import (
    IA3Config,
    IA3Linear,
    add_ia3,
    ia3_layers,
    ia3_parameters,
    load_adapter,
    merge_ia3,
    remove_ia3,
    save_adapter,
    unmerge_ia3,
)
from minigpt.methods.lora import add_lora
from minigpt.methods.lora import save_adapter as save_lora
from minigpt.model.linear import is_linear

V = SMALL["vocab_size"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    small_gpt().save_pretrained(d)
    return d


def randomize_ia3(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ia3_layers(model).values():
            layer.ia3_l.copy_(1 + 0.3 * torch.randn(layer.ia3_l.shape, generator=g))


def peft_ia3(hf, **kw):
    from peft import IA3Config as PeftIA3Config
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(hf, PeftIA3Config(task_type="CAUSAL_LM", **kw))


def randomize_peft(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


# --- counts and the layer ------------------------------------------------------------------

def test_gpt2_counts_match_peft():
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        ours = IA3Config().apply(GPT(GPTConfig.from_name("gpt2")))
        pm = peft_ia3(GPT2LMHeadModel(GPT2Config()))
    trainable, total = count_parameters(ours)
    assert trainable == pm.get_nb_trainable_parameters()[0] == 12 * (2304 + 3072)
    assert total == 124_439_808 + trainable
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_defaults_keys_and_no_op():
    m = small_gpt()
    x = ids(V=V)
    with torch.no_grad():
        base = m(x)
    plain_keys = list(m.state_dict())
    IA3Config().apply(m)
    assert sorted(ia3_layers(m)) == sorted(f"transformer.h.{i}.{t}" for i in range(2)
                                           for t in ("attn.c_attn", "mlp.c_proj"))
    assert m.transformer.h[0].attn.c_attn.ia3_l.shape == (192,)          # output rows
    assert m.transformer.h[0].mlp.c_proj.ia3_l.shape == (256,)           # the MLP's hidden units
    assert [k for k in m.state_dict() if not k.endswith(".ia3_l")] == plain_keys
    for n, p in m.named_parameters():
        assert p.requires_grad == n.endswith(".ia3_l"), n
    assert len(ia3_parameters(m)) == 4 and method_of(m) == "ia3"
    with torch.no_grad():
        assert torch.equal(m(x), base)


@pytest.mark.parametrize("feedforward", [False, True])
def test_forward_formula(feedforward):
    torch.manual_seed(0)
    lin = nn.Linear(24, 24)                        # square: a wrong orientation would not fail on shape
    layer = IA3Linear(lin, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(torch.rand(24) + 0.5)
    x = torch.randn(3, 5, 24)
    l = layer.ia3_l.detach()
    expected = (x * l) @ lin.weight.T + lin.bias if feedforward else (x @ lin.weight.T + lin.bias) * l
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < 1e-5


# --- merge / unmerge ------------------------------------------------------------------------------

@pytest.mark.parametrize("target,ff", [("attn.c_attn", False), ("attn.c_proj", False), ("attn.c_proj", True),
                                       ("mlp.c_fc", False), ("mlp.c_proj", True), ("mlp.c_proj", False)])
def test_merge_unmerge_round_trip(target, ff):
    m = add_ia3(small_gpt(), targets=(target,), feedforward=(target,) if ff else ())
    randomize_ia3(m)
    x = ids(V=V)
    layers = ia3_layers(m)
    assert all(l.feedforward == ff for l in layers.values())
    w0 = {n: (l.weight.detach().clone(), l.bias.detach().clone()) for n, l in layers.items()}
    with torch.no_grad():
        out = m(x)
        merge_ia3(m)
        for n, l in layers.items():
            s = l.ia3_l
            assert torch.allclose(l.weight, w0[n][0] * (s[None, :] if ff else s[:, None]), atol=1e-6)
            assert torch.allclose(l.bias, w0[n][1] if ff else w0[n][1] * s, atol=1e-6)   # bias scaled with outputs
        assert (m(x) - out).abs().max() < 1e-4
        unmerge_ia3(m)
        for n, l in layers.items():
            assert (l.weight - w0[n][0]).abs().max() < 1e-6 and (l.bias - w0[n][1]).abs().max() < 1e-6
        assert (m(x) - out).abs().max() < 1e-5


def test_merge_and_unload_gives_plain_gpt():
    m = small_gpt()
    plain_keys = list(m.state_dict())
    add_ia3(m, targets=("c_attn", "c_proj", "c_fc"), feedforward=("mlp.c_proj",))
    randomize_ia3(m)
    x = ids(V=V)
    with torch.no_grad():
        out = m(x)
    assert peft_merge(m) is m
    assert list(m.state_dict()) == plain_keys and method_of(m) is None
    assert is_linear(m.transformer.h[0].mlp.c_proj) and m.lm_head.weight is m.transformer.wte.weight
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        assert (m(x) - out).abs().max() < 1e-4


def test_remove_without_merge_and_refusals():
    m = small_gpt()
    x = ids(V=V)
    with torch.no_grad():
        base = m(x)
    add_ia3(m, targets=("c_attn", "lm_head"), feedforward=())
    randomize_ia3(m)
    with pytest.raises(ConfigError, match="wte"):
        merge_ia3(m)                                              # tied head: would scale the embeddings
    remove_ia3(m, merge=False)
    with torch.no_grad():
        assert torch.equal(m(x), base)
    m = add_ia3(small_gpt(), targets=("c_fc",), feedforward=())
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.ia3_l[3] = 0.0
    merge_ia3(m)
    with pytest.raises(ConfigError, match="zero"):
        unmerge_ia3(m)


# --- adapters against PEFT ----------------------------------------------------------------------

@pytest.mark.parametrize("targets,ff", [(("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
                                        (("c_attn", "c_proj", "c_fc"), ("mlp.c_proj",)),
                                        (("c_fc", "lm_head"), ())])
def test_minigpt_ia3_loads_in_peft(base_dir, tmp_path, targets, ff):
    m = GPT.from_pretrained(base_dir).eval()
    add_ia3(m, targets=targets, feedforward=ff)
    randomize_ia3(m)
    peft_save(m, tmp_path / "ad", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["fan_in_fan_out"] is True and cfg["feedforward_modules"] == list(ff)
    assert set(cfg["feedforward_modules"]) <= set(cfg["target_modules"])
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    if ff:
        assert sd["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (192, 1)
        assert sd["base_model.model.transformer.h.0.mlp.c_proj.ia3_l"].shape == (1, 256)
    x = ids(V=V)
    with torch.no_grad():
        ours = m(x)
    hf = hf_from(base_dir)
    assert (ours - hf_logits(hf, x)).abs().max() > 1e-2
    theirs = hf_logits(peft_model_from_dir(hf, tmp_path / "ad"), x)
    assert (ours - theirs).abs().max() < 1e-4
    m2 = peft_load(GPT.from_pretrained(base_dir), tmp_path / "ad").eval()     # minigpt round trip
    assert method_of(m2) == "ia3" and count_parameters(m2) == count_parameters(m)
    with torch.no_grad():
        assert torch.equal(m2(x), ours)


@pytest.mark.parametrize("kw", [{}, dict(target_modules=["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
                                         feedforward_modules=["mlp.c_proj"])])
def test_peft_ia3_loads_in_minigpt(base_dir, tmp_path, kw):
    pm = peft_ia3(hf_from(base_dir), **kw)
    randomize_peft(pm)
    pm.eval()
    x = ids(1, V=V)
    theirs = hf_logits(pm, x)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = peft_load(GPT.from_pretrained(base_dir), tmp_path / "peft").eval()
    assert method_of(m) == "ia3"
    assert {n for n, l in ia3_layers(m).items() if l.feedforward} == {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}
    with torch.no_grad():
        ours = m(x)
        assert (ours - hf_logits(hf_from(base_dir), x)).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-4
    assert count_parameters(m)[0] == pm.get_nb_trainable_parameters()[0]


# --- loading rules and config -------------------------------------------------------------------

def test_load_into_existing_layers_copies_in_place(tmp_path):
    src = IA3Config().apply(small_gpt())
    randomize_ia3(src, seed=7)
    save_adapter(src, tmp_path / "a")
    m = IA3Config().apply(small_gpt())
    params = ia3_parameters(m)
    opt = torch.optim.AdamW(params, lr=1e-3)
    peft_load(m, tmp_path / "a")
    assert all(p is q for p, q in zip(ia3_parameters(m), params))
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], ia3_parameters(m)))
    for (n, a), b in zip(ia3_layers(src).items(), ia3_parameters(m)):
        assert torch.equal(a.ia3_l, b), n
    other = add_ia3(small_gpt(), targets=("c_fc",), feedforward=())
    with pytest.raises(AdapterError, match="IA3 layers"):
        load_adapter(other, tmp_path / "a")


def test_wrong_method_is_refused_naming_both(tmp_path):
    save_lora(add_lora(small_gpt(), r=2, alpha=4), tmp_path / "lora")
    with pytest.raises(AdapterError) as e:
        load_adapter(small_gpt(), tmp_path / "lora")
    assert "LoRA" in str(e.value) and "IA3" in str(e.value)
    with pytest.raises(AdapterError) as e:                      # a model that carries IA3 already
        peft_load(IA3Config().apply(small_gpt()), tmp_path / "lora")
    assert "LoRA" in str(e.value) and "IA3" in str(e.value)
    save_adapter(IA3Config().apply(small_gpt()), tmp_path / "ia3")
    with pytest.raises(AdapterError) as e:
        peft_load(small_gpt(), tmp_path / "ia3", method="dora")
    assert "IA3" in str(e.value) and "DoRA" in str(e.value)
    with pytest.raises(AdapterError, match="IA3"):
        peft_load(add_lora(small_gpt(), r=2, alpha=4), tmp_path / "ia3")    # model carries LoRA already


def test_config_validation_and_describe():
    cfg = method_config("ia3")
    assert isinstance(cfg, IA3Config) and cfg.method == "ia3"
    assert cfg.targets == ("c_attn", "mlp.c_proj") and cfg.feedforward == ("mlp.c_proj",)
    assert cfg.to_dict() == {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]}
    assert cfg.describe() == "IA3 on c_attn, mlp.c_proj (inputs of mlp.c_proj)"
    assert method_config("ia3", targets="c_attn,c_proj", feedforward="mlp.c_proj").feedforward == ("mlp.c_proj",)
    for kw in (dict(targets=()), dict(targets=("c_attn",), feedforward=("c_fc",)), dict(size=3)):
        with pytest.raises(ConfigError):
            method_config("ia3", **kw)
    with pytest.raises(ConfigError, match="match no"):
        add_ia3(small_gpt(), targets=("nope",), feedforward=())
    with pytest.raises(ConfigError, match="already"):
        IA3Config().apply(IA3Config().apply(small_gpt()))


def test_save_refuses_merged_and_missing(tmp_path):
    with pytest.raises(ConfigError, match="no IA3"):
        save_adapter(small_gpt(), tmp_path / "x")
    m = IA3Config().apply(small_gpt())
    merge_ia3(m)
    with pytest.raises(ConfigError, match="unmerge"):
        save_adapter(m, tmp_path / "x")


def test_quantized_base_runs_but_does_not_merge():
    from minigpt.model.quant import quantize_model
    m = quantize_model(small_gpt(), "int8")
    x = ids(V=V)
    with torch.no_grad():
        base = m(x)
    IA3Config().apply(m)
    layer = m.transformer.h[0].attn.c_attn
    assert layer.quant is not None and layer.ia3_l.dtype == torch.float32
    randomize_ia3(m)
    with torch.no_grad():
        s = layer.ia3_l.clone()
        h = m.transformer.h[0].ln_1(m.transformer.wte(x) + m.transformer.wpe(torch.arange(x.size(1))))
        assert torch.allclose(layer(h), layer.quant(h) * s, atol=1e-6)
        assert (m(x) - base).abs().max() > 1e-2
    m(x).sum().backward()
    assert all(p.grad is not None for p in ia3_parameters(m))
    with pytest.raises(ConfigError, match="quantized"):
        merge_ia3(m)
