"""Preference tuning across the training features: reference log-probs precomputed once (= a frozen
copy), an NF4 base, gradient checkpointing (same loss and gradients), every parameter-efficient method
with its adapter switched off as the reference, exact resume after Ctrl-C, two DDP ranks (= one
process), and the embedded preference set as finetune's default."""
from __future__ import annotations

import json
import math
import os
import signal
import socket

import pytest
import tiny
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args
from minigpt.data.preferences import PreferenceDataset, collate_pairs
from minigpt.methods import method_config
from minigpt.training.config import TrainConfig
from minigpt.training.preference import PreferenceLoss, precompute_ref_logps
from minigpt.training.trainer import Trainer

TOL = 1e-5
RUN = ["--batch-size", "2", "--grad-accum", "2", "--samples", "0", "--exact-match", "0", "--threads", "1",
       "--log-interval", "1", "--device", "cpu", "--precision", "fp32", "--max-length", "48"]


def _pairs(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, 50256, (k,), generator=g).tolist()
    return [{"prompt": ids(3 + i % 3), "chosen": ids(2 + i % 4) + [50256], "rejected": ids(4 - i % 3) + [50256]}
            for i in range(n)]


def _moved(model, scale: float = 0.1, seed: int = 1):
    """`model` with its trainable parameters nudged (so that the policy differs from the reference)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny.gpt(block_size=64, std=0.2).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    words = ["apple", "sky", "grass", "snow", "coal", "sun", "night", "fire"]
    colours = ["red", "blue", "green", "white", "black", "yellow", "dark", "hot"]
    rows = [{"prompt": f"What colour is {w}?", "chosen": c, "rejected": colours[(i + 3) % 8],
             "split": "val" if i % 4 == 3 else "train"} for i, (w, c) in enumerate(zip(words * 2, colours * 2))]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def run(base, data, out, *extra):
    argv = ["--base", base, "--data", data, "--out-dir", out, *RUN, *extra]
    return ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in argv]))


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --- the reference, precomputed ---------------------------------------------------------------------

@pytest.mark.parametrize("share_prompt", [False, True])
def test_precomputed_reference_equals_the_frozen_copy(share_prompt):
    """Loss, metrics and gradients with the reference's log-probs computed once beforehand equal those
    with a frozen reference model, whatever the batch the pair is in, in either batch layout."""
    ref = tiny.gpt(std=0.1, seed=3)
    policy = _moved(tiny.gpt(std=0.1, seed=3))
    examples = _pairs()
    table = precompute_ref_logps(ref, examples, batch_size=3, share_prompt=share_prompt)
    ds = PreferenceDataset(examples, 4, seed=1, share_prompt=share_prompt)
    ds.ref_logps = table
    x, y, _, kw = ds.batch(0)
    seg = kw.get("segments")
    assert (seg is not None) == share_prompt
    frozen = PreferenceLoss(policy, "dpo", 0.2, reference=ref)
    pre = PreferenceLoss(policy, "dpo", 0.2, reference="precomputed")
    assert pre._ref == [] and frozen._ref == [ref]                # no model kept
    a, ma = frozen.pair_losses(x, y, kw["targets"], segments=seg)
    a.backward()
    ga = _grads(policy)
    policy.zero_grad()
    b, mb = pre.pair_losses(x, y, kw["targets"], kw["ref_logps"], segments=seg)
    b.backward()
    assert abs(float(a) - float(b)) < 1e-6 and float(a) != pytest.approx(math.log(2), abs=1e-3)
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)
    assert all(torch.allclose(ga[n], g, atol=1e-7) for n, g in _grads(policy).items())
    with pytest.raises(ValueError, match="precomputed"):
        pre.pair_losses(x, y)


@pytest.mark.parametrize("method", [None, "lora"])
def test_finetune_precompute_ref_logps_matches_the_reference_model(base, prefs, tmp_path, method):
    """finetune --precompute-ref-logps = the frozen copy (full fine-tuning) / the adapter switched off
    (LoRA), step by step, held-out metrics included."""
    extra = ["--objective", "dpo", "--max-steps", "3", "--eval-interval", "3", "--lr", "3e-3",
             *(["--method", method] if method else [])]
    run(base, prefs, tmp_path / "ref", *extra)
    run(base, prefs, tmp_path / "pre", *extra, "--precompute-ref-logps")
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "pre")
    assert len(a) == len(b) == 4 and abs(a[0]["loss"] - math.log(2)) < 1e-6
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if k.startswith(("loss", "val_", "rewards/", "logps/")):
                assert rb[k] == pytest.approx(v, abs=TOL), k
    assert a[-1]["val_rewards/margins"] != 0.0
    meta = json.loads((tmp_path / "pre" / "minigpt_finetune.json").read_text())
    assert meta["precompute_ref_logps"] is True


# --- NF4 base, gradient checkpointing ---------------------------------------------------------------

def test_dpo_on_an_nf4_base(base, prefs, tmp_path):
    """The reference of a QLoRA run is the quantized base: the adapter switched off gives the numbers of
    a separately loaded NF4 base; finetune trains, starting at ln 2."""
    model = GPT.from_pretrained(base, quantize="nf4")
    method_config("lora", r=4, dropout=0.0).apply(model)
    _moved(model, 0.2)
    x, y, t = collate_pairs(_pairs(4))
    ours, m = PreferenceLoss(model, "dpo", 0.1, reference="adapters").pair_losses(x, y, t)
    theirs, tm = PreferenceLoss(model, "dpo", 0.1, reference=GPT.from_pretrained(base, quantize="nf4")
                                ).pair_losses(x, y, t)
    assert abs(float(ours) - float(theirs)) < 1e-6 and float(m["rewards/margins"].abs().sum()) > 1e-3
    ours.backward()
    assert all(("lora_" in n) == (p.grad is not None) for n, p in model.named_parameters())
    run(base, prefs, tmp_path / "q", "--objective", "dpo", "--lora", "--quantize", "nf4", "--max-steps", "2",
        "--lr", "1e-2")
    rec = _metrics(tmp_path / "q")
    assert abs(rec[0]["loss"] - math.log(2)) < 1e-6 and "val_rewards/accuracies" in rec[-1]


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(objective):
    model = tiny.gpt(std=0.1, seed=5, train=True)
    method_config("lora", r=4, dropout=0.0).apply(model)
    _moved(model, 0.2)
    x, y, t = collate_pairs(_pairs(4, seed=2))
    ref = None if objective == "orpo" else "adapters"
    out = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        loss, m = PreferenceLoss(model, objective, 0.1, reference=ref).pair_losses(x, y, t)
        loss.backward()
        out.append((float(loss), _grads(model), m))
    (la, ga, ma), (lb, gb, mb) = out
    assert la == pytest.approx(lb, abs=1e-7) and ga.keys() == gb.keys() and ga
    assert all(torch.allclose(ga[n], gb[n], atol=1e-7) for n in ga)
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in ma)


# --- every method: the reference is the base ---------------------------------------------------------

METHODS = [("dora", ["--lora-r", "4"]), ("ia3", []), ("adapter", ["--adapter-size", "8"]),
           ("prompt", ["--num-virtual-tokens", "4"])]


@pytest.mark.parametrize("method,extra", METHODS)
def test_methods_train_against_the_base(base, prefs, tmp_path, method, extra):
    """finetune --objective dpo --method M: the reference (the adapter switched off) is the base model:
    on the trained adapter it gives the numbers of the base loaded on its own; a method that starts as
    the identity starts at ln 2."""
    res = run(base, prefs, tmp_path / method, "--objective", "dpo", "--method", method, "--max-steps", "3",
              "--lr", "3e-2", *extra)
    rec = [r for r in _metrics(tmp_path / method) if "loss" in r]
    if method != "prompt":                                 # virtual tokens change the model from the start
        assert abs(rec[0]["loss"] - math.log(2)) < 1e-6
    model = res["model"].eval()
    x, y, t = collate_pairs(_pairs(4, seed=3))
    ours, m = PreferenceLoss(model, "dpo", 0.1, reference="adapters").pair_losses(x, y, t)
    theirs, tm = PreferenceLoss(model, "dpo", 0.1, reference=GPT.from_pretrained(base)).pair_losses(x, y, t)
    assert abs(float(ours) - float(theirs)) < 1e-6
    assert torch.allclose(m["rewards/chosen"], tm["rewards/chosen"], atol=1e-6)
    assert float(m["rewards/chosen"].abs().sum()) > 1e-4           # the adapter moved the policy


# --- exact resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [["--lora", "--lora-dropout", "0.1"], ["--precompute-ref-logps"]],
                         ids=["lora", "full-precomputed"])
def test_resume_after_ctrl_c_is_bit_exact(base, prefs, tmp_path, monkeypatch, extra):
    """Ctrl-C during step 4 of 6, then --resume: the same losses and rewards at every step and the
    same final weights, bit for bit, as the uninterrupted run."""
    args = ["--objective", "dpo", "--max-steps", "6", "--eval-interval", "3", "--lr", "3e-3", *extra]
    run(base, prefs, tmp_path / "full", *args)
    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        loss = real_step(self)
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    argv = ["--base", base, "--data", prefs, "--out-dir", tmp_path / "cut", *RUN, *args]
    assert ft.main([str(a) for a in argv]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run(base, prefs, tmp_path / "cut", *args, "--resume")
    a, b = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    drop = ("tok_per_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]
    name = "adapter_model.safetensors" if "--lora" in extra else "model.safetensors"
    wa, wb = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- DDP ---------------------------------------------------------------------------------------------

def _trainer(out, data, batch, accum):
    model = tiny.gpt(std=0.1, seed=7, train=True)
    torch.manual_seed(8)
    method_config("lora", r=4, dropout=0.0).apply(model)
    _moved(model, 0.2)
    cfg = TrainConfig(out_dir=str(out), max_steps=1, batch_size=batch, grad_accum=accum, warmup_steps=1,
                      precision="fp32", device="cpu", grad_clip=0)
    loss = PreferenceLoss(model, "dpo", 0.1, reference="adapters")
    return Trainer(model, cfg, data, None, lambda m, d: None, lambda m, d: None, loss_module=loss, quiet=True)


def _first_step(trainer):
    grads = {}
    trainer.optimizer.step = lambda *a, **k: grads.update(_grads(trainer.model))
    loss, _ = trainer.train_step()
    return loss, grads, trainer.loss_module.pop_metrics()


def _ddp_rank(rank, port, examples, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    try:
        loss, grads, metrics = _first_step(_trainer(out, PreferenceDataset(examples, 2, seed=3, grad_accum=4), 2, 4))
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "metrics": metrics}, os.path.join(out, "ddp.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_ddp_ranks_equal_one_process(tmp_path):
    """DPO over 2 gloo ranks x 2 micro-batches of 2 pairs = one process, one batch of 8 pairs: the
    same loss, gradients and (all-reduced) reward metrics."""
    examples = _pairs(8, seed=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, examples, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt")
    loss, grads, metrics = _first_step(_trainer(tmp_path, PreferenceDataset(examples, 8, seed=3), 8, 1))
    assert got["loss"] == pytest.approx(loss, rel=1e-6) and loss != pytest.approx(math.log(2), abs=1e-3)
    assert grads.keys() == got["grads"].keys() and grads
    for n in grads:
        torch.testing.assert_close(got["grads"][n], grads[n], rtol=1e-5, atol=1e-6, msg=n)
    assert got["metrics"].keys() == metrics.keys()
    assert all(got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in metrics.items())


# --- the embedded set is the default -----------------------------------------------------------------

def test_dpo_without_data_uses_the_embedded_set(base, tmp_path, capsys):
    out = tmp_path / "emb"
    argv = ["--base", base, "--objective", "dpo", "--max-steps", "1", "--eval-batches", "1", "--out-dir", out,
            *RUN]
    ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in argv]))
    text = capsys.readouterr().out
    assert "data: embedded preferences: " in text and "0 with chosen = rejected skipped" in text
    assert "held-out pairs: val_loss 0.6931 -> " in text and "chosen preferred by log-prob" in text
    meta = json.loads((out / "minigpt_finetune.json").read_text())
    assert meta["data"] == "embedded:preferences" and meta["objective"] == "dpo"


def test_default_out_dir_follows_the_objective():
    assert parse_args(ft.FinetuneArgs, []).out_dir == "out-finetune"
    assert parse_args(ft.FinetuneArgs, ["--objective", "dpo"]).out_dir == "out-dpo"
    assert parse_args(ft.FinetuneArgs, ["--objective", "orpo", "--out-dir", "x"]).out_dir == "x"


def test_identical_pairs_are_counted_in_the_banner(base, tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    rows = [{"prompt": f"Say {w}.", "chosen": w, "rejected": "no"} for w in ("red", "blue", "green", "pink")]
    rows += [{"prompt": "Say it.", "chosen": "same", "rejected": " same "}] * 2
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(base, p, tmp_path / "o", "--objective", "dpo", "--max-steps", "1", "--val-fraction", "0")
    text = capsys.readouterr().out
    assert "data: " + str(p) + ": 4 train / 0 val pairs" in text and ", 2 with chosen = rejected skipped)" in text
