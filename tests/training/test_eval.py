"""`minigpt eval`: sliding-window perplexity and bits per byte, checked against the transformers docs'
loop ("Perplexity of fixed-length models") on the same tiny model saved to HF format."""
from __future__ import annotations

import copy
import json
import math
import time

import pytest
import tiny
import torch
import torch.nn.functional as F

from minigpt import get_tokenizer
from minigpt.commands import run
from minigpt.data.corpus import embedded_corpus_text
from minigpt.errors import ConfigError
from minigpt.methods.lora import add_lora, merge_and_unload, save_adapter
from minigpt.training.perplexity import sliding_window_perplexity, sliding_windows

WINDOW = 64                               # the tiny model's context


@pytest.fixture(scope="module")
def text() -> str:
    return embedded_corpus_text()[:1500]  # about 400 tokens: several windows of 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    m = tiny.gpt(block_size=WINDOW, std=0.08)
    d = tmp_path_factory.mktemp("ppl") / "model"
    m.save_pretrained(d)
    return d


def hf_docs_loop(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """(total NLL in nats, tokens scored): the transformers docs' loop, with the tokens each window's
    loss averages over counted exactly (the docs' `num_valid_tokens - batch_size` counts one too few
    in the windows after the first when stride < max_length)."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())       # the labels the loss averages over, after the shift
        if n:
            nll_sum += loss.item() * n
            n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


@pytest.fixture(scope="module")
def hf_model(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()


def run_eval(argv, capsys):
    rc = run("eval", argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("stride,length", [(16, None), (WINDOW, None), (WINDOW // 2, None), (8, 40),
                                           (16, 30)], ids=["stride<window", "stride=window", "half",
                                                           "max-length", "short-text"])
def test_equals_the_transformers_docs_loop(model_dir, hf_model, text, stride, length, capsys):
    tok = get_tokenizer()
    if length == 30:                                     # a text shorter than the window
        text = tok.decode(tok.encode_ordinary(text)[:30])
        length = None
    ids = tok.encode_ordinary(text)
    window = length or WINDOW
    nll, n = hf_docs_loop(hf_model, ids, window, stride)
    argv = ["--model", str(model_dir), "--stride", str(stride), "--json", "--device", "cpu", "--batch-size", "3"]
    if length:
        argv += ["--max-length", str(length)]
    path = model_dir.parent / f"text-{stride}-{length}.txt"
    path.write_text(text, encoding="utf-8")
    rc, out, err = run_eval(argv + ["--text", str(path)], capsys)
    assert rc == 0, err
    got = json.loads(out)
    assert set(got) == {"perplexity", "bits_per_byte", "tokens"}
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-4)
    if stride < window and len(ids) > window:
        assert n == len(ids) - 1                          # every token but the first, once


def test_windows_score_every_token_once():
    for n, w, s in [(100, 64, 16), (100, 64, 64), (64, 64, 1), (65, 64, 64), (2, 64, 32), (300, 10, 7)]:
        spans = sliding_windows(n, w, s)
        scored = [t for _, e, f in spans for t in range(f, e)]
        assert scored == sorted(set(scored)) and all(e - b <= w and b < f for b, e, f in spans)
        if s < w:
            assert scored == list(range(1, n))
    assert sliding_windows(10, 4, 4) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def test_library_batches_give_the_same_numbers(model_dir, text):
    from minigpt import GPT
    m = GPT.from_pretrained(model_dir)
    one = sliding_window_perplexity(m, text, stride=16, batch_size=1)
    many = sliding_window_perplexity(m, text, stride=16, batch_size=7, chunk=37)
    assert many["tokens"] == one["tokens"] and many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        sliding_window_perplexity(m, text, window=WINDOW + 1)


def test_human_output_and_adapter(model_dir, text, tmp_path, capsys):
    from minigpt import GPT
    base = GPT.from_pretrained(model_dir)
    torch.manual_seed(1)
    add_lora(base, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    ad = save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    merged = merge_and_unload(copy.deepcopy(base)).eval()
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")

    rc, out, err = run_eval(["--model", str(model_dir), "--adapter", str(ad), "--text", str(path), "--json"], capsys)
    assert rc == 0, err
    with_adapter = json.loads(out)
    want = sliding_window_perplexity(merged, text)
    assert with_adapter["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    # the exact check: logits of the merged model over one window
    ids = torch.tensor([get_tokenizer().encode_ordinary(text)[:WINDOW]])
    with torch.no_grad():
        nll = F.cross_entropy(merged(ids)[0, :-1], ids[0, 1:], reduction="sum").item()
    direct = sliding_window_perplexity(merged, tokens=ids[0].tolist())
    assert direct["perplexity"] == pytest.approx(math.exp(nll / (WINDOW - 1)), rel=1e-5)

    rc, out, err = run_eval(["--model", str(model_dir), "--text", str(path)], capsys)
    assert rc == 0, err
    assert "perplexity" in out and "bits per byte" in out and "window 64, stride 32" in out
    plain = float(out.split("perplexity ")[1].split()[0])
    assert plain != pytest.approx(with_adapter["perplexity"], rel=1e-3)   # the adapter changes the numbers


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_base(model_dir, text, tmp_path, mode, capsys):
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    got = []
    for q in ([], ["--quantize", mode]):
        rc, out, err = run_eval(["--model", str(model_dir), "--text", str(path), "--json", *q], capsys)
        assert rc == 0, err
        got.append(json.loads(out))
    assert got[1]["tokens"] == got[0]["tokens"]
    assert got[1]["perplexity"] != got[0]["perplexity"]
    assert got[1]["perplexity"] == pytest.approx(got[0]["perplexity"], rel=0.05)


@pytest.mark.parametrize("content,flags,rc_want,fragment", [
    ("Hi", [], 1, "at least 2 tokens"),
    ("", [], 1, "at least 2 tokens"),
    (None, [], 1, "no such file"),
    ("some words here", ["--stride", "65"], 1, "exceeds the window (64 tokens)"),
    ("some words here", ["--stride", "0"], 2, "--stride must be >= 1"),
    ("some words here", ["--stride", "-3"], 2, "--stride must be >= 1"),
    ("some words here", ["--max-length", "8", "--stride", "9"], 2, "must not exceed --max-length"),
    ("some words here", ["--max-length", "65"], 1, "exceeds the model's context (64 tokens)"),
], ids=["one-token", "empty", "missing-file", "stride>window", "stride-0", "stride-negative",
        "stride>max-length", "max-length>context"])
def test_bad_input_gets_one_line(model_dir, tmp_path, capsys, content, flags, rc_want, fragment):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    try:
        rc, out, err = run_eval(["--model", str(model_dir), "--text", str(path), *flags], capsys)
    except SystemExit as e:                               # argparse-level errors
        rc = e.code
        out, err = capsys.readouterr()
    assert rc == rc_want, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "perplexity" not in ln]
    assert len(lines) == 1 and fragment in lines[0], err
    assert out == ""


def test_missing_text_flag(capsys):
    with pytest.raises(SystemExit) as e:
        run("eval", ["--model", "x"])
    assert e.value.code == 2 and "--text FILE is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("eval", ["--model", "x", "--text", "t.txt", "--judge", "http://127.0.0.1:9"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run("eval", ["--model", "x", "--text", "t.txt", "--num-fewshot", "5"])
    assert e.value.code == 2 and "--num-fewshot and --limit go with --tasks" in capsys.readouterr().err


def test_tasks_without_lm_eval_say_which_extra_to_install(monkeypatch, capsys):
    import sys
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)                      # import lm_eval... -> ImportError
    monkeypatch.delitem(sys.modules, "minigpt.inference.harness", raising=False)
    rc, out, err = run_eval(["--model", "no-such-model", "--tasks", "hellaswag"], capsys)
    assert rc == 1 and out == "" and err.strip() == ('error: --tasks needs lm-evaluation-harness: '
                                                     'pip install "minigpt[eval]"')


# --- --judge: answers scored by a judge model behind an OpenAI-compatible server ----------------

QUESTIONS = [{"instruction": "Name a color.", "output": "Blue."},
             {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
             {"question": "What is the opposite of hot?", "reference": "Cold."}]


@pytest.fixture
def questions(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(q) for q in QUESTIONS) + "\n", encoding="utf-8")
    return p


class _Canned:
    """A stand-in judge: http.server answering /v1/chat/completions with canned replies in turn."""

    def __init__(self, replies, delay: float = 0.0):
        import http.server
        import threading

        seen, canned = [], list(replies)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                if delay:
                    time.sleep(delay)
                body = json.dumps({"choices": [{"message": {"role": "assistant",
                                                            "content": canned[(len(seen) - 1) % len(canned)]}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *a):
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_judge_mean_score_and_unparsable_replies(model_dir, questions, capsys):
    judge = _Canned(["85", "Score: 60 out of 100", "I cannot say."])
    try:
        rc, out, err = run_eval(["--model", str(model_dir), "--judge", judge.url, "--questions", str(questions),
                                 "--max-new-tokens", "8", "--json"], capsys)
    finally:
        judge.close()
    assert rc == 0, err
    assert json.loads(out) == {"judge_score": 72.5, "judged": 3, "unparsable": 1}
    first = judge.seen[0]
    assert first["temperature"] == 0 and first["seed"] == 123 and first["model"] == "judge"
    text = first["messages"][0]["content"]
    assert "Name a color." in text and "Blue." in text and "0 to 100" in text
    assert "2 and 3" in judge.seen[1]["messages"][0]["content"]
    from minigpt import GPT
    from minigpt.inference.chat import ChatSession
    from minigpt.inference.judge import JUDGE_PROMPT
    answer = ChatSession(GPT.from_pretrained(model_dir), get_tokenizer(), template="alpaca", temperature=0.0,
                         max_new_tokens=8).reply("Name a color.")
    assert text == JUDGE_PROMPT.format(prompt="Name a color.", reference="Blue.", response=answer)


def test_judge_with_a_minigpt_server_as_judge(model_dir, questions, capsys):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    import threading

    import uvicorn

    from minigpt.inference.chat import ChatSession
    from minigpt.inference.engine import Engine
    from minigpt.inference.judge import JUDGE_PROMPT, judge_answers, parse_score, read_questions
    from minigpt.inference.serve import create_app

    judge_model = tiny.gpt(block_size=256, std=0.2)
    engine = Engine(judge_model, get_tokenizer(), max_batch=4).start()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "judge", template="alpaca"), host="127.0.0.1",
                                           port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        argv = ["--model", str(model_dir), "--judge", url, "--questions", str(questions), "--max-new-tokens", "8",
                "--json"]
        runs = [run_eval(argv, capsys) for _ in range(2)]
        prompts = []
        judged = judge_answers(lambda q: prompts.append(q) or "Blue.", read_questions(questions), url)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
    for rc, _out, err in runs:
        assert rc == 0, err
    got = json.loads(runs[0][1])
    assert set(got) == {"judge_score", "judged", "unparsable"} and got["judged"] == 3
    assert 0 <= got["unparsable"] <= 3                     # a random judge: scores or not, never fatal
    assert runs[1][1] == runs[0][1]                        # temperature 0, fixed seed: the same verdicts
    for item in judged["items"]:                           # the server's reply is the judge model's own
        shown = item["instruction"] + (f"\n\n{item['input']}" if item["input"] else "")
        prompt = JUDGE_PROMPT.format(prompt=shown, reference=item["reference"], response="Blue.")
        want = ChatSession(judge_model, get_tokenizer(), template="alpaca", temperature=0.0,
                           max_new_tokens=8).reply(prompt)
        assert item["judge_reply"] == want and item["score"] == parse_score(want)


def test_judge_bad_input_gets_one_line(model_dir, questions, tmp_path, capsys):
    import socket

    from minigpt.inference.judge import parse_score
    assert [parse_score(s) for s in ["85", " 7.5/10", "101", "-3", "none", ""]] == [85, 7.5, None, None, None, None]

    silent = socket.socket()                               # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        rc, out, err = run_eval(["--model", str(model_dir), "--judge", url, "--questions", str(questions),
                                 "--max-new-tokens", "4", "--judge-timeout", "1"], capsys)
    finally:
        silent.close()
    assert rc == 1 and out == "" and f"--judge {url}: no answer within 1 s" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "hi"}) + "\n", encoding="utf-8")
    rc, out, err = run_eval(["--model", str(model_dir), "--judge", url, "--questions", str(bad)], capsys)
    assert rc == 1 and "record 1 has no output/reference/answer field" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        run("eval", ["--model", str(model_dir), "--judge", url])
    assert e.value.code == 2 and "--judge needs --questions FILE" in capsys.readouterr().err
