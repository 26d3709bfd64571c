"""An OpenAI-compatible HTTP API and a browser chat page over `minigpt.inference.engine.Engine`.

    GET  /                      the chat page (minigpt/assets/chat.html, self-contained)
    GET  /health                200 {"status": "ok", ...} once the model is loaded
    GET  /v1/models             the served model: id, context_length
    POST /v1/chat/completions   messages rendered with the model's tuned template (as in chat)
    POST /v1/completions        a raw prompt: a string, token ids, or a list of either (one choice
                                each); echo + logprobs give the prompt's own log-probabilities, scored
                                in fp32 (minigpt.inference.completions: what lm-evaluation-harness's
                                local-completions backend reads)
    GET  /tokenizer_info, POST /tokenize, POST /detokenize
                                the tokenizer, as vLLM's routes (lm-evaluation-harness's "remote"
                                tokenizer backend uses them, so it needs no tokenizer of its own)

Both POST routes take temperature, top_p, top_k, repetition_penalty, max_tokens (also
max_completion_tokens, which wins when given), stop (a string or up to 4), seed, n=1, stream
(+ stream_options, an object: include_usage, a boolean), logprobs (+ top_logprobs, which needs
logprobs: true / an int for completions). Extreme sampling arguments are computed safely (a
temperature so small that logits / temperature overflow samples greedily: see sampling.py).

Context: as OpenAI, a prompt that does not fit the context with max_tokens is a 400 with
error.code "context_length_exceeded" (streaming or not); a chat without max_tokens gets
min(256, context / 2) reply tokens, fewer when the prompt leaves less room. The extension field
"truncation": "auto" (the name OpenAI's Responses API uses; default "disabled") asks a chat to be
fitted instead, by the chat context policy (minigpt.inference.chat.ChatSession.build_prompt: the
oldest turns are dropped, then an over-long last message keeps its end); the chat page sends it.

Limits: a body of at most MAX_BODY_BYTES (413 above), JSON nested too deeply is a 400; a request
is refused with 429 only when max_batch + max_waiting requests are already admitted (Engine).
Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with 400 / 401 / 404 /
405 (with an Allow header) / 413 / 429. A client that leaves while sending its body is not logged.

Network (minigpt.inference.http_guard): create_app puts the routes behind HostOriginGuard, a 403
for a foreign Host on a loopback bind (DNS rebinding) or a foreign web Origin, CORS for allowed
origins; `minigpt serve` adds a deadline for receiving each request (408) and a connection limit (503).

Needs the optional extra: pip install -e ".[serve]" (Starlette + uvicorn). The command that loads a
model and runs this app is `minigpt serve` (minigpt.commands.serve).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from importlib import resources
from typing import Any, Optional, Sequence

from ..errors import ConfigError
from .api_request import (
    ApiError,
    read_common,
    read_field,
    read_logprobs,
    read_prompts,
    read_truncation,
    read_turns,
    show,
)
from .chat import ChatError, ChatSession, ReplyTrim
from .completions import complete_many, token_text
from .engine import Engine, EngineBusy, Event, Request
from .http_guard import HostOriginGuard, OriginPolicy
from .scoring import Scorer

__all__ = ["create_app", "ApiError", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
EOT = "<|endoftext|>"


# --- the app ------------------------------------------------------------------------------------

class _Service:
    """The served model: prompt building (the chat policy), requests to the engine, responses."""

    def __init__(self, engine: Engine, model_id: str, template: str, api_key: Optional[str],
                 scorer: Optional[Scorer]):
        self.engine, self.model_id, self.template, self.api_key = engine, model_id, template, api_key
        self._scorer = scorer
        self.created = int(time.time())

    @property
    def scorer(self) -> Scorer:
        """What scores echoed prompts: the one create_app was given, else one over the engine's model."""
        if self._scorer is None:
            self._scorer = Scorer(self.engine.model)
        return self._scorer

    def chat_prompt(self, body: dict, common: dict) -> tuple[list[int], list[str], int]:
        system, turns, last = read_turns(body.get("messages"))
        truncate = read_truncation(body)
        bs = self.engine.context_length
        max_new = common["max_tokens"] or min(256, bs // 2)
        if max_new >= bs:
            raise ApiError(400, f"max_tokens {max_new} must be below the model's context of {bs} tokens (the "
                                "prompt needs room too)", "max_tokens", "context_length_exceeded")
        try:
            session = ChatSession(self.engine.model, self.engine.tokenizer, template=self.template, system=system,
                                  stop=common["stops"], max_new_tokens=min(max_new, bs - 1))
            session.turns = turns
            if not truncate:
                return self._whole_chat(session, last, common["max_tokens"], max_new)
            ids, _, _ = session.build_prompt(last)
        except ChatError as e:                             # the chat's words for it, in the API's terms
            msg = str(e).replace(" with /set max_new_tokens N", "").replace("max_new_tokens", "max_tokens")
            raise ApiError(400, f"{msg} (context {bs} tokens)", "max_tokens", "context_length_exceeded") from None
        return ids, session.stop_strings, max_new

    def _whole_chat(self, session: ChatSession, last: str, asked: Optional[int],
                    max_new: int) -> tuple[list[int], list[str], int]:
        """Every message in the prompt, as OpenAI: a 400 when they and the reply do not fit (without
        max_tokens the reply takes what room is left)."""
        msgs = session.messages() + [{"role": "user", "content": last}]
        ids = session.template.prompt_ids(msgs, session.tokenizer, session.system)
        bs = self.engine.context_length
        if asked is None:
            max_new = max(1, min(max_new, bs - len(ids)))
        if len(ids) + max_new > bs:
            raise ApiError(400, f"This model's maximum context length is {bs} tokens. However, you requested "
                                f"{len(ids) + max_new} tokens ({len(ids)} in the messages, {max_new} in the "
                                "completion). Please reduce the length of the messages or completion (or send "
                                "\"truncation\": \"auto\" to drop the oldest turns).", "messages",
                           "context_length_exceeded")
        return ids, session.stop_strings, max_new

    def completion_prompt(self, ids: list[int], common: dict) -> tuple[list[int], list[str], int]:
        bs = self.engine.context_length
        max_new = common["max_tokens"] or 16
        if len(ids) + max_new > bs:
            raise ApiError(400, f"prompt of {len(ids)} tokens + max_tokens {max_new} exceeds the model's context "
                                f"of {bs} tokens", "max_tokens", "context_length_exceeded")
        return ids, common["stops"], max_new

    def check_model(self, body: dict) -> None:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model_id:
            raise ApiError(404, f"model {show(model)} not found; this server serves {self.model_id!r}", "model",
                           "model_not_found")


def _read_page() -> str:
    return resources.files("minigpt").joinpath("assets/chat.html").read_text(encoding="utf-8")


def create_app(engine: Engine, model_id: str, template: str = "alpaca", api_key: Optional[str] = None, *,
               loopback: bool = True, allow_origins: Sequence[str] = (), allow_hosts: Sequence[str] = (),
               scorer: Optional[Scorer] = None):
    """The Starlette app serving `engine` (already started) under the name `model_id`, behind
    minigpt.inference.http_guard.HostOriginGuard: `loopback` (the server listens on loopback only):
    the Host header must be localhost, an IP address or one of `allow_hosts` (DNS rebinding); an
    Origin header must be the server's own or one of `allow_origins` (which get CORS headers).
    `scorer` scores echoed prompts (minigpt.inference.scoring.Scorer, made before the model's
    decoding weights were swapped in; default: one over engine.model as it is)."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    svc = _Service(engine, model_id, template, api_key, scorer)

    async def page(request):
        return HTMLResponse(_read_page())

    async def health(request):
        return JSONResponse({"status": "ok", "model": model_id, **engine.load})

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": svc.created, "owned_by": "minigpt",
             "context_length": engine.context_length}]})

    async def chat_completions(request):
        return await _complete(svc, request, chat=True)

    async def completions(request):
        return await _complete(svc, request, chat=False)

    routes = [Route("/", page), Route("/health", health), Route("/v1/models", _authed(svc, models)),
              Route("/v1/chat/completions", _authed(svc, chat_completions), methods=["POST"]),
              Route("/v1/completions", _authed(svc, completions), methods=["POST"]),
              Route("/tokenizer_info", _authed(svc, _tokenizer_info(svc))),
              Route("/tokenize", _authed(svc, _tokenize(svc)), methods=["POST"]),
              Route("/detokenize", _authed(svc, _detokenize(svc)), methods=["POST"])]
    guard = Middleware(HostOriginGuard, loopback=loopback, allow_origins=OriginPolicy(allow_origins),
                       allow_hosts=allow_hosts)
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _not_allowed}, middleware=[guard])
    app.state.service = svc
    return app


def _tokenizer_info(svc: _Service):
    from starlette.responses import JSONResponse

    async def info(request):
        return JSONResponse({"tokenizer_class": "tiktoken gpt2", "eos_token": EOT, "bos_token": EOT, "unk_token": EOT,
                             "pad_token": None, "model_max_length": svc.engine.context_length})
    return info


def _tokenize(svc: _Service):
    from starlette.responses import JSONResponse

    async def tokenize(request):
        body = await _body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string", "prompt")
        ids = svc.engine.tokenizer.encode(prompt, allowed_special={EOT})
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": svc.engine.context_length})
    return tokenize


def _detokenize(svc: _Service):
    from starlette.responses import JSONResponse

    async def detokenize(request):
        body = await _body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                   and 0 <= t < svc.engine.vocab for t in tokens):
            raise ApiError(400, f"'tokens' must be a list of token ids in 0..{svc.engine.vocab - 1}", "tokens")
        return JSONResponse({"prompt": svc.engine.tokenizer.decode(tokens)})
    return detokenize


async def _not_found(request, exc):
    from starlette.responses import JSONResponse
    return JSONResponse(ApiError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)


async def _not_allowed(request, exc):
    from starlette.responses import JSONResponse
    return JSONResponse(ApiError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                        status_code=405, headers=getattr(exc, "headers", None))     # Allow: the methods


def _authed(svc: _Service, handler):
    """The handler behind the API key check (when the server has one) and the error mapping."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, Response

    async def wrapped(request):
        try:
            if svc.api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not secrets.compare_digest(token.encode(), svc.api_key.encode()):
                    raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                   type="authentication_error", code="invalid_api_key")
            return await handler(request)
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except ClientDisconnect:                  # left while sending its body: nobody to answer, nothing to log
            return Response(status_code=499)      # (nginx's "client closed request"; never sent)
    return wrapped


