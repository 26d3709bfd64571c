"""DoRA (weight-decomposed LoRA): the layer's maths, merge round trips on every GPT-2 projection,
parameter counts and adapters in both directions against PEFT as the independent reference."""
from __future__ import annotations

import json
import warnings

import pytest
import tiny
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_lora import hf_logits, ids, peft_model_from_dir

from minigpt import GPT, GPTConfig
from minigpt.errors import AdapterError, ConfigError
from minigpt.methods import count_parameters, method_config, method_of
from minigpt.methods import load_adapter as peft_load
from minigpt.methods import merge_and_unload as peft_merge
from minigpt.methods import save_adapter as peft_save
from minigpt.methods.lora import (
    LoRAConfig,
    LoRALinear,
    add_lora,
    load_adapter,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101)
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# --- helpers -------------------------------------------------------------------------------

def small_gpt(seed=0) -> GPT:
    """test_lora's tiny_gpt with 4 heads and 64 dims: all weights N(0, 0.2), LayerNorm gains included."""
    return tiny.gpt(**SMALL, seed=seed, std=0.2, ln_mean=0.0)


def hf_from(base_dir):
    """transformers' GPT2LMHeadModel read from a folder minigpt's save_pretrained wrote."""
    from transformers import GPT2LMHeadModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel.from_pretrained(str(base_dir)).eval()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    small_gpt().save_pretrained(d)
    return d


