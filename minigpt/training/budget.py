"""The time budget of a training run: `TimeBudget` ends a run within a wall-clock limit by fixing
max_steps after a few measured warm-up steps (the Trainer measures, the budget plans), re-planning
once if the pace falls behind mid-run, and the duration text of the --time-budget flag
(`parse_duration`, `format_duration`).

    budget = TimeBudget(parse_duration("5m"))            # Trainer(..., budget=budget)
"""
from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from .config import TrainConfig, lr_at

__all__ = ["TimeBudget", "BudgetMeasurement", "parse_duration", "format_duration"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|m|min|h)?\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(text) -> float:
    """Seconds of a duration: "300", "300s", "5m", "1.5m", "1h". ValueError if it is not a positive one."""
    m = _DURATION.match(str(text))
    seconds = float(m.group(1)) * _UNIT_S[(m.group(2) or "s").lower()] if m else float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"not a positive duration: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """3.2s, 45s, 4m48s, 1h02m05s."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _events(done: int, n: int, every: int) -> int:
    """How many of steps done..n (the decision is made before step `done`'s evaluation and save)
    are multiples of `every`, plus the last step n when it is not one."""
    return n // every - (done - 1) // every + (n % every != 0)


def _timed(fn: Callable) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class BudgetMeasurement:
    """What a TimeBudget decides from, in seconds."""

    elapsed_s: float        # since the budget's clock started: setup, the steps so far, the probes
    step_s: float           # one optimizer step
    tok_per_s: float
    eval_s: float = 0.0     # one evaluation, with its sample and best/ save
    save_s: float = 0.0     # one checkpoint
    final_s: float = 0.0    # what the caller does after fit (e.g. the final samples)


