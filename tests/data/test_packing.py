"""Packing (several examples per row, attention and positions per example) gives the loss and the
gradients of the same examples unpacked; the EOS label after each response stays trained when the
pad id is EOS, packed or not."""
from __future__ import annotations

import random

import pytest
import tiny
import torch

from minigpt.data.instruct import EOS_ID, Collator, InstructionDataset, tokenize_records
from minigpt.data.packing import PackedCollator, pack_rows
from minigpt.data.records import default_instructions_path, load_records
from minigpt.data.tokenizer import get_tokenizer
from minigpt.training.loss import CausalLMLoss


@pytest.fixture(scope="module")
def examples():
    recs = load_records(default_instructions_path())[:40]
    ex, _ = tokenize_records(recs, get_tokenizer(), "alpaca", 64, True)
    return ex


def test_pack_rows_best_fit_decreasing():
    rng = random.Random(0)
    sizes = [rng.randint(1, 50) for _ in range(200)]
    rows = pack_rows(sizes, 63)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(sizes[i] for i in r) <= 63 for r in rows)
    assert len(rows) <= sum(sizes) / 63 * 1.1 + 1                     # near the lower bound
    assert pack_rows([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]               # 5 then 4 (new row), 3 beside 4, 2 beside 5
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([8], 7)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_batch_equals_unpacked(examples, fused):
    ex = examples[:12]
    rows = pack_rows([len(e["input_ids"]) - 1 for e in ex], 63)
    assert len(rows) < len(ex) and any(len(r) > 1 for r in rows)
    packed = PackedCollator()([[ex[i] for i in r] for r in rows])
    assert packed["mask"].shape == (len(rows), 1) + packed["input_ids"].shape[1:] * 2
    plain = Collator()(ex)
    results = []
    for batch, kw in ((plain, {}), (packed, {"pos": packed["pos"], "mask": packed["mask"]})):
        model = tiny.gpt(std=0.1)
        loss = CausalLMLoss(model, fused=fused)(batch["input_ids"], batch["labels"], **kw)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_packed_rows_keep_each_example_apart():
    a = {"input_ids": [1, 2, 3, EOS_ID], "labels": [-100, -100, 3, EOS_ID]}
    b = {"input_ids": [7, 8, 9, 10, EOS_ID], "labels": [-100, 8, 9, 10, EOS_ID]}
    out = PackedCollator()([[a, b], [b]])
    assert out["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9, 10], [7, 8, 9, 10, EOS_ID, EOS_ID, EOS_ID]]
    # a's last label is its EOS; b's first token (7) is never a label of a; padding is -100
    assert out["labels"].tolist() == [[-100, 3, EOS_ID, 8, 9, 10, EOS_ID], [8, 9, 10, EOS_ID, -100, -100, -100]]
    assert out["pos"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0, 0]]
    m = out["mask"][0, 0]
    assert m[3, :3].sum() == 0 and m[6, 3:].all() and not m[2, 3] and m.diagonal().all()
    assert out["n_tokens"] == 11 and out["mask"][1, 0].diagonal().all()    # padding attends to itself


def test_eos_label_kept_when_pad_is_eos():
    """GPT-2 has no pad token: padding with 50256 must not mask the real EOS labels."""
    ex, _ = tokenize_records(load_records(default_instructions_path())[:6], get_tokenizer(), "alpaca", 1024, True)
    batch = Collator(pad_id=EOS_ID)(ex)
    x, y = batch["input_ids"], batch["labels"]
    assert (x == EOS_ID).any()                                          # padding is EOS
    for i, e in enumerate(ex):
        n = len(e["input_ids"]) - 1
        assert e["input_ids"][-1] == EOS_ID and y[i, n - 1] == EOS_ID    # the EOS label is trained
        assert (y[i, n:] == -100).all() and (x[i, n:] == EOS_ID).all()  # padding is not
    packed = PackedCollator(pad_id=EOS_ID)([ex[:3], ex[3:]])
    assert (packed["labels"] == EOS_ID).sum() == 6
    ds = InstructionDataset(ex, 2, pack=1023)
    got = torch.cat([ds.batch(s)[1].flatten() for s in range(ds.per_epoch)])
    assert (got == EOS_ID).sum() == 6


def test_packed_dataset_covers_every_example_per_epoch(examples):
    ds = InstructionDataset(examples, 2, seed=1, grad_accum=2, pack=63)
    for epoch in range(2):
        rows = [r for s in range(ds.per_epoch) for m in range(2) for r in ds.indices(epoch * ds.per_epoch + s, m)]
        assert sorted(i for r in rows for i in r) == list(range(len(examples)))
    x, y, n, kw = ds.batch(0, 1)
    assert kw["mask"].dtype == torch.bool and kw["pos"].shape == x.shape == y.shape
    assert n == sum(len(examples[i]["input_ids"]) - 1 for r in ds.indices(0, 1) for i in r)
    assert ds.per_epoch < InstructionDataset(examples, 2, grad_accum=2).per_epoch
