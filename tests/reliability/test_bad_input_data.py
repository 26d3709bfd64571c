"""Bad data files give one clear line, never a traceback, and change nothing on disk: unreadable
files, pretraining text that is empty, too short or not UTF-8, .bin token files of odd size or
outside the vocabulary, a non-UTF-8 --eval-text, and broken or unusable instruction and preference
data.

The rows run through bad_input.check_row (see tests/reliability/bad_input.py for what each row checks).
"""
from __future__ import annotations

import errno
import io
import json
import os
import sys
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


def b_data_folder_without_data(t, fx, mp):
    (t / "docs").mkdir()
    (t / "docs" / "notes.md").write_text("# not a data file\n")
    return cli(ft, fx.ft("--data", t / "docs", out=t / "o"), after=_no_run(t))


# --- instruction data in other formats and containers: checked before the run folder is claimed ---

def _no_run(t):
    def after():
        assert not (t / "o").exists(), "the run folder was created"
    return after


def _ft(t, fx, p, *extra):
    return cli(ft, fx.ft("--data", p, *extra, out=t / "o"), protect=[p], after=_no_run(t))


def b_glob_no_match(t, fx, mp):
    return _ft(t, fx, t / "data" / "*.parquet")


def b_unknown_record_shape(t, fx, mp):
    p = t / "qa.jsonl"
    p.write_text('{"question": "Say red.", "answer": "red"}\n')
    return _ft(t, fx, p)


def b_columns_no_such_column(t, fx, mp):
    p = t / "qa.jsonl"
    p.write_text('{"question": "Say red.", "answer": "red"}\n')
    return _ft(t, fx, p, "--columns", "prompt=qustion,response=answer")


def b_columns_malformed(t, fx, mp):
    return _ft(t, fx, fx.data, "--columns", "prompt")


def b_csv_row_field_count(t, fx, mp):
    p = t / "rows.csv"
    p.write_text('instruction,input,output\nSay red.,,red\n"Say, blue.",,blue,extra\n')
    return _ft(t, fx, p)


def b_tsv_empty_output(t, fx, mp):
    p = t / "notes.tsv"
    p.write_text("instruction\tinput\toutput\nSay red.\t\tred\nSay blue.\t\t \n")
    return _ft(t, fx, p)


def b_parquet_bad_row(t, fx, mp):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = t / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Say red.", "response": "red"},
                                         {"prompt": "Say blue.", "response": ""}]), p, row_group_size=1)
    return _ft(t, fx, p)


def b_parquet_corrupt(t, fx, mp):
    pytest.importorskip("pyarrow")
    p = t / "torn.parquet"
    p.write_bytes(b"PAR1" + bytes(range(200)))
    return _ft(t, fx, p)


def b_parquet_without_pyarrow(t, fx, mp):
    p = t / "qa.parquet"
    p.write_bytes(b"PAR1 never read")
    mp.setitem(sys.modules, "pyarrow", None)             # import pyarrow -> ImportError
    mp.setitem(sys.modules, "pyarrow.parquet", None)
    return _ft(t, fx, p)


def b_sharegpt_unknown_role(t, fx, mp):
    p = t / "sharegpt.json"
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Beep"}]}]
    p.write_text("[\n" + ",\n".join(map(json.dumps, rows)) + "\n]\n")      # one record a line
    return _ft(t, fx, p)


def b_text_field_empty_turn(t, fx, mp):
    p = t / "guanaco.jsonl"
    p.write_text(json.dumps({"text": "### Human: Hi### Assistant: Hello"}) + "\n"
                 + json.dumps({"text": "### Human: Hi\n### Assistant:"}) + "\n")
    return _ft(t, fx, p)


def b_chatbot_arena(t, fx, mp):
    p = t / "arena.jsonl"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    p.write_text(json.dumps({"question_id": "q1", "model_a": "a", "model_b": "b", "winner": "model_a",
                             "conversation_a": conv, "conversation_b": conv, "turn": 1}) + "\n")
    return _ft(t, fx, p)


