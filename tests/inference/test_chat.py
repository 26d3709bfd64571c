"""chat.py and minigpt.inference.chat: replies vs minigpt.inference.generate, commands, truncation, adapters, pty."""
from __future__ import annotations

import copy
import io
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch

from minigpt import GPT, get_tokenizer
from minigpt.commands import chat as chat_cli
from minigpt.data.templates import get_template
from minigpt.inference.chat import ChatError, ChatSession
from minigpt.inference.generate import generate
from minigpt.methods.lora import add_lora, merge_and_unload, save_adapter
from minigpt.training.runs import find_latest_run, load_chat_model

ROOT = Path(__file__).resolve().parents[2]

TOK = get_tokenizer()
EOT = TOK.eot_token


def tiny_model(seed: int = 0, block_size: int = 128, std: float = 0.3) -> GPT:
    """Tiny random GPT; weights at std 0.3 so that greedy replies are varied words (at GPT-2's
    init std 0.02 they are runs of newlines and U+FFFD)."""
    return tiny.gpt(block_size=block_size, seed=seed, std=std, ln_mean=None)


def scripted_model(chain: list[int], r: float = 3.0) -> GPT:
    """A bigram GPT whose greedy continuation of chain[0] is chain[1], chain[2], ...

    Blocks add nothing (c_proj zeroed), positions are zero, so the logits depend on the last token
    only: logit(b | a) ~ LN(v_a) . v_b with v_k = r^k (e_k + e_{k+1}), largest at b = next(a).
    """
    assert len(set(chain)) == len(chain) and len(chain) < 63
    m = tiny_model()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "c_proj" in name or "wpe" in name or "wte" in name:
                p.zero_()
        m.transformer.ln_f.weight.fill_(1.0)
        m.transformer.ln_f.bias.zero_()
        for k, t in enumerate(chain):
            m.transformer.wte.weight[t, k] = r ** k
            m.transformer.wte.weight[t, k + 1] = r ** k
    return m


def expected_reply(model, messages, *, system=None, template="alpaca", max_new_tokens=16, stops=()) -> str:
    """What chat should print: greedy minigpt.inference.generate on the template's prompt ids, cut at EOS and
    at the first stop string, surrounding whitespace removed."""
    tmpl = get_template(template)
    ids = tmpl.prompt_ids(messages, TOK, system)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=0.0, eos_token_id=EOT)
    new = out[0, len(ids):].tolist()
    if EOT in new:
        new = new[:new.index(EOT)]
    text = b"".join(TOK.decode_single_token_bytes(t) for t in new).decode("utf-8", "replace")
    for s in list(tmpl.stop_strings) + list(stops):
        j = text.find(s)
        if j >= 0:
            text = text[:j]
    return text.strip()


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat") / "tiny"
    tiny_model().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory):
    """Alpaca prompts end in '\\n'; this model answers 'Hello world! ### Instruction: more' + EOS."""
    chain = [198] + TOK.encode_ordinary("Hello world! ### Instruction: more") + [EOT]
    d = tmp_path_factory.mktemp("chat") / "scripted"
    scripted_model(chain).save_pretrained(d)
    return d