def randomize_dora(model, seed=1):
    """Non-trivial A, B and magnitudes (each magnitude off its initial row norm by ~20%)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(layer.lora_magnitude.shape, generator=g))


def randomize_peft(pm, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def peft_dora(hf, targets, r=4, alpha=8, dropout=0.0, rslora=False):
    from peft import LoraConfig, get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_dora=True,
                                             fan_in_fan_out=True, lora_dropout=dropout, use_rslora=rslora,
                                             task_type="CAUSAL_LM"))


# --- counts and structure ----------------------------------------------------------------------

def test_gpt2_counts_match_peft():
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        ours = add_lora(GPT(GPTConfig.from_name("gpt2")), r=8, alpha=16, targets=("c_attn",), use_dora=True)
        pm = peft_dora(GPT2LMHeadModel(GPT2Config()), ("c_attn",), r=8, alpha=16)
    trainable, total = count_parameters(ours)
    assert trainable == pm.get_nb_trainable_parameters()[0] == 12 * (8 * (768 + 2304) + 2304)
    assert total == 124_439_808 + trainable
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_keys_magnitude_init_and_no_op():
    m = small_gpt()
    x = ids(V=SMALL["vocab_size"])
    with torch.no_grad():
        base = m(x)
    add_lora(m, r=4, alpha=8, targets=("c_attn", "c_fc"), use_dora=True)
    layer = m.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.use_dora
    assert layer.lora_magnitude.shape == (192,)          # one per output row of the (out, in) weight
    assert torch.allclose(layer.lora_magnitude, layer.weight.norm(dim=1))
    assert "transformer.h.0.attn.c_attn.lora_magnitude" in m.state_dict()
    assert "transformer.h.0.attn.c_attn.lora_magnitude" in lora_state_dict(m)
    assert len(lora_parameters(m)) == 3 * 4
    for n, p in m.named_parameters():
        assert p.requires_grad == (".lora_" in n), n
    with torch.no_grad():
        assert (m(x) - base).abs().max() < 1e-5          # B = 0: the base model


def test_forward_is_the_decomposed_weight():
    """y = m * x (W + sBA)^T / ||W + sBA||_row + b: magnitudes scale output rows, the bias is not scaled."""
    torch.manual_seed(0)
    lin = nn.Linear(48, 48)                              # square: a wrong orientation would not fail on shape
    layer = LoRALinear(lin, r=4, alpha=8, use_dora=True).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_magnitude.mul_(torch.rand(48) + 0.5)
    x = torch.randn(5, 48)
    V = lin.weight + layer.scaling * layer.lora_B @ layer.lora_A
    expected = x @ (layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)).T + lin.bias
    with torch.no_grad():
        assert (layer(x) - expected).abs().max() < 1e-5
        assert torch.allclose(layer.merged_weight(), layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True),
                              atol=1e-6)


def test_norm_is_detached_gradients_reach_magnitude_a_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 24), r=2, alpha=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(3, 16)
    layer(x).square().sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # with n a constant, d/dm of sum(y) is x W'^T / n summed over the batch (no term through n)
    layer.zero_grad()
    layer(x).sum().backward()
    n = (layer.weight + layer.delta_weight()).norm(dim=1).detach()
    expected = (x @ (layer.weight + layer.delta_weight()).T / n).sum(0).detach()
    assert torch.allclose(layer.lora_magnitude.grad, expected, atol=1e-5)


# --- merge / unmerge on every projection -------------------------------------------------------

@pytest.mark.parametrize("target", PROJECTIONS)
def test_merge_unmerge_round_trip(target):
    m = add_lora(small_gpt(), r=4, alpha=8, targets=(target,), use_dora=True)
    randomize_dora(m)
    x = ids(V=SMALL["vocab_size"])
    layers = lora_layers(m)
    assert sorted(layers) == [f"transformer.h.{i}.{target}" for i in range(2)]
    w0 = {n: l.weight.detach().clone() for n, l in layers.items()}
    expected = {n: l.merged_weight() for n, l in layers.items()}
    with torch.no_grad():
        out = m(x)
        merge_lora(m)
        for n, l in layers.items():
            assert l.merged and (l.weight - expected[n]).abs().max() < 1e-6
            assert (l.weight - w0[n]).abs().max() > 1e-3
        assert (m(x) - out).abs().max() < 1e-4
        unmerge_lora(m)
        for n, l in layers.items():
            assert not l.merged and (l.weight - w0[n]).abs().max() < 1e-6
        assert (m(x) - out).abs().max() < 1e-5


def test_merge_and_unload_gives_plain_gpt():
    m = small_gpt()
    plain_keys = list(m.state_dict())
    add_lora(m, r=4, alpha=8, targets=("c_attn", "c_proj", "c_fc"), use_dora=True)
    randomize_dora(m)
    x = ids(V=SMALL["vocab_size"])
    with torch.no_grad():
        out = m(x)
    assert peft_merge(m) is m
    assert list(m.state_dict()) == plain_keys and method_of(m) is None
    assert m.lm_head.weight is m.transformer.wte.weight
    with torch.no_grad():
        assert (m(x) - out).abs().max() < 1e-4


def test_merged_forward_matches_peft_merge(base_dir):
    """PEFT's own merge (Conv1D, fan_in_fan_out) gives the weights ours does, transposed."""
    hf = hf_from(base_dir)
    pm = peft_dora(hf, ("c_attn", "c_proj", "c_fc"))
    randomize_peft(pm)
    d = base_dir.parent / "peft_merge"
    pm.save_pretrained(str(d))
    m = peft_load(small_gpt(), d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged_hf = pm.merge_and_unload()
    merge_lora(m)
    for name, layer in lora_layers(m).items():
        theirs = merged_hf.get_submodule(name).weight.T          # Conv1D (in, out) -> (out, in)
        assert (layer.weight - theirs).abs().max() < 1e-5, name


# --- adapters against PEFT ----------------------------------------------------------------------

@pytest.mark.parametrize("targets,rslora", [(("c_attn",), False), (("c_attn", "c_proj", "c_fc"), True),
                                            (("c_attn", "lm_head"), False)])
def test_minigpt_dora_loads_in_peft(base_dir, tmp_path, targets, rslora):
    m = GPT.from_pretrained(base_dir).eval()
    x = ids(V=SMALL["vocab_size"])
    with torch.no_grad():
        assert (m(x) - hf_logits(hf_from(base_dir), x)).abs().max() < 1e-4      # same base
    add_lora(m, r=4, alpha=8, dropout=0.05, targets=targets, use_rslora=rslora, use_dora=True)
    randomize_dora(m)
    m.eval()
    peft_save(m, tmp_path / "ad", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["use_rslora"] is rslora
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"].shape == (192,)
    with torch.no_grad():
        ours = m(x)
    hf = hf_from(base_dir)
    assert (ours - hf_logits(hf, x)).abs().max() > 1e-2               # the adapter matters
    theirs = hf_logits(peft_model_from_dir(hf, tmp_path / "ad"), x)
    assert (ours - theirs).abs().max() < 1e-4
    m2 = peft_load(GPT.from_pretrained(base_dir), tmp_path / "ad").eval()   # minigpt round trip
    assert method_of(m2) == "dora" and count_parameters(m2) == count_parameters(m)
    with torch.no_grad():
        assert torch.equal(m2(x), ours)


def test_peft_dora_loads_in_minigpt(base_dir, tmp_path):
    pm = peft_dora(hf_from(base_dir), ("c_attn", "c_proj", "c_fc"))
    randomize_peft(pm)
    pm.eval()
    x = ids(1, V=SMALL["vocab_size"])
    theirs = hf_logits(pm, x)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = peft_load(GPT.from_pretrained(base_dir), tmp_path / "peft").eval()
    assert method_of(m) == "dora" and len(lora_layers(m)) == 8
    with torch.no_grad():
        ours = m(x)
        assert (ours - hf_logits(hf_from(base_dir), x)).abs().max() > 1e-2
    assert (ours - theirs).abs().max() < 1e-4
    assert count_parameters(m)[0] == pm.get_nb_trainable_parameters()[0]


class FixedMask(nn.Module):
    """A dropout with a fixed mask, so that both libraries see the same dropped-out inputs."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask[: x.size(-2), : x.size(-1)]


def test_training_forward_and_gradients_match_peft(base_dir, tmp_path):
    """With dropout active PEFT feeds the dropped-out input to the (m/n - 1) x W^T term too."""
    pm = peft_dora(hf_from(base_dir), ("c_attn",), dropout=0.1)
    randomize_peft(pm)
    pm.save_pretrained(str(tmp_path / "ad"))
    m = peft_load(GPT.from_pretrained(base_dir), tmp_path / "ad")
    mask = (torch.rand(12, 64, generator=torch.Generator().manual_seed(3)) > 0.3).float() / 0.7
    for i in range(2):
        m.transformer.h[i].attn.c_attn.lora_dropout = FixedMask(mask)
        pm.base_model.model.transformer.h[i].attn.c_attn.lora_dropout["default"] = FixedMask(mask)
    m.train()
    pm.train()
    x = ids(2, B=1, V=SMALL["vocab_size"])
    ours, theirs = m(x), pm(input_ids=x).logits
    assert (ours - theirs).abs().max() < 1e-4
    ours.square().mean().backward()
    theirs.square().mean().backward()
    for i in range(2):
        a = m.transformer.h[i].attn.c_attn
        b = pm.base_model.model.transformer.h[i].attn.c_attn
        for g_ours, g_theirs in ((a.lora_A.grad, b.lora_A["default"].weight.grad),
                                 (a.lora_B.grad, b.lora_B["default"].weight.grad),
                                 (a.lora_magnitude.grad, b.lora_magnitude_vector["default"].weight.grad)):
            assert torch.allclose(g_ours, g_theirs, atol=1e-6, rtol=1e-4)


# --- loading rules -----------------------------------------------------------------------------

def test_load_into_existing_layers_copies_in_place(tmp_path):
    src = add_lora(small_gpt(), r=2, alpha=4, targets=("c_attn",), use_dora=True)
    randomize_dora(src, seed=7)
    save_adapter(src, tmp_path / "a")
    m = add_lora(small_gpt(), r=2, alpha=4, targets=("c_attn",), use_dora=True)
    params = lora_parameters(m)
    opt = torch.optim.AdamW(params, lr=1e-3)
    load_adapter(m, tmp_path / "a")
    assert all(p is q for p, q in zip(lora_parameters(m), params))
    assert all(p is q for p, q in zip(opt.param_groups[0]["params"], lora_parameters(m)))
    for k, v in lora_state_dict(src).items():
        assert torch.equal(lora_state_dict(m)[k], v), k
    plain_lora = add_lora(small_gpt(), r=2, alpha=4, targets=("c_attn",))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(plain_lora, tmp_path / "a")


def test_wrong_method_is_refused_naming_both(tmp_path):
    from minigpt.methods.ia3 import IA3Config
    from minigpt.methods.ia3 import save_adapter as save_ia3
    save_ia3(IA3Config().apply(small_gpt()), tmp_path / "ia3")
    assert method_of(load_adapter(small_gpt(), tmp_path / "ia3")) == "ia3"     # handed to minigpt.methods
    with pytest.raises(AdapterError) as e:                        # not onto a model with LoRA layers
        load_adapter(add_lora(small_gpt(), r=2, alpha=4), tmp_path / "ia3")
    assert "IA3" in str(e.value) and "LoRA" in str(e.value)
    save_adapter(add_lora(small_gpt(), r=2, alpha=4, use_dora=True), tmp_path / "dora")
    with pytest.raises(AdapterError) as e:
        peft_load(small_gpt(), tmp_path / "dora", method="lora")
    assert "DoRA" in str(e.value) and "LoRA" in str(e.value)


def test_config_and_refusals():
    cfg = method_config("dora", r=4, alpha=8, targets="c_attn,c_fc")
    assert isinstance(cfg, LoRAConfig) and cfg.use_dora and cfg.method == "dora"
    assert cfg.describe() == "DoRA r=4 alpha=8 on c_attn, c_fc"
    assert method_config("lora").describe() == "LoRA r=8 alpha=16 on c_attn"
    assert cfg.to_dict() == {"r": 4, "alpha": 8, "dropout": 0.05, "targets": ["c_attn", "c_fc"], "rslora": False,
                             "use_dora": True}
    m = cfg.apply(small_gpt())
    assert method_of(m) == "dora" and sorted({n.rsplit(".", 1)[1] for n in lora_layers(m)}) == ["c_attn", "c_fc"]
    with pytest.raises(ConfigError, match="rank"):
        method_config("dora", rank=4)
    with pytest.raises(ConfigError, match="q, k, v"):
        LoRAConfig(targets=("q", "v"), use_dora=True)
    with pytest.raises(ConfigError, match="slices"):
        add_lora(small_gpt(), targets=("q", "v"), use_dora=True)
    from minigpt.model.quant import quantize_model
    with pytest.raises(ConfigError, match="quantized"):
        add_lora(quantize_model(small_gpt(), "int8"), targets=("c_attn",), use_dora=True)


def test_tied_lm_head_dora_refuses_merge():
    m = add_lora(small_gpt(), r=2, alpha=4, targets=("lm_head",), use_dora=True)
    randomize_dora(m)
    assert m.lm_head.weight is m.transformer.wte.weight
    with pytest.raises(ConfigError, match="wte"):
        merge_lora(m)


def test_short_dora_training_changes_only_adapter():
    m = small_gpt()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    add_lora(m, r=4, alpha=8, dropout=0.1, targets=("c_attn", "c_fc"), use_dora=True)
    opt = torch.optim.AdamW(lora_parameters(m), lr=1e-2)
    x = ids(4, V=SMALL["vocab_size"])
    m.train()
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(x[:, :-1]).reshape(-1, SMALL["vocab_size"]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in m.state_dict().items():
        if k in base:
            assert torch.equal(v, base[k]), k
