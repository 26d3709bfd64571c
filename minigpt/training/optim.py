"""The optimizers the Trainer builds: AdamW, or Muon on the hidden weight matrices with AdamW on
the rest. One policy for which parameters get weight decay and which optimizer steps them.

Param groups may carry "lr_scale": the Trainer sets each group's lr to the schedule's lr times it
(Muon's groups run at a multiple of AdamW's rate, on the same warmup and decay).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ..device import cpu_has_native_bf16
from ..errors import ConfigError

OPTIMIZERS = ("adamw", "muon")
MUON_LR_SCALE = 4.0       # Muon's lr / AdamW's by default (2-minute runs at 1x-12x: README, "what was tried")
_EMBEDDINGS = ("wte.weight", "wpe.weight", "lm_head.weight")


def _hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the weights of the model's nn.Linear layers other than the head: Muon's parameters."""
    return {id(m.weight) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head") and m.weight.dim() == 2}


def param_groups(model: nn.Module, weight_decay: float, muon_lr_scale: Optional[float] = None) -> list[dict]:
    """Weight decay on 2-D weight matrices only: not on biases, LayerNorms or embeddings.

    With muon_lr_scale, the hidden Linear weights form a first group marked "muon" (decayed, at that
    multiple of the learning rate); embeddings, the (tied) head, biases and gains stay with AdamW.
    """
    hidden = _hidden_matrices(model) if muon_lr_scale is not None else set()
    muon, decay, no_decay, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in hidden:
            muon.append(p)
        elif p.dim() >= 2 and not name.endswith(_EMBEDDINGS):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": muon, "weight_decay": weight_decay, "muon": True, "lr_scale": muon_lr_scale},
              {"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_adamw(groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CUDA; CPU since torch
    2.4): one pass over each parameter, no temporaries; on a CPU about 5x faster than the
    per-tensor loop for GPT-2 124M (60 vs 300+ ms a step). Falls back to the standard loop."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError, TypeError):            # no fused kernel for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def orthogonalise(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Newton-Schulz iteration of a matrix toward the semi-orthogonal U V^T of its SVD (Muon's
    quintic, coefficients (3.4445, -4.7750, 2.0315): singular values land in about [0.7, 1.2],
    which works as well as exactly 1). Runs in `dtype` on the wide orientation; returns g's dtype."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)                                   # spectral norm <= 1
    for _ in range(steps):                                      # x <- a x + (b s + c s^2) x, s = x x^T
        s = x @ x.T
        x = torch.addmm(x, torch.addmm(s, s, s, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 where its matmuls are native (CUDA, CPUs with AVX512-BF16/AMX), else fp32: emulated bf16
    made a Muon step several times slower on AVX2 kernels (307 steps in 5 minutes instead of ~700)."""
    return torch.bfloat16 if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()) \
        else torch.float32


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for 2-D weight matrices: a matrix's update is its Nesterov momentum
    (EMA, beta `momentum`) orthogonalised by `orthogonalise`, scaled by 0.2 sqrt(max(rows, cols)) so
    that its RMS matches AdamW's (Liu et al. 2025: AdamW's learning rate and decay carry over), with
    decoupled weight decay. The Newton-Schulz steps run in bf16 where the machine has native bf16
    matmuls, else in fp32 (newton_schulz_dtype). Same maths as torch.optim.Muon with
    adjust_lr_fn="match_rms_adamw" (tested against it), which always orthogonalises in bf16."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: Optional[torch.dtype] = None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ConfigError(f"Muon steps 2-D weight matrices, got a parameter of shape {tuple(p.shape)}")
                if self.ns_dtype is None:
                    self.ns_dtype = newton_schulz_dtype(p.device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)                           # EMA of the gradients
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


class MuonAdamW:
    """Muon on the groups marked "muon", AdamW on the others, stepped as one optimizer.

    Muon is meant for the hidden matrices only; embeddings, the head, biases and LayerNorm gains
    use AdamW. Muon's update RMS matches AdamW's, so both follow one learning-rate schedule, Muon's
    groups at their "lr_scale" times it. Offers what the Trainer and GradScaler use: param_groups,
    step, zero_grad, state_dict and load_state_dict (the state of both, so resume is exact).
    """

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float]):
        muon = [{k: v for k, v in g.items() if k != "muon"} for g in groups if g.get("muon")]
        rest = [g for g in groups if not g.get("muon")]
        if not muon:
            raise ConfigError("--optimizer muon: the model has no trainable hidden weight matrices "
                              "(Muon's parameters); use --optimizer adamw")
        self.muon = Muon(muon, lr=lr)
        self.adamw = make_adamw(rest, lr, betas) if rest else None

    def _parts(self):
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        """Both optimizers' groups (read afresh: load_state_dict replaces their dicts)."""
        return [g for opt in self._parts() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self._parts():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._parts():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state")
        self.muon.load_state_dict(state["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state["adamw"])


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   betas: tuple[float, float], muon_lr: Optional[float] = None,
                   extra_groups: Optional[list[dict]] = None):
    """The optimizer `name` ("adamw" or "muon") over the model's trainable parameters.
    muon_lr: Muon's peak learning rate (default MUON_LR_SCALE x lr). extra_groups: AdamW groups of
    parameters outside the model (minigpt.training.spelling.Spelling's)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    extra = list(extra_groups or [])
    if name == "adamw":
        return make_adamw(param_groups(model, weight_decay) + extra, lr, betas)
    scale = MUON_LR_SCALE if muon_lr is None else muon_lr / lr
    return MuonAdamW(param_groups(model, weight_decay, muon_lr_scale=scale) + extra, lr, betas)