def run_chat(argv, stdin_text="", monkeypatch=None, capsys=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    rc = chat_cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


GREEDY = ["--temperature", "0", "--max-new-tokens", "16"]


# --- replies -----------------------------------------------------------------------------------

def test_scripted_model_stops_before_turn_marker(scripted_dir, monkeypatch, capsys):
    m = GPT.from_pretrained(scripted_dir)
    raw = generate(m, torch.tensor([[198]]), 12, temperature=0.0)[0, 1:].tolist()
    assert "### Instruction:" in TOK.decode(raw)                 # the model does emit the marker
    rc, out, err = run_chat(["--model", str(scripted_dir), *GREEDY], "hi\nagain\n", monkeypatch, capsys)
    assert rc == 0, err
    assert out == "Hello world!\nHello world!\n"                 # marker and what follows: never shown
    assert "###" not in out


def test_user_stop_strings_repeatable(scripted_dir, monkeypatch, capsys):
    rc, out, _ = run_chat(["--model", str(scripted_dir), *GREEDY, "--stop", " world", "--stop", "zzz"],
                          "hi\n", monkeypatch, capsys)
    assert rc == 0 and out == "Hello\n"
    rc, out, _ = run_chat(["--model", str(scripted_dir), *GREEDY, "--stop", "zzz", "!"],
                          "hi\n", monkeypatch, capsys)
    assert rc == 0 and out == "Hello world\n"


def test_piped_turns_match_generate_with_history(model_dir, model, monkeypatch, capsys):
    rc, out, err = run_chat(["--model", str(model_dir), *GREEDY], "hello there\nhow are you?\n",
                            monkeypatch, capsys)
    assert rc == 0, err
    r1 = expected_reply(model, [user("hello there")])
    r2 = expected_reply(model, [user("hello there"), bot(r1), user("how are you?")])
    assert r1 and out == f"{r1}\n{r2}\n"
    assert err == ""                                             # nothing noisy in pipe mode


def test_prompt_mode(model_dir, model, monkeypatch, capsys):
    rc, out, err = run_chat(["--model", str(model_dir), *GREEDY, "--prompt", "Say hi.",
                             "--system", "Be nice."], "ignored\n", monkeypatch, capsys)
    assert rc == 0, err
    assert out == expected_reply(model, [user("Say hi.")], system="Be nice.") + "\n"


def test_decoding_weights_flag(model_dir, model, monkeypatch, capsys):
    """--weights: plain, fp32 and auto (the CPU default: fp32 repacked) answer exactly as generate
    does; int8/int4 answer (approximately); bad values and impossible combinations: one line."""
    want = expected_reply(model, [user("Say hi.")]) + "\n"
    base = ["--model", str(model_dir), *GREEDY, "--prompt", "Say hi."]
    for w in ("plain", "fp32", "auto"):
        rc, out, err = run_chat(base + ["--weights", w], "", monkeypatch, capsys)
        assert rc == 0 and out == want, (w, err)
    for w in ("int8", "int4"):
        rc, out, err = run_chat(base + ["--weights", w], "", monkeypatch, capsys)
        assert rc == 0 and out.endswith("\n") and err == "", (w, err)
    rc, out, err = run_chat(base + ["--weights", "fp8"], "", monkeypatch, capsys)
    assert rc == 1 and out == "" and "--weights must be one of" in err and err.count("\n") == 1
    rc, out, err = run_chat(base + ["--weights", "bf16", "--compile", "--device", "cpu"], "", monkeypatch, capsys)
    assert rc == 1 and "--compile cannot" in err and err.count("\n") == 1


def test_sampling_seed_reproducible(model_dir, monkeypatch, capsys):
    argv = ["--model", str(model_dir), "--max-new-tokens", "12", "--seed", "3", "--top-k", "50"]
    outs = [run_chat(argv, "hi\nmore\n", monkeypatch, capsys)[1] for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].count("\n") == 2


# --- commands ----------------------------------------------------------------------------------

def test_commands_set_system_reset_save(model_dir, model, tmp_path, monkeypatch, capsys):
    f1, f2 = tmp_path / "a.json", tmp_path / "b.json"
    script = "\n".join(["/set temperature 0", "/set top-k 5", "/set max_new_tokens 8", "/set seed none",
                        "/system You are terse.", "hi", "/save " + str(f1), "/reset", "/system",
                        "yo", "/save " + str(f2), "/quit", "never sent"]) + "\n"
    rc, out, err = run_chat(["--model", str(model_dir), "--max-new-tokens", "16"], script, monkeypatch, capsys)
    assert rc == 0, err
    r1 = expected_reply(model, [user("hi")], system="You are terse.", max_new_tokens=8)
    r2 = expected_reply(model, [user("yo")], max_new_tokens=8)       # history and system gone
    assert out == f"{r1}\n{r2}\n"
    t1, t2 = json.loads(f1.read_text()), json.loads(f2.read_text())
    assert t1["settings"] == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.0,
                              "max_new_tokens": 8, "seed": None}
    assert t1["system"] == "You are terse." and t1["template"] == "alpaca"
    assert t1["turns"] == [{"user": "hi", "assistant": r1}]
    assert t2["system"] is None and t2["turns"] == [{"user": "yo", "assistant": r2}]
    assert "temperature = 0.0" in err and "saved 1 turn(s)" in err


