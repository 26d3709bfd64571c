"""The server: continuous batching (minigpt.inference.engine) and the OpenAI-compatible API (minigpt.inference.serve),
proved with the official `openai` client against a live server on loopback."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from serving import free_port, wait_healthy
from tiny import gpt as tiny_gpt

from minigpt import GPT, get_tokenizer
from minigpt.inference.chat import ChatSession
from minigpt.inference.engine import Engine, Request
from minigpt.inference.sampling import SamplingConfig

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

TOK = get_tokenizer()
PROMPTS = ["Hello there", "The quick brown fox", "One two three four five", "a", "Shall I compare thee",
           "x y z", "What is the capital of France?", "Name three colors."]


def tiny(block_size: int = 256) -> GPT:
    """2 layers, 64 dims, weights at std 0.2 (confident logits, no near-ties to flip)."""
    return tiny_gpt(block_size=block_size, std=0.2)


def alone(model, ids, n):
    return model.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()


def run_all(engine, reqs, timeout=60):
    done = threading.Semaphore(0)
    events = {i: [] for i in range(len(reqs))}
    for i, r in enumerate(reqs):
        def on_event(ev, i=i):
            events[i].append(ev)
            if ev.kind in ("done", "error"):
                done.release()
        r.on_event = on_event
        engine.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=timeout)
    return events


# --- the engine ---------------------------------------------------------------------------------

def test_batched_greedy_equals_alone_and_batches():
    model = tiny()
    engine = Engine(model, TOK, max_batch=4).start()
    try:
        ids = [TOK.encode(p) for p in PROMPTS]
        reqs = [Request(p, 12 + 3 * i, SamplingConfig(0.0), eos_token_id=-1) for i, p in enumerate(ids)]
        events = run_all(engine, reqs)
        for i, (p, r) in enumerate(zip(ids, reqs)):
            assert r.tokens == alone(model, p, 12 + 3 * i), i
            assert events[i][-1].finish_reason == "length" and events[i][-1].completion_tokens == 12 + 3 * i
            assert "".join(e.text for e in events[i] if e.kind == "text") == TOK.decode(r.tokens)
        # 8 requests with 12..33 tokens each: far fewer steps than tokens, as they ran together
        assert engine.steps < 0.5 * sum(len(r.tokens) for r in reqs)
        assert engine.load["active"] == 0
    finally:
        engine.stop()


def test_stop_string_split_across_tokens_never_leaks():
    model = tiny()
    ids = TOK.encode("Once upon a time")
    full = TOK.decode(alone(model, ids, 30))
    stop = full[len(full) // 2 - 2: len(full) // 2 + 2]          # a stop string that likely spans tokens
    engine = Engine(model, TOK, max_batch=2).start()
    try:
        r = Request(ids, 30, SamplingConfig(0.0), stops=[stop], eos_token_id=-1)
        ev = run_all(engine, [r])[0]
        text = "".join(e.text for e in ev if e.kind == "text")
        assert text == full[:full.index(stop)] and stop not in text and ev[-1].finish_reason == "stop"
    finally:
        engine.stop()


def test_cancel_frees_the_row_and_others_continue():
    model = tiny()
    engine = Engine(model, TOK, max_batch=2).start()
    try:
        ids = [TOK.encode(p) for p in PROMPTS[:2]]
        keep = Request(ids[1], 40, SamplingConfig(0.0), eos_token_id=-1)
        gone = Request(ids[0], 200, SamplingConfig(0.0), eos_token_id=-1)
        gone.on_event = lambda ev: gone.cancel() if len(gone.tokens) >= 3 else None
        engine.submit(gone)
        ev = run_all(engine, [keep])[0]
        assert keep.tokens == alone(model, ids[1], 40) and ev[-1].kind == "done"
        assert 3 <= len(gone.tokens) < 200
        deadline = time.time() + 5
        while engine.load["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert engine.load["active"] == 0
    finally:
        engine.stop()


# --- the HTTP API with the official client --------------------------------------------------------

class Live:
    """create_app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, api_key=None, max_batch=8, max_waiting=64, model=None, scorer=None):
        from minigpt.inference.serve import create_app

        self.model = model if model is not None else tiny()
        self.engine = Engine(self.model, TOK, max_batch=max_batch, max_waiting=max_waiting).start()
        self.port = free_port()
        app = create_app(self.engine, "tiny", template="alpaca", api_key=api_key, scorer=scorer)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=api_key or "unused", max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop()


