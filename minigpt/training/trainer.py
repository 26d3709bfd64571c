"""The one training loop, shared by pretraining (`minigpt train`) and fine-tuning (`minigpt finetune`).

AdamW (or Muon on the hidden matrices: minigpt.training.optim) with decoupled weight decay on matrices
only, the learning-rate schedule of the run's TrainConfig (minigpt.training.config), gradient
accumulation and clipping, mixed precision (CUDA bf16/fp16, CPU bf16), optional torch.compile, DDP
under torchrun, periodic evaluation, JSONL metrics, atomic checkpoints and exact resume (batches
are a pure function of the step; RNG, optimizer and scaler state are saved), and an optional time
budget (minigpt.training.budget.TimeBudget): the step count fixed after a few measured warm-up steps.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..device import autocast, peak_flops, process_rank, resolve_device, resolve_precision
from ..errors import CheckpointError, ConfigError, TrainingStopped
from ..fileio import atomic_write_json
from .budget import TimeBudget
from .config import TrainConfig, lr_at
from .loss import CausalLMLoss
from .optim import make_adamw, make_optimizer, param_groups  # noqa: F401 (re-exported)
from .runs import CKPT_DIR, METRICS_FILE, RUN_INFO, STATE_FILE, latest_checkpoint

__all__ = ["Trainer", "flops_per_token"]

IGNORE_INDEX = -100          # labels that are not trained on (padding, masked prompts)


def flops_per_token(model) -> float:
    """6N + 12·L·H·Q·T (PaLM appendix B accounting) for a GPT-like model."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


class _DeferredInterrupt:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step; a second one
    interrupts at once. Only installed in the main thread."""

    def __init__(self):
        self.requested, self._old = False, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("stopping after this step (Ctrl-C again to abort now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _ddp_info() -> tuple[int, int, int]:
    return process_rank(), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _metric_step(line: str) -> Optional[int]:
    """The step of one metrics.jsonl line; None for a blank or torn line (e.g. after a crash)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec.get("step", 0) if isinstance(rec, dict) else None


