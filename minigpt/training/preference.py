"""Preference objectives: DPO, IPO and ORPO, with the numbers trl computes on the same batch.

    sequence_logps(model, x, y)          per row: (sum of log p over the labels y != -100, their count)
    dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)   per pair (trl's loss_type "sigmoid";
                                         label_smoothing: conservative DPO, -(1-e) logs(b z) - e logs(-b z))
    ipo_loss(..., n_c, n_r, beta)        per pair (trl's "ipo": log-ratios AVERAGED over the response tokens)
    orpo_loss(mean_c, mean_r, nll, beta) trl's ORPO: NLL of the chosen sequence - beta * logsigmoid(log odds),
                                         log odds from the mean response log-probs
    PreferenceLoss(model, objective, ...) the Trainer's loss module (forward(x, y, targets) -> mean over pairs)
    precompute_ref_logps(ref, examples)  (N, 2) the reference's log-probs of every pair, computed once

A batch holds B pairs as 2B rows: the B chosen sequences, then the B rejected ones, right-padded, so
chosen and rejected go through one forward; or, with `segments` (collate_shared_pairs: what finetune
uses for GPT-2), as B rows of prompt + chosen + rejected, the prompt computed once and the rejected
answer masked from the chosen one, whose 2B label rows give the same numbers. y (the labels, shifted
like SFT's) is -100 on the prompt and the padding: a sequence's log-probability is the SUM over its
response tokens, EOS included.
Rewards are logged as trl logs them: rewards/chosen = beta * (pi_c - ref_c) (ORPO: beta * mean log-prob),
rewards/rejected, rewards/margins (chosen - rejected), rewards/accuracies (chosen > rejected), and
logps/chosen, logps/rejected (the policy's; ORPO: the means), plus logps/accuracies (logps/chosen >
logps/rejected: the policy's own preference, which also scores a model before training).

The reference (DPO, IPO) is a frozen model, or "adapters": the trained model itself with its adapter
switched off (minigpt.methods.adapters_disabled), so a parameter-efficient run keeps one copy of the
base, or "precomputed": its log-probs computed once before training (precompute_ref_logps, trl's
precompute_ref_log_probs) and passed with each batch as `ref_logps`, so full fine-tuning keeps no
frozen copy. The reference pass runs without gradients and in eval mode (no dropout), so at the first
step, where the policy equals the reference, the DPO loss is exactly ln 2.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.preferences import pair_layout
from ..model.linear import is_linear
from .loss import linear_log_probs

__all__ = ["OBJECTIVES", "REFERENCE_OBJECTIVES", "PreferenceLoss", "dpo_loss", "ipo_loss", "log1mexp", "orpo_loss",
           "precompute_ref_logps", "reward_metrics", "sequence_logps", "token_logps"]

OBJECTIVES = ("dpo", "ipo", "orpo")
REFERENCE_OBJECTIVES = ("dpo", "ipo")          # ORPO needs no reference model
IGNORE_INDEX = -100
METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def token_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> torch.Tensor:
    """(R, T) fp32: log p(y_t | x_<=t) where y_t != -100, else 0; y's row r labels x's row r % B (R = kB:
    collate_shared_pairs' chosen and rejected labels of one row).

    Only the labelled positions go through the head (the prompt's and the padding's logits are never
    formed), in vocabulary chunks (minigpt.training.loss.linear_log_probs); the log-softmax is fp32
    whatever the autocast dtype."""
    h = model.hidden_states(x, **kw)                                   # (B, T, C)
    valid = y != IGNORE_INDEX
    if y.size(0) == h.size(0):
        h = h[valid]                                                   # (N, C)
    else:
        rows, cols = valid.nonzero(as_tuple=True)
        h = h[rows % h.size(0), cols]
    head = model.lm_head
    if is_linear(head) and head.bias is None:
        tok = linear_log_probs(h, head.weight, y[valid])               # (N,)
    else:                                                              # a wrapped head (e.g. LoRA on it)
        logits = head(h).float()                                       # (N, V)
        tok = logits.gather(1, y[valid][:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return torch.zeros(y.shape, dtype=torch.float32, device=y.device).masked_scatter(valid, tok)


def sequence_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(y_t | x_<=t) over y_t != -100, count of such t), each (B,), fp32."""
    return token_logps(model, x, y, **kw).sum(1), (y != IGNORE_INDEX).sum(1).to(torch.float32)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO loss: -logsigmoid(beta z)(1 - e) - logsigmoid(-beta z) e, z = (pi_c - pi_r) - (ref_c - ref_r)."""
    z = (pi_c - pi_r) - (ref_c - ref_r)
    loss = -F.logsigmoid(beta * z) * (1 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-beta * z) * label_smoothing
    return loss


def ipo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             n_c: torch.Tensor, n_r: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair IPO loss as trl: ((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2 (n: response tokens)."""
    z = (pi_c - ref_c) / n_c.clamp(min=1.0) - (pi_r - ref_r) / n_r.clamp(min=1.0)
    return (z - 1 / (2 * beta)) ** 2


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(mean_c: torch.Tensor, mean_r: torch.Tensor, nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the ORPO loss of the batch, per-pair log odds): nll - mean(beta * logsigmoid(log_odds)),
    log_odds = log(p_c / (1 - p_c)) - log(p_r / (1 - p_r)) with p the mean response log-probs' exp."""
    mean_c, mean_r = mean_c.float(), mean_r.float()
    log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))
    return nll - (beta * F.logsigmoid(log_odds)).mean(), log_odds


