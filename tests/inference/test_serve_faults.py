"""Regression tests for the server faults of issue 33 that the engine and the request handling own:
one request's failure ends that request only (1), deeply nested JSON (2), over-long chats (3),
clients leaving mid-upload (6), the capacity rule (8, 9) and API details (12).

Live servers are test_serve's (uvicorn in a thread, loopback, a tiny model); their log is captured
in-process at the level `minigpt serve` runs uvicorn (warning) and must hold no traceback.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from importlib import resources

import pytest
from test_serve import PROMPTS, TOK, Live, alone, run_all, tiny

from minigpt.inference import engine as engine_module
from minigpt.inference.engine import Engine, EngineBusy, Request
from minigpt.inference.sampling import SamplingConfig

httpx = pytest.importorskip("httpx")
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "Name three colors."}]


class LogCapture(logging.Handler):
    """Every record the uvicorn loggers (from WARNING) and the root logger pass, formatted."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []
        self.loggers = [logging.getLogger("uvicorn"), logging.getLogger()]
        self.reset()

    def reset(self):
        """Forget what was logged; (re)attach (a later uvicorn.Config replaces the uvicorn handlers)."""
        self.lines.clear()
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        for lg in self.loggers:
            if self not in lg.handlers:
                lg.addHandler(self)

    def emit(self, record):
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def close(self):
        for lg in self.loggers:
            lg.removeHandler(self)
        super().close()


@pytest.fixture(scope="module")
def srv():
    server = Live(max_batch=4, max_waiting=8)
    server.log = LogCapture()
    yield server
    server.log.close()
    server.close()


def post(srv, path, body=None, **kw):
    kw.setdefault("timeout", 30)
    return httpx.post(srv.url + path, json=body, **kw) if body is not None else httpx.post(srv.url + path, **kw)