@pytest.fixture(scope="module")
def live():
    srv = Live()
    yield srv
    srv.close()


def expected_chat(model, messages_user: str, max_tokens: int, system=None) -> str:
    s = ChatSession(model, TOK, template="alpaca", system=system, temperature=0.0, max_new_tokens=max_tokens)
    return s.reply(messages_user)


def test_models_and_health(live):
    models = live.client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].model_extra["context_length"] == 256
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_chat_completion_matches_chat_and_stream_matches_full(live):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    r = live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert text == expected_chat(live.model, "Name three colors.", 24, system="Be brief.")
    assert r.object == "chat.completion" and r.usage.completion_tokens >= 1
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=24,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_multi_turn_history_and_max_completion_tokens(live):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and now?"}]
    r = live.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_completion_tokens=5)
    s = ChatSession(live.model, TOK, template="alpaca", temperature=0.0, max_new_tokens=5)
    s.turns = [{"user": "hi", "assistant": "hello"}]
    assert r.choices[0].message.content == s.reply("and now?") and r.usage.completion_tokens <= 5


def test_completions_stop_and_logprobs(live):
    base = live.client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=30)
    full = base.choices[0].text
    assert full == TOK.decode(alone(live.model, TOK.encode("Once upon a time"), 30))
    stop = full[10:14]
    r = live.client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=30,
                                       stop=[stop, "zzzz"])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in live.client.completions.create(
        model="tiny", prompt="Once upon a time", temperature=0, max_tokens=30, stop=stop, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    lp = live.client.completions.create(model="tiny", prompt="Once", temperature=0, max_tokens=3, logprobs=2)
    token_logprobs = lp.choices[0].logprobs.token_logprobs
    assert len(token_logprobs) == 3 and all(v <= 0 for v in token_logprobs)
    c = live.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], temperature=0,
                                            max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content[0].top_logprobs) == 2


def test_seeded_sampling_is_reproducible(live):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], temperature=1.0, top_p=0.9,
              max_tokens=12, seed=7, extra_body={"top_k": 50, "repetition_penalty": 1.1})
    a, b = (live.client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


def test_eight_concurrent_streams_get_their_own_replies(live):
    results, errors = {}, []

    def one(i):
        try:
            stream = live.client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPTS[i]}], temperature=0, max_tokens=20,
                stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:                                        # collected, asserted below
            errors.append(e)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i in range(8):
        assert results[i] == expected_chat(live.model, PROMPTS[i], 20), i


def test_client_disconnect_frees_its_slot(live):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content": " ' in line or '"content": "' in line and "role" not in line:
                break
    deadline = time.time() + 10
    while live.engine.load["active"] and time.time() < deadline:
        time.sleep(0.02)
    assert live.engine.load["active"] == 0


@pytest.mark.parametrize("body, status, fragment", [
    ({"messages": []}, 400, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role must be one of"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "must be a non-empty string"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a non-empty string"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message must be a user message"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "'temperature' must be a number in"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "'temperature' must be"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "only n=1"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "'max_tokens' must be >= 1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4o"}, 404, "model 'gpt-4o' not found"),
])
def test_bad_requests_get_openai_errors(live, body, status, fragment):
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_malformed_json_oversized_body_and_long_prompt(live):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(live.url + "/v1/chat/completions", content=b" " * (2 << 20), timeout=30)
    assert r.status_code == 413
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "word " * 400, "max_tokens": 8}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        live.client.completions.create(model="tiny", prompt="x " * 300, max_tokens=8)
    # an over-long chat asking for truncation keeps the end of the last message (the chat policy)
    r = live.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 400}],
                                            max_tokens=8, temperature=0, extra_body={"truncation": "auto"})
    assert r.usage.prompt_tokens + 8 <= 256
    assert httpx.get(live.url + "/nope").status_code == 404


def test_api_key_and_busy_server():
    srv = Live(api_key="s3cret", max_batch=1, max_waiting=0)
    try:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/").status_code in (200, 500)
        assert srv.client.models.list().data[0].id == "tiny"
        # one request decoding (greedy, no early end), none may wait: a second one is told to retry (429)
        body = {"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0, "stream": True}
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers=auth, timeout=30) as r:
            lines = r.iter_lines()                        # kept: a dropped iterator closes the stream
            next(lines)
            codes = [httpx.post(srv.url + "/v1/completions", json=body, headers=auth).status_code
                     for _ in range(3)]
        assert 429 in codes
    finally:
        srv.close()


