"""A step's loss is the token-weighted mean over every micro-batch and rank: batch B x accum A trains
exactly as one batch of A*B over the same examples (in one process and over 2 DDP ranks); pretraining's
equal-length micro-batches keep their plain mean of means; finetune --pack end to end."""
from __future__ import annotations

import json
import os
import socket

import pytest
import tiny
import torch
import torch.multiprocessing as mp

from minigpt.data.instruct import InstructionDataset, tokenize_records
from minigpt.data.records import default_instructions_path, load_records
from minigpt.data.tokenizer import get_tokenizer
from minigpt.training.config import TrainConfig
from minigpt.training.loss import CausalLMLoss
from minigpt.training.runs import FINETUNE_META
from minigpt.training.trainer import Trainer

SPLITS = [(8, 1), (4, 2), (2, 4), (1, 8)]


@pytest.fixture(scope="module")
def examples():
    """48 records of the embedded set, 17 to 64 tokens long."""
    recs = load_records(default_instructions_path())[:48]
    ex, _ = tokenize_records(recs, get_tokenizer(), "alpaca", 64, True)
    assert len({len(e["input_ids"]) for e in ex}) > 10
    return ex


def _trainer(tmp_path, data, batch, accum, world_cfg=None) -> Trainer:
    model = tiny.gpt(std=0.1, train=True)                              # dropout 0
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=1, batch_size=batch, grad_accum=accum, warmup_steps=1,
                      precision="fp32", device="cpu", grad_clip=0)
    return Trainer(model, cfg, data, None, lambda m, d: None, lambda m, d: None, quiet=True)


def _first_step(trainer) -> tuple[float, dict]:
    """The logged loss and the gradients of the first step (taken where the optimizer would step)."""
    grads = {}

    def record(*a, **k):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = record
    loss, _ = trainer.train_step()
    return loss, grads


def test_step_examples_do_not_depend_on_the_split(examples):
    for s in range(4):
        want = InstructionDataset(examples, 8, seed=3).indices(s, 0)
        for b, a in SPLITS[1:]:
            ds = InstructionDataset(examples, b, seed=3, grad_accum=a)
            assert [i for m in range(a) for i in ds.indices(s, m)] == want
    # a short last step batch is shared out; an empty micro-batch is one unlabelled position
    ds = InstructionDataset(examples[:10], 2, grad_accum=4)
    assert sorted(len(ds.indices(s, m)) for s in range(2) for m in range(4)) == [0, 0, 1, 1, 2, 2, 2, 2]
    empty = next(ds.batch(s, m) for s in range(2) for m in range(4) if not ds.indices(s, m))
    assert empty[1].tolist() == [[-100]] and empty[2] == 0


def test_gradients_and_loss_equal_for_every_split(examples, tmp_path):
    ref_loss, ref = None, None
    for b, a in SPLITS:
        loss, grads = _first_step(_trainer(tmp_path, InstructionDataset(examples, b, seed=3, grad_accum=a), b, a))
        if ref is None:
            ref_loss, ref = loss, grads
            # 8 x 1 is the plain token mean of one batch of the same 8 examples
            x, y, _ = InstructionDataset(examples, 8, seed=3).batch(0)
            assert loss == pytest.approx(CausalLMLoss(tiny.gpt(std=0.1))(x, y).item(), rel=1e-6)
            continue
        assert loss == pytest.approx(ref_loss, rel=1e-6), (b, a)
        assert grads.keys() == ref.keys()
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=1e-5, atol=1e-7, msg=f"{b}x{a} {n}")


def test_equal_label_counts_keep_the_mean_of_means(tmp_path):
    """Pretraining: every micro-batch as many labels, so the step's loss is exactly the mean of the
    micro-batches' means (the numbers of earlier versions, bit for bit)."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 50257, (2, 17), generator=g) for _ in range(3)]
    trainer = _trainer(tmp_path, lambda step, m: (data[m][:, :-1], data[m][:, 1:]), 2, 3)
    loss, _ = _first_step(trainer)
    fn = CausalLMLoss(tiny.gpt(std=0.1))
    total = torch.zeros(())
    for d in data:
        total += fn(d[:, :-1], d[:, 1:]).detach() / 3
    assert loss == total.item()


def _ddp_rank(rank: int, port: int, examples, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        trainer = _trainer(out, InstructionDataset(examples, 2, seed=3, grad_accum=4), 2, 4)
        loss, grads = _first_step(trainer)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads}, os.path.join(out, "ddp.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ddp_ranks_train_as_one_batch(examples, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, examples, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    loss, ref = _first_step(_trainer(tmp_path, InstructionDataset(examples, 8, seed=3), 8, 1))
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    for n in ref:
        torch.testing.assert_close(got["grads"][n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


def test_finetune_pack_end_to_end(tmp_path):
    """--pack: fewer, fuller rows; it trains, and the run records it."""
    from minigpt.commands import finetune as ft
    from minigpt.commands.args import parse_args

    base = tmp_path / "base"
    tiny.gpt(block_size=128, std=0.1).save_pretrained(base)
    out = tmp_path / "packed"
    args = ["--base", base, "--max-steps", 3, "--max-length", 96, "--batch-size", 2, "--grad-accum", 2,
            "--lora", "--eval-batches", 1, "--exact-match", 0, "--samples", 0, "--threads", 1,
            "--precision", "fp32", "--device", "cpu", "--log-interval", 1, "--out-dir", out, "--pack"]
    res = ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in args]))
    assert res["step"] == 3
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 3 and all(r["tokens"] > 2 * 2 * 95 * 0.8 for r in steps)   # rows well filled
    assert json.loads((out / FINETUNE_META).read_text())["pack"] is True