def error_of(r, status=400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def wait_quiet(srv, seconds=0.5):
    """Let the server finish logging, then: no traceback, at most one line."""
    time.sleep(seconds)
    assert "Traceback" not in srv.log.text and len(srv.log.lines) <= 1, srv.log.text


def wait_idle(engine, timeout=10):
    deadline = time.time() + timeout
    while (engine.load["active"] or engine.load["waiting"] or engine._admitted) and time.time() < deadline:
        time.sleep(0.02)
    assert engine.load["active"] == engine.load["waiting"] == engine._admitted == 0, engine.load


# --- 1: one request's failure ends that request only -----------------------------------------------

@pytest.mark.parametrize("poison", [SamplingConfig(1e-300), SamplingConfig(3e-42, top_k=5, top_p=0.5),
                                   SamplingConfig(1.0, repetition_penalty=1e-300),
                                   SamplingConfig(0.0, repetition_penalty=1e-200)])
def test_extreme_sampling_is_computed_safely_in_a_batch(poison):
    """Temperatures whose logits / T overflow (and penalties that send logits to inf) sample
    greedily instead of raising; the rows beside them are untouched."""
    model = tiny()
    engine = Engine(model, TOK, max_batch=4).start()
    try:
        ids = [TOK.encode(p) for p in PROMPTS[:4]]
        reqs = [Request(p, 14, SamplingConfig(0.0), eos_token_id=-1) for p in ids]
        reqs[1] = Request(ids[1], 14, poison, seed=3, eos_token_id=-1)
        events = run_all(engine, reqs)
        assert [ev[-1].kind for ev in events.values()] == ["done"] * 4, events
        for i in (0, 2, 3):
            assert reqs[i].tokens == alone(model, ids[i], 14), i
        if poison.repetition_penalty == 1.0:                      # tiny temperature: the greedy limit
            assert reqs[1].tokens == alone(model, ids[1], 14)
        wait_idle(engine)
    finally:
        engine.stop()


def test_a_row_that_fails_mid_stream_ends_alone(monkeypatch):
    """A failure while sampling one row (here on its 5th token) gives that row an error event; the
    others, the last of which moves into its cache row, decode exactly as alone."""
    real, calls = engine_module.sample_next, []

    def flaky(logits, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom in one row")
        return real(logits, **kw)
    monkeypatch.setattr(engine_module, "sample_next", flaky)
    model = tiny()
    engine = Engine(model, TOK, max_batch=4).start()
    try:
        ids = [TOK.encode(p) for p in PROMPTS[4:8]]
        reqs = [Request(p, 20, SamplingConfig(0.0), eos_token_id=-1) for p in ids]
        reqs[1] = Request(ids[1], 20, SamplingConfig(0.8), seed=1, eos_token_id=-1)   # the only sampled row
        events = run_all(engine, reqs)
        assert events[1][-1].kind == "error" and "boom in one row" in events[1][-1].message
        assert len(reqs[1].tokens) == 4
        for i in (0, 2, 3):
            assert events[i][-1].kind == "done" and reqs[i].tokens == alone(model, ids[i], 20), i
        wait_idle(engine)
    finally:
        engine.stop()


def test_poison_requests_leave_a_concurrent_stream_alone(srv):
    srv.log.reset()
    body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 150, "stream": True}
    want = TOK.decode(alone(srv.model, TOK.encode("The quick brown fox"), 150))
    bad = [{"temperature": 1e-300}, {"temperature": 5e-45, "top_p": 0.9},
           {"temperature": 1, "repetition_penalty": 1e-300}, {"temperature": 2, "repetition_penalty": 1e-250}]
    codes, text = [], ""
    with httpx.stream("POST", srv.url + COMPLETIONS, json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: {"))
        threads = [threading.Thread(target=lambda b=b: codes.append(post(srv, CHAT, {
            "messages": USER, "max_tokens": 12, **b}).status_code)) for b in bad]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        rest = [line for line in lines if line.startswith("data: ")]
    for line in [first] + rest:
        if line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
    assert codes == [200] * len(bad) and rest[-1] == "data: [DONE]"
    assert text == want
    wait_quiet(srv)


# --- 2: deeply nested JSON --------------------------------------------------------------------------

def _deep_temperature(depth):
    return ('{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + "[" * depth + "]" * depth
            + "}").encode()


@pytest.mark.parametrize("raw", [b"[" * 30000 + b"]" * 30000, b'{"k": ' * 20000 + b"1" + b"}" * 20000,
                                 b'{"stop": ' + b"[" * 50000 + b"]" * 50000 + b"}", _deep_temperature(900),
                                 _deep_temperature(400)])
def test_deeply_nested_json_is_a_400(srv, raw):
    srv.log.reset()
    err = error_of(post(srv, CHAT, content=raw, headers={"Content-Type": "application/json"}))
    assert len(err["message"]) < 300, err
    wait_quiet(srv, 0.2)
    assert srv.client.models.list().data[0].id == "tiny"


# --- 3: a chat longer than the context ------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("messages, max_tokens", [
    ([{"role": "user", "content": "lorem ipsum " * 150}], 16),
    ([{"role": "user", "content": "a"}], 250),
    ([m for i in range(12) for m in ({"role": "user", "content": f"question {i} " * 6},
                                     {"role": "assistant", "content": f"answer {i} " * 6})]
     + [{"role": "user", "content": "last"}], 20),
])
def test_chat_longer_than_the_context_is_context_length_exceeded(srv, messages, max_tokens, stream):
    err = error_of(post(srv, CHAT, {"messages": messages, "max_tokens": max_tokens, "stream": stream}))
    assert err["code"] == "context_length_exceeded" and "256" in err["message"], err


def test_chat_truncation_is_only_on_request(srv):
    long = [{"role": "user", "content": "lorem ipsum " * 150}]
    r = post(srv, CHAT, {"messages": long, "max_tokens": 16, "temperature": 0, "truncation": "auto"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] + 16 <= 256
    assert error_of(post(srv, CHAT, {"messages": long, "max_tokens": 16, "truncation": "middle"}))["param"] \
        == "truncation"
    assert error_of(post(srv, CHAT, {"messages": long, "max_tokens": 16, "truncation": "disabled"}))["code"] \
        == "context_length_exceeded"
    # without max_tokens the whole prompt is kept; the reply gets what room is left
    near = [{"role": "user", "content": "word " * 180}]
    full = len(TOK.encode_ordinary("word " * 180))
    usage = post(srv, CHAT, {"messages": near, "temperature": 0}).json()["usage"]
    assert usage["prompt_tokens"] > full and usage["prompt_tokens"] + usage["completion_tokens"] <= 256
    # the chat page's choice: it asks for truncation (tests/inference/test_web.py drives the page)
    assert 'truncation: "auto"' in resources.files("minigpt").joinpath("assets/chat.html").read_text("utf-8")


# --- 6: a client that leaves during its upload ----------------------------------------------------

def test_client_leaving_mid_upload_logs_no_traceback(srv):
    srv.log.reset()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                      b"\r\nContent-Length: 5000\r\n\r\n" + b'{"messages": [' + b" " * 100)
            time.sleep(0.15)
    wait_quiet(srv)
    assert post(srv, CHAT, {"messages": USER, "max_tokens": 2}).status_code == 200


# --- 8, 9: the capacity rule ------------------------------------------------------------------------

@pytest.mark.parametrize("max_batch, max_waiting", [(4, 8), (2, 0), (1, 3)])
def test_submit_refuses_only_past_max_batch_plus_max_waiting(max_batch, max_waiting):
    engine = Engine(tiny(), TOK, max_batch=max_batch, max_waiting=max_waiting)    # not started: all wait
    for _ in range(max_batch + max_waiting):
        engine.submit(Request([1, 2], 4))
    with pytest.raises(EngineBusy, match="at capacity"):
        engine.submit(Request([1, 2], 4))


def test_max_waiting_zero_serves_while_a_slot_is_free():
    srv = Live(max_batch=2, max_waiting=0, model=tiny(block_size=2048))      # long streams: both slots busy
    try:
        for _ in range(3):
            assert post(srv, CHAT, {"messages": USER, "max_tokens": 4}).status_code == 200
        body = {"prompt": "The quick brown fox", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", srv.url + COMPLETIONS, json=body, timeout=30) as r1, \
                httpx.stream("POST", srv.url + COMPLETIONS, json=body, timeout=30) as r2:
            lines = r1.iter_lines(), r2.iter_lines()        # (kept: a dropped iterator closes its stream)
            next(lines[0]), next(lines[1])
            assert srv.engine.load["active"] == 2
            assert error_of(post(srv, COMPLETIONS, body), 429)["code"] == "server_busy"
        wait_idle(srv.engine)
    finally:
        srv.close()


def test_twelve_at_once_fit_four_decoding_and_eight_waiting(srv):
    barrier, codes = threading.Barrier(12), []

    def one(i):
        barrier.wait(10)
        codes.append(post(srv, CHAT, {"messages": [{"role": "user", "content": PROMPTS[i % 8]}],
                                      "max_tokens": 24, "temperature": 0}).status_code)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 12
    wait_idle(srv.engine)


# --- 12: API details ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allow", [("GET", CHAT, "POST"), ("PUT", COMPLETIONS, "POST"),
                                                 ("DELETE", "/", "GET, HEAD")])
def test_405_names_the_allowed_methods(srv, method, path, allow):
    r = httpx.request(method, srv.url + path, timeout=30)
    error_of(r, 405)
    assert set(r.headers.get("allow", "").split(", ")) == set(allow.split(", "))


@pytest.mark.parametrize("extra, param", [
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"top_logprobs": 0, "logprobs": False}, "top_logprobs"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": "yes"}, "stream_options"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens"),
    ({"max_completion_tokens": -7}, "max_completion_tokens"),
])
def test_api_details_are_checked(srv, extra, param):
    assert error_of(post(srv, CHAT, {"messages": USER, **extra}))["param"] == param


def test_valid_details_still_work(srv):
    r = post(srv, CHAT, {"messages": USER, "max_completion_tokens": None, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    r = post(srv, CHAT, {"messages": USER, "max_completion_tokens": 2, "max_tokens": 9, "logprobs": True,
                         "top_logprobs": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    assert len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
    with httpx.stream("POST", srv.url + CHAT, json={"messages": USER, "max_tokens": 3, "stream": True,
                                                    "stream_options": {"include_usage": False}}, timeout=30) as r:
        assert '"usage"' not in "".join(r.iter_lines())
