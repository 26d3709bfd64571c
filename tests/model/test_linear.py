"""minigpt.model.linear: fp32 products on oneDNN where the CPU favours it, equal to F.linear."""
import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig
from minigpt.methods import add_lora
from minigpt.model import linear as linear_mod
from minigpt.training.loss import fused_lm_loss


@pytest.fixture
def gemm(monkeypatch):
    """Force the choice: gemm("onednn") or gemm("mkl")."""
    def force(name):
        monkeypatch.setattr(linear_mod, "onednn_linear_wins", lambda: name == "onednn")
    return force


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_linear_on_onednn_matches_f_linear_values_and_gradients(gemm, needs):
    gemm("onednn")
    torch.manual_seed(0)
    x = (torch.randn(3, 80, 96) * 0.2).requires_grad_(needs[0])
    w = (torch.randn(200, 96) * 0.2).requires_grad_(needs[1])
    b = (torch.randn(200) * 0.2).requires_grad_(needs[2])
    assert linear_mod.uses_onednn(x, w)
    y = linear_mod.linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, torch.zeros_like(y))
    g = torch.randn_like(ref)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], g)
    want = torch.autograd.grad(ref, [t for t in (x, w, b) if t.requires_grad], g)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_choice_follows_env_and_leaves_small_bf16_and_autocast_products_to_torch(gemm, monkeypatch):
    linear_mod.onednn_linear_wins.cache_clear()
    try:
        monkeypatch.setenv("MINIGPT_GEMM", "mkl")
        assert linear_mod.onednn_linear_wins() is False
        linear_mod.onednn_linear_wins.cache_clear()
        monkeypatch.setenv("MINIGPT_GEMM", "onednn")
        assert linear_mod.onednn_linear_wins() is torch.backends.mkldnn.is_available()
    finally:
        linear_mod.onednn_linear_wins.cache_clear()
    gemm("onednn")
    w = torch.randn(768, 768)
    assert linear_mod.uses_onednn(torch.randn(8, 768), w)
    assert not linear_mod.uses_onednn(torch.randn(4, 32), torch.randn(32, 32))   # 16 * 32 * 32 MACs
    assert not linear_mod.uses_onednn(torch.randn(8, 768).bfloat16(), w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear_mod.uses_onednn(torch.randn(8, 768), w)
    gemm("mkl")
    assert not linear_mod.uses_onednn(torch.randn(8, 768), w)


def test_lora_step_gives_the_same_loss_and_gradients_on_either_kernel(gemm):
    """A LoRA model's fused-head loss and adapter gradients: oneDNN vs MKL (the head, the frozen
    base's forward and input gradients all change kernels)."""
    results = {}
    for name in ("mkl", "onednn"):
        gemm(name)
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        add_lora(model, r=4, dropout=0.0, targets="c_attn,c_fc")
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
        x = torch.randint(0, 50257, (4, 33))
        h = model.hidden_states(x[:, :-1])
        loss = fused_lm_loss(h, model.lm_head.weight, x[:, 1:])
        loss.backward()
        results[name] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    (l0, g0), (l1, g1) = results["mkl"], results["onednn"]
    assert l0 == pytest.approx(l1, rel=1e-5) and l0 > 1.0
    assert g0.keys() == g1.keys() and len(g0) == 8
    for n in g0:
        assert g0[n].abs().max() > 0
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("vendor,isa,wins", [("AuthenticAMD", "AVX512", True), ("AuthenticAMD", "AVX2", False),
                                             ("GenuineIntel", "AVX512", False)])
def test_auto_choice_is_onednn_on_amd_with_avx512_only(monkeypatch, vendor, isa, wins):
    monkeypatch.delenv("MINIGPT_GEMM", raising=False)
    monkeypatch.setattr(linear_mod, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    linear_mod.onednn_linear_wins.cache_clear()
    try:
        assert linear_mod.onednn_linear_wins() is (wins and torch.backends.mkldnn.is_available())
    finally:
        linear_mod.onednn_linear_wins.cache_clear()


@pytest.mark.parametrize("name", ["mkl", "onednn"])
def test_chunked_head_log_probs_on_either_kernel(gemm, name):
    """linear_log_probs (the preference losses' head) on oneDNN or MKL: log_softmax's values and
    gradients."""
    from minigpt.training.loss import linear_log_probs

    gemm(name)
    torch.manual_seed(0)
    h = (torch.randn(40, 64) * 2).requires_grad_()
    w = (torch.randn(5000, 64) * 0.2).requires_grad_()
    y = torch.randint(0, 5000, (40,))
    assert linear_mod.uses_onednn(h, w) is (name == "onednn")
    got = linear_log_probs(h, w, y, chunk=1024)
    ref = torch.log_softmax(h @ w.t(), -1)[torch.arange(40), y]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(40)
    for a, r in zip(torch.autograd.grad(got, (h, w), g), torch.autograd.grad(ref, (h, w), g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
