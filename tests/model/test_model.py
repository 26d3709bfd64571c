"""The model itself: preset sizes, structure, loss helpers and bits per byte against transformers."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minigpt import GPT, GPTConfig, get_tokenizer, lm_loss
from minigpt.data.corpus import TokenDataset, prepare_data
from minigpt.errors import DataError
from minigpt.model import linear as linear_mod
from minigpt.training.evaluate import evaluate_bpb, evaluate_loss
from minigpt.training.loss import CausalLMLoss, fused_lm_loss


@pytest.mark.parametrize("name, n", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                     ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts(name, n):
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name(name))
    assert model.num_params() == n
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.vocab_size == 50257 and model.config.block_size == 1024


def test_hf_parameter_names():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16))
    keys = set(model.state_dict())
    for k in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.ln_1.weight",
              "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
              "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.bias"]:
        assert k in keys


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=65, n_head=2)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_name("gpt3")
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layer=0)


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=64))
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0


def test_forward_shape_and_context_error():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8))
    assert model(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 8, 50257)
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_causality():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    x = torch.randint(0, 50257, (1, 10))
    y = x.clone()
    y[0, 6] = (y[0, 6] + 1) % 50257
    a, b = model(x), model(y)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.allclose(a[:, 6:], b[:, 6:])


def test_fused_loss_matches_reference_loss_and_grads(tiny_hf_gpt2):
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 64, requires_grad=True)
    weight = (torch.randn(50257, 64) * 0.2).requires_grad_()
    y = torch.randint(0, 50257, (2, 7))
    y[1, :3] = -100
    fused = fused_lm_loss(hidden, weight, y, chunk=5)
    fused.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy((hidden @ weight.T).view(-1, 50257), y.view(-1), ignore_index=-100)
    ref.backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(gh, hidden.grad, atol=1e-7) and torch.allclose(gw, weight.grad, atol=1e-7)


def test_fused_loss_of_a_target_far_below_the_rest():
    """A target ~200 nats below the top logit (its softmax entry underflows to 0): the loss is still
    the exact -log p, from the row's log_softmax, and finite; the other rows are untouched."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(50, 8) * 0.2).requires_grad_()
    with torch.no_grad():
        weight[7] = hidden[1].detach() * 40 / hidden[1].norm() ** 2 * 5       # row 1's logit of 7: 200
    y = torch.tensor([3, 9, 11])
    fused = fused_lm_loss(hidden[None], weight, y[None])
    fused.backward()
    ref = F.cross_entropy(hidden @ weight.T, y, reduction="none")
    assert ref[1] > 150 and torch.isfinite(fused)
    assert fused.item() == pytest.approx(ref.mean().item(), rel=1e-6)
    gh = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(hidden @ weight.T, y).backward()
    assert torch.allclose(gh, hidden.grad, atol=1e-6)


def test_loss_module_equals_transformers_loss(tiny_hf_gpt2, tmp_path):
    tiny_hf_gpt2.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    x = torch.randint(0, 50257, (2, 12))
    ours = CausalLMLoss(model)(x[:, :-1], x[:, 1:])
    theirs = tiny_hf_gpt2(x, labels=x).loss
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)
    assert lm_loss(model(x[:, :-1]), x[:, 1:]).item() == pytest.approx(theirs.item(), abs=1e-4)


