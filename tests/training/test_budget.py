"""train.py's time budget (minigpt.training.budget.TimeBudget): the step count fixed after measured warm-up
steps, recorded in run.json and the checkpoints; exact resume; --max-steps N reproduces it."""
import json
import os
import signal
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from minigpt.commands import train
from minigpt.training.budget import BudgetMeasurement, TimeBudget, format_duration, parse_duration
from minigpt.training.config import TrainConfig
from minigpt.training.trainer import Trainer

TINY = tiny.train_flags(n_layer=1, n_embd=32, batch_size=2, eval_batches=2, log_interval=1, precision="fp32",
                        device="cpu", dropout=0.1)
# what the patched measurement reports: 1 s so far, 0.25 s a step, 0.5 s an evaluation, 0.1 s a
# checkpoint, 0.2 s after training. With --time-budget 10s (9.2 s less the 8% margin) after 14
# steps: 1 + 0.25 (N - 14) + 2 x 0.5 + 2 x 0.1 + 0.2 <= 9.2  ->  N = 41, evaluations every 21 steps
# (plan() called directly after 8 steps: N = 35, every 18)
FIXED = BudgetMeasurement(elapsed_s=1.0, step_s=0.25, tok_per_s=256.0, eval_s=0.5, save_s=0.1, final_s=0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "a.txt"
    f.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(2000)))
    return f


@pytest.fixture
def fixed_measurement(monkeypatch):
    """The decision made deterministic: the real probes run (they must leave the RNG and the model
    as they were: dropout is on), then the fixed figures are reported."""
    real = TimeBudget.measure
    calls = []

    def measure(self, trainer, *a):
        real(self, trainer, *a)
        calls.append(trainer.step)
        return FIXED
    monkeypatch.setattr(TimeBudget, "measure", measure)
    return calls


