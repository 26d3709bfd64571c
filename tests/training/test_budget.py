"""train.py's time budget (minigpt.training.budget.TimeBudget): the step count fixed after measured warm-up
steps, recorded in run.json and the checkpoints; exact resume; --max-steps N reproduces it; the one re-plan
when the pace falls behind mid-run (fake clock)."""
import json
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from minigpt.commands import train
from minigpt.training.budget import BudgetMeasurement, TimeBudget, format_duration, parse_duration
from minigpt.training.config import TrainConfig, lr_at
from minigpt.training.trainer import Trainer

TINY = tiny.train_flags(n_layer=1, n_embd=32, batch_size=2, eval_batches=2, log_interval=1, precision="fp32",
                        device="cpu", dropout=0.1)
# what the patched measurement reports: 1 s so far, 0.25 s a step, 0.5 s an evaluation, 0.1 s a
# checkpoint, 0.2 s after training. With --time-budget 10s (9.2 s less the 8% margin) after 14
# steps: 1 + 0.25 (N - 14) + 2 x 0.5 + 2 x 0.1 + 0.2 <= 9.2  ->  N = 41, evaluations every 21 steps
# (plan() called directly after 8 steps: N = 35, every 18)
FIXED = BudgetMeasurement(elapsed_s=1.0, step_s=0.25, tok_per_s=256.0, eval_s=0.5, save_s=0.1, final_s=0.2)


SHIPPED_MARGIN = train.BUDGET_MARGIN


@pytest.fixture(autouse=True)
def worked_margin(monkeypatch):
    """The figures below are worked out for an 8% margin (TimeBudget's default); train.py's own
    margin is tested by test_train_margin_spans_the_quickstart_window."""
    monkeypatch.setattr(train, "BUDGET_MARGIN", 0.08)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "a.txt"
    f.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(2000)))
    return f


@pytest.fixture
def fixed_measurement(monkeypatch):
    """The decision made deterministic: the real probes run (they must leave the RNG and the model
    as they were: dropout is on), then the fixed figures are reported; and no re-plan, which would
    compare the fixed figures with the real clock (re-plans are tested on the fake clock below)."""
    real = TimeBudget.measure
    calls = []

    def measure(self, trainer, *a):
        real(self, trainer, *a)
        calls.append(trainer.step)
        return FIXED
    monkeypatch.setattr(TimeBudget, "measure", measure)
    monkeypatch.setattr(TimeBudget, "replan", lambda *a: None)
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


# --- the re-plan when the pace falls behind -------------------------------------------------------

def test_replan_only_when_behind_and_the_decay_still_ends_at_its_final_rate():
    cfg = TrainConfig(warmup_steps=4, eval_interval=10 ** 9, lr=1e-3)
    b = TimeBudget(10)
    d = b.plan(FIXED, 8, cfg, evaluates=False)      # 1 + 0.25 (N - 8) + 0.1 (last save) + 0.2 <= 9.2 -> N = 39
    n0 = d["chosen_max_steps"]
    assert n0 == 39 and b.replan_window() == (8 + 10, 3)            # checked from a third of the way on
    cfg.max_steps = n0
    before = [b.lr_at(s, cfg) for s in range(n0 + 1)]
    assert before == [lr_at(s, cfg) for s in range(n0 + 1)]         # no re-plan: exactly the config's schedule
    # at step 20, 4 s in: on pace, 4 + 19 x 0.25 + 0.3 = 9.05 s
    on_pace = BudgetMeasurement(elapsed_s=4.0, step_s=0.25, tok_per_s=256.0, save_s=0.1, final_s=0.2)
    assert b.replan(on_pace, 20, cfg, evaluates=False) is None and "replan" not in b.decision
    # the VM slowed down to 0.5 s a step: 4 + 19 x 0.5 + 0.3 = 13.8 s, past 10 s
    slow = BudgetMeasurement(elapsed_s=4.0, step_s=0.5, tok_per_s=128.0, save_s=0.1, final_s=0.2)
    r = b.replan(slow, 20, cfg, evaluates=False)
    n = b.decision["chosen_max_steps"]
    assert n == 29 and 4 + (n - 20) * 0.5 + 0.3 <= 9.2 < 4 + (n + 1 - 20) * 0.5 + 0.3
    assert (r["at_step"], r["max_steps_before"], r["projected_s"], r["expected_s"]) == (20, 39, 13.8, 8.8)
    assert b.replan(slow, 21, cfg, evaluates=False) is None and b.decision["chosen_max_steps"] == 29   # once
    after = [b.lr_at(s, cfg) for s in range(n + 1)]
    assert after[:21] == before[:21]                                 # unchanged up to the re-plan's step
    assert after[n] == pytest.approx(cfg.lr / 10) and after[n - 1] > after[n]   # the final rate at the new end
    assert all(x > y for x, y in zip(after[20:], after[21:]))       # still decaying, faster
    for s in range(20, n + 1):                                       # the old curve, stretched over 20..29
        assert after[s] == pytest.approx(lr_at(20 + (s - 20) * 19 / 9, cfg))
    assert "re-planned at step 20: 29 steps instead of 39" in b.describe_replan()