def test_bits_per_byte_against_transformers(tiny_hf_gpt2, tmp_path):
    tiny_hf_gpt2.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    text = "Of Man's first disobedience, and the fruit\nOf that forbidden tree — whose mortal taste…\n" * 3
    tok = get_tokenizer()
    ids = tok.encode_ordinary(text)
    got = evaluate_bpb(model, text, block_size=16, batch_size=3)
    # reference: transformers logits over the same non-overlapping 16-token windows
    nats = 0.0
    for s in range(0, len(ids) - 1, 16):
        x = torch.tensor([ids[s: s + 16]])
        y = torch.tensor(ids[s + 1: s + 17])
        x = x[:, : len(y)]
        with torch.no_grad():
            nats += F.cross_entropy(tiny_hf_gpt2(x).logits[0], y, reduction="sum").item()
    nbytes = len(text.encode("utf-8")) - len(tok.decode_bytes(ids[:1]))
    assert got["tokens"] == len(ids) - 1 and got["bytes"] == nbytes
    assert got["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    ev = evaluate_loss(model, [(torch.tensor([ids[:16]]), torch.tensor([ids[1:17]]))])
    assert ev["tokens"] == 16 and 0 <= ev["acc"] <= 1 and ev["bpb"] > 0
    # through a loss module (the chunked head train.py evaluates with): the same loss, no accuracy
    fused = evaluate_loss(model, [(torch.tensor([ids[:16]]), torch.tensor([ids[1:17]]))], loss_fn=CausalLMLoss(model))
    assert fused.keys() == {"loss", "bpb", "tokens"} and fused["tokens"] == 16
    assert fused["loss"] == pytest.approx(ev["loss"], rel=1e-5) and fused["bpb"] == pytest.approx(ev["bpb"], rel=1e-5)


def test_prepare_data_sources(tmp_path):
    tok = get_tokenizer()
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    one = prepare_data(str(tmp_path / "a.txt"), tmp_path / "cache")
    train = np.fromfile(one / "train.bin", dtype=np.uint16)
    val = np.fromfile(one / "val.bin", dtype=np.uint16)
    assert train[:3].tolist() == tok.encode("hello world\n")[:3]
    assert len(val) == int((len(train) + len(val)) * 0.05)
    assert prepare_data(str(tmp_path / "a.txt"), tmp_path / "cache") == one          # cached
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "tokens.bin")
    b = prepare_data(str(tmp_path / "tokens.bin"), tmp_path / "cache")
    assert np.fromfile(b / "train.bin", dtype=np.uint16).tolist() == list(range(950))
    ds = TokenDataset(b / "train.bin", 16, batch_size=4, seed=1, grad_accum=2)
    x1, y1, n = ds.batch(3)
    x2, y2, _ = ds.batch(3)
    assert n == x1.numel() == 4 * 16
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(x1, ds.batch(4)[0]) and not torch.equal(x1, ds.batch(3, micro=1)[0])
    bad = tmp_path / "bad.bin"
    np.array([60000], dtype=np.uint16).tofile(bad)
    with pytest.raises(DataError, match="outside GPT-2's vocabulary"):
        prepare_data(str(bad), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        prepare_data(str(tmp_path / "empty"), tmp_path / "cache")


@pytest.mark.parametrize("gemm", ["mkl", "onednn"])
def test_causal_lm_loss_reuses_its_scratch_buffers(gemm, monkeypatch):
    """CausalLMLoss keeps the fused loss's (chunk, vocab) buffers between calls (no fresh pages each
    step; with oneDNN's products, which come as new tensors, there is none) and the loss and
    gradients stay those of the logits path."""
    monkeypatch.setattr(linear_mod, "onednn_linear_wins", lambda: gemm == "onednn")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    loss_fn = CausalLMLoss(model)
    x = torch.randint(0, 50257, (2, 9))
    first = loss_fn(x[:, :-1], x[:, 1:])
    buf = loss_fn.workspace.get("logits")
    assert (buf is None) == (gemm == "onednn")
    first.backward()
    g1 = model.transformer.wte.weight.grad.clone()
    model.zero_grad()
    second = loss_fn(x[:, :-1], x[:, 1:])
    assert loss_fn.workspace.get("logits") is buf                   # the same storage, reused
    second.backward()
    assert second.item() == first.item()
    torch.testing.assert_close(model.transformer.wte.weight.grad, g1, rtol=0, atol=0)
    model.zero_grad()
    ref = lm_loss(model(x[:, :-1]), x[:, 1:])
    ref.backward()
    assert second.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(model.transformer.wte.weight.grad, g1, rtol=1e-4, atol=1e-6)


def test_seen_vocab_head_trains_exactly_like_the_full_head():
    """With the unseen tokens' rows tied, the head over the seen rows (+1 shared row) gives the full
    head's loss, gradients and AdamW steps; the rows stay tied; validation targets outside the seen
    set get their exact loss; an untied model falls back to the full head."""
    import copy

    from minigpt.training.loss import SeenVocab
    from minigpt.training.trainer import make_adamw, param_groups

    torch.manual_seed(0)
    # float64 weights: AdamW's first steps are sign-like, so a gradient that is ~0 in both losses can
    # step either way on float32 rounding alone (2 x lr apart; seen on an AVX2 CPU's kernels)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)).double()
    corpus = torch.randint(0, 3000, (4000,))
    vocab = SeenVocab.of_tokens(corpus.numpy(), 50257)
    assert len(vocab) == len(corpus.unique()) and vocab.unseen.numel() == 50257 - len(vocab)
    assert SeenVocab.of_tokens(torch.arange(50257).numpy(), 50257) is None        # nothing to save
    untied = copy.deepcopy(model)
    vocab.tie(model.lm_head.weight)
    ref = copy.deepcopy(model)
    seen_fn, full_fn = CausalLMLoss(model, vocab=vocab), CausalLMLoss(ref)
    opts = [make_adamw(param_groups(m, 0.1), 3e-3, (0.9, 0.95)) for m in (model, ref)]
    w = model.lm_head.weight
    for _ in range(4):
        x = corpus[torch.randint(0, 4000 - 9, (3,))[:, None] + torch.arange(9)]
        a, b = seen_fn(x[:, :-1], x[:, 1:]), full_fn(x[:, :-1], x[:, 1:])
        a.backward()
        b.backward()
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
        for p, q in zip(model.parameters(), ref.parameters()):       # equal up to float rounding
            assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm()
        for o in opts:
            o.step()
            o.zero_grad()
    assert vocab.is_tied(w) and vocab.is_tied(ref.lm_head.weight)
    # nothing stays on the model: a full-head loss afterwards gets the full head's own gradients
    model.zero_grad()
    ref.zero_grad()
    x = corpus[:9][None]
    CausalLMLoss(model)(x[:, :-1], x[:, 1:]).backward()
    full_fn(x[:, :-1], x[:, 1:]).backward()
    u, gm, gr = vocab.unseen, model.lm_head.weight.grad, ref.lm_head.weight.grad
    assert (gm[u] - gr[u]).norm() <= 1e-5 * gr[u].norm() and (gm - gr).norm() <= 1e-5 * gr.norm()
    model.zero_grad()
    ref.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # evaluation on text with unseen tokens: the full logits' cross-entropy
    x = torch.randint(0, 50257, (2, 9))
    with torch.no_grad():
        want = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
        assert seen_fn(x[:, :-1], x[:, 1:]).item() == pytest.approx(want, rel=1e-5)
    # weights whose rows differ: the full head
    fallback = CausalLMLoss(untied, vocab=SeenVocab.of_tokens(corpus.numpy(), 50257))
    fallback(x[:, :-1], x[:, 1:]).backward()
    assert fallback.vocab is None and untied.lm_head.weight.grad[:, 0].unique().numel() > 1000