@dataclass
class TimeBudget:
    """End a run within `seconds` of wall time, counted from `start` (default: when this is made).

    After `decide_at(cfg)` steps, all inside the warm-up (whose learning rates do not depend on
    max_steps; the first `skip` are not timed: allocation, compilation), the Trainer fixes
    max_steps N: the largest N whose measured cost (steps left x step time, plus the evaluations and
    checkpoints N implies, plus `final_cost(model)`) ends within the budget less `margin`. The decay then
    runs over N exactly as with max_steps=N from the start. The decision (`decision`) is recorded in
    run.json ("budget") and in every checkpoint, so resume continues with the same N.

    Re-plan: from `replan_from` of the way through the planned steps, the Trainer projects the end
    at the current pace (the median step time of the last tenth of the planned steps, at least 3)
    after every step. The first time it lands past the budget (the VM slowed down), or short of it by
    more than twice the margin (the VM sped up: e.g. the warm-up steps were measured while another job
    ran), N is chosen again as above from what is measured now, once. The decay keeps its shape:
    from the re-plan's step k on, step s runs the learning rate the old schedule gives
    k + (s - k)(N - k)/(N' - k), which is continuous at k and reaches the final rate at the new end
    N'. The decision then holds N' and a "replan" record (in run.json, the checkpoints and
    metrics.jsonl), so resume continues the same schedule; a resumed session does not re-plan (its
    clock does not see the earlier sessions).

    evaluations: pick eval_interval so the run evaluates this many times (ceil(N / evaluations));
        None keeps cfg.eval_interval.
    eval_cost(model) -> seconds of one evaluation (e.g. one batch timed x the batch count); None:
        the Trainer times one evaluation (its result is discarded).
    final_cost(model) -> seconds the caller spends after fit (samples, ...).
    """

    seconds: float
    label: str = ""
    margin: float = 0.08
    skip: int = 2
    steps: int = 12
    evaluations: Optional[int] = None
    eval_cost: Optional[Callable] = None
    final_cost: Optional[Callable] = None
    start: float = field(default_factory=lambda: time.perf_counter())
    decision: Optional[dict] = None
    resumed: bool = False
    replan_from: float = 1 / 3

    def __post_init__(self):
        self.label = self.label or format_duration(self.seconds)

    def decide_at(self, cfg: TrainConfig) -> int:
        """The step after which N is fixed: steps 0..warmup_steps have learning rates independent of N."""
        n = self.skip + self.steps
        return n if cfg.schedule == "constant" else max(1, min(n, cfg.warmup_steps + 1))

    def measure(self, trainer, steps: list, evals: list, saves: list) -> BudgetMeasurement:
        """Time what the plan needs (rank 0; `trainer`: the Trainer): `steps` (seconds, tokens) of
        this session's steps, `evals` / `saves` the seconds of the evaluations and checkpoints so
        far. What is not measured yet is probed without side effects (RNG state and model mode are
        restored)."""
        kept = steps[min(self.skip, len(steps) // 2):]
        busy = sum(t for t, _ in kept)
        model, dev = trainer.model, trainer.device
        was_training = model.training
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):
            weights_s = _timed(lambda: _probe_save(trainer))
            eval_s = 0.0
            if trainer.evaluate_fn is not None:
                eval_s = sum(evals) / len(evals) if evals else (
                    self.eval_cost(model) if self.eval_cost else _timed(lambda: trainer.evaluate_fn(model))
                ) + weights_s + (_timed(lambda: trainer.sample_fn(model)) if trainer.sample_fn else 0.0)
            final_s = self.final_cost(model) if self.final_cost else 0.0
        model.train(was_training)
        save_s = sum(saves) / len(saves) if saves else 4 * weights_s    # weights twice + the optimizer's 2x
        return BudgetMeasurement(time.perf_counter() - self.start, busy / len(kept),
                                 sum(n for _, n in kept) / max(busy, 1e-9), eval_s, save_s, final_s)

    def plan(self, m: BudgetMeasurement, done: int, cfg: TrainConfig, evaluates: bool) -> dict:
        """Fix N (>= done + 1; `done` when not even that fits) from measurement `m` after `done`
        steps; sets and returns `decision`."""
        limit = self.seconds * (1 - self.margin)

        def interval(n):
            return max(-(-n // self.evaluations), done + 1) if self.evaluations else cfg.eval_interval

        cost = _cost(m, done, evaluates, interval, cfg.save_interval)
        n = _fit(cost, m, done, limit)
        expected, evals, saves = cost(n)
        if n > done:
            reason = (f"{m.elapsed_s:.3g}s so far + {n - done} steps x {m.step_s:.3g}s + {evals} evaluations x "
                      f"{m.eval_s:.3g}s + {saves} checkpoints x {m.save_s:.3g}s + {m.final_s:.3g}s after training "
                      f"= {expected:.4g}s, within {self.seconds:.4g}s less {self.margin:.0%}")
        else:
            reason = (f"setup and the first {done} steps took {m.elapsed_s:.3g}s: one more step would end at "
                      f"{cost(done + 1)[0]:.4g}s, past {self.seconds:.4g}s less {self.margin:.0%}")
        self.decision = {
            "seconds": self.seconds, "given": self.label, "decided_at_step": done, "elapsed_s": round(m.elapsed_s, 3),
            "measured_step_s": round(m.step_s, 5), "tok_per_s": round(m.tok_per_s, 1), "eval_s": round(m.eval_s, 4),
            "save_s": round(m.save_s, 4), "final_s": round(m.final_s, 4), "margin": self.margin,
            "chosen_max_steps": n, "eval_interval": interval(n), "evaluations": evals, "checkpoints": saves,
            "expected_s": round(expected, 2), "reason": reason}
        return self.decision

    def describe(self) -> str:
        """The line that says what was chosen and why."""
        d = self.decision
        if self.resumed:
            return (f"time budget {d['given']}: continuing the run's decision at step {d['decided_at_step']}: "
                    f"{d['chosen_max_steps']:,} steps")
        if d["chosen_max_steps"] <= d["decided_at_step"]:
            return (f"time budget {d['given']}: setup and the first {d['decided_at_step']} steps took "
                    f"{format_duration(d['elapsed_s'])}; no further step fits -> stopping at step "
                    f"{d['chosen_max_steps']} (give a longer budget or a fixed step count)")
        return (f"time budget {d['given']}: {d['tok_per_s']:,.0f} tok/s measured -> {d['chosen_max_steps']:,} steps "
                f"(expected end {format_duration(d['expected_s'])} incl. {d['evaluations']} evaluations, "
                f"every {d['eval_interval']:,} steps)")

    def replan_window(self) -> tuple[int, int]:
        """(the first step after which the pace is checked, how many recent steps measure it)."""
        d = self.decision
        span = int(d["chosen_max_steps"]) - int(d["decided_at_step"])
        return int(d["decided_at_step"]) + max(1, int(span * self.replan_from)), max(3, span // 10)

    def pace(self, step_times: list, evals: list, saves: list) -> BudgetMeasurement:
        """The measurement a re-plan uses: the median of `step_times` (recent steps), the mean
        evaluation and checkpoint seconds so far (the decision's estimates before the first)."""
        d = self.decision
        ts = sorted(step_times)
        mid = len(ts) // 2
        step_s = ts[mid] if len(ts) % 2 else (ts[mid - 1] + ts[mid]) / 2
        tokens_per_step = d.get("tok_per_s", 0.0) * d.get("measured_step_s", 0.0)
        return BudgetMeasurement(time.perf_counter() - self.start, step_s, tokens_per_step / max(step_s, 1e-9),
                                 sum(evals) / len(evals) if evals else d.get("eval_s", 0.0),
                                 sum(saves) / len(saves) if saves else d.get("save_s", 0.0), d.get("final_s", 0.0))

    def replan(self, m: BudgetMeasurement, done: int, cfg: TrainConfig, evaluates: bool) -> Optional[dict]:
        """After `done` steps: if the run's end projected from `m` (at the current max_steps and
        eval/save intervals of `cfg`) is past the budget, or before seconds x (1 - 2 margin), fix N
        again as `plan` does (fewer steps when behind, more when ahead) and record it in `decision`
        ("replan"); returns that record, or None."""
        d = self.decision
        n0 = int(d["chosen_max_steps"])
        cost = _cost(m, done, evaluates, lambda n: cfg.eval_interval, cfg.save_interval)
        projected = cost(n0)[0]
        behind, ahead = projected > self.seconds, projected < self.seconds * (1 - 2 * self.margin)
        if d.get("replan") is not None or not (behind or ahead):
            return None
        n = _fit(cost, m, done, self.seconds * (1 - self.margin))
        n = min(n0, n) if behind else max(n0, n)
        if n == n0:
            return None
        expected = cost(n)[0]
        d["replan"] = {
            "at_step": done, "max_steps_before": n0, "elapsed_s": round(m.elapsed_s, 3),
            "measured_step_s": round(m.step_s, 5), "planned_step_s": d.get("measured_step_s"),
            "projected_s": round(projected, 2), "expected_s": round(expected, 2),
            "reason": f"at step {done}: {m.elapsed_s:.3g}s so far + {n0 - done} steps x {m.step_s:.3g}s (now) "
                      f"would end at {projected:.4g}s, {'past' if behind else 'well before'} {self.seconds:.4g}s; "
                      f"{n - done} more steps end at {expected:.4g}s"}
        d["chosen_max_steps"] = n
        return d["replan"]

    def follow_replan(self, done: int, n: int) -> None:
        """A DDP rank other than 0: rank 0 re-planned after `done` steps to N = `n`."""
        d = self.decision
        d["replan"] = {"at_step": done, "max_steps_before": int(d["chosen_max_steps"])}
        d["chosen_max_steps"] = n

    def describe_replan(self) -> str:
        r, d = self.decision["replan"], self.decision
        how = "fell behind" if d["chosen_max_steps"] < r["max_steps_before"] else "ran ahead"
        return (f"time budget {d['given']}: the pace {how} ({r['measured_step_s']:.3g}s a step now, "
                f"{r['planned_step_s']:.3g}s planned; projected end {format_duration(r['projected_s'])}) -> "
                f"re-planned at step {r['at_step']:,}: {d['chosen_max_steps']:,} steps instead of "
                f"{r['max_steps_before']:,} (expected end {format_duration(r['expected_s'])})")

    def lr_at(self, step: float, cfg: TrainConfig) -> float:
        """The learning rate of step `step`: minigpt.training.config.lr_at, with the decay stretched
        over the steps left after a re-plan (see the class docstring); exactly lr_at without one."""
        r = (self.decision or {}).get("replan")
        if r is None:
            return lr_at(step, cfg)
        k, n0, n1 = r["at_step"], r["max_steps_before"], int(self.decision["chosen_max_steps"])
        if step > k:
            step = k + (step - k) * (n0 - k) / max(n1 - k, 1)
        return lr_at(step, replace(cfg, max_steps=n0))

    def summary(self, step: int) -> str:
        """The final line: elapsed time against the budget."""
        elapsed = time.perf_counter() - self.start
        over = f", {format_duration(elapsed - self.seconds)} over" if elapsed > self.seconds else ""
        r = (self.decision or {}).get("replan")
        planned = "" if self.resumed or not self.decision else \
            f" (planned {format_duration(self.decision['expected_s'])}" + (
                f", re-planned at step {r['at_step']:,} to {format_duration(r['expected_s'])})" if r else ")")
        return (f"time budget {self.label}: {step:,} steps in {format_duration(elapsed)}"
                f"{' this session' if self.resumed else ''}{planned}{over}")

    def restore(self, state: dict) -> None:
        """From a checkpoint's state: its decision (resume keeps N); one of a run with a fixed step
        count continues with that count; a pending one is decided again."""
        d = state.get("budget")
        if d is None:
            c = state.get("config", {})
            d = {"seconds": self.seconds, "given": self.label, "decided_at_step": state.get("step", 0),
                 "chosen_max_steps": c["max_steps"], "eval_interval": c["eval_interval"],
                 "reason": "resumed a run with a fixed step count"}
        if d.get("chosen_max_steps") is not None:
            self.decision, self.resumed = dict(d), True


def _cost(m: BudgetMeasurement, done: int, evaluates: bool, interval: Callable[[int], int],
          save_interval: Optional[int]) -> Callable[[int], tuple]:
    """cost(n) -> (seconds at the end of a run of n steps, evaluations, checkpoints) from `done` on."""
    def cost(n):
        evals = _events(done, n, interval(n)) if evaluates else 0
        saves = _events(done, n, save_interval or interval(n))
        return m.elapsed_s + (n - done) * m.step_s + evals * m.eval_s + saves * m.save_s + m.final_s, evals, saves
    return cost


def _fit(cost: Callable[[int], tuple], m: BudgetMeasurement, done: int, limit: float) -> int:
    """The largest n > done with cost(n) <= limit (cost grows with n); `done` when none."""
    n = done + 1
    if cost(n)[0] > limit:
        return done
    hi = n + int(min(1e9, max(0.0, limit - m.elapsed_s) / max(m.step_s, 1e-9)))
    while n < hi:
        mid = (n + hi + 1) // 2
        n, hi = (mid, hi) if cost(mid)[0] <= limit else (n, mid - 1)
    return n


def _probe_save(trainer) -> None:
    d = trainer.out_dir / f".budget-probe-{os.getpid()}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        trainer.save_weights(trainer.model, d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
