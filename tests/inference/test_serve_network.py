"""The server against the network (minigpt.inference.http_guard, minigpt.commands.serve): Host / Origin
checks and CORS, the API key's sources, binding before loading, request deadlines and the connection
limit. Loopback only; each wait is bounded."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from serving import free_port, wait_healthy
from test_serve import TOK, Live, tiny

from minigpt.inference.engine import Engine

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


class Guarded:
    """What `minigpt serve` runs: create_app behind the guard, served by the guarded protocol on the
    sockets bind_sockets bound (127.0.0.1, a free port), in a thread."""

    def __init__(self, request_timeout: float = 30.0, max_connections=None, **app_kw):
        from minigpt.inference.http_guard import bind_sockets, server_config
        from minigpt.inference.serve import create_app

        self.engine = Engine(tiny(), TOK, max_batch=2).start()
        socks, loopback = bind_sockets("127.0.0.1", 0)
        assert loopback and len(socks) == 1
        self.port = socks[0].getsockname()[1]
        app = create_app(self.engine, "tiny", **{"loopback": loopback, **app_kw})
        self.server = uvicorn.Server(server_config(app, request_timeout=request_timeout,
                                                   max_connections=max_connections, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": socks}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def plain():
    """The server as test_serve.py builds it: create_app's defaults, uvicorn's own protocol."""
    srv = Live()
    yield srv
    srv.close()


def _refused(r: httpx.Response, code: str) -> None:
    assert r.status_code == 403, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    assert "access-control-allow-origin" not in r.headers


# --- fault 4: DNS rebinding and cross-origin requests ----------------------------------------------

@pytest.mark.parametrize("headers, code", [
    ({"host": "evil.example"}, "host_not_allowed"),
    ({"host": "evil.example:{port}"}, "host_not_allowed"),
    ({"host": "127.0.0.1.evil.example:{port}"}, "host_not_allowed"),
    ({"origin": "http://evil.example"}, "origin_not_allowed"),
    ({"origin": "null"}, "origin_not_allowed"),
    ({"origin": "http://127.0.0.1:{other}"}, "origin_not_allowed"),        # another local port: another site
    ({"origin": "http://localhost:{port}"}, "origin_not_allowed"),         # sent to 127.0.0.1: cross-origin
])
def test_loopback_server_refuses_foreign_host_or_origin(plain, headers, code):
    headers = {k: v.format(port=plain.port, other=plain.port + 1) for k, v in headers.items()}
    steps = plain.engine.steps
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/", None), ("GET", "/health", None),
                               ("POST", "/v1/chat/completions", CHAT), ("POST", "/v1/completions",
                                                                         {"prompt": "x", "max_tokens": 2})]:
        _refused(httpx.request(method, plain.url + path, json=body, headers=headers, timeout=30), code)
    assert plain.engine.steps == steps                          # nothing was generated for them


def test_loopback_server_answers_its_own_names_and_origin(plain):
    p = plain.port
    for host in (f"127.0.0.1:{p}", f"localhost:{p}", f"[::1]:{p}", f"LocalHost:{p}", f"chat.localhost:{p}"):
        assert httpx.get(plain.url + "/v1/models", headers={"host": host}, timeout=30).status_code == 200, host
        origin = f"http://{host}"                                 # the chat page, opened under that name
        r = httpx.post(plain.url + "/v1/chat/completions", json=CHAT, headers={"host": host, "origin": origin},
                       timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"], (host, r.text)
    assert httpx.get(plain.url + "/").text.lstrip().lower().startswith("<!doctype html")


def test_api_key_does_not_lift_the_origin_check():
    srv = Live(api_key="s3cret")
    try:
        auth = {"authorization": "Bearer s3cret"}
        _refused(httpx.post(srv.url + "/v1/chat/completions", json=CHAT, timeout=30,
                            headers={**auth, "origin": "http://evil.example"}), "origin_not_allowed")
        _refused(httpx.get(srv.url + "/v1/models", headers={**auth, "host": "evil.example"}), "host_not_allowed")
        assert httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30).status_code == 200
    finally:
        srv.close()


def test_allowed_origins_get_cors_headers_and_preflight_answers():
    app_origin = "http://localhost:3000"
    srv = Guarded(allow_origins=[app_origin + "/", "null"])
    try:
        pre = httpx.options(srv.url + "/v1/chat/completions", timeout=30, headers={
            "origin": app_origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os"})
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == app_origin
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "x-stainless-os" in pre.headers["access-control-allow-headers"]
        r = httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers={"origin": app_origin}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app_origin
        assert "origin" in r.headers["vary"].lower()
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30,
                          headers={"origin": app_origin}) as s:
            assert s.headers["access-control-allow-origin"] == app_origin
            assert list(s.iter_lines())[-2] == "data: [DONE]"
        assert httpx.get(srv.url + "/v1/models", headers={"origin": "null"}).status_code == 200
        for other in ("http://localhost:3001", "https://localhost:3000", "http://evil.example"):
            _refused(httpx.options(srv.url + "/v1/chat/completions", headers={
                "origin": other, "access-control-request-method": "POST"}), "origin_not_allowed")
            _refused(httpx.post(srv.url + "/v1/chat/completions", json=CHAT, headers={"origin": other}),
                     "origin_not_allowed")
    finally:
        srv.close()
    srv = Guarded(allow_origins=["*"], allow_hosts=["proxy.example"])
    try:
        r = httpx.get(srv.url + "/v1/models", headers={"origin": "https://any.example"}, timeout=30)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://any.example"
        assert httpx.get(srv.url + "/v1/models", headers={"host": "proxy.example"}).status_code == 200
        _refused(httpx.get(srv.url + "/v1/models", headers={"host": "other.example"}), "host_not_allowed")
    finally:
        srv.close()


def test_non_loopback_bind_checks_the_origin_not_the_host():
    """Reachable from other machines (loopback=False): any Host name is fine (the key protects it);
    a foreign web page is still refused."""
    srv = Guarded(loopback=False)
    try:
        assert httpx.get(srv.url + "/v1/models", headers={"host": "mybox.lan:8000"}, timeout=30).status_code == 200
        _refused(httpx.get(srv.url + "/v1/models", headers={"origin": "http://evil.example"}), "origin_not_allowed")
        r = httpx.get(srv.url + "/v1/models", headers={"host": "mybox.lan:8000", "origin": "http://mybox.lan:8000"})
        assert r.status_code == 200
    finally:
        srv.close()


def test_bad_allow_origin_is_refused_at_once():
    from minigpt.errors import ConfigError
    from minigpt.inference.serve import create_app

    engine = Engine(tiny(), TOK, max_batch=1)                   # not started: create_app checks first
    for bad in ("evil.example", "http://x.example/path", "http://x.example:99999"):
        with pytest.raises(ConfigError, match="--allow-origin must be an origin"):
            create_app(engine, "tiny", allow_origins=[bad])


# --- fault 5: the API key ------------------------------------------------------------------------

@pytest.mark.parametrize("argv, env", [
    (["--api-key", ""], None),
    (["--api-key", "   "], None),
    ([], ""),                                                     # MINIGPT_API_KEY set but empty
    (["--api-key-file", "{blank}"], None),
])
def test_an_empty_api_key_is_refused_not_ignored(tmp_path, monkeypatch, capsys, argv, env):
    from minigpt.commands import serve

    (tmp_path / "blank.txt").write_text("\n")
    argv = [a.format(blank=tmp_path / "blank.txt") for a in argv]
    monkeypatch.delenv("MINIGPT_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("MINIGPT_API_KEY", env)
    with pytest.raises(SystemExit) as e:                         # (a missing model: never serves)
        serve.main(["--model", str(tmp_path / "missing"), "--port", str(free_port()), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "empty: " in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_api_key_from_file_or_environment(tmp_path, monkeypatch, capsys):
    from minigpt.commands.args import parse_args
    from minigpt.commands.serve import ServeArgs

    monkeypatch.setenv("MINIGPT_API_KEY", "from-env")
    assert parse_args(ServeArgs, []).api_key == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert parse_args(ServeArgs, ["--api-key-file", str(tmp_path / "key")]).api_key == "from-file"
    monkeypatch.delenv("MINIGPT_API_KEY")
    assert parse_args(ServeArgs, []).api_key is None
    for argv in (["--api-key", "a", "--api-key-file", str(tmp_path / "key")], ["--api-key", " padded "],
                 ["--api-key-file", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit):
            parse_args(ServeArgs, argv)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "padded" not in err, err


# --- fault 7: a taken port or a bad host, before the model loads -----------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("net") / "tiny"
    tiny().save_pretrained(d)
    return d


def _serve(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "minigpt", "serve", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("case", ["port in use", "port in use, model never read", "bad..host", "192.0.2.1"])
def test_taken_port_or_bad_host_is_one_line_before_the_model_loads(model_dir, tmp_path, case):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        model = str(tmp_path / "never-read") if "never read" in case else str(model_dir)
        host = [] if case.startswith("port") else ["--host", case]
        r = _serve("--model", model, "--port", str(port), *host)
    want = f"port {port} is already in use" if case.startswith("port") else case
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and want in r.stderr, r.stderr
    assert "serving" not in r.stdout and "Traceback" not in r.stderr


def test_cli_wiring_key_file_timeout_and_origin(model_dir, tmp_path):
    """`minigpt serve` end to end: the key from a file (absent from the process list), the request
    deadline from --request-timeout, a foreign Origin refused even with the key."""
    (tmp_path / "key").write_text("k-" + "7" * 20 + "\n")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(model_dir), "--port", str(port),
                          "--api-key-file", str(tmp_path / "key"), "--request-timeout", "1", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(p, url, timeout=90)
        assert "7" * 20 not in Path(f"/proc/{p.pid}/cmdline").read_bytes().decode(errors="replace")
        auth = {"authorization": "Bearer k-" + "7" * 20}
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(url + "/v1/models", headers=auth, timeout=10).status_code == 200
        _refused(httpx.get(url + "/v1/models", headers={**auth, "origin": "http://evil.example"}, timeout=10),
                 "origin_not_allowed")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            reply, elapsed = _read_until_closed(s)
        assert reply.startswith(b"HTTP/1.1 408") and elapsed < 8, (reply, elapsed)
    finally:
        p.terminate()
        out, err = p.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in out and "API key required" in out and "Traceback" not in err, err


# --- fault 10: request deadlines (slowloris) and the connection limit --------------------------------

def _read_until_closed(s: socket.socket, limit: float = 10.0) -> tuple[bytes, float]:
    t0, data = time.monotonic(), b""
    s.settimeout(limit)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - t0


@pytest.fixture(scope="module")
def quick():
    """A guarded server whose requests must arrive within 0.5 s."""
    srv = Guarded(request_timeout=0.5)
    yield srv
    srv.close()


def _timed_out(reply: bytes) -> None:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower(), reply
    assert json.loads(body)["error"]["code"] == "request_timeout"


def test_half_sent_head_gets_408_and_the_connection_closes(quick):
    with quick.raw() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: app")
        reply, elapsed = _read_until_closed(s)
    _timed_out(reply)
    assert 0.3 < elapsed < 5, elapsed


def test_a_trickled_head_does_not_extend_the_deadline(quick):
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
    with quick.raw() as s:
        t0, closed = time.monotonic(), False
        for i in range(len(head)):                                # one byte every 20 ms: 4 s if never cut
            try:
                s.sendall(head[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.02)
            if time.monotonic() - t0 > 1.0:
                break
        reply, _ = _read_until_closed(s)
    assert closed or reply.startswith(b"HTTP/1.1 408"), reply
    assert time.monotonic() - t0 < 5


def test_an_idle_connection_is_closed_without_a_reply(quick):
    with quick.raw() as s:
        reply, elapsed = _read_until_closed(s)
    assert reply == b"" and 0.3 < elapsed < 5, (reply, elapsed)


def test_a_slow_body_gets_408_and_frees_everything(quick):
    with quick.raw() as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"messages\": ")
        reply, elapsed = _read_until_closed(s)
    _timed_out(reply)
    assert 0.3 < elapsed < 5 and quick.engine.load["active"] == 0
    assert httpx.get(quick.url + "/health", timeout=10).status_code == 200


def test_the_deadline_never_cuts_a_reply_or_a_kept_alive_connection():
    srv = Guarded(request_timeout=0.2)
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            time.sleep(0.3)                                       # idle past the deadline, under keep-alive (5 s)
            assert c.get("/health").status_code == 200
            t0 = time.monotonic()
            with c.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 250, "temperature": 0,
                                                           "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line]
            elapsed = time.monotonic() - t0
            assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) > 200, lines[-3:]
            full = c.post("/v1/completions", json={"prompt": "Once", "max_tokens": 250, "temperature": 0})
            assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == 250
        assert elapsed > 0.2, f"the reply took {elapsed:.2f} s, too fast to show that the deadline spares it"
    finally:
        srv.close()


def test_connections_over_the_limit_get_503():
    srv = Guarded(request_timeout=10, max_connections=3)
    idle = []
    try:
        idle = [srv.raw() for _ in range(3)]
        time.sleep(0.3)                                           # the server has taken them
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 503
        for s in idle:
            s.close()
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.time() < deadline, "the closed connections were not released"
            time.sleep(0.1)
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_serve_command_defaults_bound_connections_and_request_time():
    from minigpt.commands.args import parse_args
    from minigpt.commands.serve import ServeArgs

    args = parse_args(ServeArgs, [])
    assert 30 <= args.request_timeout <= 60 and args.max_connections == args.max_batch + args.max_waiting + 64
    for argv in (["--request-timeout", "0"], ["--request-timeout", "nan"], ["--max-connections", "0"]):
        with pytest.raises(SystemExit):
            parse_args(ServeArgs, argv)
