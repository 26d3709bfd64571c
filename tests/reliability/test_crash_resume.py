"""kill -9 and resume: SIGKILL in the middle of a checkpoint write leaves the previous checkpoint
and the top-level model loadable, and --resume finishes the run; the kill -9 loop (several SIGKILLs at
seeded random moments, resumed each time) ends bit-identical to an uninterrupted run.

Ctrl-C and a single kill -9 are covered in test_train.py; bad --resume inputs in test_bad_input_runs.py.
"""
from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bad_input import ROOT, TINY, Fx, shared_fx
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.training.runs import STATE_FILE, latest_checkpoint


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return shared_fx(tmp_path_factory)


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
