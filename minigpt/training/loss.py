"""Training losses. `lm_loss` (in model.py) works on logits; the fused head + cross-entropy here
never materialises the (B*T, vocab) logits in fp32, which is most of a small model's step on CPU."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..model.linear import mm_nt, uses_onednn


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = "cuda" if t.is_cuda else "cpu"
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """mean CE(h @ w.T, y) over y != ignore_index, computed in row chunks.

    Gradients are formed chunk by chunk during the forward pass (softmax - onehot), so peak
    memory is one chunk of logits instead of all of them: a single (rows, V) buffer holds the
    logits, then the log-probabilities (in place), then the probabilities (plus an fp32 buffer for
    the softmax when the matmuls run in bf16/fp16). Rows whose target is ignore_index never enter
    the matmuls. A frozen head (no weight gradient: LoRA and other adapters) takes fewer rows at a
    time (_frozen_head_rows); the loss is still summed `chunk` rows at a time, so its value is the
    same bits for any row count (the gradient rows are the same products; a chunk of another height
    may round differently where the matmul library picks another kernel for it).
    """

    @staticmethod
    def forward(ctx, h, w, y, ignore_index: int, chunk: int, dtype: torch.dtype, workspace: Optional[dict],
                log_counts: Optional[torch.Tensor] = None):
        # h (N, C), w (V, C), y (N,), log_counts (V,) fp32 or None: see fused_lm_loss
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = y != ignore_index
        n_valid = valid.sum().clamp(min=1)
        keep = None
        if not bool(valid.all()):
            # ignored positions (padding, masked prompts) add no loss and no gradient: leave their
            # rows out of the head matmuls altogether
            keep = valid.nonzero().squeeze(1)
            hk, yk = h.index_select(0, keep), y.index_select(0, keep)            # (n_valid, C)
        else:
            hk, yk = h, y
        wc = w.to(dtype)
        grad_hk = torch.empty(hk.shape, dtype=h.dtype, device=h.device) if need_h else None
        grad_w = None                     # fp32 (V, C): the first chunk's product, later ones added
        # one (rows, V) buffer for all chunks: logits, then log-probs in place, then probs. The
        # softmax is fp32 at least: bf16/fp16 logits are copied into a second, fp32 buffer
        sm_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        rows = chunk if need_w else _frozen_head_rows(chunk, w.size(0), dtype, sm_dtype)
        n0 = min(rows, hk.size(0))
        # oneDNN's products come as new tensors (minigpt.model.linear): no logits buffer then
        buf = None if uses_onednn(hk[:n0], wc) else _scratch(workspace, "logits", n0, w.size(0), dtype, h.device)
        buf_sm = None if sm_dtype == dtype else _scratch(workspace, "softmax", n0, w.size(0), sm_dtype, h.device)
        picked = torch.empty(hk.size(0), dtype=sm_dtype, device=h.device)      # log p(target) per row
        for s in range(0, hk.size(0), rows):
            hs, ys = hk[s:s + rows].to(dtype), yk[s:s + rows]
            n = hs.size(0)
            logits = mm_nt(hs, wc, out=None if buf is None else buf[:n])            # (n, V)
            logp = logits if buf_sm is None else buf_sm[:n].copy_(logits)
            if log_counts is not None:
                logp += log_counts
            ar = torch.arange(n, device=h.device)
            if (need_h or need_w) and logp.is_cpu:
                # one exp pass instead of log_softmax's and exp_'s: softmax in place, log p(target) from it
                p = torch._softmax(logp, -1, False, out=logp)                      # softmax (n, V)
                picked[s:s + n] = _log_target(p[ar, ys], hs, wc, ys, log_counts)
            else:
                torch.log_softmax(logp, dim=-1, out=logp)                         # in place
                picked[s:s + n] = logp[ar, ys]
                p = logp.exp_() if need_h or need_w else None                      # softmax (n, V)
            if need_h or need_w:
                p[ar, ys] -= 1.0                                                   # - onehot
                if p is not logits:
                    p = logits.copy_(p)                                            # matmul dtype
                if need_h:
                    if p.dtype == grad_hk.dtype:
                        mm_nt(p, wc.t(), out=grad_hk[s:s + n])
                    else:
                        grad_hk[s:s + n] = p @ wc
                if need_w:
                    if grad_w is None:
                        grad_w = (p.t() @ hs).float()                                  # no zero fill
                    elif p.dtype == grad_w.dtype:
                        grad_w.addmm_(p.t(), hs)
                    else:
                        grad_w.add_(p.t() @ hs)
        total = _summed(picked, yk, chunk, log_counts)
        if need_w and grad_w is None:                                      # every target ignored
            grad_w = torch.zeros_like(w, dtype=torch.float32)
        grad_h = grad_hk
        if need_h and keep is not None:
            grad_h = torch.zeros(h.shape, dtype=h.dtype, device=h.device).index_copy_(0, keep, grad_hk)
        ctx.save_for_backward(grad_h if grad_h is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0), n_valid)
        return total / n_valid

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = g / n_valid
        gh = (grad_h * scale).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        gw = (grad_w * scale) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None, None, None, None


TINY_PROB = 1e-30   # below: log p(target) from the row's log_softmax, not the (underflowing) softmax


def _log_target(p_target: torch.Tensor, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor,
                log_counts: Optional[torch.Tensor]) -> torch.Tensor:
    """log p(target) per row from the softmax's target entries (n,); the rare rows whose entry is
    below TINY_PROB (a target more than ~69 nats down) get it from their log_softmax, recomputed."""
    out = p_target.log()
    low = (p_target < TINY_PROB).nonzero().squeeze(1)
    if low.numel():
        z = mm_nt(h.index_select(0, low), w).float()                       # (k, V) the rows' logits again
        if log_counts is not None:
            z += log_counts
        out[low] = torch.log_softmax(z, dim=-1).gather(1, y.index_select(0, low)[:, None]).squeeze(1)
    return out


def _summed(picked: torch.Tensor, y: torch.Tensor, chunk: int, log_counts: Optional[torch.Tensor]) -> torch.Tensor:
    """The summed loss: -log p(target) added up `chunk` rows at a time (whatever rows the matmuls
    took: the same float sums for any chunking), plus each target's log_counts share."""
    total = torch.zeros((), dtype=torch.float32, device=picked.device)
    for s in range(0, picked.size(0), chunk):
        total -= picked[s:s + chunk].sum()
        if log_counts is not None:                         # the target token's own share of its row
            total += log_counts[y[s:s + chunk]].sum()
    return total


