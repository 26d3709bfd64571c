"""The run-folder policy (minigpt.training.runs) and up-front validation: one regression test per defect
of the architecture issue, each on the commands as a user runs them (in-process `main(argv)`)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tiny import gpt as tiny_gpt
from tiny import train_flags as tiny_flags

from minigpt import GPT, GPTConfig
from minigpt.commands import finetune, train
from minigpt.data.instruct import InstructionDataset, tokenize_records
from minigpt.data.records import load_records
from minigpt.data.templates import get_template
from minigpt.data.tokenizer import get_tokenizer
from minigpt.errors import DataError, RunDirError
from minigpt.training.config import TrainConfig
from minigpt.training.runs import FINETUNE_META, RunInput, check_run_dir, load_chat_model
from minigpt.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
TRAIN = tiny_flags(n_embd=32, batch_size=2, precision="fp32", device="cpu", max_steps=2, eval_interval=2,
                   warmup_steps=1)
TUNE = ["--batch-size", "2", "--grad-accum", "1", "--max-length", "48", "--threads", "1", "--samples", "0",
        "--precision", "fp32", "--device", "cpu", "--max-steps", "2", "--exact-match", "0", "--eval-interval", "2"]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def run(cmd, argv) -> int:
    try:
        return cmd.main([str(a) for a in argv])
    except SystemExit as e:                                  # a flag rejected at parse time: exit 2
        return e.code


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """corpus, instruction data, a plain model folder (base), a train run (m1) and LoRA runs."""
    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400)))
    data = root / "tasks.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Repeat {w}.", "output": w}) + "\n"
                            for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()))
    base = root / "plain"
    tiny_gpt(n_embd=32).save_pretrained(base)                   # torch.manual_seed(0), context 64
    m1, ft1 = root / "m1", root / "ft1"
    assert run(train, ["--data", corpus, "--out-dir", m1, *TRAIN]) == 0
    assert (m1 / "best" / "model.safetensors").is_file()
    assert run(finetune, ["--lora", "--merge", "--base", base, "--data", data, "--out-dir", ft1, *TUNE]) == 0
    assert (ft1 / "adapter_config.json").is_file() and (ft1 / "merged" / "model.safetensors").is_file()

    class Fx:
        pass
    f = Fx()
    f.root, f.corpus, f.data, f.base, f.m1, f.ft1 = root, corpus, data, base, m1, ft1
    return f


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --- 1-7: run folders ---------------------------------------------------------------------------

def test_1_failed_finetune_keeps_the_previous_run(fx, tmp_path, capsys):
    x = copy(fx.ft1, tmp_path)
    before = snapshot(x)
    rc = run(finetune, ["--lora", "--overwrite", "--precision", "fp16", "--device", "cpu", "--out-dir", x,
                        "--base", fx.base, "--data", fx.data])
    assert rc == 1 and "--precision fp16 needs CUDA" in capsys.readouterr().err
    assert snapshot(x) == before


def test_2_train_overwrite_removes_a_finetune_runs_adapter(fx, tmp_path):
    x = copy(fx.ft1, tmp_path)
    assert run(train, ["--data", fx.corpus, "--out-dir", x, "--overwrite", *TRAIN]) == 0
    left = {p.name for p in x.iterdir()}
    assert not left & {"adapter_config.json", "adapter_model.safetensors", FINETUNE_META, "merged", "samples.json"}
    ids = torch.randint(0, 50257, (1, 8))
    chat_model = load_chat_model(str(x)).model
    with torch.no_grad():
        assert torch.equal(chat_model(ids), GPT.from_pretrained(x)(ids))


def test_3_overwrite_refuses_an_init_from_inside_the_out_dir(fx, tmp_path, capsys):
    m = copy(fx.m1, tmp_path)
    before = snapshot(m)
    assert run(train, ["--init-from", m / "best", "--out-dir", m, "--overwrite", "--data", fx.corpus, *TRAIN]) == 1
    err = capsys.readouterr().err
    assert "--init-from" in err and "best, whose files this run would replace" in err
    assert snapshot(m) == before


def test_4_finetune_refuses_a_base_inside_the_out_dir(fx, tmp_path, capsys):
    f = copy(fx.ft1, tmp_path)
    before = snapshot(f)
    rc = run(finetune, ["--lora", "--base", f / "merged", "--out-dir", f, "--overwrite", "--data", fx.data, *TUNE])
    assert rc == 1 and "merged, whose files this run would replace" in capsys.readouterr().err
    assert snapshot(f) == before


@pytest.mark.parametrize("cmd", ["finetune", "train"])
def test_5_6_a_folder_no_run_wrote_is_refused(fx, tmp_path, capsys, cmd):
    p = copy(fx.base, tmp_path)
    before = snapshot(p)
    argv = (["--lora", "--base", fx.base, "--data", fx.data, *TUNE] if cmd == "finetune"
            else ["--data", fx.corpus, *TRAIN])
    assert run(finetune if cmd == "finetune" else train, [*argv, "--out-dir", p]) == 1
    assert "holds files no minigpt run wrote (config.json, model.safetensors)" in capsys.readouterr().err
    assert snapshot(p) == before


@pytest.mark.parametrize("cmd", ["finetune", "train"])
def test_7_naming_the_weights_file_does_not_bypass_the_guard(fx, tmp_path, capsys, cmd):
    p = copy(fx.base, tmp_path)
    before = snapshot(p)
    weights = p / "model.safetensors"
    argv = (["--lora", "--base", weights, "--data", fx.data, *TUNE] if cmd == "finetune"
            else ["--init-from", weights, "--data", fx.corpus, *TRAIN])
    assert run(finetune if cmd == "finetune" else train, [*argv, "--out-dir", p, "--overwrite"]) == 1
    assert "model.safetensors, whose files this run would replace" in capsys.readouterr().err
    assert snapshot(p) == before


def test_policy_allows_what_loses_nothing(fx, tmp_path):
    """Inputs outside the outputs, an empty folder, and a started run without results are fine;
    --resume needs a checkpoint of the same kind."""
    (tmp_path / "empty").mkdir()
    assert check_run_dir(tmp_path / "empty", "pretrain") == []
    assert check_run_dir(tmp_path / "new" / "deeper", "finetune") == []
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "corpus.txt").write_text("x")
    with pytest.raises(RunDirError, match="no minigpt run wrote"):
        check_run_dir(tmp_path / "o", "pretrain", inputs=[RunInput("--data", tmp_path / "o" / "corpus.txt")])
    doomed = check_run_dir(tmp_path / "o", "pretrain", overwrite=True,
                           inputs=[RunInput("--data", tmp_path / "o" / "corpus.txt")])
    assert doomed == []                                    # a file of the user's is never deleted
    with pytest.raises(RunDirError, match="holds a finetune run, not a pretrain run"):
        check_run_dir(fx.ft1, "pretrain", resume=True)
    with pytest.raises(RunDirError, match="already holds a pretrain run"):
        check_run_dir(fx.m1, "pretrain")


# --- 8: throughput counts the tokens trained on ---------------------------------------------------

def test_8_tokens_are_the_real_tokens_of_the_batches_trained_on(fx, tmp_path):
    tok, tpl = get_tokenizer(), get_template("alpaca")
    examples, _ = tokenize_records(load_records(fx.data), tok, tpl, 48, True)
    ds = InstructionDataset(examples, 3, seed=1, grad_accum=2)
    x, y, n = ds.batch(0, 0)
    lengths = sorted(len(e["input_ids"]) - 1 for e in examples)
    assert n < x.numel() and n == sum(len(examples[i]["input_ids"]) - 1 for i in ds.indices(0, 0))
    assert lengths[0] < lengths[-1]                        # padding exists, so n < x.numel() means something

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=64))
    cfg = TrainConfig(out_dir=str(tmp_path / "o"), max_steps=3, batch_size=3, grad_accum=2, warmup_steps=1,
                      log_interval=1, eval_interval=3, precision="fp32", device="cpu")
    Trainer(model, cfg, ds, None, lambda m, d: m.save_pretrained(d), lambda m, d: None, quiet=True).fit()
    recs = [json.loads(ln) for ln in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    want = [sum(ds.batch(s, m)[2] for m in range(2)) for s in range(3)]
    assert [r["tokens"] for r in recs if "tokens" in r] == want
    assert not (tmp_path / "o" / "best").exists()           # evaluate=None: no evaluation, no best/


# --- 9-11: flags are checked before any work, in their own names ----------------------------------

def test_9_eval_batches(fx, tmp_path, capsys):
    assert run(train, ["--data", fx.corpus, "--out-dir", tmp_path / "a", *TRAIN, "--eval-batches", "-1"]) == 2
    assert "--eval-batches must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert run(train, ["--data", fx.corpus, "--out-dir", tmp_path / "b", *TRAIN, "--eval-batches", "0"]) == 0
    assert "no evaluation (--eval-batches 0)" in capsys.readouterr().out
    recs = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert recs and not any("val_loss" in r for r in recs) and not (tmp_path / "b" / "best").exists()


@pytest.mark.parametrize("cmd", ["train", "finetune"])
def test_10_data_that_is_not_a_regular_file(fx, tmp_path, capsys, cmd):
    argv = ["--data", "/dev/zero", "--out-dir", tmp_path / "o"]
    argv += ["--lora", "--base", fx.base, *TUNE] if cmd == "finetune" else TRAIN
    assert run(finetune if cmd == "finetune" else train, argv) == 1
    assert "/dev/zero: not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["-5", "0"])
def test_11_sample_tokens_checked_first(fx, tmp_path, capsys, value):
    assert run(train, ["--data", fx.corpus, "--out-dir", tmp_path / "o", *TRAIN, "--sample-tokens", value]) == 2
    assert f"--sample-tokens must be >= 1, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- 12: the library validates its own arguments --------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt(n_layer=1, n_embd=32, block_size=32)


@pytest.mark.parametrize("kw, message", [
    (dict(top_k=-5), "top_k must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"), (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_p=math.nan), "top_p must be finite"),
    (dict(temperature=-1.0), "temperature must be >= 0"), (dict(temperature=math.nan), "temperature must be finite"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=math.nan), "repetition_penalty must be finite"),
    (dict(stop="", tokenizer=get_tokenizer()), "stop strings must be non-empty"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
])
def test_12_generate_validates_its_arguments(tiny, kw, message):
    kw = {"max_new_tokens": 4, "temperature": 0.7, **kw}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny.generate(torch.tensor([[1, 2, 3]]), **kw)


def test_12_token_ids_and_batches(tiny):
    for bad in (torch.tensor([[1, 50257]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50257\)"):
            tiny(bad)
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 50257\)"):
            tiny.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one prompt"):
        tiny.generate(torch.zeros((0, 3), dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("kw, message", [
    (dict(layer_norm_epsilon=-1), "GPTConfig.layer_norm_epsilon must be > 0"),
    (dict(n_layer=True), "GPTConfig.n_layer must be a positive integer, got True"),
    (dict(dropout="0.1"), "GPTConfig.dropout must be a finite number, got '0.1'"),
])
def test_12_gptconfig_validates(kw, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kw)


def test_12_json_null_data(fx, tmp_path, capsys):
    (tmp_path / "null.json").write_text("null\n")
    with pytest.raises(DataError, match="expected a JSON array of records or JSON lines"):
        load_records(tmp_path / "null.json")
    assert run(finetune, ["--lora", "--base", fx.base, "--data", tmp_path / "null.json", "--out-dir",
                          tmp_path / "o", *TUNE]) == 1
    assert "got null" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_readme_troubleshooting_lists_the_run_folder_rows():
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Troubleshooting", 1)[1]
    for fragment in ("holds files no minigpt run wrote", "whose files this run would replace",
                     "not a regular file", "--sample-tokens must be >= 1", "--eval-batches must be >= 0",
                     "holds a finetune run, not a pretrain run", "top_p must be in (0, 1]",
                     "token ids must be in [0, 50257)", "expected a JSON array of records or JSON lines"):
        assert fragment in section, fragment
