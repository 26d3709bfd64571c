"""Reliability: every bad input gives one clear line (or a specific exception), never a traceback,
and never corrupts what is already on disk.

The table below is the overview. Each row builds one bad input under tmp_path, then runs a
script's main(argv) in-process (train.py, finetune.py, chat.py) or one library call, and checks:
  * scripts: the exit code (1 for errors, 2 for argparse), exactly one `error:` line on stderr
    that contains the expected fragment, no "Traceback"; APIs: the exception type and a one-line
    message containing the fragment;
  * nothing corrupted: the files each row names as protected keep their bytes, and no temporary
    files (*.tmp, .tmp-step-*) are left anywhere under tmp_path;
  * optional row-specific checks (a pickle payload did not run, the last checkpoint still loads).
The README's "Troubleshooting" section lists the same rows.

Covered elsewhere (not repeated here): Ctrl-C during training saves a checkpoint and exits 130
(test_train.py::test_ctrl_c_saves_and_resumes); one kill -9 and exact resume
(test_train.py::test_resume_after_kill_is_exact); reader-level malformed instruction data
(test_instruct.py::test_malformed_data_names_file_and_line); TF index crc/truncation at the API
(test_checkpoint.py); adapter shape checks at the API (test_lora.py).
After the table: kill -9 in the middle of a checkpoint write, and the kill -9 loop (several
SIGKILLs at seeded random moments, resumed each time, bit-identical to an uninterrupted run).
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import tf_bundle
import torch
from safetensors.torch import load_file, save_file

from minigpt import GPT, GPTConfig
from minigpt.commands import chat as chat_cli
from minigpt.commands import finetune as ft
from minigpt.commands import train
from minigpt.errors import CheckpointError
from minigpt.inference.generate import generate
from minigpt.methods.lora import add_lora, load_adapter, save_adapter
from minigpt.training.runs import STATE_FILE, latest_checkpoint
from minigpt.weights.keymap import minigpt_to_hf

ROOT = Path(__file__).resolve().parents[1]




def _chmod_blocks_reads() -> bool:
    """False as root (with CAP_DAC_OVERRIDE): chmod 000 does not stop root from reading."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "probe"
        f.write_text("x")
        f.chmod(0)
        try:
            f.read_text()
            return False
        except PermissionError:
            return True
        finally:
            f.chmod(0o600)


CHMOD_BLOCKS_READS = _chmod_blocks_reads()

# train.py flags of a tiny, fast, deterministic run (2 layers x 64, context 32, 1 thread)
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--batch-size", "2",
        "--eval-batches", "1", "--samples", "0", "--threads", "1", "--log-interval", "1",
        "--warmup-steps", "1", "--precision", "fp32", "--device", "cpu"]