async def _body(request) -> Any:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {size} bytes is over the limit of {MAX_BODY_BYTES}")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise ApiError(400, "the request body's JSON nests too deeply") from None


async def _complete(svc: _Service, request, chat: bool):
    from starlette.responses import JSONResponse, StreamingResponse

    body = await _body(request)
    svc.check_model(body)
    echo = not chat and read_field(body, "echo", (bool,), False)
    common = read_common(body, echo)
    logprobs = read_logprobs(body, chat)
    if chat:
        ids, stops, max_new = svc.chat_prompt(body, common)
    else:
        prompts = read_prompts(body, svc.engine.tokenizer, svc.engine.vocab)
        if echo or len(prompts) > 1:                      # minigpt.inference.completions
            if common["stream"]:
                raise ApiError(400, "'stream' is not supported with 'echo' or with several prompts", "stream")
            return JSONResponse(await complete_many(svc, prompts, common, echo, logprobs))
        ids, stops, max_new = svc.completion_prompt(prompts[0], common)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    trim = ReplyTrim() if chat else None                  # chat replies: no outer whitespace, as in chat

    def on_event(ev: Event) -> None:                      # (runs in the engine's thread)
        if trim is not None and ev.kind == "text":
            ev.text = trim.feed(ev.text)
            if not ev.text and logprobs is None:
                return
        loop.call_soon_threadsafe(events.put_nowait, ev)
    req = Request(ids, max_new, common["sampling"], stops, common["seed"], logprobs, on_event=on_event)
    try:
        svc.engine.submit(req)
    except EngineBusy as e:
        raise ApiError(429, str(e), type="rate_limit_error", code="server_busy") from None
    except ConfigError as e:
        raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
    shape = _Shape(svc.model_id, chat, logprobs is not None)
    if common["stream"]:
        return StreamingResponse(_sse(req, events, shape, common["usage"]), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    pieces: list[Event] = []
    try:
        while (ev := await events.get()).kind == "text":
            pieces.append(ev)
    finally:
        req.cancel()
    if ev.kind == "error":
        raise ApiError(500, ev.message, type="server_error")
    done = ev
    return JSONResponse(shape.full(pieces, done))


async def _sse(req: Request, events: asyncio.Queue, shape: "_Shape", usage: bool):
    """Server-sent events: the role chunk, text chunks, the finish chunk, usage, [DONE]."""
    try:
        if shape.chat:
            yield _data(shape.chunk({"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if ev.kind == "error":
                yield _data(ApiError(500, ev.message, type="server_error").body())
                break
            if ev.kind == "text":
                yield _data(shape.chunk_text(ev))
                continue
            yield _data(shape.chunk_finish(ev.finish_reason))
            if usage:
                yield _data({**shape.head("chunk"), "choices": [], "usage": _usage(ev)})
            break
        yield "data: [DONE]\n\n"
    finally:                                           # also when the client went away mid-stream
        req.cancel()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(done: Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class _Shape:
    """OpenAI response objects for one request (chat.completion[.chunk] or text_completion)."""

    def __init__(self, model_id: str, chat: bool, logprobs: bool):
        self.model_id, self.chat, self.logprobs = model_id, chat, logprobs
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def head(self, kind: str) -> dict:
        obj = ("chat.completion" + (".chunk" if kind == "chunk" else "")) if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def _lp(self, evs: list[Event]):
        if not self.logprobs:
            return None
        tok = token_text
        if self.chat:
            return {"content": [{"token": tok(e.token), "logprob": e.logprob, "bytes": list(tok(e.token).encode()),
                                 "top_logprobs": [{"token": tok(j), "logprob": v, "bytes": list(tok(j).encode())}
                                                  for j, v in e.top_logprobs or []]} for e in evs]}
        return {"tokens": [tok(e.token) for e in evs], "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [{tok(j): v for j, v in e.top_logprobs or []} for e in evs], "text_offset": None}

    def chunk(self, delta: dict, finish: Optional[str] = None, lp=None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": lp, "finish_reason": finish}
        return {**self.head("chunk"), "choices": [choice]}

    def chunk_text(self, ev: Event) -> dict:
        return self.chunk({"content": ev.text}, lp=self._lp([ev]))

    def chunk_finish(self, reason: str) -> dict:
        return self.chunk({}, reason)

    def full(self, pieces: list[Event], done: Event) -> dict:
        text = "".join(e.text for e in pieces)
        lp = self._lp(pieces)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": done.finish_reason}
        return {**self.head("full"), "choices": [choice], "usage": _usage(done)}
