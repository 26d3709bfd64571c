"""finetune.py end to end on a tiny base model: LoRA and full fine-tuning, learning a synthetic
mapping, output layout and load_finetuned, exact resume, --merge vs transformers, bad input."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig
from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args
from minigpt.methods.lora import lora_layers
from minigpt.training.runs import FINETUNE_META, find_latest_run, load_finetuned

ROOT = Path(__file__).resolve().parents[2]

PAIRS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white",
         "coal": "black", "sun": "yellow", "night": "dark", "fire": "hot"}
# flags every run shares: tiny context, quiet samples, one thread (the test machine is small)
COMMON = ["--batch-size", "4", "--grad-accum", "1", "--max-length", "64", "--threads", "1",
          "--sample-tokens", "4", "--samples", "2", "--precision", "fp32", "--device", "cpu"]
# LoRA settings that learn the mapping on a random 2-layer base in ~100 steps
LEARN = ["--lora", "--lora-targets", "c_attn", "c_proj", "c_fc", "--lora-alpha", "32",
         "--lora-dropout", "0", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny GPT-2 saved with save_pretrained. The embeddings are drawn larger than GPT-2's
    init (std 0.5) so that the tied head can produce confident logits after a few steps."""
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128))
    with torch.no_grad():
        m.transformer.wte.weight.normal_(0.0, 0.5)
    m.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Alpaca JSONL: a fixed word -> colour mapping; 3 copies for training, 1 held out as val."""
    p = tmp_path_factory.mktemp("data") / "colors.jsonl"
    with open(p, "w") as f:
        for split in ("train", "train", "train", "val"):
            for k, v in PAIRS.items():
                f.write(json.dumps({"instruction": f"What color is {k}?", "input": "", "output": v,
                                    "exact": True, "split": split}) + "\n")
    return p


def run(argv) -> dict:
    """finetune() in-process (returns the trained model too)."""
    return ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in argv]))


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def evals(out: Path) -> list[dict]:
    return [r for r in metrics(out) if "val_loss" in r]


def test_lora_learns_and_only_trains_the_adapter(base, data, tmp_path):
    out = tmp_path / "lora"
    res = run(["--base", base, "--data", data, "--out-dir", out, "--max-steps", 100, "--eval-interval", 10,
               "--save-interval", 50, *COMMON, *LEARN])
    model = res["model"]
    # learning: masked val loss falls a lot, exact match on the held-out prompts rises
    ev = evals(out)
    assert [r["step"] for r in ev] == list(range(10, 101, 10))
    assert ev[-1]["val_loss"] < 0.5 * ev[0]["val_loss"], ev
    assert ev[-1]["exact_match"] >= 0.5 > ev[0]["exact_match"], ev
    assert ev[-1]["exact_match_n"] == 8 and 0 <= ev[-1]["val_acc"] <= 1
    # only the adapter trained: the base weights are bit-identical
    ref = GPT.from_pretrained(base).state_dict()
    sd = model.state_dict()
    lora_keys = {k for k in sd if ".lora_" in k}
    assert lora_keys and set(sd) - lora_keys == set(ref)
    for k, v in ref.items():
        assert torch.equal(sd[k].cpu(), v), k
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_keys
    # output layout: PEFT adapter + metadata + samples; checkpoints hold the adapter, not the model
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == str(base.resolve())
    assert acfg["r"] == 8 and acfg["lora_alpha"] == 32
    assert not (out / "model.safetensors").exists()
    meta = json.loads((out / FINETUNE_META).read_text())
    assert meta["method"] == "lora" and meta["template"] == "alpaca" and meta["max_length"] == 64
    assert meta["base"] == str(base.resolve()) and meta["lora"]["targets"] == ["c_attn", "c_proj", "c_fc"]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000050", "step-0000100"]
    for c in ckpts:
        files = {p.name for p in (out / "checkpoints" / c).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"}
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and all({"prompt", "expected", "before", "after"} <= set(s) for s in samples)
    assert samples[0]["prompt"].startswith("### Instruction:\nWhat color is")
    # load_finetuned: base + adapter, the same function as the trained model
    loaded, template = load_finetuned(out)
    assert template == "alpaca" and len(lora_layers(loaded)) == 8      # c_proj: attn and mlp
    x = torch.randint(0, 50257, (2, 16))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
        plain = GPT.from_pretrained(base).eval()(x)
        assert (loaded(x) - plain).abs().max() > 1e-3                   # the adapter is applied
    assert find_latest_run("finetune", tmp_path) == out


def test_full_finetune_main(base, data, tmp_path, capsys):
    out = tmp_path / "full"
    rc = ft.main(["--base", str(base), "--data", str(data), "--out-dir", str(out), "--max-steps", "40",
                  "--eval-interval", "10", "--save-interval", "40", "--lr", "3e-3", *COMMON])
    assert rc == 0
    text = capsys.readouterr().out
    assert "samples before fine-tuning" in text and "samples after fine-tuning" in text
    ev = evals(out)
    assert ev[-1]["val_loss"] < 0.75 * ev[0]["val_loss"], ev
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / FINETUNE_META).read_text())["method"] == "full"
    model, template = load_finetuned(out)
    assert not lora_layers(model) and template == "alpaca"
    ref = GPT.from_pretrained(base)
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, ref.transformer.h[0].attn.c_attn.weight)
    # a second run into the same folder must not silently mix with the first
    rc = ft.main(["--base", str(base), "--data", str(data), "--out-dir", str(out), "--max-steps", "2", *COMMON])
    assert rc == 1 and "--resume" in capsys.readouterr().err


def test_other_formats_epochs_and_gradient_checkpointing(base, tmp_path):
    """Chat JSONL with the chat template, --no-mask-prompt, --epochs and gradient checkpointing."""
    p = tmp_path / "chat.jsonl"
    with open(p, "w") as f:
        for i in range(10):
            f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": f"Say {i}."},
                                             {"role": "assistant", "content": str(i)}]}) + "\n")
    out = tmp_path / "chat"
    res = run(["--base", base, "--data", p, "--out-dir", out, "--epochs", 2, "--template", "chat",
               "--no-mask-prompt", "--gradient-checkpointing", "--val-fraction", "0.2", "--lora", *COMMON])
    assert res["step"] == 4                                 # 8 train examples / 4 per step * 2 epochs
    assert res["model"].gradient_checkpointing
    assert res["samples"][0]["prompt"].startswith("<|system|>\nBe brief.\n<|user|>\n")
    assert load_finetuned(out)[1] == "chat"
    assert "val_loss" in evals(out)[-1] and "exact_match" not in evals(out)[-1]   # nothing checkable


def _losses(out: Path) -> dict:
    return {r["step"]: (r["loss"], r["lr"]) for r in metrics(out) if "loss" in r}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter_model.safetensors")


def _same_run(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert la == lb and len(la) == 12
    ea, eb = ({r["step"]: r for r in evals(x)} for x in (a, b))
    common = ea.keys() & eb.keys()              # a run stopped by --max-steps also evaluates there
    assert 12 in common and all(ea[s] == eb[s] for s in common)
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_is_exact(base, data, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C at step 5) + --resume == uninterrupted, with the default linear decay
    and LoRA dropout on; and --max-steps 6, then --resume --max-steps 12 == a run to 12 (with a
    constant schedule, which does not depend on the total)."""
    args = ["--base", base, "--data", data, "--lora", "--log-interval", 1, "--eval-interval", 4,
            "--exact-match", 2, "--lr", "3e-3", *COMMON, "--samples", 0]
    full = tmp_path / "full"
    run(["--out-dir", full, "--max-steps", 12, *args])

    from minigpt.training.trainer import Trainer
    real_step = Trainer.train_step

    def step_then_ctrl_c(self):
        loss = real_step(self)
        if self.step == 4:                  # the 5th step: Ctrl-C arrives while it runs
            signal.raise_signal(signal.SIGINT)
        return loss

    cut = tmp_path / "cut"
    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert ft.main([str(a) for a in ["--out-dir", cut, "--max-steps", 12, *args]]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (cut / "checkpoints" / "step-0000005").is_dir()
    run(["--out-dir", cut, "--max-steps", 12, "--resume", *args])
    _same_run(full, cut)

    const = ["--schedule", "constant", "--warmup-steps", 2, *args]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(["--out-dir", whole, "--max-steps", 12, *const])
    run(["--out-dir", parts, "--max-steps", 6, *const])
    run(["--out-dir", parts, "--max-steps", 12, "--resume", *const])
    _same_run(whole, parts)


def test_merge_loads_in_transformers(base, data, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "m"
    res = run(["--base", base, "--data", data, "--out-dir", out, "--max-steps", 5, "--merge",
               "--exact-match", 0, *COMMON, *LEARN])
    assert json.loads((out / FINETUNE_META).read_text())["merged"] == "merged"
    lora_model, _ = load_finetuned(out)
    assert lora_layers(lora_model)
    hf = GPT2LMHeadModel.from_pretrained(out / "merged").eval()
    merged = GPT.from_pretrained(out / "merged").eval()
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        want = lora_model(x)
        assert (want - GPT.from_pretrained(base)(x)).abs().max() > 1e-3
        torch.testing.assert_close(hf(x).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res["model"].eval()(x), want, rtol=1e-4, atol=1e-4)
    assert load_finetuned(out / "merged")[1] == "alpaca"


def _bad_data(tmp_path: Path) -> Path:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    return p


@pytest.mark.parametrize("case", ["missing-base", "bad-data", "r0", "neg-lr", "too-long", "both-lengths",
                                  "bad-template", "missing-data", "resume-nothing"])
def test_bad_input_is_one_line(base, data, tmp_path, capsys, case):
    argv = {"missing-base": ["--base", tmp_path / "nope"],
            "bad-data": ["--data", _bad_data(tmp_path)],
            "r0": ["--lora", "--lora-r", 0],
            "neg-lr": ["--lr", "-1"],
            "too-long": ["--max-length", 512],
            "both-lengths": ["--epochs", 1, "--max-steps", 3],
            "bad-template": ["--template", "vicuna"],
            "missing-data": ["--data", tmp_path / "none.jsonl"],
            "resume-nothing": ["--resume"]}[case]
    full = ["--base", base, "--data", data, "--out-dir", tmp_path / "o", "--threads", 1]
    try:
        rc = ft.main([str(a) for a in full + argv])
    except SystemExit as e:                 # a flag argparse or the flags' own checks reject: exit 2
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == (2 if case in ("bad-template", "r0", "neg-lr", "both-lengths") else 1)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    expect = {"missing-base": "nope", "bad-data": "bad.jsonl:2", "r0": "--lora-r", "neg-lr": "--lr",
              "too-long": "context (128", "both-lengths": "--epochs", "bad-template": "vicuna",
              "missing-data": "none.jsonl", "resume-nothing": "no checkpoint"}[case]
    assert expect in err, err


def test_default_base(tmp_path, monkeypatch, capsys, base):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "cache"))          # gpt2 not cached
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))             # (nor in the Hugging Face cache)
    assert ft.main(["--lora", "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "minigpt train" in err and "--base" in err and len(err.strip().splitlines()) == 1
    # a train.py output in ./out is found (run.json kind "pretrain" + weights)
    out = tmp_path / "out"
    GPT.from_pretrained(base).save_pretrained(out)
    (out / "run.json").write_text(json.dumps({"kind": "pretrain"}))
    assert find_latest_run("pretrain") == Path(".") / "out"
    assert ft.default_base() == "out"
    (out / "run.json").write_text(json.dumps({"kind": "finetune"}))
    assert find_latest_run("pretrain") is None
    # a cached gpt2 wins over local runs
    import minigpt.weights.hub
    monkeypatch.setattr(minigpt.weights.hub, "is_preset_cached", lambda name, cache=None: name == "gpt2")
    assert ft.default_base() == "gpt2"