class Evil:
    """Unpickling this calls open(path, "w"): creates a file. Safe loaders must never do that."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------------
# Shared inputs (built once per module)
# ------------------------------------------------------------------------------------------------
@dataclass
class Fx:
    root: Path
    base: Path          # tiny GPT folder (config.json + model.safetensors), context 64
    corpus: Path        # a text file for train.py
    data: Path          # a good Alpaca JSONL for finetune.py
    adapter: Path       # LoRA adapter for `base` (r=2 on c_attn), base recorded
    tf: Path            # OpenAI TF checkpoint folder of a tiny model (vocab 500)
    tf_spans: dict
    run: Path           # a finished 4-step train.py run (checkpoints at steps 2 and 4)

    def ft(self, *extra, out="ft-out"):
        return ["--base", str(self.base), "--threads", "1", "--max-steps", "2", "--batch-size", "2",
                "--grad-accum", "1", "--max-length", "32", "--samples", "0", "--exact-match", "0",
                "--eval-batches", "1", "--precision", "fp32", "--device", "cpu", "--out-dir", str(out),
                "--data", str(self.data), *map(str, extra)]

    def train(self, *extra, out="train-out", steps=4):
        return ["--data", str(self.corpus), "--out-dir", str(out), "--max-steps", str(steps),
                "--eval-interval", "2", *TINY, *map(str, extra)]


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    root = tmp_path_factory.mktemp("reliability")
    torch.manual_seed(0)
    base = root / "base"
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).save_pretrained(base)
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n"
                              for i in range(600)))
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in ("red", "green", "blue", "black", "white", "pink", "gold", "grey")))
    m = GPT.from_pretrained(base)
    add_lora(m, r=2, alpha=4, dropout=0.0, targets=("c_attn",))
    adapter = save_adapter(m, root / "adapter", base_model_name_or_path=str(base))
    small = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=500))
    tf = root / "tf"
    spans = _write_tf(tf, small)
    run = root / "run"
    assert train.main(["--data", str(corpus), "--out-dir", str(run), "--max-steps", "4",
                       "--eval-interval", "2", *TINY]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    return Fx(root, base, corpus, data, adapter, tf, spans, run)


def _write_tf(d: Path, model: GPT, tensors: Optional[dict] = None) -> dict:
    """An OpenAI-style checkpoint folder (hparams.json + model.ckpt.*) written by tests/tf_bundle."""
    d.mkdir(parents=True, exist_ok=True)
    c = model.config
    (d / "hparams.json").write_text(json.dumps(dict(n_vocab=c.vocab_size, n_ctx=c.block_size,
                                                    n_embd=c.n_embd, n_head=c.n_head, n_layer=c.n_layer)))
    if tensors is None:
        tensors = tf_bundle.hf_to_openai(minigpt_to_hf(model.state_dict(), prefix=False))
    return tf_bundle.write_bundle(d / "model.ckpt", tensors)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _weights_finite(d: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(d / "model.safetensors").values())


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
@dataclass
class Call:
    script: object = None                   # train / ft / chat_cli module: main(argv) is run
    argv: list = field(default_factory=list)
    api: Optional[Callable] = None          # or a library call expected to raise
    protect: tuple = ()                     # files/folders whose bytes must not change
    after: Optional[Callable] = None        # extra checks, run after the call
    undo: Optional[Callable] = None         # clean-up (e.g. restore permissions), always run


@dataclass
class Row:
    id: str
    build: Callable                         # (tmp_path, fx, monkeypatch) -> Call
    expect: str                             # fragment of the one-line message
    rc: int = 1                             # exit code for script rows
    exc: Optional[type] = None              # exception type for API rows
    needs_non_root: bool = False            # chmod-based: root reads anything
    remedy: str = ""                        # what to do (README troubleshooting)


def cli(script, argv, protect=(), after=None, undo=None) -> Call:
    return Call(script=script, argv=[str(a) for a in argv], protect=tuple(protect), after=after, undo=undo)


def api(fn, protect=(), after=None) -> Call:
    return Call(api=fn, protect=tuple(protect), after=after)


# --- builders -----------------------------------------------------------------------------------
def b_model_missing(t, fx, mp):
    return cli(chat_cli, ["--model", t / "no-such-model", "--prompt", "hi"])


def b_model_empty_dir(t, fx, mp):
    (t / "empty").mkdir()
    return cli(train, fx.train("--init-from", t / "empty", out=t / "o"))


def b_model_dir_unreadable(t, fx, mp):
    d = _copy(fx.base, t / "locked")
    d.chmod(0)
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], undo=lambda: d.chmod(0o755))


def b_data_unreadable_chmod(t, fx, mp):
    p = _copy(fx.data, t / "locked.jsonl")
    p.chmod(0)
    return cli(ft, fx.ft("--data", p, out=t / "o"), protect=[fx.base], undo=lambda: p.chmod(0o644))


def b_data_unreadable_eacces(t, fx, mp):
    """Permission denied simulated at open() (works as root, where chmod 000 does not block reads)."""
    p = _copy(fx.data, t / "denied.jsonl")
    real_open = io.open

    def guarded(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file) == p:
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_open(file, *a, **k)
    mp.setattr(io, "open", guarded)
    return cli(ft, fx.ft("--data", p, out=t / "o"), protect=[fx.base])


def b_train_data_empty(t, fx, mp):
    (t / "empty.txt").write_text("")
    return cli(train, ["--data", t / "empty.txt", "--out-dir", t / "o", *TINY])


def b_train_data_folder_no_txt(t, fx, mp):
    (t / "docs").mkdir()
    (t / "docs" / "notes.md").write_text("# not a .txt file\n")
    return cli(train, ["--data", t / "docs", "--out-dir", t / "o", *TINY])


def b_train_data_too_short(t, fx, mp):
    (t / "short.txt").write_text("hello world")
    return cli(train, ["--data", t / "short.txt", "--out-dir", t / "o", *TINY])


def b_train_data_bin_odd(t, fx, mp):
    (t / "tokens.bin").write_bytes(b"\x01\x02\x03")
    return cli(train, ["--data", t / "tokens.bin", "--out-dir", t / "o", *TINY])


def b_train_data_bin_vocab(t, fx, mp):
    np.full(200, 60000, dtype=np.uint16).tofile(t / "tokens.bin")
    return cli(train, ["--data", t / "tokens.bin", "--out-dir", t / "o", *TINY])


def b_train_data_not_utf8(t, fx, mp):
    (t / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1") * 50)
    return cli(train, ["--data", t / "latin1.txt", "--out-dir", t / "o", *TINY])


def b_eval_text_not_utf8(t, fx, mp):
    (t / "heldout.txt").write_bytes(b"\xff\xfe held out")
    return cli(train, fx.train("--eval-text", t / "heldout.txt", out=t / "o"))


def b_safetensors_truncated(t, fx, mp):
    d = _copy(fx.base, t / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 3])
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_safetensors_bad_header(t, fx, mp):
    d = _copy(fx.base, t / "garbled")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:24] = b"{garbage!!!!!!!}"
    (d / "model.safetensors").write_bytes(bytes(raw))
    return cli(train, fx.train("--init-from", d, out=t / "o"), protect=[d])


def b_safetensors_int_dtype(t, fx, mp):
    d = _copy(fx.base, t / "ints")
    sd = load_file(d / "model.safetensors")
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"].to(torch.int32)
    save_file(sd, d / "model.safetensors")
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_config_mismatch(t, fx, mp):
    d = _copy(fx.base, t / "mismatch")
    _edit_json(d / "config.json", n_embd=128)
    return cli(train, fx.train("--init-from", d, out=t / "o"), protect=[d])


def b_config_not_object(t, fx, mp):
    d = _copy(fx.base, t / "listcfg")
    (d / "config.json").write_text("[2, 2, 64]")
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_config_broken_json(t, fx, mp):
    d = _copy(fx.base, t / "brokencfg")
    (d / "config.json").write_text('{"n_layer": 2,')
    return cli(ft, fx.ft("--base", d, out=t / "o"), protect=[d])


def b_bin_truncated(t, fx, mp):
    d = t / "bin"
    d.mkdir()
    shutil.copy(fx.base / "config.json", d)
    torch.save(load_file(fx.base / "model.safetensors"), d / "pytorch_model.bin")
    raw = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_bin_malicious_pickle(t, fx, mp):
    d = t / "evil"
    d.mkdir()
    shutil.copy(fx.base / "config.json", d)
    torch.save({"wte.weight": torch.zeros(2), "payload": Evil(t / "pwned.txt")}, d / "pytorch_model.bin")

    def after():
        assert not (t / "pwned.txt").exists(), "the pickle payload ran"
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d], after=after)


def b_tf_bad_crc(t, fx, mp):
    d = _copy(fx.tf, t / "tf")
    off, size = fx.tf_spans["model/h1/mlp/c_fc/b"]
    p = d / "model.ckpt.data-00000-of-00001"
    raw = bytearray(p.read_bytes())
    raw[off + size // 2] ^= 0x10
    p.write_bytes(bytes(raw))
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_tf_short_data(t, fx, mp):
    d = _copy(fx.tf, t / "tf")
    p = d / "model.ckpt.data-00000-of-00001"
    p.write_bytes(p.read_bytes()[:-4096])
    return api(lambda: GPT.from_pretrained(d), protect=[d])


def b_tf_wrong_dtype(t, fx, mp):
    small = GPT.from_pretrained(fx.tf)
    tensors = tf_bundle.hf_to_openai(minigpt_to_hf(small.state_dict(), prefix=False))
    tensors["model/ln_f/g"] = tensors["model/ln_f/g"].astype(np.int32)
    _write_tf(t / "tf", small, tensors)
    return api(lambda: GPT.from_pretrained(t / "tf"), protect=[t / "tf"])


def b_tf_wrong_shape(t, fx, mp):
    small = GPT.from_pretrained(fx.tf)
    tensors = tf_bundle.hf_to_openai(minigpt_to_hf(small.state_dict(), prefix=False))
    tensors["model/h0/ln_1/g"] = tensors["model/h0/ln_1/g"][:32]
    _write_tf(t / "tf", small, tensors)
    return cli(train, fx.train("--init-from", t / "tf", out=t / "o"), protect=[t / "tf"])


def b_tf_index_truncated(t, fx, mp):
    d = _copy(fx.tf, t / "tf")
    idx = d / "model.ckpt.index"
    idx.write_bytes(idx.read_bytes()[:-20])
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], protect=[d])


def b_adapter_other_base(t, fx, mp):
    other = t / "wider"
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).save_pretrained(other)
    return cli(chat_cli, ["--model", other, "--adapter", fx.adapter, "--prompt", "hi"], protect=[fx.adapter, other])


def b_adapter_truncated(t, fx, mp):
    d = _copy(fx.adapter, t / "adapter")
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:40])
    return cli(chat_cli, ["--model", fx.base, "--adapter", d, "--prompt", "hi"], protect=[d, fx.base])


def b_adapter_malicious_bin(t, fx, mp):
    d = _copy(fx.adapter, t / "adapter")
    (d / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": Evil(t / "pwned.txt")},
               d / "adapter_model.bin")

    def after():
        assert not (t / "pwned.txt").exists(), "the pickle payload ran"
    return api(lambda: load_adapter(GPT.from_pretrained(fx.base), d), protect=[d], after=after)


def b_adapter_broken_config(t, fx, mp):
    d = _copy(fx.adapter, t / "adapter")
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    return cli(chat_cli, ["--model", fx.base, "--adapter", d, "--prompt", "hi"], protect=[d])


def b_jsonl_broken_line(t, fx, mp):
    p = t / "torn.jsonl"
    p.write_text(fx.data.read_text() + '{"instruction": "Say red.", "outp')   # torn last line
    return cli(ft, fx.ft("--data", p, out=t / "o"), protect=[fx.base])


def b_json_missing_field(t, fx, mp):
    p = t / "list.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}], indent=1))
    return cli(ft, fx.ft("--data", p, out=t / "o"))


def b_jsonl_wrong_type(t, fx, mp):
    p = t / "types.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}\n')
    return cli(ft, fx.ft("--data", p, out=t / "o"))


def b_data_empty(t, fx, mp):
    p = t / "empty.jsonl"
    p.write_text("\n\n")
    return cli(ft, fx.ft("--data", p, out=t / "o"))


def b_data_is_folder(t, fx, mp):
    return cli(ft, fx.ft("--data", t, out=t / "o"))


def b_records_longer_than_context(t, fx, mp):
    p = t / "long.jsonl"
    p.write_text("".join(json.dumps({"instruction": "word " * 100, "output": "x"}) + "\n" for _ in range(4)))
    return cli(ft, fx.ft("--data", p, out=t / "o"))


def b_unknown_flag(t, fx, mp):
    return cli(ft, fx.ft("--lora-rank", "4", out=t / "o"))


def b_lora_r_zero(t, fx, mp):
    return cli(ft, fx.ft("--lora", "--lora-r", "0", out=t / "o"))


def b_lr_not_finite(t, fx, mp):
    return cli(train, fx.train("--lr", "nan", out=t / "o"))


def b_block_above_context(t, fx, mp):
    return cli(train, fx.train("--init-from", fx.base, "--block-size", "128", out=t / "o"), protect=[fx.base])


def b_threads_negative(t, fx, mp):
    return cli(train, fx.train("--threads", "-2", out=t / "o"))


def b_device_unknown(t, fx, mp):
    return cli(ft, fx.ft("--device", "tpu", out=t / "o"))


def b_save_interval_negative(t, fx, mp):
    return cli(train, fx.train("--save-interval", "-5", out=t / "o"))


def b_min_lr_negative(t, fx, mp):
    return cli(train, fx.train("--min-lr", "-0.0001", out=t / "o"))


def b_out_dir_is_init_from(t, fx, mp):
    d = _copy(fx.base, t / "model")

    def after():
        assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    return cli(train, fx.train("--init-from", d, out=d), protect=[d], after=after)


def b_out_dir_under_file(t, fx, mp):
    (t / "notes.txt").write_text("a regular file\n")
    return cli(train, fx.train(out=t / "notes.txt" / "run"), protect=[t / "notes.txt"])


def b_ft_out_dir_under_file(t, fx, mp):
    (t / "notes.txt").write_text("a regular file\n")
    return cli(ft, fx.ft("--lora", out=t / "notes.txt" / "run"), protect=[t / "notes.txt"])


def b_existing_run_no_resume(t, fx, mp):
    run = _copy(fx.run, t / "run")
    return cli(train, fx.train(out=run), protect=[run])


def b_resume_other_shape(t, fx, mp):
    run = _copy(fx.run, t / "run")
    return cli(train, fx.train("--n-embd", "32", "--resume", out=run, steps=6), protect=[run])


def b_resume_corrupt_state(t, fx, mp):
    run = _copy(fx.run, t / "run")
    p = run / "checkpoints" / "step-0000004" / STATE_FILE
    p.write_bytes(p.read_bytes()[:200])
    return cli(train, fx.train("--resume", out=run, steps=6), protect=[run])


def b_generate_prompt_too_long(t, fx, mp):
    m = GPT.from_pretrained(fx.base)
    return api(lambda: generate(m, torch.zeros((1, 65), dtype=torch.long), 4))


def b_generate_no_room(t, fx, mp):
    m = GPT.from_pretrained(fx.base)
    return api(lambda: generate(m, torch.zeros((1, 60), dtype=torch.long), 10))


def b_chat_prompt_too_long(t, fx, mp):
    return cli(chat_cli, ["--model", fx.base, "--prompt", "word " * 400, "--temperature", "0",
                          "--max-new-tokens", "8"], protect=[fx.base])


def b_nan_loss(t, fx, mp):
    out = t / "o"

    def after():
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if "loss" in r]
        assert np.isfinite(losses[0]) and all(x is None for x in losses[1:])   # skipped steps, null
        ckpts = sorted((out / "checkpoints").glob("step-*"))
        assert ckpts and all((c / STATE_FILE).exists() for c in ckpts)
        last = latest_checkpoint(out)
        GPT.from_pretrained(last)                                   # the last checkpoint loads
        assert _weights_finite(last) and _weights_finite(out)
        a, b = load_file(ckpts[0] / "model.safetensors"), load_file(last / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)             # skipped steps changed nothing
    return cli(train, fx.train("--lr", "1e6", "--warmup-steps", "0", "--grad-clip", "0", "--save-interval", "2",
                               out=out, steps=20), after=after)


def b_disk_full_during_checkpoint(t, fx, mp):
    """The second checkpoint's write fails with ENOSPC half-way through."""
    out = t / "o"
    real_save = torch.save
    failed = []

    def full_disk(obj, f, *a, **k):
        if not failed and "step-0000004" in str(f):
            failed.append(f)
            Path(f).write_bytes(b"\x00" * 100)                      # a partial write, then no space
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    mp.setattr(torch, "save", full_disk)

    def after():
        assert failed
        assert latest_checkpoint(out).name == "step-0000002"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
        prev = out / "checkpoints" / "step-0000002"
        GPT.from_pretrained(prev)
        torch.load(prev / STATE_FILE, weights_only=True)
        assert (out / "model.safetensors").read_bytes() == (prev / "model.safetensors").read_bytes()
        mp.setattr(torch, "save", real_save)                         # space again: resume finishes
        assert train.main(fx.train("--resume", out=out, steps=6)) == 0
        assert latest_checkpoint(out).name == "step-0000006"
    return cli(train, fx.train("--save-interval", "2", out=out, steps=6), after=after)


