"""Shared machinery of the bad-input tests (tests/reliability/test_bad_input_*.py): every bad input gives one
clear line (or a specific exception), never a traceback, and never corrupts what is already on disk.

Each test file holds a table of rows, grouped by what they cover:
    test_bad_input_weights.py   model folders, safetensors/.bin/config.json files, OpenAI TF bundles, adapters
    test_bad_input_data.py      pretraining text and .bin token files, instruction data
    test_bad_input_cli.py       flags and impossible values, prompts longer than the context, --debug
    test_bad_input_runs.py      output folders, --resume, failures during training (NaN loss, full disk)
Each row builds one bad input under tmp_path, then runs a script's main(argv) in-process (train.py,
finetune.py, chat.py) or one library call, and check_row checks:
  * scripts: the exit code (1 for errors, 2 for argparse), exactly one `error:` line on stderr
    that contains the expected fragment, no "Traceback"; APIs: the exception type and a one-line
    message containing the fragment;
  * nothing corrupted: the files each row names as protected keep their bytes, and no temporary
    files (*.tmp, .tmp-step-*) are left anywhere under tmp_path;
  * optional row-specific checks (a pickle payload did not run, the last checkpoint still loads).
The README's "Troubleshooting" section lists the same rows (test_troubleshooting_table.py checks it).

Covered elsewhere (not repeated here): Ctrl-C during training saves a checkpoint and exits 130
(test_train.py::test_ctrl_c_saves_and_resumes); one kill -9 and exact resume
(test_train.py::test_resume_after_kill_is_exact); reader-level malformed instruction data
(test_instruct.py::test_malformed_data_names_file_and_line); TF index crc/truncation at the API
(test_checkpoint.py); adapter shape checks at the API (test_lora.py). kill -9 in the middle of a
checkpoint write, and the kill -9 loop (several SIGKILLs at seeded random moments, resumed each
time, bit-identical to an uninterrupted run): test_crash_resume.py.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import tf_bundle
import tiny
import torch
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.commands import train
from minigpt.methods.lora import add_lora, save_adapter
from minigpt.weights.keymap import minigpt_to_hf

ROOT = Path(__file__).resolve().parents[2]


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
TINY = tiny.train_flags(batch_size=2, log_interval=1, warmup_steps=1, precision="fp32", device="cpu")


class Evil:
    """Unpickling this calls open(path, "w"): creates a file. Safe loaders must never do that."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------------------
# Shared inputs (built once per session, read-only: rows copy what they change)
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


_SHARED: dict[str, Fx] = {}


def shared_fx(tmp_path_factory) -> Fx:
    """The inputs every bad-input test file uses, built on first use and shared by all of them."""
    if "fx" not in _SHARED:
        _SHARED["fx"] = _build_fx(tmp_path_factory.mktemp("reliability"))
    return _SHARED["fx"]


def _build_fx(root: Path) -> Fx:
    base = root / "base"
    tiny.gpt().save_pretrained(base)                       # torch.manual_seed(0), 2 layers x 64, context 64
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n"
                              for i in range(600)))
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in ("red", "green", "blue", "black", "white", "pink", "gold", "grey")))
    m = GPT.from_pretrained(base)
    add_lora(m, r=2, alpha=4, dropout=0.0, targets=("c_attn",))
    adapter = save_adapter(m, root / "adapter", base_model_name_or_path=str(base))
    small = tiny.gpt(vocab_size=500, seed=None)            # the RNG goes on from add_lora's draws
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
# The table: rows, and the check every row goes through
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


def _snapshot(paths) -> dict:
    snap = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            snap[str(f)] = f.read_bytes()
    return snap


def _temp_leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if re.search(r"(\.tmp$|^\.tmp-step-)", p.name)]


def check_row(row: Row, fx: Fx, tmp_path, monkeypatch, capsys) -> None:
    """Build the row's bad input, run it, and check the one-line message and the untouched files."""
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