class FakeClock:
    """time.perf_counter for a whole run: it moves only when an optimizer step runs, by pace(step)
    seconds (step: the steps done before it), so the budget sees exactly the pace the test sets."""

    def __init__(self, pace):
        self.t, self.pace, self.start = 1000.0, pace, 1000.0

    def __call__(self):
        return self.t

    @property
    def elapsed(self):
        return self.t - self.start


@pytest.fixture
def fake_clock(monkeypatch):
    def install(pace):
        clock = FakeClock(pace)
        monkeypatch.setattr(time, "perf_counter", clock)
        real = Trainer.train_step

        def train_step(self):
            step = self.step
            out = real(self)
            clock.t += clock.pace(step)
            return out
        monkeypatch.setattr(Trainer, "train_step", train_step)
        return clock
    return install


def slows_down(step):
    return 0.25 if step < 20 else 0.5          # the VM halves its pace at step 20


# 10 s: after 14 steps at 0.25 s (probes take no time on this clock) N = 36 (3.5 + 22 x 0.25 = 9 <= 9.2),
# evaluations every 18 steps. Checked from step 21 on with the median of the last 3 steps: at step 22,
# 6 s + 14 x 0.5 s = 13 s is past 10 s -> N = 28 (6 + 6 x 0.5 = 9 <= 9.2)
SLOW = dict(n0=36, at=22, n=28)


def test_no_drift_changes_nothing(tmp_path, corpus, fake_clock):
    clock = fake_clock(lambda step: 0.25)
    budget, fixed = tmp_path / "budget", tmp_path / "fixed"
    assert train.main(["--data", str(corpus), "--out-dir", str(budget), "--time-budget", "10s", *TINY]) == 0
    b = json.loads((budget / "run.json").read_text())["budget"]
    assert (b["chosen_max_steps"], b["eval_interval"]) == (SLOW["n0"], 18) and "replan" not in b
    assert clock.elapsed == 9.0
    assert not [ln for ln in (budget / "metrics.jsonl").read_text().splitlines() if "replan" in ln]
    assert train.main(["--data", str(corpus), "--out-dir", str(fixed), "--max-steps", "36", "--eval-interval", "18",
                       *TINY]) == 0
    assert records(fixed) == records(budget) and same_weights(fixed, budget)


def test_slowdown_mid_run_replans_once_and_ends_within_budget(tmp_path, corpus, fake_clock, capsys):
    out, ref = tmp_path / "slow", tmp_path / "ref"
    clock = fake_clock(slows_down)
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--time-budget", "10s", *TINY]) == 0
    assert 0.9 * 10 <= clock.elapsed <= 10                         # without the re-plan: 13 s
    b = json.loads((out / "run.json").read_text())["budget"]
    r = b["replan"]
    assert (b["chosen_max_steps"], r["at_step"], r["max_steps_before"]) == (SLOW["n"], SLOW["at"], SLOW["n0"])
    assert (r["measured_step_s"], r["planned_step_s"], r["projected_s"], r["expected_s"]) == (0.5, 0.25, 13.0, 9.0)
    assert json.loads((out / "run.json").read_text())["train"]["max_steps"] == SLOW["n"]
    state = torch.load(out / "checkpoints" / f"step-{SLOW['n']:07d}" / "trainer_state.pt", weights_only=True)
    assert state["budget"]["replan"]["at_step"] == SLOW["at"]
    marks = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "replan" in ln]
    assert [m["step"] for m in marks] == [SLOW["at"]]
    text = capsys.readouterr().out
    assert "the pace fell behind (0.5s a step now, 0.25s planned; projected end 13s) -> re-planned at step 22: " \
           "28 steps instead of 36" in text and "re-planned at step 22 to 9.0s)" in text
    tr, va = records(out)
    assert [s for s, _, _ in tr] == list(range(1, SLOW["n"] + 1)) and [s for s, _ in va] == [18, SLOW["n"]]
    # up to the re-plan the run is the planned one (the same 36-step schedule), after it the decay is
    # stretched so that it reaches the final rate at the new end
    assert train.main(["--data", str(corpus), "--out-dir", str(ref), "--max-steps", "36", "--eval-interval", "18",
                       *TINY]) == 0
    ref_tr = records(ref)[0]
    assert tr[:SLOW["at"]] == ref_tr[:SLOW["at"]]
    cfg = TrainConfig(max_steps=SLOW["n0"], warmup_steps=20, lr=2e-3, schedule="linear")   # train.py's default
    k, n0, n = SLOW["at"], SLOW["n0"], SLOW["n"]
    for step, _, lr in tr[k:]:                                      # the lr logged at `step` is step - 1's
        assert lr == pytest.approx(lr_at(k + (step - 1 - k) * (n0 - k) / (n - k), cfg), rel=1e-12)
    assert tr[-1][2] > 0 and lr_at(n0, cfg) == 0.0                 # (linear decay reaches 0 at the end)