ROWS = [
    # --- missing / empty / unreadable files and folders ---
    Row("model-missing", b_model_missing, "checkpoint path not found",
        remedy="check the path, or use a preset name (gpt2, gpt2-medium, ...)"),
    Row("model-empty-dir", b_model_empty_dir, "no checkpoint found",
        remedy="point at a folder with config.json + model.safetensors (or pytorch_model.bin), or an "
               "OpenAI folder with hparams.json + model.ckpt.*"),
    Row("model-dir-unreadable", b_model_dir_unreadable, "Permission denied", needs_non_root=True,
        remedy="fix the folder's permissions (chmod u+rx)"),
    Row("data-unreadable-chmod", b_data_unreadable_chmod, "Permission denied", needs_non_root=True,
        remedy="fix the file's permissions (chmod u+r)"),
    Row("data-unreadable-eacces", b_data_unreadable_eacces, "Permission denied",
        remedy="fix the file's permissions (chmod u+r)"),
    Row("train-data-empty", b_train_data_empty, "file is empty", remedy="pass a file with text in it"),
    Row("train-data-folder-without-txt", b_train_data_folder_no_txt, "folder contains no .txt files",
        remedy="put .txt files in the folder (other extensions are ignored)"),
    Row("train-data-too-short", b_train_data_too_short, "too few to train on",
        remedy="use more text (at least a few block sizes of tokens)"),
    Row("train-data-bin-odd-size", b_train_data_bin_odd, "odd byte count",
        remedy="a .bin must be raw uint16 token ids; re-export it or pass the text instead"),
    Row("train-data-bin-outside-vocab", b_train_data_bin_vocab, "outside GPT-2's vocabulary",
        remedy="the .bin was made with another tokenizer; re-tokenise with GPT-2's or pass the text"),
    Row("train-data-not-utf8", b_train_data_not_utf8, "not UTF-8 text",
        remedy="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"),
    Row("eval-text-not-utf8", b_eval_text_not_utf8, "--eval-text",
        remedy="convert the held-out file to UTF-8"),
    # --- corrupted weights: safetensors, .bin, config.json, OpenAI TF bundles ---
    Row("safetensors-truncated", b_safetensors_truncated, "unreadable safetensors file",
        remedy="the file is cut short (interrupted copy/download): copy or download it again"),
    Row("safetensors-garbled-header", b_safetensors_bad_header, "unreadable safetensors file",
        remedy="the file is corrupted: copy or download it again"),
    Row("safetensors-wrong-dtype", b_safetensors_int_dtype, "non-floating dtype",
        remedy="the weights are not a float GPT-2 checkpoint; re-export them as float tensors"),
    Row("config-does-not-match-weights", b_config_mismatch, "has shape",
        remedy="config.json belongs to another model size: use the config.json saved with the weights"),
    Row("config-not-an-object", b_config_not_object, "expected a JSON object",
        remedy="config.json must be a JSON object like the one save_pretrained writes"),
    Row("config-broken-json", b_config_broken_json, "unreadable JSON",
        remedy="fix or restore config.json"),
    Row("bin-truncated", b_bin_truncated, "unreadable torch checkpoint",
        remedy="the .bin is cut short: copy or download it again"),
    Row("bin-malicious-pickle", b_bin_malicious_pickle, "refused to load",
        remedy="the .bin holds Python objects, not just tensors; it is never executed. Get a "
               "safetensors copy from a source you trust"),
    Row("tf-bad-crc", b_tf_bad_crc, "crc32c mismatch",
        remedy="the OpenAI .data file is corrupted: download it again"),
    Row("tf-short-data-file", b_tf_short_data, "truncated data file", exc=CheckpointError,
        remedy="the OpenAI .data file is incomplete: download it again"),
    Row("tf-wrong-dtype", b_tf_wrong_dtype, "non-floating dtype", exc=CheckpointError,
        remedy="the bundle does not hold float GPT-2 weights"),
    Row("tf-wrong-shape", b_tf_wrong_shape, "has shape",
        remedy="hparams.json and the tensors disagree: use the hparams.json of that checkpoint"),
    Row("tf-index-truncated", b_tf_index_truncated, "index",
        remedy="model.ckpt.index is cut short: download it again"),
    # --- adapters ---
    Row("adapter-for-other-base", b_adapter_other_base, "adapter for another base model",
        remedy="pass the base the adapter was trained on (--model), or omit --model to use the "
               "recorded one"),
    Row("adapter-weights-truncated", b_adapter_truncated, "unreadable adapter weights",
        remedy="adapter_model.safetensors is cut short: copy it again or retrain"),
    Row("adapter-malicious-bin", b_adapter_malicious_bin, "refused to load", exc=ValueError,
        remedy="adapter_model.bin holds Python objects; it is never executed. Use a safetensors adapter"),
    Row("adapter-config-broken", b_adapter_broken_config, "invalid JSON",
        remedy="fix or restore adapter_config.json"),
    # --- instruction data ---
    Row("jsonl-broken-line", b_jsonl_broken_line, "torn.jsonl:9: invalid JSON",
        remedy="fix the line named in the message (file:line)"),
    Row("json-missing-field", b_json_missing_field, "missing field 'output'",
        remedy="every Alpaca record needs instruction and output (input is optional)"),
    Row("jsonl-wrong-type", b_jsonl_wrong_type, "must be a string",
        remedy="message contents and Alpaca fields must be JSON strings"),
    Row("data-empty", b_data_empty, "empty dataset", remedy="pass a file with records"),
    Row("data-is-a-folder", b_data_is_folder, "is a folder",
        remedy="finetune.py takes one .json, .jsonl or .txt file"),
    Row("records-longer-than-context", b_records_longer_than_context, "longer than --max-length",
        remedy="raise --max-length (up to the base model's context) or shorten the prompts"),
    # --- flags and impossible values ---
    Row("unknown-flag", b_unknown_flag, "unrecognized arguments: --lora-rank", rc=2,
        remedy="see --help for the flag names (here: --lora-r)"),
    Row("lora-r-zero", b_lora_r_zero, "--lora-r must be a positive integer", rc=2,
        remedy="use --lora-r 4, 8 or 16"),
    Row("lr-not-finite", b_lr_not_finite, "--lr must be a finite number", rc=2,
        remedy="pass a positive finite --lr"),
    Row("block-size-above-context", b_block_above_context, "exceeds the --init-from model's context (64)",
        remedy="--block-size must be at most the --init-from model's context"),
    Row("threads-negative", b_threads_negative, "--threads must be a positive integer", rc=2,
        remedy="pass --threads N with N >= 1 (or leave it out)"),
    Row("device-unknown", b_device_unknown, "unknown --device 'tpu'",
        remedy="use auto, cpu, cuda or cuda:N"),
    Row("save-interval-negative", b_save_interval_negative, "--save-interval must be >= 0", rc=2,
        remedy="pass a positive --save-interval (or leave it out: the eval interval)"),
    Row("min-lr-negative", b_min_lr_negative, "--min-lr must be >= 0", rc=2, remedy="--min-lr must be >= 0"),
    # --- output folders, resume ---
    Row("out-dir-is-init-from", b_out_dir_is_init_from, "whose files this run would replace",
        remedy="write the new run to another --out-dir; the source weights are left untouched"),
    Row("out-dir-under-a-file", b_out_dir_under_file, "is a file, not a folder",
        remedy="choose an --out-dir whose parents are folders (and writable)"),
    Row("finetune-out-dir-under-a-file", b_ft_out_dir_under_file, "is a file, not a folder",
        remedy="choose an --out-dir whose parents are folders (and writable)"),
    Row("out-dir-holds-a-run", b_existing_run_no_resume, "already holds a pretrain run",
        remedy="--resume to continue it, --overwrite to start over, or another --out-dir"),
    Row("resume-with-other-shape", b_resume_other_shape, "resume with the original run's model flags",
        remedy="resume with the same --n-layer/--n-head/--n-embd/--block-size as the original run"),
    Row("resume-corrupt-state", b_resume_corrupt_state, "unreadable training state",
        remedy="delete the named checkpoint folder; --resume then continues from the one before"),
    # --- context length ---
    Row("generate-prompt-too-long", b_generate_prompt_too_long, "longer than the model's context",
        exc=ValueError, remedy="truncate the prompt to the model's context (block_size)"),
    Row("generate-no-room-for-new-tokens", b_generate_no_room, "lower max_new_tokens", exc=ValueError,
        remedy="shorten the prompt or lower max_new_tokens"),
    Row("chat-prompt-too-long", b_chat_prompt_too_long, "kept its last", rc=0,
        remedy="nothing: chat keeps the end of the message and says so"),
    # --- training failures ---
    Row("non-finite-loss", b_nan_loss, "loss was not finite for 5 steps in a row",
        remedy="lower --lr (or check the data) and start over with --overwrite; the checkpoints "
               "written so far stay loadable"),
    Row("disk-full-during-checkpoint", b_disk_full_during_checkpoint, "No space left on device",
        remedy="free space and run again with --resume: the previous checkpoint is intact"),
]


