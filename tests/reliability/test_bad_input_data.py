"""Bad data files give one clear line, never a traceback, and change nothing on disk: unreadable
files, pretraining text that is empty, too short or not UTF-8, .bin token files of odd size or
outside the vocabulary, a non-UTF-8 --eval-text, and broken or unusable instruction data.

The rows run through bad_input.check_row (see tests/reliability/bad_input.py for what each row checks).
"""
from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from bad_input import (
    TINY,
    Fx,
    Row,
    _copy,
    check_row,
    cli,
    shared_fx,
)

from minigpt.commands import finetune as ft
from minigpt.commands import train


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return shared_fx(tmp_path_factory)


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


ROWS = [
    # --- missing / empty / unreadable files and folders ---
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
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    check_row(row, fx, tmp_path, monkeypatch, capsys)
