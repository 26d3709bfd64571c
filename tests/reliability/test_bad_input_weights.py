"""Bad model and weight files give one clear line, never a traceback, and change nothing on disk:
missing, empty or unreadable model folders; corrupted safetensors, .bin and config.json files; broken
OpenAI TF bundles; adapters that are cut short, malicious, broken or for another base model.

The rows run through bad_input.check_row (see tests/reliability/bad_input.py for what each row checks).
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import tf_bundle
import torch
from bad_input import (
    Evil,
    Fx,
    Row,
    _copy,
    _edit_json,
    _write_tf,
    api,
    check_row,
    cli,
    shared_fx,
)
from safetensors.torch import load_file, save_file

from minigpt import GPT, GPTConfig
from minigpt.commands import chat as chat_cli
from minigpt.commands import finetune as ft
from minigpt.commands import train
from minigpt.errors import CheckpointError
from minigpt.methods.lora import load_adapter
from minigpt.weights.keymap import minigpt_to_hf


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return shared_fx(tmp_path_factory)


def b_model_missing(t, fx, mp):
    return cli(chat_cli, ["--model", t / "no-such-model", "--prompt", "hi"])


def b_model_empty_dir(t, fx, mp):
    (t / "empty").mkdir()
    return cli(train, fx.train("--init-from", t / "empty", out=t / "o"))


def b_model_dir_unreadable(t, fx, mp):
    d = _copy(fx.base, t / "locked")
    d.chmod(0)
    return cli(chat_cli, ["--model", d, "--prompt", "hi"], undo=lambda: d.chmod(0o755))


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


ROWS = [
    # --- missing / empty / unreadable files and folders ---
    Row("model-missing", b_model_missing, "checkpoint path not found",
        remedy="check the path, or use a preset name (gpt2, gpt2-medium, ...)"),
    Row("model-empty-dir", b_model_empty_dir, "no checkpoint found",
        remedy="point at a folder with config.json + model.safetensors (or pytorch_model.bin), or an "
               "OpenAI folder with hparams.json + model.ckpt.*"),
    Row("model-dir-unreadable", b_model_dir_unreadable, "Permission denied", needs_non_root=True,
        remedy="fix the folder's permissions (chmod u+rx)"),
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
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    check_row(row, fx, tmp_path, monkeypatch, capsys)