def _snapshot(paths) -> dict:
    snap = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            snap[str(f)] = f.read_bytes()
    return snap


def _temp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if re.search(r"(\.tmp$|^\.tmp-step-)", p.name)]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    if row.needs_non_root and not CHMOD_BLOCKS_READS:
        pytest.skip("running as root: chmod 000 does not block reads (the -eacces row covers it)")
    monkeypatch.chdir(tmp_path)
    call = row.build(tmp_path, fx, monkeypatch)
    before = _snapshot(call.protect)
    try:
        if call.api is not None:
            with pytest.raises(row.exc) as ei:
                call.api()
            msg = str(ei.value).strip()
            assert row.expect in msg, msg
            assert "\n" not in msg, msg
        else:
            try:
                rc = call.script.main(call.argv)
            except SystemExit as e:                              # argparse: exit code 2
                rc = e.code
            err = capsys.readouterr().err
            assert rc == row.rc, err[-2000:]
            assert "Traceback" not in err, err[-2000:]
            lines = [ln.strip() for ln in re.split(r"[\r\n]+", err) if ln.strip()]
            errors = [ln for ln in lines if "error:" in ln]
            if row.rc == 0:
                assert not errors and any(row.expect in ln for ln in lines), err[-2000:]
            else:
                assert len(errors) == 1 and errors[0] == lines[-1], err[-2000:]   # one line, the last
                assert row.expect in errors[0], errors[0]
        assert _snapshot(call.protect) == before, "a protected file changed"
        assert not _temp_leftovers(tmp_path)
        if call.after is not None:
            call.after()
    finally:
        if call.undo is not None:
            call.undo()


