"""Spelling-shared embedding updates (minigpt.training.spelling): the fold-after-every-step form
against the explicit reparametrisation W = E + F P trained by autograd, the tied unseen rows,
and train.py's use of it (on by default for fresh weights, off for --init-from, resume checks)."""
import json

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch.func import functional_call

from minigpt.commands import train
from minigpt.data.tokenizer import get_tokenizer
from minigpt.model.gpt import GPT
from minigpt.training.loss import SeenVocab
from minigpt.training.spelling import UNSEEN_SCALE, Spelling, spelling_features

TINY = tiny.train_flags(eval_batches=1, log_interval=1, precision="fp32")


def test_features_share_buckets_between_tokens_that_share_letters():
    tok = get_tokenizer()
    words = [b" thou", b" thee", b" though", b"xyz"]
    f = spelling_features(words, buckets=4096).to_dense()
    assert f.shape == (4, 4096)
    assert torch.allclose(f.norm(dim=1), torch.ones(4))                     # unit rows
    assert (f[0] > 0).sum() == len({g for n in (1, 2, 3) for g in _grams(b"\x02 thou\x03", n)} - {b"\x02", b"\x03"})
    sim = f @ f.T
    assert sim[0, 2] > sim[0, 1] > sim[0, 3] >= 0                          # " thou" ~ " though" > " thee" > "xyz"
    assert torch.equal(f, spelling_features(words, buckets=4096).to_dense())   # deterministic (crc32)
    assert tok.decode_single_token_bytes(tok.encode_ordinary(" thou")[0]) == b" thou"


def _grams(b: bytes, n: int) -> set:
    return {b[i:i + n] for i in range(len(b) - n + 1)}


def test_folded_updates_equal_the_explicit_reparametrisation():
    """AdamW steps with Spelling's gradient-then-fold give the embedding that training E and P of
    W = E + F P by autograd gives (same AdamW, no decay on E or P), and every other weight alike."""
    model = tiny.gpt(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, seed=0, std=0.2, train=True)
    ref = tiny.gpt(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, seed=0, std=0.2, train=True)
    spelling = Spelling(model.lm_head.weight, buckets=64)                   # 64 buckets: much sharing
    Fd = spelling.F.to_dense()                                              # (300, 64)
    P = torch.zeros(64, 16, requires_grad=True)
    E = ref.transformer.wte.weight
    others = [p for n, p in ref.named_parameters() if "wte" not in n]
    opt_ref = torch.optim.AdamW([{"params": [E], "weight_decay": 0.0}, {"params": others, "weight_decay": 0.1},
                                 {"params": [P], "weight_decay": 0.0}], lr=3e-2)
    mine = [p for n, p in model.named_parameters() if "wte" not in n]
    opt = torch.optim.AdamW([{"params": [model.transformer.wte.weight], "weight_decay": 0.0},
                             {"params": mine, "weight_decay": 0.1}, *spelling.param_groups()], lr=3e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randint(0, 300, (4, 16), generator=g)
        y = torch.randint(0, 300, (4, 16), generator=g)
        W = E + Fd @ P
        logits = functional_call(ref, {"transformer.wte.weight": W, "lm_head.weight": W}, (x,))
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        spelling.gradient()
        opt.step()
        spelling.fold()
        opt.zero_grad()
    assert spelling.P.abs().max() == 0
    with torch.no_grad():
        want = E + Fd @ P
    moved = (want - tiny.gpt(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, seed=0,
                             std=0.2).transformer.wte.weight).abs().max()
    assert moved > 0.05 and P.abs().max() > 0.01                            # both parts really trained
    assert torch.allclose(model.transformer.wte.weight, want, atol=2e-6, rtol=0)
    for (n, a), b in zip(((n, p) for n, p in model.named_parameters() if "wte" not in n), others):
        if n.endswith("c_attn.bias"):
            # the key bias is left out: its gradient is zero in exact arithmetic (it shifts all of a
            # query's scores alike), so Adam steps on rounding noise there
            a, b = torch.cat([a[:16], a[32:]]), torch.cat([b[:16], b[32:]])
        assert torch.allclose(a, b, atol=2e-6, rtol=0), n


def test_rows_outside_the_seen_vocab_stay_tied_and_untouched():
    model = tiny.gpt(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, seed=0, std=0.2, train=True)
    vocab = SeenVocab(torch.arange(0, 300, 3), 300)
    vocab.tie(model.lm_head.weight)
    spelling = Spelling(model.lm_head.weight, rows=vocab.seen, buckets=64)
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.AdamW(list(model.parameters()) + [spelling.P], lr=1e-2)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)) * 3   # seen ids only
    for _ in range(3):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        with torch.no_grad():                   # as the seen-rows head's gradient: the tied rows share one
            g = model.lm_head.weight.grad
            g[vocab.unseen] = g[vocab.unseen].mean(0)
        spelling.gradient()
        opt.step()
        spelling.fold()
        opt.zero_grad()
    w = model.lm_head.weight.detach()
    assert vocab.is_tied(w)
    assert not torch.equal(w[vocab.seen], before[vocab.seen])