SCRATCH_BYTES = 128 << 20     # a frozen head's (chunk, vocab) scratch buffers stay under this


def _frozen_head_rows(chunk: int, vocab: int, dtype: torch.dtype, sm_dtype: torch.dtype) -> int:
    """Rows per chunk when the head's weight gets no gradient (LoRA and other adapters): halved
    from `chunk` (down to 128) until the scratch buffers fit SCRATCH_BYTES. GPT-2's 50,257 logits
    a row then take 103 MB instead of 206 MB at the peak of a step; the matmuls lose ~1% of their
    speed. A trained head keeps `chunk`: each chunk adds its product into the (V, C) weight
    gradient, a pass over it that fewer, larger chunks save."""
    per_row = vocab * (dtype.itemsize + (sm_dtype.itemsize if sm_dtype != dtype else 0))
    while chunk > 128 and chunk * per_row > SCRATCH_BYTES:
        chunk //= 2
    return chunk


def _scratch(workspace: Optional[dict], name: str, rows: int, cols: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A (rows, cols) scratch buffer, kept in `workspace` between calls when one is given: the
    (chunk, vocab) buffers are hundreds of MB, and allocating them afresh every step makes the
    kernel fault their pages in again (~0.1-0.3 s a step on a CPU)."""
    if workspace is None:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    t = workspace.get(name)
    if t is None or t.dtype != dtype or t.device != device or t.size(1) != cols or t.size(0) < rows:
        workspace[name] = t = torch.empty(rows, cols, dtype=dtype, device=device)
    return t[:rows]


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = -100, chunk: int = 1024,
                  workspace: Optional[dict] = None, log_counts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden @ weight.T` without full logits.

    hidden (B, T, C), weight (V, C), targets (B, T) -> scalar. log_counts (V,) or None: row v
    stands for exp(log_counts[v]) tokens that share it (SeenVocab): the softmax counts it that many
    times, and a target in it gets its one token's share. Matmuls run in the autocast dtype when
    autocast is on; the softmax is always fp32.
    workspace: a dict that keeps the (chunk, V) scratch buffers from one call to the next
    (CausalLMLoss passes its own).
    """
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.reshape(-1),
                                         ignore_index, chunk, dtype, workspace,
                                         None if log_counts is None else log_counts.float())


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h @ w.T)[n, y_n] per row, the vocabulary in column chunks.

    Each (N, chunk) block of logits is one matmul whose output stays in the last-level cache while
    an online logsumexp takes it in (max and sum of exponentials carried from block to block) and
    the targets' logits are picked out; no (N, V) tensor is formed for the log-softmax, its
    backward or a one-hot. When a gradient is needed the blocks are kept (fp32, as autograd would
    keep the logits) and the backward turns each into g * softmax in place: grad_h = g * (w[y] -
    softmax @ w), grad_w likewise by rows. Matmuls run in `dtype`, the softmax in fp32."""

    @staticmethod
    def forward(ctx, h, w, y, chunk: int, dtype: torch.dtype):
        # h (N, C), w (V, C), y (N,) -> (N,) fp32
        N, dev = h.size(0), h.device
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        hc, wc = h.to(dtype), w.to(dtype)
        m = torch.full((N,), float("-inf"), device=dev)
        s = torch.zeros(N, device=dev)
        picked = torch.zeros(N, device=dev)
        blocks = []
        for a in range(0, w.size(0), chunk):
            z = mm_nt(hc, wc[a:a + chunk]).float()                          # (N, chunk)
            top = torch.maximum(m, z.amax(1))
            s = s * torch.exp(m - top) + torch.exp(z - top[:, None]).sum(1)
            m = top
            rows = ((y >= a) & (y < a + z.size(1))).nonzero().squeeze(1)
            picked[rows] = z[rows, y[rows] - a]
            if keep:
                blocks.append(z)
        lse = m + torch.log(s)
        ctx.save_for_backward(hc, wc, y, lse)
        ctx.blocks, ctx.dtypes = blocks, (h.dtype, w.dtype)
        return picked - lse

    @staticmethod
    def backward(ctx, g):
        hc, wc, y, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = g.float()
        gh = torch.zeros(hc.shape, dtype=torch.float32, device=hc.device) if need_h else None
        gw = torch.zeros(wc.shape, dtype=torch.float32, device=hc.device) if need_w else None
        a = 0
        for z in ctx.blocks:
            n = z.size(1)
            p = z.sub_(lse[:, None]).exp_().mul_(g[:, None])                # g * softmax, (N, n) fp32
            pc = p if hc.dtype == torch.float32 else p.to(hc.dtype)
            if need_h and uses_onednn(pc, wc):
                gh -= mm_nt(pc, wc[a:a + n].t())
            elif need_h and pc.dtype == gh.dtype:
                gh.addmm_(pc, wc[a:a + n], alpha=-1)
            elif need_h:
                gh -= torch.mm(pc, wc[a:a + n])
            if need_w:
                gw[a:a + n] -= torch.mm(pc.t(), hc)
            a += n
        ctx.blocks = None
        if need_h:
            gh += g[:, None] * wc[y].float()
        if need_w:
            gw.index_add_(0, y, g[:, None] * hc.float())
        return (gh.to(ctx.dtypes[0]) if need_h else None, gw.to(ctx.dtypes[1]) if need_w else None,
                None, None, None)


def linear_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     chunk: int = 4096) -> torch.Tensor:
    """log softmax(hidden @ weight.T) at the targets, per row: hidden (N, C), weight (V, C), targets
    (N,) -> (N,) fp32, without (N, V) tensors beyond the kept logits (see _LinearLogProbs). The
    matmuls run in the autocast dtype when autocast is on; the softmax is always fp32."""
    dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearLogProbs.apply(hidden, weight, targets, chunk, dtype)


class SeenVocab:
    """The tokens a training corpus uses, and a head that costs only theirs.

    A model trained from scratch never sees most of GPT-2's 50,257 tokens in a small corpus: they
    never occur as inputs, and as outputs they only ever get pushed down. `tie(model)` gives all of
    those unseen tokens one and the same (tied) embedding row. Full-vocabulary training keeps equal
    rows equal (equal gradients, equal AdamW updates), and their softmax terms add up to one term:
    logsumexp_j(h . w_j) = h . u + log(n_unseen). So the head runs over the seen rows plus one row
    that stands for the rest, with log(n_unseen) added to its logit, and the gradient of that row,
    n_unseen times each tied row's, is shared out among them (`rows`). The loss, the gradients and
    the AdamW steps are those of the full head on the same model (training targets are seen tokens
    by construction; an unseen target, e.g. in validation text, gets its exact loss but would untie
    the rows if trained on); the head's cost is that of the seen rows only. The saved model is an
    ordinary GPT-2 with all 50,257 rows.
    """

    def __init__(self, seen: torch.Tensor, vocab_size: int):
        seen = torch.as_tensor(seen, dtype=torch.long).unique()            # sorted ids
        mask = torch.ones(vocab_size, dtype=torch.bool)
        mask[seen] = False
        self.vocab_size, self.seen, self.unseen = vocab_size, seen, mask.nonzero().squeeze(1)
        if self.unseen.numel() == 0:
            raise ValueError("SeenVocab: every token is seen; use the full head")
        self.rep = int(self.unseen[0])                                        # the row that stands for all
        self.index = torch.cat([seen, self.unseen[:1]])                       # (K+1,) rows of the head
        self.remap = torch.full((vocab_size,), len(seen), dtype=torch.long)   # token id -> head row
        self.remap[seen] = torch.arange(len(seen))
        self.log_counts = torch.zeros(len(seen) + 1)                          # rows per head row
        self.log_counts[-1] = math.log(self.unseen.numel())

    @classmethod
    def of_tokens(cls, tokens, vocab_size: int, max_share: float = 0.8,
                  chunk: int = 1 << 24) -> Optional["SeenVocab"]:
        """The vocabulary of a token array (e.g. a uint16 memmap); None when the tokens use more than
        `max_share` of the vocabulary (the saving would be small)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for s in range(0, len(tokens), chunk):
            counts += np.bincount(np.asarray(tokens[s:s + chunk], dtype=np.int64), minlength=vocab_size)[:vocab_size]
            if (counts > 0).sum() > max_share * vocab_size:
                return None
        return cls(torch.from_numpy(np.flatnonzero(counts)), vocab_size)

    def __len__(self) -> int:
        return len(self.seen)

    @torch.no_grad()
    def tie(self, weight: torch.Tensor) -> None:
        """Give every unseen token the representative's row (a model at initialisation)."""
        weight[self.unseen] = weight[self.rep].clone()

    @torch.no_grad()
    def is_tied(self, weight: torch.Tensor) -> bool:
        u = self.unseen.to(weight.device)
        return bool((weight[u] == weight[self.rep]).all())

    def to(self, device) -> "SeenVocab":
        """The index tensors on `device` (in place; returns self)."""
        self.seen, self.unseen, self.index = self.seen.to(device), self.unseen.to(device), self.index.to(device)
        self.remap, self.log_counts = self.remap.to(device), self.log_counts.to(device)
        return self

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """(K+1, C): the seen rows of `weight` (V, C), then the tied rows' shared one. Backward is
        that of [w[seen]; mean(w[unseen])], which it equals while they are tied: each tied row
        gets 1/n_unseen of the shared row's gradient (the full head's gradient, row by row)."""
        return _SeenRows.apply(weight, self.index, self.unseen)