def test_debug_flag_shows_the_traceback(fx, tmp_path):
    """--debug re-raises instead of printing one line (the escape hatch the messages mention)."""
    with pytest.raises(CheckpointError):
        chat_cli.main(["--model", str(tmp_path / "missing"), "--prompt", "hi", "--debug"])


def test_torn_metrics_line_is_dropped_on_resume(fx, tmp_path, capsys):
    """A crash in the middle of appending to metrics.jsonl leaves a torn last line: --resume skips it."""
    run = _copy(fx.run, tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1')
    assert train.main(fx.train("--resume", out=run, steps=6)) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_sample_tokens_beyond_context_do_not_fail_the_run(fx, tmp_path, capsys):
    """The end-of-run samples are clipped to the context instead of failing a finished run."""
    argv = fx.train(out=tmp_path / "o", steps=2)
    argv[argv.index("--samples") + 1] = "1"                       # default --sample-tokens 80 > 32
    assert train.main(argv) == 0
    assert "saved model to" in capsys.readouterr().out


def test_table_has_enough_rows_and_the_readme_lists_them():
    assert len({r.id for r in ROWS}) == len(ROWS) >= 25
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Troubleshooting" in text
    section = text[text.index("## Troubleshooting"):]
    for r in ROWS:                                   # each row's message, minus a FILE:LINE prefix
        assert re.sub(r"^\S+:\d+: ", "", r.expect) in section, r.id


# ------------------------------------------------------------------------------------------------
# kill -9: in the middle of a checkpoint write, and at random moments (the resume loop)
# ------------------------------------------------------------------------------------------------
def _train_cmd(out: Path, corpus: Path, steps: int, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--data", str(corpus), "--out-dir", str(out),
            "--max-steps", str(steps), *TINY, *extra]


# Runs train.py with torch.save patched: the write of step-0000004's training state stops half-way
# and the process SIGKILLs itself, i.e. kill -9 lands inside a checkpoint write.
_KILL_DURING_WRITE = r"""
import io, os, signal, sys, torch
real = torch.save
def save(obj, f, *a, **k):
    if "step-0000004" in str(f):
        buf = io.BytesIO(); real(obj, buf)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush(); os.fsync(fh.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = save
from minigpt.commands import train
sys.exit(train.main(sys.argv[2:]))
"""


def test_kill9_during_checkpoint_write(fx, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(fx.corpus), "--out-dir", str(out), "--max-steps", "6", "--eval-interval", "6",
            "--save-interval", "2", *TINY]
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_WRITE, str(ROOT), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    # the half-written folder is not a checkpoint; the previous one and the top-level model load
    assert list((out / "checkpoints").glob(".tmp-step-0000004-*"))
    assert latest_checkpoint(out).name == "step-0000002"
    prev = out / "checkpoints" / "step-0000002"
    GPT.from_pretrained(prev)
    torch.load(prev / STATE_FILE, weights_only=True)
    assert (out / "model.safetensors").read_bytes() == (prev / "model.safetensors").read_bytes()
    r = subprocess.run([*_train_cmd(out, fx.corpus, 6, "--eval-interval", "6", "--save-interval", "2"),
                        "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    assert not list((out / "checkpoints").glob(".tmp-step-*"))          # cleaned by the next save
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5, 6]


def _losses(out: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in recs if "loss" in r or "val_loss" in r]


def _logged_step(metrics: Path, launched: float, step: int) -> bool:
    """True once the process launched at `launched` has logged `step` or a later one (lines left by
    an earlier, killed process do not count: a resumed run rewrites the file before appending)."""
    try:
        if metrics.stat().st_mtime < launched:
            return False
        steps = [json.loads(x).get("step", 0) for x in metrics.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return False
    return any(s >= step for s in steps)


def test_kill9_loop_resume_is_bit_exact(fx, tmp_path):
    """SIGKILL a tiny fp32 run at seeded random moments (4 kills), resume with --resume after each,
    and compare with an uninterrupted run: the same loss at every step and bit-identical weights."""
    steps, flags = 40, ["--eval-interval", "10", "--save-interval", "3", "--dropout", "0.1", "--keep-last", "2"]
    ref = tmp_path / "ref"
    ref_proc = subprocess.Popen(_train_cmd(ref, fx.corpus, steps, *flags), cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = tmp_path / "killed"
    rng = random.Random(20240607)
    kills, proc = [], None
    try:
        while True:
            ckpt = latest_checkpoint(out)
            start_step = int(ckpt.name[5:]) if ckpt else 0
            launched = time.time()
            proc = subprocess.Popen(_train_cmd(out, fx.corpus, steps, *flags, *(["--resume"] if ckpt else [])),
                                    cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if len(kills) < 4:
                # a random point: 1-6 steps past the resume point, then 0-150 ms more (which lands
                # anywhere in a step: forward/backward, metrics append, checkpoint write, eval)
                target = start_step + rng.randint(1, 6)
                deadline = time.time() + 120
                while proc.poll() is None and time.time() < deadline and \
                        not _logged_step(out / "metrics.jsonl", launched, target):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.15))
                if proc.poll() is not None:
                    pytest.fail(f"the run ended before it could be killed (rc {proc.returncode}, kills so far "
                                f"{kills}): {proc.stderr.read()[-2000:]}")
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                proc.stderr.close()
                kills.append((start_step, target))
                continue
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            break
    finally:
        for p in (ref_proc, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err[-2000:]
    assert len(kills) == 4 and any(start for start, _ in kills), kills      # resumed runs were killed too
    assert _losses(out) == _losses(ref)                                    # every step, bit for bit
    assert [s for s, loss, _ in _losses(out) if loss is not None] == list(range(1, steps + 1))
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob(".tmp-step-*"))
