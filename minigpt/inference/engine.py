"""Continuous batching: many concurrent requests decoded together on one static KV cache.

Decoding one token reads every weight once, so on a CPU (and a GPU at small batch) serving N
clients one after another costs ~N times what serving them together does. `Engine` runs one
decoding thread over up to `max_batch` requests at once:

* a request joins between two steps: its prompt is prefilled alone into a free row of the cache
  (rows 0..n-1 are always the active ones), and its first token is sampled from that prefill;
* every step feeds each active row its last token at the row's own position (one KV write per
  row, `KVCache.update` with per-row positions) and attends under a mask over what the row holds;
* a request leaves when it ends (eos, a stop string, its token budget or the context) or is
  cancelled (a client that went away): the last active row moves into its place at once;
* a request whose own prefill or sampling fails gets an "error" event and leaves alone: the other
  rows go on untouched (only a failure of the batched step itself ends every active request);
* capacity: `submit` accepts a request while fewer than max_batch + max_waiting are admitted and
  unfinished (waiting, joining or decoding), so max_waiting=0 means "no queue": a request is
  accepted exactly when a batch slot is free.

Each row samples with its own settings and generator, so at temperature 0 a request gets the
tokens it would get alone (up to float rounding of the batched matmuls). Text is produced by
`minigpt.inference.generate.TextStream`: stop strings never leak, even split across tokens.

    engine = Engine(model, tokenizer, max_batch=8).start()
    req = engine.submit(Request(prompt_ids, max_new_tokens=64, stops=["###"], on_event=print))
    ...; req.cancel(); engine.stop()
"""
from __future__ import annotations

import collections
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConfigError, MinigptError
from ..model.gpt import check_token_ids
from .generate import TextStream
from .sampling import SamplingConfig, sample_next

__all__ = ["Engine", "EngineBusy", "Request", "Event"]


class EngineBusy(MinigptError):
    """max_batch + max_waiting requests are already admitted; the caller should retry later."""


@dataclass
class Event:
    """What a request gets back: a piece of text (kind "text", with the token and its logprobs when
    asked), then one "done" (finish_reason "stop" | "length", token counts) or one "error"."""

    kind: str
    text: str = ""
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list[tuple[int, float]]] = None
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""


@dataclass
class Request:
    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stops: Sequence[str] = ()
    seed: Optional[int] = None
    logprobs: Optional[int] = None            # None: off; k: the chosen token's + the top k
    eos_token_id: int = 50256
    on_event: Callable[[Event], None] = print
    # state kept by the engine
    cancelled: bool = field(default=False, init=False)
    tokens: list[int] = field(default_factory=list, init=False)
    admitted: bool = field(default=False, init=False)      # counted against the engine's capacity

    def cancel(self) -> None:
        """Leave the batch before the next step (safe from any thread)."""
        self.cancelled = True


class _Row:
    """An active request: its length in the cache, text stream, generator and penalty mask."""

    def __init__(self, req: Request, tokenizer, vocab: int, device):
        self.req, self.length, self.text = req, len(req.prompt), TextStream(tokenizer, req.stops)
        self.gen = torch.Generator(device=device).manual_seed(req.seed) if req.seed is not None else None
        self.seen = None
        if req.sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.tensor(list(req.prompt), device=device)] = True


INITIAL_CACHE_LENGTH = 256      # positions per row the caches start with (Engine grows them on demand)