def test_serve_command_without_the_extra_says_which_to_install(monkeypatch, capsys):
    import builtins

    from minigpt.commands import serve

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name in ("uvicorn", "starlette") else real(name, *a, **k))
    assert serve.main(["--model", "gpt2-nonexistent"]) == 1
    err = capsys.readouterr().err
    assert 'pip install -e ".[serve]"' in err and len(err.strip().splitlines()) == 1


def test_serve_command_prints_the_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    import signal
    import subprocess
    import sys

    tiny().save_pretrained(tmp_path / "m")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(tmp_path / "m"), "--port",
                          str(port), "--max-batch", "2", "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(p, f"http://127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/").text.lstrip().lower().startswith("<!doctype html")
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert f"http://127.0.0.1:{port}" in out


def test_serve_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    from minigpt.commands import serve

    monkeypatch.chdir(tmp_path)
    assert serve.main([]) == 1
    err = capsys.readouterr().err
    assert "no model to chat with" in err and len(err.strip().splitlines()) == 1


def test_engine_refuses_ids_outside_the_vocabulary():
    from minigpt.errors import ConfigError

    engine = Engine(tiny(), TOK, max_batch=1)                 # not started: submit checks first
    with pytest.raises(ConfigError, match=r"token ids must be in \[0, 50257\)"):
        engine.submit(Request([1, 50257], 4))
    assert not engine.waiting


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_token_models_serve_as_they_generate(method):
    """A prefix- / prompt-tuned model (virtual tokens in the engine's KV cache): the API's greedy
    completions equal generate's, concurrently, and the context it reports leaves out the prefix."""
    from minigpt.methods import method_config

    model = tiny()
    method_config(method, num_virtual_tokens=6).apply(model)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.kv_prefix.parameters():
            p.normal_(0.0, 0.5)
    model.eval()
    srv = Live(model=model, max_batch=4)
    try:
        assert srv.client.models.list().data[0].model_extra["context_length"] == 256 - 6
        prompts = PROMPTS[:4]
        out = [None] * len(prompts)

        def ask(i):
            out[i] = srv.client.completions.create(model="tiny", prompt=prompts[i], temperature=0,
                                                   max_tokens=12).choices[0].text
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        plain = tiny()
        for p, got in zip(prompts, out):
            want = TOK.decode(alone(model, TOK.encode(p), 12))
            assert got == want and want != TOK.decode(alone(plain, TOK.encode(p), 12))
    finally:
        srv.close()


def test_caches_grow_on_demand_while_rows_decode():
    """The engine starts with short caches and grows them (doubling, up to the context) when a request
    needs more; rows already decoding keep what they hold: every row's tokens equal the request alone."""
    model = tiny()
    engine = Engine(model, TOK, max_batch=3, cache_length=16).start()
    try:
        assert engine.capacity == 16 and engine.caches[0].k.size(2) == 16
        ids = [TOK.encode(p) for p in PROMPTS[:3]]
        first = Request(ids[0], 10, SamplingConfig(0.0), eos_token_id=-1)          # fits in 16
        events = {}
        seen_first = threading.Event()

        def on_first(ev):
            events.setdefault(0, []).append(ev)
            if len(first.tokens) == 4:
                seen_first.set()
        first.on_event = on_first
        engine.submit(first)
        assert seen_first.wait(30)
        long = [Request(ids[1], 60, SamplingConfig(0.0), eos_token_id=-1),            # needs 64
                Request(ids[2], 100, SamplingConfig(0.0), eos_token_id=-1)]           # needs 128
        run_all(engine, long)
        deadline = time.time() + 10
        while engine.load["active"] and time.time() < deadline:
            time.sleep(0.01)
        assert first.tokens == alone(model, ids[0], 10)
        for p, r in zip(ids[1:], long):
            assert r.tokens == alone(model, p, r.max_new_tokens)
        assert engine.capacity == 128 and engine.caches[0].k.size(2) == 128
        assert Engine(model, TOK, max_batch=1, cache_length=10 ** 6).capacity == model.context_length
    finally:
        engine.stop()
