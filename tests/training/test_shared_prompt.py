"""One row a pair (collate_shared_pairs + pair_layout): the prompt computed once, the rejected answer
masked from the chosen one, gives the log-probs, losses and gradients of two rows a pair (collate_pairs,
itself checked against trl in test_preference.py) for every method; and the vocabulary-chunked head
(minigpt.training.loss.linear_log_probs) equals log_softmax on full logits, values and gradients."""
from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F

from minigpt.data.preferences import (
    CHOSEN,
    PAD,
    PROMPT,
    REJECTED,
    PreferenceDataset,
    collate_pairs,
    collate_shared_pairs,
    pair_layout,
)
from minigpt.methods import method_config
from minigpt.training.loss import linear_log_probs
from minigpt.training.preference import PreferenceLoss, sequence_logps

EOS = 50256


def _pairs(seed: int = 0, n: int = 4, empty_prompt: bool = True):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, 50256, (k,), generator=g).tolist()
    out = [{"prompt": ids(2 + 3 * i), "chosen": ids(1 + (5 * i) % 7) + [EOS], "rejected": ids(6 - i) + [EOS]}
           for i in range(n)]
    if empty_prompt:
        out[0]["prompt"] = []
    return out


def test_layout_of_one_pair():
    x, y, t, seg = collate_shared_pairs([{"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6, 7, 8]}], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 4, 5, 6, 7]]                       # the rejected EOS predicts nothing
    assert seg.tolist() == [[PROMPT] * 3 + [CHOSEN] * 2 + [REJECTED] * 2]
    assert y.tolist() == [[-100, -100, 4, 5, -100, -100, -100],         # chosen: from the last prompt token
                          [-100, -100, 6, -100, -100, 7, 8]]            # rejected: its first token there too
    assert t.tolist() == [[2, 3, 4, 5, -100, -100, -100], [2, 3, 6, -100, -100, 7, 8]]
    lay = pair_layout(seg)
    assert lay["pos"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    m = lay["mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True, False]  # rejected sees prompt + itself
    assert m[4].tolist() == [True] * 5 + [False] * 2 and torch.equal(m, m.tril())
    x2, y2, _, seg2 = collate_shared_pairs([{"prompt": [1], "chosen": [4], "rejected": [6]},
                                            {"prompt": [1, 2, 3], "chosen": [4, 5], "rejected": [6, 7, 8]}], pad_id=0)
    assert x2.shape == (2, 7) and y2.shape == (4, 7) and seg2[0].tolist()[2:] == [PAD] * 5
    assert pair_layout(seg2)["mask"][0, 0, 6].tolist() == [True] * 7    # padding sees what precedes it


@pytest.mark.parametrize("method", [None, "lora", "dora", "ia3", "adapter", "prefix", "prompt"])
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_shared_rows_equal_two_rows(method, objective):
    """Same losses, metrics and gradients (every trainable tensor) from both layouts, a pair with an
    empty prompt and padding included; DPO's reference is the adapter switched off (frozen copy for
    full fine-tuning)."""
    model = tiny.gpt(n_embd=32, std=0.1, seed=1)                      # eval(): no dropout in the methods
    ref = tiny.gpt(n_embd=32, std=0.1, seed=2) if method is None else "adapters"
    if method:
        method_config(method).apply(model)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
    examples = _pairs(empty_prompt=method not in ("prefix", "prompt"))
    loss_mod = PreferenceLoss(model, objective, 0.2, reference=None if objective == "orpo" else ref)
    results = []
    for shared in (False, True):
        model.zero_grad()
        if shared:
            x, y, t, seg = collate_shared_pairs(examples)
            loss, m = loss_mod.pair_losses(x, y, t, segments=seg)
        else:
            loss, m = loss_mod.pair_losses(*collate_pairs(examples))
        loss.backward()
        results.append((loss.detach(), m, {n: p.grad.clone() for n, p in model.named_parameters()
                                           if p.grad is not None}))
    (a, ma, ga), (b, mb, gb) = results
    assert abs(float(a) - float(b)) < 1e-5 and float(ma["logps/chosen"].std()) > 0.05
    if objective == "dpo":                                             # the adapter changed something
        assert float(ma["rewards/margins"].abs().max()) > 1e-4
    assert all(torch.allclose(ma[k], mb[k], atol=1e-4, rtol=1e-5) for k in ma)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), n


def test_dataset_batches_and_empty_micro_batch():
    """share_prompt batches carry segments; lengths count prompt + both answers; a micro-batch without
    pairs (more micro-batches than pairs) gives a zero loss with gradients for the graph."""
    examples = _pairs(3, n=3)
    ds = PreferenceDataset(examples, batch_size=3, grad_accum=4, share_prompt=True)
    assert ds.lengths == [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]
    x, y, n, kw = ds.batch(0, 0)
    assert set(kw) == {"targets", "segments"} and x.size(0) == 1 and y.size(0) == 2
    assert n == sum(len(examples[i]["prompt"]) * 2 + len(examples[i]["chosen"]) + len(examples[i]["rejected"])
                    for i in ds.indices(0, 0))
    x, y, n, kw = ds.batch(0, 3)                                       # 3 pairs over 4 micro-batches
    assert n == 0 and bool((y == -100).all()) and "segments" in kw
    model = tiny.gpt(n_embd=32, std=0.1, train=True)
    method_config("lora").apply(model)
    loss = PreferenceLoss(model, "dpo", 0.1, reference="adapters")(x, y, **kw)
    loss.backward()
    assert float(loss) == 0.0
    ((vx, vy, vkw),) = list(ds.sequential(8))
    assert vx.size(0) == 3 and set(vkw) == {"targets", "segments"}


def test_sequence_logps_of_a_long_row_past_the_context():
    """A shared row may be longer than the context (prompt + chosen + rejected); positions stay inside it."""
    model = tiny.gpt(n_embd=32, std=0.1, block_size=16)
    e = {"prompt": list(range(1, 7)), "chosen": list(range(10, 19)) + [EOS], "rejected": list(range(20, 29)) + [EOS]}
    x, y, _, seg = collate_shared_pairs([e])
    assert x.size(1) > 16
    shared = sequence_logps(model, x, y, **pair_layout(seg))[0]
    two = sequence_logps(model, *collate_pairs([e])[:2])[0]
    assert torch.allclose(shared, two, atol=1e-5)


@pytest.mark.parametrize("need_w", [False, True])
def test_linear_log_probs_equal_log_softmax(need_w):
    torch.manual_seed(0)
    V, C, N = 1000, 16, 37
    h = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.5).requires_grad_(need_w)
    y = torch.randint(0, V, (N,))
    y[:3] = torch.tensor([0, V - 1, 299])                              # chunk edges (chunk 300)
    g = torch.randn(N)
    ours = linear_log_probs(h, w, y, chunk=300)
    ours.backward(g)
    gh, gw = h.grad.clone(), w.grad.clone() if need_w else None
    h.grad, w.grad = None, None
    want = F.log_softmax(F.linear(h, w), dim=-1).gather(1, y[:, None]).squeeze(1)
    want.backward(g)
    assert ours.dtype == torch.float32 and torch.allclose(ours, want, atol=1e-5)
    assert torch.allclose(gh, h.grad, atol=1e-5)
    if need_w:
        assert torch.allclose(gw, w.grad, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(linear_log_probs(h, w, y, chunk=300), ours.detach())


def test_linear_log_probs_under_bf16_autocast():
    """Matmuls in bf16 as autocast would run the head, the softmax in fp32: values as bf16 logits
    taken through an fp32 log_softmax, gradients within bf16 rounding."""
    torch.manual_seed(1)
    h = torch.randn(20, 32, requires_grad=True)
    w = torch.randn(500, 32) * 0.3
    y = torch.randint(0, 500, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_log_probs(h, w, y, chunk=128)
        logits = F.linear(h, w)
    want = F.log_softmax(logits.float(), -1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(ours, want, atol=1e-5)
    ours.sum().backward()
    got, h.grad = h.grad.clone(), None
    want.sum().backward()
    assert torch.allclose(got, h.grad, atol=0.02 * float(h.grad.abs().max()))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neo"])
def test_finetune_shares_the_prompt_for_gpt2_only(tmp_path, monkeypatch, arch):
    """GPT-Neo's local windows count slots, which the shared row moves for the rejected answer: its
    runs keep two rows a pair. A DPO run starts at ln 2 either way."""
    import json

    from minigpt.commands.args import parse_args
    from minigpt.commands.finetune import FinetuneArgs, finetune
    from minigpt.data import preferences

    seen = []
    init = preferences.PreferenceDataset.__init__

    def spy(self, *a, **kw):
        init(self, *a, **kw)
        seen.append(self.share_prompt)
    monkeypatch.setattr(preferences.PreferenceDataset, "__init__", spy)
    extra = {"arch": "gpt_neo", "window_size": 4} if arch == "gpt_neo" else {}
    tiny.gpt(n_embd=32, std=0.1, block_size=64, **extra).save_pretrained(tmp_path / "base")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i} about colours?", "chosen": " red and blue",
                                        "rejected": " no idea at all"}) + "\n" for i in range(6)))
    argv = ["--base", tmp_path / "base", "--data", data, "--out-dir", tmp_path / "out", "--objective", "dpo",
            "--method", "lora", "--max-steps", "1", "--batch-size", "2", "--samples", "0", "--exact-match", "0",
            "--eval-interval", "1", "--log-interval", "1", "--device", "cpu", "--precision", "fp32", "--threads", "1"]
    finetune(parse_args(FinetuneArgs, [str(a) for a in argv]))
    assert seen and set(seen) == {arch == "gpt2"}
    first = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