def test_bad_input_gets_a_message(model_dir, tmp_path, monkeypatch, capsys):
    script = "\n".join(["", "   ", "/frobnicate", "/set temperature hot", "/set top_p 1.5", "/set top_k -1",
                        "/set max_new_tokens 100000", "/set nonsense 1", "/set temperature",
                        "/set repetition_penalty 0", "/set temperature nan", "/save",
                        "/save " + str(tmp_path / "no" / "such" / "dir.json"), "//help me",
                        "x" * 100_000]) + "\n"
    rc, out, err = run_chat(["--model", str(model_dir), *GREEDY], script, monkeypatch, capsys)
    assert rc == 0
    assert "Traceback" not in err
    for needle in ("empty message", "unknown command /frobnicate", "temperature must be a number",
                   "top_p must be in (0, 1]", "top_k must be >= 0", "max_new_tokens must be below",
                   "unknown setting 'nonsense'", "usage: /set", "repetition_penalty must be > 0",
                   "temperature must be finite", "usage: /save", "cannot save", "kept its last"):
        assert needle in err, needle
    assert out.count("\n") == 2                                  # '//help me' and the huge paste answered


def test_cli_errors_are_one_line(tmp_path, model_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                                  # no out-finetune/, no out/
    rc, out, err = run_chat([], "hi\n", monkeypatch, capsys)
    assert rc == 1 and out == "" and err.count("\n") == 1
    assert "python train.py" in err and "python finetune.py" in err
    rc, _, err = run_chat(["--model", str(tmp_path / "missing")], "", monkeypatch, capsys)
    assert rc == 1 and err.startswith("error:") and err.count("\n") == 1
    rc, _, err = run_chat(["--model", str(model_dir), "--top-p", "2"], "", monkeypatch, capsys)
    assert rc == 1 and "top-p" in err and err.count("\n") == 1
    rc, _, err = run_chat(["--model", str(model_dir), "--max-new-tokens", "500"], "", monkeypatch, capsys)
    assert rc == 1 and "max-new-tokens" in err and err.count("\n") == 1
    rc, _, err = run_chat(["--adapter", str(tmp_path)], "", monkeypatch, capsys)
    assert rc == 1 and err.count("\n") == 1


def test_closed_stdin_is_a_one_line_error(model_dir):
    """`chat.py --model DIR <&-`: Python starts with sys.stdin None; one line and exit 1, no traceback
    (--prompt needs no stdin and still answers)."""
    cmd = [sys.executable, "-m", "minigpt", "chat", "--model", str(model_dir)]
    r = subprocess.run(cmd, preexec_fn=lambda: os.close(0), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 1 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("error: stdin is closed") and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run(cmd + ["--prompt", "hi", *GREEDY], preexec_fn=lambda: os.close(0), capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_ctrl_c_keeps_partial_reply_and_chat_goes_on(model_dir, model, tmp_path, monkeypatch, capsys):
    import minigpt.inference.generate as gen

    real = gen.stream_text
    calls = []

    def interrupted_once(*a, **k):
        it = real(*a, **k)
        calls.append(1)
        if len(calls) > 1:
            yield from it
            return
        yield next(it)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "stream_text", interrupted_once)
    f = tmp_path / "t.json"
    rc, out, err = run_chat(["--model", str(model_dir), *GREEDY], f"hi\nagain\n/save {f}\n", monkeypatch, capsys)
    assert rc == 0 and "interrupted" in err
    turns = json.loads(f.read_text())["turns"]
    assert turns[0]["interrupted"] is True and turns[0]["assistant"]
    assert expected_reply(model, [user("hi")]).startswith(turns[0]["assistant"])
    r2 = expected_reply(model, [user("hi"), bot(turns[0]["assistant"]), user("again")])
    assert turns[1] == {"user": "again", "assistant": r2}
    assert out == f"{turns[0]['assistant']}\n{r2}\n"


# --- model discovery, templates, adapters ------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_setup(tmp_path_factory, model_dir):
    """A LoRA adapter with random lora_B over the tiny base, plus the merged reference model."""
    base = GPT.from_pretrained(model_dir)
    torch.manual_seed(1)
    add_lora(base, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    root = tmp_path_factory.mktemp("adapters")
    ad = save_adapter(base, root / "adapter", base_model_name_or_path=str(model_dir))
    merged = merge_and_unload(copy.deepcopy(base)).eval()
    return ad, merged


def test_adapter_changes_replies_and_equals_merged(model_dir, model, adapter_setup, monkeypatch, capsys):
    ad, merged = adapter_setup
    msgs = [user("tell me a story")]
    rc, out, err = run_chat(["--model", str(model_dir), "--adapter", str(ad), *GREEDY], "tell me a story\n",
                            monkeypatch, capsys)
    assert rc == 0, err
    assert out == expected_reply(merged, msgs) + "\n"
    assert out != expected_reply(model, msgs) + "\n"
    # base taken from adapter_config.json's base_model_name_or_path
    rc, out2, _ = run_chat(["--adapter", str(ad), *GREEDY], "tell me a story\n", monkeypatch, capsys)
    assert rc == 0 and out2 == out


def test_finetune_dir_template_from_metadata_and_default_discovery(tmp_path, model_dir, adapter_setup,
                                                                   monkeypatch, capsys):
    import shutil

    from minigpt.training.runs import FINETUNE_META
    ad, merged = adapter_setup
    run = tmp_path / "out-finetune"                              # what finetune.py writes (LoRA)
    shutil.copytree(ad, run)
    (run / "run.json").write_text(json.dumps({"kind": "finetune"}))
    (run / FINETUNE_META).write_text(json.dumps({"kind": "finetune", "method": "lora", "base": str(model_dir),
                                                 "template": "human-assistant"}))
    msgs = [user("hello")]
    want = expected_reply(merged, msgs, template="human-assistant") + "\n"
    rc, out, err = run_chat(["--model", str(run), *GREEDY], "hello\n", monkeypatch, capsys)
    assert rc == 0 and out == want, err
    rc, out, _ = run_chat(["--model", str(run), "--template", "chat", *GREEDY], "hello\n", monkeypatch, capsys)
    assert out == expected_reply(merged, msgs, template="chat") + "\n"
    # no --model: the newest finetune output wins over train.py's out/
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir, tmp_path / "out")
    (tmp_path / "out" / "run.json").write_text(json.dumps({"kind": "pretrain"}))
    assert find_latest_run() == Path("out-finetune")
    rc, out, _ = run_chat(GREEDY, "hello\n", monkeypatch, capsys)
    assert rc == 0 and out == want
    shutil.rmtree(run)
    assert find_latest_run() == Path("out")
    loaded = load_chat_model()
    assert loaded.template is None and loaded.adapter is None


# --- the library: truncation, interruption -----------------------------------------------------

def test_history_truncation_keeps_last_turns(model):
    s = ChatSession(model, temperature=0.0, max_new_tokens=32)
    budget = model.config.block_size - 32
    s.turns = [{"user": f"question number {i} " + "word " * 6, "assistant": f"answer {i} " + "ok " * 6}
               for i in range(12)]
    ids, info, used = s.build_prompt("latest question")
    assert len(ids) <= budget and used == "latest question"
    assert 0 < info.turns_used < 12 and info.turns_dropped == 12 - info.turns_used
    kept = s.turns[-info.turns_used:]
    want = get_template("alpaca").prompt_ids(s.messages(kept) + [user("latest question")], TOK)
    assert ids == want                                           # the most recent turns, whole
    longer = get_template("alpaca").prompt_ids(s.messages(s.turns[-info.turns_used - 1:])
                                               + [user("latest question")], TOK)
    assert len(longer) > budget                                  # and as many as fit
    reply = s.reply("latest question")
    assert reply == expected_reply(model, s.messages(kept) + [user("latest question")], max_new_tokens=32)
    assert any("oldest" in n for n in s.notices) and len(s.turns) == 13


@pytest.mark.parametrize("text", ["x" * 100_000, "é✓ " * 20_000 + "the end"])
def test_huge_message_keeps_its_end(model, text):
    s = ChatSession(model, temperature=0.0, max_new_tokens=40, system="sys")
    s.turns = [{"user": "old", "assistant": "reply"}]
    ids, info, used = s.build_prompt(text)
    assert len(ids) <= model.config.block_size - 40
    assert info.user_truncated and info.turns_used == 0 and text.endswith(used) and "\ufffd" not in used
    assert TOK.decode(ids).endswith(used + "\n\n### Response:\n")
    s.reply(text)
    assert any("kept its last" in n for n in s.notices)
    assert s.turns[-1]["user"] == used and s.turns[-1]["user_truncated_from_chars"] == len(text)


def test_interrupted_stream_state_stays_consistent(model):
    s = ChatSession(model, temperature=0.0, max_new_tokens=16)
    it = s.reply_stream("hi")
    first = next(it)
    it.close()                                                   # e.g. Ctrl-C in a UI
    assert s.turns == [{"user": "hi", "assistant": first, "interrupted": True}]
    assert s.reply("again") == expected_reply(model, [user("hi"), bot(first), user("again")])
    s.reset()
    assert s.turns == [] and s.reply("hi") == expected_reply(model, [user("hi")])
    with pytest.raises(ChatError):
        s.reply("   ")
    with pytest.raises(ChatError):
        s.set("max_new_tokens", 128)
    assert s.set("top-p", "none") == 1.0 and s.set("top_k", "0") is None


# --- a real terminal ---------------------------------------------------------------------------

def _read_until(fd, needle: bytes, buf: bytearray, timeout: float = 60.0) -> bytes:
    end = time.monotonic() + timeout
    while needle not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {needle!r}; got {bytes(buf)!r}")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF waiting for {needle!r}; got {bytes(buf)!r}")
            buf += chunk
    i = buf.index(needle) + len(needle)
    out = bytes(buf[:i])
    del buf[:i]
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_interactive_pty_session(scripted_dir):
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, TERM="dumb", PYTHONUNBUFFERED="1")
    def controlling_tty():                                       # so that Ctrl-C becomes SIGINT
        import fcntl
        import signal
        import termios
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # a parent started in the background (nohup, `cmd &`) hands down an ignored SIGINT, and
        # Python only installs its KeyboardInterrupt handler when SIGINT is not ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, str(ROOT / "chat.py"), "--model", str(scripted_dir), *GREEDY],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env, close_fds=True,
                            start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    buf = bytearray()
    try:
        banner = _read_until(master, b"you> ", buf)
        assert b"/help" in banner
        os.write(master, b"hi there\n")
        reply = _read_until(master, b"you> ", buf).decode()
        assert "Hello world!" in reply and "###" not in reply
        os.write(master, b"/set temperature 0.25\n")
        assert "temperature = 0.25" in _read_until(master, b"you> ", buf).decode()
        # Ctrl-C at the prompt: stay. Under heavy load the first ^C right after the prompt appears
        # was occasionally not seen (nothing printed within 60 s); retry a few times before failing.
        for attempt in range(3):
            os.write(master, b"\x03")
            try:
                hint = _read_until(master, b"you> ", buf, timeout=20.0).decode()
                break
            except AssertionError:
                if attempt == 2:
                    raise
        assert "/quit" in hint
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