def speeds_up(step):
    return 0.25 if step < 20 else 0.125        # the warm-up was measured on a busy VM; it then doubles its pace


def test_speedup_mid_run_replans_upwards_and_ends_within_budget(tmp_path, corpus, fake_clock, capsys):
    """Measured at 0.25 s a step, planned N = 36 (9 s); from step 20 on 0.125 s: the run would end at
    7 s, 30% early. At step 22 (median of the last 3 steps 0.125 s): 5.25 s + 14 x 0.125 = 7 s < 8.4 s
    (1 - 2 x margin) -> N = 53 (5.25 + 31 x 0.125 = 9.125 <= 9.2), the decay stretched to the new end."""
    out = tmp_path / "fast"
    clock = fake_clock(speeds_up)
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--time-budget", "10s", *TINY]) == 0
    assert 0.9 * 10 <= clock.elapsed <= 10                         # without the re-plan: 7 s
    b = json.loads((out / "run.json").read_text())["budget"]
    r = b["replan"]
    assert (b["chosen_max_steps"], r["at_step"], r["max_steps_before"]) == (53, 22, SLOW["n0"])
    assert (r["measured_step_s"], r["projected_s"], r["expected_s"]) == (0.125, 7.0, 9.12)
    assert "well before 10s" in r["reason"]
    text = capsys.readouterr().out
    assert "the pace ran ahead (0.125s a step now, 0.25s planned; projected end 7.0s) -> re-planned at step " \
           "22: 53 steps instead of 36" in text
    tr, _ = records(out)
    assert [s for s, _, _ in tr] == list(range(1, 54))
    cfg = TrainConfig(max_steps=SLOW["n0"], warmup_steps=20, lr=2e-3, schedule="linear")   # train.py's default
    for step, _, lr in tr[22:]:
        assert lr == pytest.approx(lr_at(22 + (step - 1 - 22) * (36 - 22) / (53 - 22), cfg), rel=1e-12)
    assert tr[-1][2] > 0


def test_replanned_run_resumes_exactly(tmp_path, corpus, fake_clock, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "cut"
    flags = ["--data", str(corpus), "--time-budget", "10s", *TINY]
    fake_clock(slows_down)
    assert train.main(["--out-dir", str(ref), *flags]) == 0
    with monkeypatch.context() as m:
        _interrupt_at(m, 24)                                       # stops after step 25, past the re-plan
        assert train.main(["--out-dir", str(out), *flags]) == 130
    state = torch.load(out / "checkpoints" / "step-0000025" / "trainer_state.pt", weights_only=True)
    assert state["budget"]["replan"]["at_step"] == SLOW["at"]
    monkeypatch.setattr(TimeBudget, "replan", lambda *a: pytest.fail("a resumed session re-planned"))
    assert train.main(["--out-dir", str(out), "--resume", *flags]) == 0
    assert records(out) == records(ref) and same_weights(out, ref)
    assert json.loads((out / "run.json").read_text())["budget"]["chosen_max_steps"] == SLOW["n"]


def test_train_margin_spans_the_quickstart_window():
    """train.py plans to end at 95% of its budget and re-plans (once) when the pace would end the run
    past the budget or before 90% of it: a 5-minute run ends within 4m30s-5m unless the pace drifts
    again after the re-plan."""
    assert SHIPPED_MARGIN == 0.05
    b = TimeBudget(300, margin=SHIPPED_MARGIN)
    cfg = TrainConfig(warmup_steps=20, eval_interval=10 ** 9)
    m = BudgetMeasurement(elapsed_s=5.0, step_s=0.3, tok_per_s=6800.0, save_s=2.0, final_s=1.0)
    d = b.plan(m, 14, cfg, evaluates=False)
    assert 0.94 * 300 <= d["expected_s"] <= 0.95 * 300
    n0 = d["chosen_max_steps"]

    def projected_at(step_s):           # where the run would end at this pace, from step 300
        return 5.0 + 300 * 0.3 + (n0 - 300) * step_s + 2 * 2.0 + 1.0
    quick, slightly_quick = 0.3 * 0.85, 0.3 * 0.96
    assert projected_at(quick) < 270 < projected_at(slightly_quick)
    for step_s, replans in [(slightly_quick, False), (quick, True)]:
        b2 = TimeBudget(300, margin=SHIPPED_MARGIN, decision=dict(d))
        now = BudgetMeasurement(elapsed_s=5.0 + 300 * 0.3, step_s=step_s, tok_per_s=6800.0, save_s=2.0, final_s=1.0)
        r = b2.replan(now, 300, replace(cfg, max_steps=n0), evaluates=False)
        assert (r is not None) == replans
        if replans:
            assert b2.decision["chosen_max_steps"] > n0 and 270 < r["expected_s"] <= 0.95 * 300
