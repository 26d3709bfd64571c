"""`/v1/completions` beyond one streamed or generated reply: `echo` and several prompts at once.

echo: the choice's text starts with the prompt, and with `logprobs: N` its tokens come back with
their log-probabilities in OpenAI's legacy format: tokens, token_logprobs (null for the first
token, which has no context), top_logprobs (null first, then the N likeliest tokens at each
position), text_offset (each token's start in the text). The prompt is scored exactly, by the fp32
model (minigpt.inference.scoring.Scorer), whatever weights the server decodes with; max_tokens may
then be 0 (the prompt alone) or k > 0 (k generated tokens follow, with theirs). This is what
lm-evaluation-harness's local-completions backend sends for its log-likelihood requests: echo,
logprobs 1, max_tokens 1, temperature 0 and a list of token-id prompts. A greedy single token after
a scored prompt is read from the same fp32 forward; longer or sampled continuations come from
the decoding engine.

Several prompts (a list of strings or of token-id lists): one choice each, with its index, in the
order given; their generations run together in the engine's batch. Not with stream.
"""
from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Optional

from ..errors import ConfigError
from .api_request import ApiError
from .engine import EngineBusy, Event, Request
from .generate import TextStream

__all__ = ["complete_many", "token_text"]


def token_text(t: int) -> str:
    """A token as the API shows it: its bytes as UTF-8, invalid pieces replaced."""
    from ..data.tokenizer import get_tokenizer
    return get_tokenizer().decode_single_token_bytes(t).decode("utf-8", errors="replace")


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -9999.0


async def complete_many(svc, prompts: list[list[int]], common: dict, echo: bool, logprobs: Optional[int]) -> dict:
    """The text_completion object for `prompts` (see the module docstring). `svc` is the server's
    service: engine, scorer, model_id."""
    engine = svc.engine
    bs = engine.context_length
    max_new = 16 if common["max_tokens"] is None else common["max_tokens"]
    for i, ids in enumerate(prompts):
        if len(ids) + max_new > bs:
            where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            raise ApiError(400, f"{where} of {len(ids)} tokens + max_tokens {max_new} exceeds the model's context of "
                                f"{bs} tokens", "max_tokens", "context_length_exceeded")
    s = common["sampling"]
    scored = None
    fast = echo and logprobs is not None and max_new == 1 and s.temperature == 0 and s.repetition_penalty == 1.0
    if echo and logprobs is not None:
        scored = await asyncio.to_thread(svc.scorer.score, prompts, max(logprobs, int(fast)), fast)
    if max_new == 0:
        gens = [([], _done("length", ids, 0)) for ids in prompts]
    elif fast:
        gens = [_greedy_token(engine, ids, sc.top[-1][0], common["stops"], logprobs, sc.top[-1])
                for ids, sc in zip(prompts, scored)]
    else:
        gens = await _generate(engine, prompts, max_new, common, logprobs)
    choices = []
    for i, (ids, (events, done)) in enumerate(zip(prompts, gens)):
        lp = None if logprobs is None else _legacy(ids if echo else [], scored[i] if echo else None, events, logprobs)
        text = (engine.tokenizer.decode(ids) if echo else "") + "".join(e.text for e in events)
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": done.finish_reason})
    n_in, n_out = sum(len(p) for p in prompts), sum(d.completion_tokens for _, d in gens)
    return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
            "model": svc.model_id, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


def _done(reason: str, ids: list[int], n: int) -> Event:
    return Event("done", finish_reason=reason, prompt_tokens=len(ids), completion_tokens=n)


def _greedy_token(engine, ids: list[int], best: tuple[int, float], stops: list[str], logprobs: int,
                  tops: list) -> tuple[list[Event], Event]:
    """The one greedy token after a scored prompt, from the scoring forward's own distribution."""
    t, lp = best
    eos = t == 50256
    stream = TextStream(engine.tokenizer, stops)
    text = "" if eos else stream.feed(t)
    text += stream.finish()
    ev = Event("text", text=text, token=t, logprob=_finite(lp), top_logprobs=[(j, v) for j, v in tops[:logprobs]])
    return [ev], _done("stop" if eos or stream.stopped else "length", ids, 1)


async def _generate(engine, prompts: list[list[int]], max_new: int, common: dict,
                    logprobs: Optional[int]) -> list[tuple[list[Event], Event]]:
    """Each prompt's generated events and its "done" event, all prompts in the engine's batch."""
    loop = asyncio.get_running_loop()
    queues = [asyncio.Queue() for _ in prompts]
    reqs = []
    try:
        for ids, q in zip(prompts, queues):
            def on_event(ev: Event, q=q) -> None:                     # (runs in the engine's thread)
                loop.call_soon_threadsafe(q.put_nowait, ev)
            req = Request(ids, max_new, common["sampling"], common["stops"], common["seed"], logprobs,
                          on_event=on_event)
            try:
                reqs.append(engine.submit(req))
            except EngineBusy as e:
                raise ApiError(429, str(e), type="rate_limit_error", code="server_busy") from None
            except ConfigError as e:
                raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
        out = []
        for q in queues:
            events = []
            while (ev := await q.get()).kind == "text":
                events.append(ev)
            if ev.kind == "error":
                raise ApiError(500, ev.message, type="server_error")
            out.append((events, ev))
        return out
    finally:
        for req in reqs:
            req.cancel()


def _legacy(prompt: list[int], scored, events: list[Event], logprobs: int) -> dict:
    """OpenAI's legacy logprobs object over the echoed prompt (when given) and the generated tokens."""
    tokens = [token_text(t) for t in prompt] + [token_text(e.token) for e in events]
    values: list = []
    tops: list = []
    if prompt:
        values = [None] + [_finite(v) for v in scored.logprobs]
        tops = [None] + [{token_text(j): _finite(v) for j, v in scored.top[i][:logprobs]}
                         for i in range(len(prompt) - 1)]
    values += [e.logprob for e in events]
    tops += [{token_text(j): v for j, v in e.top_logprobs or []} for e in events]
    offsets, at = [], 0
    for piece in tokens:
        offsets.append(at)
        at += len(piece)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