def records(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"], r["lr"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def same_weights(a, b):
    a, b = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parse_and_format_duration():
    assert [parse_duration(x) for x in ("5m", "300s", "300", "1.5m", "1h", " 2 min ", ".5s")] == \
        [300, 300, 300, 90, 3600, 120, 0.5]
    for bad in ("", "5x", "0", "-5m", "m", "inf", "nan", "1e3"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [format_duration(x) for x in (3.21, 45.2, 288, 3725)] == ["3.2s", "45s", "4m48s", "1h02m05s"]


def test_decision_point_stays_inside_the_warmup():
    b = TimeBudget(300)
    assert b.decide_at(TrainConfig(warmup_steps=20)) == 14         # steps 3..14 measured
    assert b.decide_at(TrainConfig(warmup_steps=3)) == 4           # lr of steps 0..3: no max_steps in it
    assert b.decide_at(TrainConfig(warmup_steps=0)) == 1
    assert b.decide_at(TrainConfig(warmup_steps=0, schedule="constant")) == 14


def test_plan_fits_the_budget_with_evaluations_and_saves():
    cfg = TrainConfig(warmup_steps=20, eval_interval=10 ** 9)
    b = TimeBudget(10, evaluations=2)
    d = b.plan(FIXED, 8, cfg, evaluates=True)
    assert (d["chosen_max_steps"], d["eval_interval"], d["evaluations"], d["checkpoints"]) == (35, 18, 2, 2)
    assert d["expected_s"] == pytest.approx(9.15) and "2 evaluations" in d["reason"]
    assert "256 tok/s measured -> 35 steps (expected end 9.2s incl. 2 evaluations, every 18 steps)" in b.describe()
    # an explicit eval interval is kept, and its evaluations are paid for: every 4 steps from step 8
    d = TimeBudget(10).plan(FIXED, 8, TrainConfig(eval_interval=4), evaluates=True)
    def events(n):                    # steps 8..n that are multiples of 4, and the last one
        return sum(1 for s in range(8, n + 1) if s % 4 == 0 or s == n)

    def cost(n):                      # an evaluation (0.5 s) and a checkpoint (0.1 s) at each
        return 1 + 0.25 * (n - 8) + 0.6 * events(n) + 0.2
    n = d["chosen_max_steps"]
    assert d["eval_interval"] == 4 and d["evaluations"] == events(n) and cost(n) <= 9.2 < cost(n + 1)
    # without evaluation the steps take their place; a long budget gives many steps
    assert TimeBudget(10).plan(FIXED, 8, cfg, evaluates=False)["chosen_max_steps"] > 35
    assert TimeBudget(3600).plan(FIXED, 8, cfg, evaluates=True)["chosen_max_steps"] > 13000
    # nothing fits after the measured steps: stop there (never below the steps already run)
    b = TimeBudget(2, evaluations=2)
    d = b.plan(FIXED, 8, cfg, evaluates=True)
    assert d["chosen_max_steps"] == 8 and "no further step fits -> stopping at step 8" in b.describe()
    # a short budget never chooses fewer than one more step when one fits
    d = TimeBudget(3, evaluations=2).plan(FIXED, 8, cfg, evaluates=False)
    assert d["chosen_max_steps"] >= 9 and d["eval_interval"] >= 9


def test_budget_run_records_its_decision_and_max_steps_reproduces_it(tmp_path, corpus, capsys, fixed_measurement):
    budget, fixed = tmp_path / "budget", tmp_path / "fixed"
    assert train.main(["--data", str(corpus), "--out-dir", str(budget), "--time-budget", "10s", *TINY]) == 0
    out = capsys.readouterr().out
    assert "time budget 10s: 256 tok/s measured -> 41 steps (expected end 9.2s incl. 2 evaluations" in out
    assert "time budget 10s: 41 steps in " in out                   # the final line
    assert fixed_measurement == [14]
    info = json.loads((budget / "run.json").read_text())
    b = info["budget"]
    assert (b["seconds"], b["chosen_max_steps"], b["eval_interval"], b["decided_at_step"]) == (10.0, 41, 21, 14)
    assert {"measured_step_s", "tok_per_s", "eval_s", "reason", "expected_s"} <= b.keys()
    assert info["train"]["max_steps"] == 41 and info["train"]["eval_interval"] == 21
    tr, va = records(budget)
    assert [s for s, _, _ in tr] == list(range(1, 42)) and [s for s, _ in va] == [21, 41]
    assert sorted(p.name for p in (budget / "checkpoints").iterdir()) == ["step-0000021", "step-0000041"]
    state = torch.load(budget / "checkpoints" / "step-0000041" / "trainer_state.pt", weights_only=True)
    assert state["budget"]["chosen_max_steps"] == 41
    # the same flags with --max-steps 41 (and the chosen interval): the same run, bit for bit
    assert train.main(["--data", str(corpus), "--out-dir", str(fixed), "--max-steps", "41", "--eval-interval", "21",
                       *TINY]) == 0
    assert "budget" not in json.loads((fixed / "run.json").read_text())
    assert records(fixed) == records(budget) and same_weights(fixed, budget)


def _interrupt_at(monkeypatch, step):
    """Ctrl-C during optimizer step `step` (0-based): the run stops after it and saves."""
    real = Trainer.train_step

    def train_step(self):
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.parametrize("cut", [17, 4])     # after the decision; before it (the resumed run decides)
def test_interrupted_budget_run_resumes_exactly(tmp_path, corpus, monkeypatch, fixed_measurement, cut):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    flags = ["--data", str(corpus), "--time-budget", "10s", "--save-interval", "5", *TINY]
    assert train.main(["--out-dir", str(ref), *flags]) == 0
    n = json.loads((ref / "run.json").read_text())["budget"]["chosen_max_steps"]
    assert n == 39              # (checkpoints at 15, 20, .., 39 cost 0.4 s more than at 21 and 41: 41)
    with monkeypatch.context() as m:
        _interrupt_at(m, cut - 1)
        assert train.main(["--out-dir", str(out), *flags]) == 130
    state = torch.load(out / "checkpoints" / f"step-{cut:07d}" / "trainer_state.pt", weights_only=True)
    assert state["budget"].get("chosen_max_steps") == (n if cut > 14 else None)
    if cut > 14:     # a decided run never measures again, whatever the clock says now
        monkeypatch.setattr(TimeBudget, "plan", lambda *a: pytest.fail("decided twice"))
    assert train.main(["--out-dir", str(out), "--resume", *flags]) == 0
    assert records(out) == records(ref) and same_weights(out, ref)
    assert json.loads((out / "run.json").read_text())["budget"]["chosen_max_steps"] == n


def test_resume_without_max_steps_continues_a_fixed_run(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "fixed"
    flags = ["--data", str(corpus), "--out-dir", str(out), "--eval-interval", "4", *TINY]
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)
        assert train.main(["--max-steps", "10", *flags]) == 130
    monkeypatch.setattr(TimeBudget, "measure", lambda *a: pytest.fail("a fixed run is not measured"))
    assert train.main(["--resume", *flags]) == 0                    # no --max-steps: the run's own 10
    assert [s for s, _, _ in records(out)[0]] == list(range(1, 11))
    assert "continuing the run's decision at step 5: 10 steps" in capsys.readouterr().out


def test_real_clock_budget_run(tmp_path, corpus, capsys):
    out = tmp_path / "real"
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--time-budget", "4s", *TINY]) == 0
    b = json.loads((out / "run.json").read_text())["budget"]
    assert b["chosen_max_steps"] >= 14 and b["measured_step_s"] > 0 and b["tok_per_s"] > 0
    if b["chosen_max_steps"] > 14:
        assert b["expected_s"] <= 4 * 0.92
    assert len(records(out)[0]) == b["chosen_max_steps"]
    assert not list(out.glob(".budget-probe-*"))                    # the save probe left nothing
    assert "time budget 4s: " in capsys.readouterr().out


def test_ddp_ranks_follow_rank_zeros_decision(tmp_path, corpus):
    """Under torchrun each rank times its own steps; rank 0's decision is the one all of them run."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(root / "train.py"), "--data", str(corpus), "--out-dir", str(out), "--time-budget", "6s",
                        "--grad-accum", "2", *TINY], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    b = json.loads((out / "run.json").read_text())["budget"]
    assert len(records(out)[0]) == b["chosen_max_steps"] >= 14
    assert (out / "checkpoints" / f"step-{b['chosen_max_steps']:07d}").is_dir()