def test_unseen_rows_are_filled_from_their_spelling_and_tied_again():
    """filled(): every unseen row but the representative's is u + UNSEEN_SCALE * F_j total (F_j from
    the token's own bytes), the rows the seen-rows head reads are untouched, and leaving the block
    restores the tied rows bit for bit."""
    tok = get_tokenizer()
    model = tiny.gpt(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, seed=0, std=0.2, train=True)
    vocab = SeenVocab(torch.arange(0, 300, 3), 300)
    w = model.lm_head.weight
    vocab.tie(w)
    spelling = Spelling(w, rows=vocab.seen, buckets=64)
    opt = torch.optim.AdamW(list(model.parameters()) + [spelling.P], lr=1e-2)
    x = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0)) * 3
    for _ in range(3):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        spelling.gradient()
        opt.step()
        spelling.fold()
        opt.zero_grad()
    assert spelling.total.abs().max() > 1e-3                                 # the folded P, kept
    vocab.tie(w)                                                            # (as the seen-rows head keeps them)
    before = w.detach().clone()
    rest = vocab.unseen[1:]
    feats = spelling_features([tok.decode_single_token_bytes(int(i)) for i in rest], 64).to_dense()
    with spelling.filled(vocab):
        got = w.detach().clone()
    assert torch.equal(w.detach(), before)                                   # tied again, bit for bit
    want = before[vocab.rep] + UNSEEN_SCALE * feats @ spelling.total
    assert torch.allclose(got[rest], want, atol=1e-6, rtol=0)
    assert (got[rest] - before[rest]).abs().amax(1).min() > 0                # every one moved
    assert torch.equal(got[vocab.index], before[vocab.index])                # what the head reads: unchanged


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("spell") / "c.txt"
    p.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(800)))
    return p


def _train_tokens(out):
    import numpy as np

    return np.fromfile(next((out / "data").glob("*/train.bin")), dtype=np.uint16)


def test_train_uses_it_for_fresh_weights_and_resume_checks_it(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--max-steps", "4", *TINY]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["spelling"]["buckets"] == 8192 and info["spelling"]["rows"] == info["head"]["rows"] - 1
    # the saved model's unseen rows come from their spelling (distinct), the checkpoint's as well;
    # the checkpoint records the spelling total that resume needs for them
    seen = SeenVocab.of_tokens(_train_tokens(out), 50257)
    w = GPT.from_pretrained(out).lm_head.weight.detach()
    moved = (w[seen.unseen] != w[seen.rep]).any(1)
    assert moved.float().mean() > 0.9, moved.float().mean()                  # (their n-grams: in seen tokens)
    state = torch.load(out / "checkpoints" / "step-0000004" / "trainer_state.pt", weights_only=True)
    assert state["spelling_total"].abs().max() > 0
    assert "spelling-shared embedding updates" in capsys.readouterr().out
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--max-steps", "6", "--resume",
                       "--spelling", "off", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert "trained with spelling-shared embedding updates" in err and len(err.splitlines()) == 1
    off = tmp_path / "off"
    assert train.main(["--data", str(corpus), "--out-dir", str(off), "--max-steps", "4", "--spelling", "off",
                       *TINY]) == 0
    assert json.loads((off / "run.json").read_text())["spelling"] == "off"
    cont = tmp_path / "cont"
    assert train.main(["--data", str(corpus), "--out-dir", str(cont), "--max-steps", "2", "--init-from",
                       str(out), *TINY]) == 0
    assert json.loads((cont / "run.json").read_text())["spelling"] == "off"