def reward_metrics(rew_c: torch.Tensor, rew_r: torch.Tensor, logp_c: torch.Tensor,
                   logp_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """trl's per-pair metrics (means of these are what it logs), and logps/accuracies: whether the
    policy alone gives the chosen answer the higher log-prob (the sum; ORPO: the mean), which, unlike
    rewards/accuracies (0 while policy = reference), also scores a model before training."""
    return {"rewards/chosen": rew_c, "rewards/rejected": rew_r, "rewards/margins": rew_c - rew_r,
            "rewards/accuracies": (rew_c > rew_r).float(), "logps/chosen": logp_c, "logps/rejected": logp_r,
            "logps/accuracies": (logp_c > logp_r).float()}


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class PreferenceLoss(nn.Module):
    """The Trainer's loss module for a preference objective.

    forward(x, y, targets=None) -> the mean loss over the micro-batch's pairs; x, y (2B, T): the
    chosen rows then the rejected rows; targets (2B, T): every real next token (prompt included, -100
    on padding), which ORPO's NLL term is taken over, as trl's ORPOTrainer does. The Trainer weights
    micro-batches by `count_labels(y)` (pairs, not tokens). Per-pair metrics are summed as steps go
    and `pop_metrics()` returns their means since the last call (summed over DDP ranks).

    reference: None (ORPO), "adapters" (the model with its adapter switched off), a frozen model, or
    "precomputed" (each batch brings its rows' reference log-probs: forward(..., ref_logps=...)).
    """

    def __init__(self, model: nn.Module, objective: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 reference: Union[None, str, nn.Module] = "adapters"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown preference objective {objective!r}; choose from {', '.join(OBJECTIVES)}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta!r}")
        if objective in REFERENCE_OBJECTIVES and reference is None:
            raise ValueError(f"{objective} needs a reference (a frozen model or 'adapters')")
        self.model, self.objective, self.beta, self.label_smoothing = model, objective, float(beta), label_smoothing
        self.ref_mode = reference if isinstance(reference, str) or reference is None else "model"
        if isinstance(reference, str) and reference not in ("adapters", "precomputed"):
            raise ValueError(f"reference must be a model, 'adapters' or 'precomputed', got {reference!r}")
        # a frozen reference model is kept out of the module's parameters (no DDP sync, no optimizer)
        self._ref = [reference] if self.ref_mode == "model" else []
        if self._ref:
            reference.requires_grad_(False).eval()
        self._sums: dict[str, torch.Tensor] = {}
        self._pairs = 0

    @staticmethod
    def count_labels(y: torch.Tensor) -> int:
        """What the Trainer weights a micro-batch by: its pairs (those with labels)."""
        return int((y[:y.size(0) // 2] != IGNORE_INDEX).any(1).sum())

    @torch.no_grad()
    def reference_logps(self, x: torch.Tensor, y: torch.Tensor, **layout) -> torch.Tensor:
        """The reference's summed response log-probs of each labelled row (2B,); layout: pair_layout's."""
        if self.ref_mode == "precomputed":
            raise ValueError("the reference log-probs are precomputed: pass them as ref_logps")
        if self.ref_mode == "model":
            ref = self._ref[0]
            if next(ref.parameters()).device != x.device:
                ref.to(x.device)
            return sequence_logps(ref, x, y, **layout)[0]
        from ..methods import adapters_disabled

        with adapters_disabled(self.model), _eval_mode(self.model):
            return sequence_logps(self.model, x, y, **layout)[0]

    def pair_losses(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None,
                    ref_logps: Optional[torch.Tensor] = None,
                    segments: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the batch's loss, per-pair metrics) for 2B labelled rows; ref_logps (2B,): the reference's,
        precomputed; segments: the pairs share a row each (collate_shared_pairs)."""
        B = y.size(0) // 2
        layout = pair_layout(segments) if segments is not None else {}
        if self.objective == "orpo":
            full = targets if targets is not None else y
            tl = token_logps(self.model, x, full, **layout)          # every real token: the NLL's
            resp = y != IGNORE_INDEX
            logps, counts = (tl * resp).sum(1), resp.sum(1).to(torch.float32)
            nll = -tl[:B].sum() / (full[:B] != IGNORE_INDEX).sum().clamp(min=1)
        else:
            logps, counts = sequence_logps(self.model, x, y, **layout)
        pi_c, pi_r, n_c, n_r = logps[:B], logps[B:], counts[:B], counts[B:]
        if self.objective == "orpo":
            mean_c, mean_r = pi_c / n_c.clamp(min=1.0), pi_r / n_r.clamp(min=1.0)
            loss, log_odds = orpo_loss(mean_c, mean_r, nll, self.beta)
            m = reward_metrics(self.beta * mean_c.detach(), self.beta * mean_r.detach(), mean_c.detach(),
                               mean_r.detach())
            m.update({"nll_loss": nll.detach().expand(B), "log_odds_chosen": log_odds.detach(),
                      "log_odds_ratio": F.logsigmoid(log_odds).detach()})
            return loss, m
        ref = self.reference_logps(x, y, **layout) if ref_logps is None else ref_logps.to(logps.device, torch.float32)
        ref_c, ref_r = ref[:B], ref[B:]
        if self.objective == "dpo":
            losses = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.beta, self.label_smoothing)
        else:
            losses = ipo_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, self.beta)
        m = reward_metrics(self.beta * (pi_c - ref_c).detach(), self.beta * (pi_r - ref_r).detach(),
                           pi_c.detach(), pi_r.detach())
        return losses.mean(), m

    def forward(self, x: torch.Tensor, y: torch.Tensor, targets: Optional[torch.Tensor] = None,
                ref_logps: Optional[torch.Tensor] = None, segments: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not bool((y != IGNORE_INDEX).any()):             # an empty micro-batch (weighted 0 by the Trainer)
            layout = pair_layout(segments) if segments is not None else {}
            return self.model.hidden_states(x, **layout).sum() * 0.0
        loss, m = self.pair_losses(x, y, targets, ref_logps, segments)
        self._accumulate(m, loss.detach())
        return loss

    def _accumulate(self, m: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        B = next(iter(m.values())).numel()
        for k, v in m.items():
            self._sums[k] = self._sums.get(k, 0) + v.float().sum()
        self._pairs += B

    def pop_metrics(self) -> dict[str, float]:
        """Means of the per-pair metrics since the last call ({} when none), over every DDP rank."""
        if not self._sums:
            return {}
        keys = list(self._sums)
        t = torch.stack([self._sums[k] for k in keys] + [torch.tensor(float(self._pairs), device=self._sums[keys[0]]
                                                                      .device)])
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        self._sums, self._pairs = {}, 0
        n = max(float(t[-1]), 1.0)
        return {k: float(v) / n for k, v in zip(keys, t[:-1].tolist())}

    @torch.no_grad()
    def evaluate(self, batches) -> dict[str, float]:
        """val_loss (mean over pairs) and the val_ metrics over (x, y, {"targets", ...}) batches
        (PreferenceDataset.sequential); restores training mode."""
        total, pairs, sums = 0.0, 0, {}
        with _eval_mode(self.model):
            for x, y, kw in batches:
                dev = self.model.lm_head.weight.device
                loss, m = self.pair_losses(x.to(dev), y.to(dev), **{k: v.to(dev) for k, v in kw.items()})
                B = y.size(0) // 2
                total, pairs = total + float(loss) * B, pairs + B
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v.float().sum())
        if not pairs:
            return {}
        return {"val_loss": total / pairs, **{f"val_{k}": v / pairs for k, v in sums.items()}}


@torch.no_grad()
def precompute_ref_logps(reference: nn.Module, examples, batch_size: int = 8, adapters_off: bool = False,
                         progress: Optional[str] = None, share_prompt: bool = False) -> torch.Tensor:
    """(N, 2) fp32: the reference's summed answer log-probs (chosen, rejected) of each tokenised pair
    (minigpt.data.preferences.tokenize_pairs' examples), computed once, in eval mode, under the
    caller's autocast, shortest pairs first in batches of `batch_size` pairs. adapters_off: the
    reference is `reference` with its adapter switched off (the base of a parameter-efficient run).
    progress: a progress-bar label (None: no bar). share_prompt: one row per pair, as the training
    batches (PreferenceDataset.share_prompt), so the numbers are the same bits as the policy's."""
    from tqdm import tqdm

    from ..data.preferences import collate_pairs, collate_shared_pairs
    from ..methods import adapters_disabled

    examples = list(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt"]) + len(examples[i]["chosen"])
                   + len(examples[i]["rejected"]))
    out = torch.zeros(len(examples), 2)
    dev = next(reference.parameters()).device
    off = adapters_disabled(reference) if adapters_off else contextlib.nullcontext()
    with off, _eval_mode(reference), tqdm(total=len(order), desc=progress, unit="pair", disable=progress is None,
                                          leave=False) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            part = [examples[i] for i in idx]
            x, y, *_, seg = collate_shared_pairs(part) if share_prompt else (*collate_pairs(part), None)
            layout = {k: v.to(dev) for k, v in pair_layout(seg).items()} if share_prompt else {}
            logps = sequence_logps(reference, x.to(dev), y.to(dev), **layout)[0].float().cpu()
            out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
            bar.update(len(idx))
    return out
