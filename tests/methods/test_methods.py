"""finetune --method for every parameter-efficient method on a tiny base: it learns (validation loss
falls), only the method's parameters train, the folder loads in chat / load_finetuned with the same
logits as the trained model, an interrupted run resumes exactly, and bad flags are one line."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args
from minigpt.methods import MERGEABLE, METHODS, adapter_method, method_of
from minigpt.methods.table import TABLE
from minigpt.training.runs import FINETUNE_META, load_chat_model, load_finetuned

COMMON = ["--batch-size", "4", "--grad-accum", "1", "--max-length", "48", "--threads", "1",
          "--sample-tokens", "4", "--samples", "1", "--precision", "fp32", "--device", "cpu", "--exact-match", "0"]
# per method: small settings that move a random 2-layer base in a few dozen steps
SETTINGS = {
    "lora": ["--lora-targets", "c_attn", "c_fc", "--lora-alpha", "32", "--lora-dropout", "0", "--lr", "5e-3"],
    "dora": ["--lora-targets", "c_attn", "c_fc", "--lora-alpha", "32", "--lora-dropout", "0", "--lr", "5e-3"],
    "ia3": ["--lr", "3e-2"],
    "prefix": ["--num-virtual-tokens", "4", "--lr", "1e-2"],
    "prompt": ["--num-virtual-tokens", "4", "--lr", "3e-2"],
    "adapter": ["--adapter-size", "8", "--lr", "5e-3"],
}
WORDS = ["apple", "sky", "grass", "snow", "coal", "sun", "night", "fire"]
COLOURS = ["red", "blue", "green", "white", "black", "yellow", "dark", "hot"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    with torch.no_grad():                        # a larger init than GPT-2's: attention that matters
        for n, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if "wte" in n else 0.2)
    m.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "colours.jsonl"
    with open(p, "w") as f:
        for split in ("train", "train", "train", "val"):
            for k, v in zip(WORDS, COLOURS):
                f.write(json.dumps({"instruction": f"What colour is {k}?", "output": v, "split": split}) + "\n")
    return p


def run(argv) -> dict:
    return ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in argv]))


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("method", METHODS)
def test_method_learns_saves_and_loads(base, data, tmp_path, method):
    out = tmp_path / method
    res = run(["--base", base, "--data", data, "--out-dir", out, "--method", method, "--max-steps", 30,
               "--eval-interval", 10, "--log-interval", 5, *COMMON, *SETTINGS[method]])
    vals = [r["val_loss"] for r in metrics(out) if "val_loss" in r]
    assert vals[-1] < vals[0] - 0.1, vals                       # it learns
    model = res["model"].eval()
    assert method_of(model) == method and adapter_method(out) == method
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    base_names = set(GPT.from_pretrained(base).state_dict())
    assert trainable and not trainable & base_names              # the base stays frozen
    meta = json.loads((out / FINETUNE_META).read_text())
    assert meta["method"] == method and meta["peft"]
    x = torch.randint(0, 50257, (2, 12))
    loaded, template = load_finetuned(out)
    chat = load_chat_model(str(out), device="cpu")               # what chat.py and serve.py load
    assert (method_of(chat.model) is None) == (method in MERGEABLE)   # mergeable ones are merged
    with torch.no_grad():
        want = model(x)
        assert (want - GPT.from_pretrained(base).eval()(x)).abs().max() > 1e-4     # not a no-op
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(chat.model(x), want, rtol=1e-4, atol=1e-4)
        out_ids = chat.model.generate(x[:1, :5], max_new_tokens=6)
        assert out_ids.shape == (1, 11)


def _same_run(a: Path, b: Path, steps: int) -> None:
    from safetensors.torch import load_file

    la = {r["step"]: (r["loss"], r["lr"]) for r in metrics(a) if "loss" in r}
    lb = {r["step"]: (r["loss"], r["lr"]) for r in metrics(b) if "loss" in r}
    assert la == lb and len(la) == steps
    ta, tb = (load_file(x / "adapter_model.safetensors") for x in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "lora"])    # lora: tests/training/test_finetune.py
def test_resume_is_exact(base, data, tmp_path, monkeypatch, method):
    """Ctrl-C during step 5, then --resume == the uninterrupted run (losses, lr, final adapter)."""
    args = ["--base", base, "--data", data, "--method", method, "--log-interval", 1, "--eval-interval", 4,
            "--max-steps", 8, *COMMON, "--samples", 0, *SETTINGS[method]]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(["--out-dir", full, *args])

    from minigpt.training.trainer import Trainer
    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        loss = real_step(self)
        if self.step == 4:
            signal.raise_signal(signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert ft.main([str(a) for a in ["--out-dir", cut, *args]]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run(["--out-dir", cut, "--resume", *args])
    _same_run(full, cut, 8)


def _main(argv, capsys) -> tuple[int, str]:
    try:
        rc = ft.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return rc, err


@pytest.mark.parametrize("argv,expect", [
    (["--method", "lora", "--num-virtual-tokens", "8"], "--num-virtual-tokens applies to --method prefix, prompt"),
    (["--lora", "--adapter-size", "8"], "--adapter-size applies to --method adapter, not to --method lora"),
    (["--method", "prefix", "--lora-r", "4"], "--lora-r applies to --method lora, dora"),
    (["--ia3-targets", "c_attn"], "not to a full fine-tune"),
    (["--lora", "--method", "ia3"], "--lora is short for --method lora"),
    (["--method", "prompt", "--merge"], "prompt-tuning cannot be merged"),
    (["--method", "adapter", "--merge"], "bottleneck-adapter cannot be merged"),
    (["--method", "dora", "--quantize", "nf4"], "--quantize needs --method"),
    (["--method", "tuning"], "invalid choice"),
])
def test_method_flag_errors(base, data, tmp_path, capsys, argv, expect):
    rc, err = _main(["--base", base, "--data", data, "--out-dir", tmp_path / "o", *argv], capsys)
    assert rc == 2 and expect in err, err
    assert not (tmp_path / "o").exists()


def test_virtual_tokens_longer_than_the_context(base, data, tmp_path, capsys):
    """The base holds 64 tokens: 40 virtual + --max-length 48 does not fit; 70 virtual leave nothing."""
    common = ["--base", base, "--data", data, "--out-dir", tmp_path / "o", "--threads", 1]
    rc, err = _main([*common, "--method", "prefix", "--num-virtual-tokens", 40, "--max-length", 48], capsys)
    assert rc == 1 and "--max-length 48" in err and "64" in err and "40 virtual tokens = 24" in err, err
    rc, err = _main([*common, "--method", "prompt", "--num-virtual-tokens", 70], capsys)
    assert rc == 1 and "--num-virtual-tokens 70" in err and "64" in err, err
    assert not (tmp_path / "o").exists()


def test_resume_with_another_method_and_loading_as_another(base, data, tmp_path, capsys):
    from minigpt.methods import load_adapter

    out = tmp_path / "p"
    run(["--base", base, "--data", data, "--out-dir", out, "--method", "prefix", "--max-steps", 2, *COMMON,
         "--samples", 0, *SETTINGS["prefix"]])
    capsys.readouterr()
    rc, err = _main(["--base", base, "--data", data, "--out-dir", out, "--method", "prompt", "--resume",
                     "--max-steps", 4, "--threads", 1], capsys)
    assert rc == 1 and "prefix" in err and "prompt" in err, err
    with pytest.raises(ValueError, match=r"prefix-tuning adapter \(prefix\), not prompt-tuning \(prompt\)"):
        load_adapter(GPT.from_pretrained(base), out, method="prompt")


def test_default_learning_rate_follows_the_base(base, data, tmp_path):
    """No --lr: a small base (< 100M parameters) gets its small_base_lr, recorded with the reason."""
    out = tmp_path / "lr"
    run(["--base", base, "--data", data, "--out-dir", out, "--method", "prefix", "--max-steps", 1,
         "--num-virtual-tokens", 2, *COMMON, "--samples", 0])
    meta = json.loads((out / FINETUNE_META).read_text())
    assert meta["lr"] == TABLE["prefix"].small_base_lr and "small base" in meta["lr_choice"]
    assert json.loads((out / "run.json").read_text())["train"]["lr"] == TABLE["prefix"].small_base_lr
    assert meta["before"]["val_loss"] > 0
    with torch.device("meta"):
        big = GPT(GPTConfig.from_name("gpt2"))
    args = parse_args(ft.FinetuneArgs, ["--lora"])
    assert ft.default_lr(args, big) == (2e-4, "default for lora on a GPT-2-sized base (124M params >= 100M)")
