"""Run folders: a bad --out-dir (the --init-from folder itself, under a file, an existing run without
--resume), a bad --resume (other model flags, a corrupt training state), and failures during
training (a non-finite loss, a full disk while writing a checkpoint) give one clear line and leave
the run's files loadable; a torn metrics line is dropped on resume; end-of-run samples longer than
the context are clipped instead of failing the run.

The rows run through bad_input.check_row (see tests/reliability/bad_input.py for what each row checks).
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input import (
    Fx,
    Row,
    _copy,
    _weights_finite,
    check_row,
    cli,
    shared_fx,
)
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.commands import finetune as ft
from minigpt.commands import train
from minigpt.training.runs import STATE_FILE, latest_checkpoint


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return shared_fx(tmp_path_factory)


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
    # --- training failures ---
    Row("non-finite-loss", b_nan_loss, "loss was not finite for 5 steps in a row",
        remedy="lower --lr (or check the data) and start over with --overwrite; the checkpoints "
               "written so far stay loadable"),
    Row("disk-full-during-checkpoint", b_disk_full_during_checkpoint, "No space left on device",
        remedy="free space and run again with --resume: the previous checkpoint is intact"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    check_row(row, fx, tmp_path, monkeypatch, capsys)


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
