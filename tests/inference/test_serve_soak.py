"""Soak test of `minigpt serve` (issue 33): 32 concurrent clients, loopback only, about a minute.

The server runs as the command line starts it (`python -m minigpt serve --model DIR`, a tiny saved
model, a 3 s --request-timeout), in a subprocess whose stderr (its log) and RSS (/proc/PID/status)
are read. First every valid request of a fixed pool is sent alone, one after another: its reply is
the expected one. Then 32 client threads send, for SOAK_SECONDS, a seeded random mix of:

- valid chat and completion requests of the pool, streamed or not: greedy (temperature 0, and the
  greedy limit temperature 1e-300), seeded sampling with repetition_penalty 1e-300, various
  max_tokens / max_completion_tokens, stop strings, logprobs;
- the invalid requests of issue 33: deeply nested JSON, a chat longer than the context, top_logprobs
  without logprobs, include_usage "no", max_completion_tokens 0, a wrong method, a foreign Origin or
  Host, malformed JSON, a body over 1 MB;
- streams the client closes after two events, uploads abandoned halfway, uploads that stall or
  trickle past the request deadline, and half-sent request heads.

Pass: every valid reply equals the same request's reply alone (text, finish_reason, token count);
every invalid request gets its 4xx JSON error; a stalled upload gets a 408 or is closed; the server's
RSS at the end is within 10% of its RSS after the warm-up; its log holds no traceback; afterwards it
is idle (/health: 0 active, 0 waiting) and still answers. The README's server section reports a run.

MINIGPT_SOAK_SECONDS sets the length of the storm (default 40; e.g. 600 for a longer local soak).
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from serving import free_port
from test_serve import tiny

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

ROOT = Path(__file__).resolve().parents[2]
SEED = 33
CLIENTS = 32
SOAK_SECONDS = float(os.environ.get("MINIGPT_SOAK_SECONDS", "40"))
WARMUP_SECONDS = min(10.0, SOAK_SECONDS / 4)     # RSS is sampled after this much of the storm ...
RSS_GROWTH = 0.10                                # ... and may grow by at most this much by the end
REQUEST_TIMEOUT = 3.0                            # --request-timeout: stalled uploads end within the test
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON = {"Content-Type": "application/json"}


# --- the server, as the command line starts it --------------------------------------------------

class Server:
    """`python -m minigpt serve` in a subprocess on a free loopback port; stderr goes to a file."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = free_port()
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minigpt", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--request-timeout", str(REQUEST_TIMEOUT), "--threads", "1", "--max-batch", "8",
             "--max-waiting", "64"], stdout=subprocess.DEVNULL, stderr=self._log, cwd=ROOT)
        deadline = time.time() + 120
        while True:
            assert self.proc.poll() is None, f"the server exited: {self.log()}"
            assert time.time() < deadline, "the server did not come up in 120 s"
            try:
                if self.health()["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.2)

    def health(self) -> dict:
        return json.loads(exchange(self.port, "GET", "/health", timeout=10).data)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


class Reply:
    def __init__(self, status: int, headers: dict, data: bytes):
        self.status, self.headers, self.data = status, headers, data

    def error(self, status: int) -> dict:
        """The OpenAI-shaped error of a `status` reply."""
        assert self.status == status, (self.status, self.data[:300])
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        err = json.loads(self.data)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        return err


def exchange(port: int, method: str, path: str, body: Optional[bytes] = None, headers: Optional[dict] = None,
             timeout: float = 60) -> Reply:
    """One request on a fresh connection; the whole reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def post(port: int, path: str, body: dict, **headers) -> Reply:
    return exchange(port, "POST", path, json.dumps(body).encode(), {**JSON, **headers})


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    t0, data = time.monotonic(), b""
    s.settimeout(limit)
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


# --- the valid requests and their replies alone --------------------------------------------------

USERS = ["Name three colors.", "Hello there", "What is the capital of France?", "Shall I compare thee",
         "Write a haiku about rain.", "x y z", "Explain continuous batching in one line.", "a"]
PROMPTS = ["Once upon a time", "The quick brown fox", "One two three four five", "import torch\n",
           "Q: What is 2 + 2?\nA:", "The meaning of life is", "Dear Sir or Madam,", "a"]
STOPS = [None, None, "e", ", ", ["o", "zz"], "\n", ["in", "at", "the"], "s"]


def valid_pool(rng: random.Random) -> list[tuple[str, str, dict]]:
    """(kind, route, body) of the valid requests: greedy chats and completions of various lengths and
    stops, then the extreme sampling arguments of issue 33 (which are computed safely)."""
    pool = []
    for i in range(12):
        msgs = [{"role": "user", "content": USERS[i % len(USERS)]}]
        if i % 4 == 1:
            msgs.insert(0, {"role": "system", "content": "Be brief."})
        if i % 4 == 2:
            msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] + msgs
        if i % 4 == 3:
            msgs[-1]["content"] = [{"type": "text", "text": msgs[-1]["content"]}]
        body = {"messages": msgs, "temperature": 0, rng.choice(["max_tokens", "max_completion_tokens"]):
                rng.choice([1, 3, 8, 16, 24, 32, 48])}
        pool.append(("greedy chat", CHAT, _extras(body, rng, i)))
    for i in range(12):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "temperature": 0, "max_tokens": rng.choice([1, 4, 12, 24, 48])}
        pool.append(("greedy completion", COMPLETIONS, _extras(body, rng, i)))
    user = [{"role": "user", "content": "Tell me a story."}]
    pool += [("extreme sampling", CHAT, {"messages": user, "temperature": 1e-300, "max_tokens": 20}),
             ("extreme sampling", COMPLETIONS, {"prompt": "The sea", "temperature": 5e-45, "top_p": 0.9,
                                                "max_tokens": 20}),
             ("extreme sampling", CHAT, {"messages": user, "temperature": 1, "repetition_penalty": 1e-300,
                                         "seed": 7, "max_tokens": 20}),
             ("extreme sampling", COMPLETIONS, {"prompt": "The sea", "temperature": 2, "repetition_penalty": 1e-250,
                                                "seed": 3, "max_tokens": 20})]
    return pool


def _extras(body: dict, rng: random.Random, i: int) -> dict:
    if (stop := STOPS[i % len(STOPS)]) is not None:
        body["stop"] = stop
    if i % 5 == 4:
        body.update({"logprobs": True, "top_logprobs": 2} if "messages" in body else {"logprobs": 2})
    return body


def full_reply(r: Reply, chat: bool) -> tuple:
    """(text, finish_reason, completion tokens) of a non-streamed reply."""
    assert r.status == 200, (r.status, r.data[:300])
    out = json.loads(r.data)
    choice = out["choices"][0]
    return (choice["message"]["content"] if chat else choice["text"], choice["finish_reason"],
            out["usage"]["completion_tokens"])


def streamed_reply(r: Reply, chat: bool, usage: bool) -> tuple:
    """(text, finish_reason, completion tokens or None) of a streamed reply, checking its events."""
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream"), (r.status, r.data[:300])
    events = [line[6:] for line in r.data.decode().split("\n") if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), chunks
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1, finishes
    tokens = None
    if usage:
        assert chunks[-1]["choices"] == [], chunks[-1]
        tokens = chunks[-1]["usage"]["completion_tokens"]
    return text, finishes[0], tokens


# --- the cases the clients draw -----------------------------------------------------------------

class Soak:
    """The shared state of one soak run: the pool and its expected replies, counts, failures."""

    def __init__(self, server: Server, pool: list, expected: list):
        self.server, self.port, self.pool, self.expected = server, server.port, pool, expected
        self.counts: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def record(self, case: str, outcome: str = "ok") -> None:
        with self.lock:
            self.counts[case] += 1
            self.outcomes[case, outcome] += 1

    # valid requests
    def valid(self, rng: random.Random) -> str:
        k = rng.randrange(len(self.pool))
        kind, route, body = self.pool[k]
        chat, stream, usage = route == CHAT, rng.random() < 0.5, rng.random() < 0.5
        if stream:
            body = {**body, "stream": True, **({"stream_options": {"include_usage": True}} if usage else {})}
        r = post(self.port, route, body)
        got = streamed_reply(r, chat, usage) if stream else full_reply(r, chat)
        want = self.expected[k]
        assert got[:2] == want[:2] and got[2] in (None, want[2]), (body, got, want)
        return kind + (", streamed" if stream else "")

    # invalid requests: (route, raw body, headers, status, what error.code / error.param must be)
    def invalid(self, rng: random.Random) -> str:
        name, method, route, raw, headers, status, check = rng.choice(INVALID)(rng)
        r = exchange(self.port, method, route, raw, {**JSON, **headers})
        err = r.error(status)
        assert check(err, r), (name, err, r.headers)
        return name

    def disconnect(self, rng: random.Random) -> str:
        """A long stream the client closes after two events."""
        body = json.dumps({"prompt": rng.choice(PROMPTS), "temperature": rng.choice([0, 0.8]), "max_tokens": 200,
                           "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(_head("POST", COMPLETIONS, len(body)) + body)
            data = b""
            while data.count(b"data: ") < 2:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        return "mid-stream disconnect"

    def abandoned_upload(self, rng: random.Random) -> str:
        """Headers and part of the body, then the client leaves."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(_head("POST", CHAT, 5000) + b'{"messages": [' + b" " * rng.randrange(200))
            time.sleep(rng.uniform(0, 0.2))
        return "upload abandoned"

    def slow_upload(self, rng: random.Random) -> str:
        """Headers and part of the body, then a stall (or a byte every 0.4 s) past the deadline."""
        trickle = rng.random() < 0.5
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(_head("POST", rng.choice([CHAT, COMPLETIONS]), 5000) + b'{"messages": [')
            return self._stalled(s, "slow upload" + (" (trickled)" if trickle else ""), trickle)

    def half_head(self, rng: random.Random) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(_head("POST", CHAT, 100)[:rng.randrange(10, 60)])
            return self._stalled(s, "half-sent head", False)

    def _stalled(self, s: socket.socket, case: str, trickle: bool) -> str:
        t0 = time.monotonic()
        try:
            while trickle and time.monotonic() - t0 < 2 * REQUEST_TIMEOUT:
                s.sendall(b" ")
                time.sleep(0.4)
        except OSError:                              # closed by the server while trickling
            pass
        reply, _ = read_until_closed(s, 3 * REQUEST_TIMEOUT + 10)
        elapsed = time.monotonic() - t0
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.8 * REQUEST_TIMEOUT < elapsed < 3 * REQUEST_TIMEOUT + 5, elapsed
        return f"{case}: {'408' if reply else 'closed'}"


def _head(method: str, path: str, length: int, host: str = "127.0.0.1") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _code(code: Optional[str] = None, param: Optional[str] = None, has: str = "") -> Callable:
    return lambda err, r: (code is None or err["code"] == code) and (param is None or err["param"] == param) \
        and has in err["message"]


def _body(d: dict) -> bytes:
    return json.dumps(d).encode()


USER = [{"role": "user", "content": "Name three colors."}]
LONG = [{"role": "user", "content": "lorem ipsum " * 150}]           # ~300 tokens, the context is 256
INVALID: list[Callable] = [
    lambda rng: ("nested JSON (arrays)", "POST", CHAT, b"[" * 40000 + b"]" * 40000, {}, 400,
                 _code(has="nests too deeply")),
    lambda rng: ("nested JSON (objects)", "POST", rng.choice([CHAT, COMPLETIONS]),
                 b'{"k": ' * 25000 + b"1" + b"}" * 25000, {}, 400, _code(has="nests too deeply")),
    lambda rng: ("chat over the context", "POST", CHAT, _body({"messages": LONG, "max_tokens": 16,
                                                               "stream": rng.random() < 0.5}), {}, 400,
                 _code("context_length_exceeded")),
    lambda rng: ("top_logprobs without logprobs", "POST", CHAT, _body({"messages": USER, "top_logprobs": 2}), {},
                 400, _code(param="top_logprobs")),
    lambda rng: ('include_usage "no"', "POST", rng.choice([CHAT, COMPLETIONS]),
                 _body({"messages": USER, "prompt": "x", "stream": True, "stream_options": {"include_usage": "no"}}),
                 {}, 400, _code(param="stream_options.include_usage")),
    lambda rng: ("max_completion_tokens 0", "POST", CHAT, _body({"messages": USER, "max_completion_tokens": 0,
                                                                 "max_tokens": 5}), {}, 400,
                 _code(param="max_completion_tokens")),
    lambda rng: ("wrong method", rng.choice(["GET", "PUT", "DELETE"]), rng.choice([CHAT, COMPLETIONS]), None, {},
                 405, lambda err, r: r.headers.get("allow") == "POST"),
    lambda rng: ("foreign Origin", "POST", CHAT, _body({"messages": USER, "max_tokens": 2}),
                 {"Origin": rng.choice(["http://evil.example", "http://localhost:3000", "null"])}, 403,
                 _code("origin_not_allowed")),
    lambda rng: ("foreign Host", "POST", COMPLETIONS, _body({"prompt": "hi", "max_tokens": 2}),
                 {"Host": rng.choice(["evil.example", "evil.example:8000", "rebind.attacker.test"])}, 403,
                 _code("host_not_allowed")),
    lambda rng: ("malformed JSON", "POST", rng.choice([CHAT, COMPLETIONS]),
                 rng.choice([b'{"messages": [', b"{'prompt': 'x'}", b"\xff\xfe", b""]), {}, 400,
                 _code(has="not valid JSON")),
    lambda rng: ("body over 1 MB", "POST", CHAT, b'{"messages": "' + b"x" * (1 << 20) + b'"}', {}, 413,
                 _code(has="over the limit")),
]

MIX = [(Soak.valid, 60), (Soak.invalid, 26), (Soak.disconnect, 6), (Soak.abandoned_upload, 3),
       (Soak.slow_upload, 3), (Soak.half_head, 2)]


def client(soak: Soak, i: int, until: float) -> None:
    rng = random.Random(SEED * 1000 + i)
    cases, weights = zip(*MIX)
    while time.monotonic() < until:
        case = rng.choices(cases, weights)[0]
        try:
            name = case(soak, rng)
        except Exception as e:                       # an assertion or a connection error: a failure
            name = case.__name__
            with soak.lock:
                soak.failures.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            soak.record(name, "FAILED")
            continue
        soak.record(*name.split(": ", 1))


# --- the test ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("soak")
    tiny().save_pretrained(d / "tiny")
    srv = Server(d / "tiny", d / "server.log")
    yield srv
    srv.close()


def test_soak_32_clients_mixed_valid_invalid_and_slow(server):
    if not Path(f"/proc/{server.proc.pid}/status").exists():
        pytest.skip("needs /proc to read the server's RSS")
    t0 = time.monotonic()
    pool = valid_pool(random.Random(SEED))
    expected = [full_reply(post(server.port, route, body), route == CHAT) for _, route, body in pool]
    t_ref = time.monotonic() - t0
    assert len({e[0] for e in expected}) > len(pool) // 2, expected            # varied replies, not one text

    soak = Soak(server, pool, expected)
    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(soak, i, start + SOAK_SECONDS), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(WARMUP_SECONDS)
    rss_warm, rss_peak, busiest = server.rss_kb(), 0, {"active": 0, "waiting": 0}
    while any(t.is_alive() for t in threads):
        rss_peak, load = max(rss_peak, server.rss_kb()), server.health()
        busiest = {k: max(v, load[k]) for k, v in busiest.items()}
        assert time.monotonic() - start < SOAK_SECONDS + 60, "the clients did not finish"
        time.sleep(0.5)
    t_storm = time.monotonic() - start

    deadline = time.monotonic() + 15                 # disconnected streams leave at the next step
    while (load := server.health())["active"] or load["waiting"]:
        assert time.monotonic() < deadline, load
        time.sleep(0.1)
    after = full_reply(post(server.port, pool[0][1], pool[0][2]), pool[0][1] == CHAT)
    rss_end = server.rss_kb()
    log = server.log()

    lines = [f"{case:<40} {n:>5}  " + ", ".join(f"{o} {c}" for (k, o), c in sorted(soak.outcomes.items()) if k == case)
             for case, n in sorted(soak.counts.items())]
    print(f"\nsoak: {sum(soak.counts.values())} requests from {CLIENTS} clients in {t_storm:.1f} s (reference "
          f"replies {t_ref:.1f} s); RSS after warm-up {rss_warm / 1024:.1f} MiB, peak {rss_peak / 1024:.1f} MiB, "
          f"end {rss_end / 1024:.1f} MiB; most seen at once: {busiest['active']} decoding, {busiest['waiting']} "
          f"waiting; log {len(log.splitlines())} lines\n" + "\n".join(lines))
    assert not soak.failures, f"{len(soak.failures)} failures:\n" + "\n".join(soak.failures[:20])
    assert sum(n for (case, o), n in soak.outcomes.items() if case.startswith("greedy")) > 100, soak.counts
    assert busiest["active"] > 1, busiest                       # the replies were compared under batching
    assert rss_end <= rss_warm * (1 + RSS_GROWTH), (rss_warm, rss_end)
    assert "Traceback" not in log and "Exception in ASGI" not in log, log[-3000:]
    assert after == expected[0]
    assert server.proc.poll() is None