class Trainer:
    """Runs `cfg.max_steps` optimizer steps on `model`.

    data: a dataset with `batch(step, micro) -> (x, y, n_tokens[, kwargs])` (TokenDataset,
        InstructionDataset; or such a function): micro-batch `micro` of optimizer step `step`,
        where micro indices run over all ranks (rank r, local micro m -> r * local_accum + m), so a
        2-process run sees the same data as 1 process with 2x accum. n_tokens, the real
        (non-padding) tokens of the batch, is what tok_per_s and MFU count; (x, y) pairs count
        x.numel(). kwargs (packed batches: {"pos", "mask"}) go to the loss module's forward.
    evaluate(model) -> dict of metrics including "val_loss" (rank 0 only); None: no evaluation
        (and no best/ folder).
    save_weights(model, dir) / load_weights(model, dir): how the model's trainable state is
        persisted (full weights for pretraining, the adapter for LoRA).
    sample(model) -> str, optional, printed at each evaluation.
    loss_module: nn.Module with forward(x, y, **kwargs) -> mean loss over the labels y != -100
        (default: fused head + cross-entropy; the step's loss weights it by its label count, or by
        loss_module.count_labels(y) where it has one: a preference loss counts pairs); its optional
        pop_metrics() -> dict is added to each metrics record (DPO's rewards/...);
        kept unwrapped as `self.loss_module` (evaluations can reuse it and its scratch buffers),
        wrapped by compile / DDP as `self.fwd_model`.
    budget: a TimeBudget: cfg.max_steps (and, with budget.evaluations, cfg.eval_interval) is then
        decided after a few measured warm-up steps instead of taken from cfg.
    spelling: a minigpt.training.spelling.Spelling over the model's embedding: its parameter is
        stepped with the rest and folded into the embedding after every step.
    """

    def __init__(self, model, cfg: TrainConfig, data, evaluate: Optional[Callable],
                 save_weights: Callable, load_weights: Callable, sample: Optional[Callable] = None,
                 run_info: Optional[dict] = None, loss_module: Optional[torch.nn.Module] = None,
                 quiet: bool = False, budget: Optional[TimeBudget] = None, spelling=None):
        self.cfg, self.budget, self.get_batch, self.evaluate_fn = cfg, budget, getattr(data, "batch", data), evaluate
        self.save_weights, self.load_weights, self.sample_fn = save_weights, load_weights, sample
        self.quiet, self.run_info = quiet, run_info or {}
        self.rank, self.local_rank, self.world = _ddp_info()
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            dist.init_process_group(backend)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        if cfg.grad_accum % self.world:
            raise ConfigError(f"--grad-accum ({cfg.grad_accum}) must be a multiple of the number of "
                              f"processes ({self.world})")
        self.local_accum = cfg.grad_accum // self.world
        if getattr(data, "grad_accum", cfg.grad_accum) != cfg.grad_accum:
            raise ConfigError(f"the dataset was made for grad_accum {data.grad_accum}, the run uses {cfg.grad_accum}")
        self.out_dir = Path(cfg.out_dir)
        self.is_main = self.rank == 0
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.model = model.to(self.device)  # master weights stay fp32; autocast does the rest
        self.spelling = None if spelling is None else spelling.to(self.device)
        self.optimizer = make_optimizer(self.model, cfg.optimizer, cfg.lr, cfg.weight_decay,
                                        (cfg.beta1, cfg.beta2), cfg.muon_lr,
                                        self.spelling.param_groups() if self.spelling else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step, self.best_val, self.bad_steps = 0, float("inf"), 0
        # the unit that computes the loss is what compile and DDP wrap: forward(x, y) -> loss
        # (compiled on a GPU, the plain head + cross-entropy fuses best; the chunked, fused loss is
        # for CPUs, where the full logits cost most of a small model's step)
        fused = not (cfg.compile and self.device.type == "cuda")
        self.loss_module = (loss_module or CausalLMLoss(self.model, fused=fused)).to(self.device)
        self.fwd_model = self.loss_module
        if cfg.compile:
            self.fwd_model = torch.compile(self.fwd_model)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.fwd_model = DDP(self.fwd_model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.flops_tok = flops_per_token(self.model)
        self.peak = peak_flops(self.device)

    # --- precision --------------------------------------------------------------------------
    def autocast(self):
        return autocast(self.precision, self.device)

    # --- checkpoints --------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        st = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def save_checkpoint(self) -> Optional[Path]:
        """Write out_dir/checkpoints/step-N atomically (temp folder + rename); rank 0 only."""
        if not self.is_main:
            return None
        root = self.out_dir / CKPT_DIR
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            self.save_weights(self.model, tmp)
            state = {
                "step": self.step, "best_val": self.best_val, "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": self._rng_state(), "config": asdict(self.cfg),
            }
            if self.budget is not None:
                state["budget"] = self.budget.decision or {"pending": True}   # (decided again on resume)
            state["spelling"] = self.spelling is not None
            if self.spelling is not None:
                state["spelling_total"] = self.spelling.total
            torch.save(state, tmp / STATE_FILE)
            for f in tmp.iterdir():  # make the data durable before the rename publishes it
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        except BaseException as e:  # e.g. disk full: drop the half-written folder, keep the old ones
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise OSError(e.errno, f"could not write checkpoint {final.name} ({e.strerror or e}); "
                                       f"the previous checkpoints in {root} are intact") from e
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # the model at the top of out_dir is always the latest; keep the last N checkpoints
        self.save_weights(self.model, self.out_dir)
        steps = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: int(p.name[5:]))
        for old in steps[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

    def resume(self) -> bool:
        """Continue from the newest checkpoint in out_dir, if any. Returns whether it did."""
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            return False
        self.load_weights(self.model, ckpt)
        try:
            state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0].split(". ")[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{ckpt / STATE_FILE}: unreadable training state ({msg}); delete "
                                  f"{ckpt} to resume from the checkpoint before it") from e
        saved = state.get("config", {}).get("optimizer", "adamw")       # (older checkpoints: AdamW)
        if saved != self.cfg.optimizer:
            raise CheckpointError(f"--resume: {ckpt} was trained with --optimizer {saved}, this run uses "
                                  f"{self.cfg.optimizer}; resume with --optimizer {saved}")
        spelled = state.get("spelling", False)
        if spelled != (self.spelling is not None):
            raise CheckpointError(f"--resume: {ckpt} was trained {'with' if spelled else 'without'} spelling-shared "
                                  f"embedding updates, this run {'without' if spelled else 'with'}; resume with "
                                  f"--spelling {'auto' if spelled else 'off'}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.spelling is not None and "spelling_total" in state:
            self.spelling.total.copy_(state["spelling_total"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.best_val = state["step"], state["best_val"]
        if self.budget is not None:
            self.budget.restore(state)
        if self.is_main:  # drop metrics logged after the checkpoint (they will be repeated)
            mpath = self.out_dir / METRICS_FILE
            if mpath.exists():
                keep = [ln for ln in mpath.read_text().splitlines()
                        if _metric_step(ln) is not None and _metric_step(ln) <= self.step]
                mpath.write_text("".join(ln + "\n" for ln in keep))
        self._log(f"resumed from {ckpt} at step {self.step}")
        return True

    # --- logging ------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.is_main and not self.quiet:
            tqdm.write(msg)

    def _record(self, rec: dict) -> None:
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # strict JSON: a non-finite loss is written as null
            rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
            with open(self.out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")

    def _plot(self) -> None:
        if not self.is_main:
            return
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        recs = [json.loads(ln) for ln in (self.out_dir / METRICS_FILE).read_text().splitlines() if ln.strip()]
        tr = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
        va = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(6, 4))
        if tr:
            ax.plot(*zip(*tr), label="train", alpha=0.7)
        if va:
            ax.plot(*zip(*va), "o-", label="val")
        ax.set_xlabel("step"), ax.set_ylabel("loss (nats/token)"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=100)
        plt.close(fig)

    # --- evaluation ---------------------------------------------------------------------------
    def run_eval(self) -> dict:
        if not self.is_main or self.evaluate_fn is None:
            return {}
        metrics = self.evaluate_fn(self.model)
        rec = {"step": self.step, **metrics}
        self._record(rec)
        self._log(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in metrics.items()))
        if metrics.get("val_loss", float("inf")) < self.best_val:
            self.best_val = metrics["val_loss"]
            (self.out_dir / "best").mkdir(parents=True, exist_ok=True)
            self.save_weights(self.model, self.out_dir / "best")
        if self.sample_fn is not None:
            self._log(self.sample_fn(self.model))
        self._plot()
        return metrics

    # --- the loop -----------------------------------------------------------------------------
    def _micro_batches(self) -> tuple[list[tuple], int]:
        """This rank's micro-batches of the step, as (x, y, tokens, model kwargs, labels), and the
        label tokens (y != -100) of the whole step: every micro-batch of every rank."""
        batches = []
        count = getattr(self.loss_module, "count_labels", None)     # (preference losses: pairs, not tokens)
        for m in range(self.local_accum):
            x, y, *rest = self.get_batch(self.step, self.rank * self.local_accum + m)
            tokens, kw = rest[0] if rest else x.numel(), rest[1] if len(rest) > 1 else {}
            batches.append((x, y, tokens, kw, count(y) if count else int((y != IGNORE_INDEX).sum())))
        labels = sum(b[-1] for b in batches)
        if self.world > 1:
            t = torch.tensor([labels], dtype=torch.long, device=self.device)
            dist.all_reduce(t)
            labels = int(t.item())
        return batches, labels

    def train_step(self) -> tuple[float, int]:
        """One optimizer step (all micro-batches of all ranks): (its loss, tokens trained on).

        The loss is the step's token-weighted mean: the sum of the per-label losses of every
        micro-batch and rank over the step's label count, so B x A trains exactly as one batch of
        A*B. Each micro-batch's mean is weighted by its share of the labels times the number of
        micro-batches (DDP's averaging over ranks included): 1 when all hold as many labels, as in
        pretraining, whose numbers are then those of a plain mean of the micro-batches' means."""
        cfg, model = self.cfg, self.fwd_model
        lr = self.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * (g.get("lr_scale") or 1.0)
        batches, labels = self._micro_batches()
        total = torch.zeros(2, device=self.device)                        # loss, tokens
        for m, (x, y, tokens, kw, n_labels) in enumerate(batches):
            total[1] += tokens
            share = n_labels * self.local_accum * self.world / max(labels, 1)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            kw = {k: v.to(self.device, non_blocking=True) for k, v in kw.items()}
            sync = m == self.local_accum - 1 or self.world == 1
            ctx = model.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with self.autocast():
                    loss = model(x, y, **kw) / self.local_accum
                    if share != 1.0:
                        loss = loss * share
                self.scaler.scale(loss).backward()
            total[0] += loss.detach()
        if self.world > 1:
            dist.all_reduce(total)
            total[0] /= self.world
        loss_val, tokens = total[0].item(), int(total[1].item())
        if not math.isfinite(loss_val) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= cfg.max_bad_steps:
                raise TrainingStopped(f"loss was not finite for {self.bad_steps} steps in a row at step "
                                      f"{self.step}; stopped (last good checkpoint kept). Try a lower --lr")
            self._log(f"step {self.step}: non-finite loss, step skipped")
            return loss_val, tokens
        self.bad_steps = 0
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.spelling is not None:
            self.spelling.gradient()                  # P's gradient from the embedding's, clipped
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.spelling is not None:
            self.spelling.fold()                      # P's update into the embedding, P = 0
        self.optimizer.zero_grad(set_to_none=True)
        return loss_val, tokens

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step`: the config's schedule (re-planned by the time
        budget, if it was)."""
        return self.budget.lr_at(step, self.cfg) if self.budget is not None else lr_at(step, self.cfg)

    # --- the time budget -------------------------------------------------------------------------
    def _start_budget(self) -> None:
        """At fit(): apply a restored decision, or set the run up to decide after the measured steps."""
        b, cfg = self.budget, self.cfg
        self._pending = b is not None and b.decision is None
        self._replan_check: Optional[tuple[int, int]] = None     # (from step, pace window) once decided
        self._timings: dict[str, list] = {"step": [], "eval": [], "save": []}
        if b is not None and b.decision is not None:
            self._apply_budget()
            if self.is_main:
                self._log(b.describe())
        elif self._pending:
            self._decide_at = max(b.decide_at(cfg), self.step + 1)
            cfg.max_steps = self._decide_at             # (the loop stops there unless the decision says more)
            if b.evaluations:
                cfg.eval_interval = sys.maxsize         # no evaluation before the interval is chosen

    def _apply_budget(self) -> None:
        d = self.budget.decision
        self.cfg.max_steps, self.cfg.eval_interval = int(d["chosen_max_steps"]), int(d["eval_interval"])
        self._pending = False
        if not self.budget.resumed and d.get("replan") is None:
            self._replan_check = self.budget.replan_window()

    def _decide(self, bar) -> float:
        """Fix max_steps (rank 0 measures and plans, the others follow); returns the seconds it took."""
        t0, b = time.perf_counter(), self.budget
        if self.is_main:
            m = b.measure(self, self._timings["step"], self._timings["eval"], self._timings["save"])
            b.plan(m, self.step, self.cfg, self.evaluate_fn is not None)
        if self.world > 1:
            d = b.decision or {}
            t = torch.tensor([d.get("chosen_max_steps", 0), d.get("eval_interval", 0)], device=self.device)
            dist.broadcast(t, 0)
            b.decision = b.decision or {"chosen_max_steps": int(t[0]), "eval_interval": int(t[1]),
                                        "decided_at_step": self.step}
        self._apply_budget()
        bar.total = self.cfg.max_steps
        bar.refresh()
        if self.is_main:
            self._log(b.describe())
            self._write_run_info()
        return time.perf_counter() - t0

    def _replan(self, bar) -> float:
        """Check the pace mid-run; re-plan max_steps once if it fell behind (rank 0 decides, the others
        follow). Returns the seconds it took."""
        t0, b = time.perf_counter(), self.budget
        n = -1                                            # -1: no re-plan, else the new max_steps
        if self.is_main:
            recent = [s for s, _ in self._timings["step"][-self._replan_check[1]:]]
            r = b.replan(b.pace(recent, self._timings["eval"], self._timings["save"]), self.step, self.cfg,
                         self.evaluate_fn is not None)
            n = -1 if r is None else int(b.decision["chosen_max_steps"])
        if self.world > 1:
            t = torch.tensor([n], device=self.device)
            dist.broadcast(t, 0)
            n = int(t.item())
            if n >= 0 and not self.is_main:
                b.follow_replan(self.step, n)
        if n >= 0:
            self._replan_check = None
            self.cfg.max_steps = n
            bar.total = n
            bar.refresh()
            if self.is_main:
                self._log(b.describe_replan())
                self._record({"step": self.step, "replan": b.decision["replan"]})
                self._write_run_info()
        return time.perf_counter() - t0

    def _write_run_info(self) -> None:
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        train = asdict(self.cfg)
        info = {**self.run_info, "train": train}
        if self.budget is not None:
            b = self.budget
            if self._pending:
                train.update(max_steps=None, **({"eval_interval": None} if b.evaluations else {}))
            info["budget"] = b.decision or {"seconds": b.seconds, "given": b.label, "chosen_max_steps": None,
                                            "reason": f"decided after step {self._decide_at}"}
        atomic_write_json(self.out_dir / RUN_INFO, info)

    def _log_metrics(self, loss: float, bar) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0, tokens = self._window
        tps = tokens / (time.perf_counter() - t0)
        rec = {"step": self.step, "loss": loss, "lr": self.lr_at(self.step - 1),
               "tokens": tokens, "tok_per_s": tps}                 # real tokens since the last record
        if self.peak:
            rec["mfu"] = tps * self.flops_tok / (self.peak * self.world)
        extra = getattr(self.loss_module, "pop_metrics", None)    # the loss module's own (e.g. DPO's rewards)
        rec.update(extra() if extra else {})
        self._record(rec)
        shown = {n: f"{rec[k]:.3f}" for n, k in (("margin", "rewards/margins"), ("acc", "rewards/accuracies"))
                 if k in rec}
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.1e}", tok_s=f"{tps:,.0f}", **shown,
                        **({"mfu": f"{rec['mfu']:.1%}"} if "mfu" in rec else {}))
        self._window = [time.perf_counter(), 0]

    def _advance(self, bar) -> Optional[dict]:
        """One turn of the loop: a step, then what is due: the budget decision, a metrics record, an
        evaluation (its metrics are returned), a checkpoint."""
        cfg, t = self.cfg, time.perf_counter()
        loss, tokens = self.train_step()
        self.step += 1
        if self._pending or self._replan_check is not None:
            self._timings["step"].append((time.perf_counter() - t, tokens))
        if self._pending and self.step >= self._decide_at:
            self._window[0] += self._decide(bar)          # (not counted in the logged tokens/s)
        elif self._replan_check is not None and self.step >= self._replan_check[0]:
            self._window[0] += self._replan(bar)
        bar.update(1)
        self._window[1] += tokens
        if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
            self._log_metrics(loss, bar)
        last = None
        if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
            t = time.perf_counter()
            last = self.run_eval()
            self._timings["eval"].append(time.perf_counter() - t)
        if self.step % (cfg.save_interval or cfg.eval_interval) == 0 or self.step == cfg.max_steps:
            t = time.perf_counter()
            self.save_checkpoint()
            self._timings["save"].append(time.perf_counter() - t)
        if self.world > 1:
            dist.barrier()
        return last

    def fit(self, resume: bool = False) -> dict:
        self.model.train()   # dropout (the model's and the adapters') on, whatever mode the model was loaded in
        if resume:       # first: a checkpoint that does not fit this run must leave the folder as it was
            self.resume()
        elif self.is_main and (self.out_dir / METRICS_FILE).exists():
            (self.out_dir / METRICS_FILE).unlink()
        self._start_budget()
        self._write_run_info()
        cfg = self.cfg
        bar = tqdm(total=None if self._pending else cfg.max_steps, initial=self.step, desc="training",
                   unit="step", disable=not self.is_main or self.quiet, dynamic_ncols=True)
        last: dict = {}
        self._window = [time.perf_counter(), 0]             # start, tokens of the metrics record
        with _DeferredInterrupt() as interrupt:
            try:
                while self.step < cfg.max_steps and not interrupt.requested:
                    last = self._advance(bar) or last
            finally:
                bar.close()
            if interrupt.requested:
                path = self.save_checkpoint()
                if self.is_main:
                    print(f"interrupted at step {self.step}: checkpoint saved to {path}; "
                          f"continue with --resume", file=sys.stderr)
                raise KeyboardInterrupt
        return {"step": self.step, "best_val_loss": self.best_val, **last}