class _SeenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, index, unseen):
        ctx.save_for_backward(index, unseen)
        ctx.shape = w.shape
        return w.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        index, unseen = ctx.saved_tensors
        gw = g.new_zeros(ctx.shape)
        gw.index_copy_(0, index[:-1], g[:-1])
        gw[unseen] = g[-1] / unseen.numel()
        return gw, None, None


class CausalLMLoss(nn.Module):
    """Wraps a GPT so that forward(x, y[, pos, mask]) -> mean loss over the labels; the unit that
    DDP/compile wrap in training.

    vocab: a SeenVocab whose unseen rows the model has tied (`vocab.tie`): the fused head then runs
    over the seen rows only, with the full head's loss and gradients. If the rows turn out untied at
    the first step (e.g. weights loaded from elsewhere), the full head is used instead."""

    def __init__(self, model: nn.Module, fused: bool = True, vocab: Optional[SeenVocab] = None):
        super().__init__()
        self.model, self.fused = model, fused
        self.workspace: dict = {}               # the fused loss's scratch buffers, reused every step
        self.vocab = vocab if fused else None
        self._checked = False

    def _seen_head(self, weight: torch.Tensor) -> bool:
        """Whether the seen-rows head applies (checked once, at the first step)."""
        if self.vocab is not None and not self._checked:
            self._checked = True
            if self.vocab.is_tied(weight):
                self.vocab.to(weight.device)
            else:
                self.vocab = None
        return self.vocab is not None

    def forward(self, x: torch.Tensor, y: torch.Tensor, pos: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean loss over the labels y != -100; pos / mask: the model's (packed batches)."""
        kw = {"pos": pos, "mask": mask}
        if self.fused:
            w = self.model.lm_head.weight
            if self._seen_head(w):
                v = self.vocab
                y = torch.where(y >= 0, v.remap[y.clamp(min=0)], y)
                return fused_lm_loss(self.model.hidden_states(x, **kw), v.rows(w), y,
                                     workspace=self.workspace, log_counts=v.log_counts)
            return fused_lm_loss(self.model.hidden_states(x, **kw), w, y, workspace=self.workspace)
        from ..model.gpt import lm_loss
        return lm_loss(self.model(x, **kw), y)