class Engine:
    """One decoding thread serving up to `max_batch` requests at once; `max_waiting` more wait
    (submit refuses a request once max_batch + max_waiting are admitted and unfinished). The KV
    caches hold `cache_length` positions a row at first and grow (doubling, up to the context) when a
    joining request needs more (prompt + max_new_tokens): `capacity`."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_waiting: int = 64,
                 cache_length: int = INITIAL_CACHE_LENGTH):
        if max_batch < 1 or max_waiting < 0 or cache_length < 1:
            raise ConfigError(f"max_batch and cache_length must be >= 1 and max_waiting >= 0, got {max_batch}, "
                              f"{cache_length}, {max_waiting}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # real tokens a request may hold (block_size: the same number, for older callers): the
        # model's block_size less any virtual tokens (prefix/prompt tuning), whose keys/values
        # new_caches writes once, here, in front of every row
        self.block_size = self.context_length = model.context_length
        self.vocab = model.config.vocab_size
        # positions held per row, grown (doubling, up to the context) when a request needs more:
        # a GPT-Neo 1.3B at its 2048-token context would otherwise hold 6.4 GB of fp32 caches for 8 rows
        self.capacity = min(self.context_length, cache_length)
        self.caches = model.new_caches(max_batch, self.capacity)
        self.rows: list[_Row] = []
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._admitted = 0                               # waiting + joining + decoding, unfinished
        self.steps = 0                                   # decoding steps run (for tests and stats)

    # --- the public side ----------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="minigpt-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: Request) -> Request:
        """Queue a request (ConfigError when it cannot fit the context; EngineBusy when full)."""
        n = len(req.prompt)
        if n:
            check_token_ids(torch.tensor([list(req.prompt)]), self.vocab)
        if n < 1 or req.max_new_tokens < 1 or n + req.max_new_tokens > self.context_length:
            raise ConfigError(f"prompt of {n} tokens + max_tokens {req.max_new_tokens} must fit the model's "
                              f"context of {self.context_length} tokens (and both be >= 1)")
        with self._wake:
            if self._admitted >= self.max_batch + self.max_waiting:
                raise EngineBusy(f"the server is at capacity ({self.max_batch} decoding + {self.max_waiting} "
                                 f"waiting); retry later")
            self._admitted += 1
            req.admitted = True
            self.waiting.append(req)
            self._wake.notify()
        return req

    def _release(self, req: Request) -> None:
        """`req` no longer counts against the capacity (once; it finished, failed or was dropped)."""
        with self._wake:
            if req.admitted:
                req.admitted = False
                self._admitted -= 1

    @property
    def load(self) -> dict:
        return {"active": len(self.rows), "waiting": len(self.waiting), "max_batch": self.max_batch}

    # --- the decoding thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.rows:
                    self._wake.wait()
                if self._stopping:
                    break
                joining = []
                while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            try:
                with torch.inference_mode():
                    for req in joining:
                        self._join(req)
                    self._drop_cancelled()
                    if self.rows:
                        self._step()
            except Exception as e:                        # the batched step failed: every row ends
                for row in self.rows:
                    self._fail(row.req, e)
                self.rows.clear()
        for row in self.rows:
            self._emit(row.req, Event("error", message="the server is shutting down"))

    def _emit(self, req: Request, event: Event) -> None:
        if event.kind in ("done", "error"):
            self._release(req)
        try:
            req.on_event(event)
        except Exception:                                 # a consumer's bug must not stop the batch
            req.cancel()

    def _fail(self, req: Request, e: Exception) -> None:
        """End `req` alone with an error event (it leaves the batch at the next _drop_cancelled)."""
        self._emit(req, Event("error", message=f"decoding failed: {type(e).__name__}: {e}"))
        req.cancel()

    def _join(self, req: Request) -> None:
        """Prefill `req` into the first free row; a failure here ends `req` only (the row stays free)."""
        if req.cancelled:
            self._release(req)
            return
        r = len(self.rows)
        try:
            self._reserve(len(req.prompt) + req.max_new_tokens)
            caches = [c.view(slice(r, r + 1)) for c in self.caches]
            idx = torch.tensor([list(req.prompt)], dtype=torch.long, device=self.model.device)
            logits = self.model(idx, caches=caches, last_only=True)[:, -1]        # (1, V)
            row = _Row(req, self.tokenizer, self.vocab, idx.device)
        except Exception as e:
            self._fail(req, e)
            return
        self.rows.append(row)
        self._advance([row], logits)

    def _reserve(self, length: int) -> None:
        """Make every row's caches hold `length` real tokens (the next power of two, at most the
        context): new caches, the old ones copied in (active rows keep what they hold)."""
        if length <= self.capacity:
            return
        cap = min(self.context_length, 1 << (length - 1).bit_length())
        new = self.model.new_caches(self.max_batch, cap)
        for old, c in zip(self.caches, new):
            end = old.k.size(2)                                  # virtual tokens + the old capacity
            c.k[:, :, :end].copy_(old.k)
            c.v[:, :, :end].copy_(old.v)
        self.caches, self.capacity = new, cap

    def _step(self) -> None:
        n = len(self.rows)
        L = min(self.capacity, 1 << max(6, max(r.length for r in self.rows).bit_length()))
        device = self.model.device
        tok = torch.tensor([[r.req.tokens[-1]] for r in self.rows], dtype=torch.long, device=device)   # (n, 1)
        at = torch.tensor([r.length for r in self.rows], dtype=torch.long, device=device)               # (n,)
        mask = (torch.arange(L, device=device)[None, :] <= at[:, None])[:, None, None, :]              # (n,1,1,L)
        caches = [c.view(slice(0, n), L) for c in self.caches]        # (n, H, P+L, D): any virtual tokens first
        logits = self.model(tok, pos=at[:, None], mask=mask, caches=caches, start=at)[:, -1]           # (n, V)
        for r in self.rows:
            r.length += 1
        self.steps += 1
        self._advance(list(self.rows), logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample each row's next token from its logits (len(rows), V); emit text; retire the finished."""
        logp = logits.float().log_softmax(-1) if any(r.req.logprobs is not None for r in rows) else None
        greedy = logits.argmax(-1).tolist()                       # what plain greedy rows take (one pass)
        for i, row in enumerate(rows):
            try:                                                  # one row's failure ends that row only
                self._advance_row(row, logits[i:i + 1], greedy[i], logp[i] if logp is not None else None)
            except Exception as e:
                self._fail(row.req, e)
        self._drop_cancelled()

    def _advance_row(self, row: _Row, logits: torch.Tensor, greedy: int, logp: Optional[torch.Tensor]) -> None:
        """Sample one row's next token from its logits (1, V); emit its text and, when it ends, "done"."""
        req, s = row.req, row.req.sampling
        if s.temperature == 0 and row.seen is None:
            t = greedy
        else:
            t = int(sample_next(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                repetition_penalty=s.repetition_penalty, seen=row.seen, generator=row.gen)[0])
        req.tokens.append(t)
        if row.seen is not None:
            row.seen[0, t] = True
        finish = self._finish_reason(row, t)
        text = "" if t == req.eos_token_id else row.text.feed(t)
        if finish is not None and not row.text.stopped:
            text += row.text.finish()
        if row.text.stopped:
            finish = "stop"
        if text or req.logprobs is not None:
            self._emit(req, self._text_event(req, text, t, logp))
        if finish is not None:
            self._emit(req, Event("done", finish_reason=finish, prompt_tokens=len(req.prompt),
                                  completion_tokens=len(req.tokens)))
            req.cancel()                                                 # leaves at the next step

    def _finish_reason(self, row: _Row, t: int) -> Optional[str]:
        req = row.req
        if t == req.eos_token_id:
            return "stop"
        if len(req.tokens) >= req.max_new_tokens or row.length + 1 >= self.context_length:
            return "length"
        return None

    @staticmethod
    def _text_event(req: Request, text: str, t: int, logp: Optional[torch.Tensor]) -> Event:
        if logp is None or req.logprobs is None:
            return Event("text", text=text, token=t)
        top = []
        if req.logprobs:
            vals, ids = logp.topk(req.logprobs)
            top = [(int(j), float(v)) for j, v in zip(ids, vals)]
        lp = float(logp[t])
        return Event("text", text=text, token=t, logprob=lp if math.isfinite(lp) else -9999.0, top_logprobs=top)

    def _drop_cancelled(self) -> None:
        """Retire cancelled rows; the last active row moves into each freed row (caches copied)."""
        i = 0
        while i < len(self.rows):
            if not self.rows[i].req.cancelled:
                i += 1
                continue
            gone, last = self.rows[i].req, len(self.rows) - 1
            if i != last:
                n = self.rows[last].length
                for c in self.caches:
                    c.copy_row(i, last, n)
                self.rows[i] = self.rows[last]
            self.rows.pop()
            self._release(gone)