def _prefs(t, rows):
    p = t / "prefs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def b_preference_missing_rejected(t, fx, mp):
    p = _prefs(t, [{"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}, {"prompt": "Say yes.", "chosen": "yes"}])
    return _ft(t, fx, p, "--objective", "dpo")


def b_preference_all_identical(t, fx, mp):
    p = _prefs(t, [{"prompt": "Say hi.", "chosen": "hi", "rejected": "hi"}, {"prompt": "Say yes.", "chosen": "yes",
                                                                            "rejected": " yes"}])
    return _ft(t, fx, p, "--objective", "dpo")


def b_dpo_on_sft_data(t, fx, mp):
    return _ft(t, fx, fx.data, "--objective", "dpo")


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
    Row("data-folder-without-data-files", b_data_folder_without_data, "folder holds no instruction data files",
        remedy="put .json, .jsonl, .csv, .tsv, .parquet or .txt files in it (other names are ignored)"),
    Row("data-glob-no-match", b_glob_no_match, "no files match the pattern", remedy="check the pattern"),
    Row("unknown-record-shape", b_unknown_record_shape, "the record holds 'question', 'answer'",
        remedy="rename the columns, or map them: --columns prompt=question,response=answer"),
    Row("columns-no-such-column", b_columns_no_such_column, "--columns prompt=qustion: no such column",
        remedy="check --columns against the file's column names"),
    Row("columns-malformed", b_columns_malformed, "--columns: expected FIELD=COLUMN", rc=2,
        remedy="FIELD=COLUMN pairs separated by commas"),
    Row("csv-row-field-count", b_csv_row_field_count, "rows.csv:3: row has 4 fields, the header 3",
        remedy="quote cells that hold the separator (\"Say, blue.\")"),
    Row("tsv-empty-output", b_tsv_empty_output, "notes.tsv:3: field 'output' is empty",
        remedy="fill in the cell, or drop the row"),
    Row("parquet-bad-row", b_parquet_bad_row, "row-group 1, row 0: field 'response' is empty",
        remedy="fix that row (row groups and rows count from 0, as pyarrow's read_row_group)"),
    Row("parquet-corrupt", b_parquet_corrupt, "not a readable Parquet file",
        remedy="the file is cut short or not Parquet: write or download it again"),
    Row("parquet-without-pyarrow", b_parquet_without_pyarrow, 'reading Parquet needs pyarrow: pip install -e ".[data]"',
        remedy='pip install -e ".[data]" (or pip install pyarrow)'),
    Row("sharegpt-unknown-role", b_sharegpt_unknown_role, "sharegpt.json:3: turn 2: unknown role 'robot'",
        remedy="ShareGPT roles: human/user, gpt/assistant, system"),
    Row("text-field-empty-turn", b_text_field_empty_turn, "guanaco.jsonl:2: field 'text', line 2: empty Assistant turn",
        remedy="every '### Human:' and '### Assistant:' turn needs text"),
    Row("chatbot-arena-for-sft", b_chatbot_arena, "train on it with the preference objective",
        remedy="pairs of answers are preference data: --objective dpo"),
    # --- preference data (finetune.py --objective dpo|ipo|orpo) ---
    Row("preference-missing-rejected", b_preference_missing_rejected, "prefs.jsonl:2: missing field 'rejected'",
        remedy="every pair needs prompt, chosen and rejected"),
    Row("preference-chosen-equals-rejected", b_preference_all_identical,
        "no training pairs (after 0 ties, 2 with chosen = rejected",
        remedy="pairs whose answers are equal teach nothing: they are skipped and counted in the data: line"),
    Row("dpo-on-sft-data", b_dpo_on_sft_data, "expected preference records: 'prompt' with 'chosen' and 'rejected'",
        remedy="instruction data trains without --objective (sft); preference data needs chosen and rejected"),
    Row("records-longer-than-context", b_records_longer_than_context, "longer than --max-length",
        remedy="raise --max-length (up to the base model's context) or shorten the prompts"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    check_row(row, fx, tmp_path, monkeypatch, capsys)
