"""The GPT-Neo chatbot recipe end to end on a tiny GPT-Neo (same architecture, tiny shape): finetune.py with
the recipe's flags (--warmup-ratio, a constant schedule after warmup, 4 x 4 batches at --max-length 512),
plain and --quantize nf4, then serve.py --model OUT answering a chat completion; and chat.py --model
EleutherAI/gpt-neo-125m answering offline from a Hugging Face cache that holds that repo."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
from serving import free_port, wait_healthy

from minigpt import GPT, get_tokenizer
from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args
from minigpt.inference.chat import ChatSession
from minigpt.training.config import TrainConfig, lr_at, warmup_for

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ["--lora", "--max-length", "512", "--batch-size", "4", "--grad-accum", "4", "--lr", "2e-4",
          "--schedule", "constant", "--warmup-ratio", "0.03"]
QUIET = ["--threads", "1", "--device", "cpu", "--samples", "1", "--sample-tokens", "4", "--exact-match", "2"]


def tiny_neo(block_size: int = 1024, seed: int = 0):
    """A 2-layer GPT-Neo (global then local attention, GPT-Neo's window of 256) with GPT-2's vocabulary."""
    return tiny.gpt(n_layer=2, n_head=2, n_embd=32, block_size=block_size, std=0.3, ln_mean=None, seed=seed,
                    arch="gpt_neo", window_size=256)


# --- --warmup-ratio and the constant schedule ----------------------------------------------------

def test_warmup_for_rounds_up_like_transformers():
    assert warmup_for(500, ratio=0.03) == 15                        # the recipe: 500 steps, ratio 0.03
    assert warmup_for(100, ratio=0.07) == 7 and warmup_for(3, ratio=0.03) == 1 and warmup_for(10, ratio=0.0) == 0
    assert warmup_for(100) == 5 and warmup_for(3) == 1              # the default: 5%, at least one step
    assert warmup_for(100, steps=0) == 0 and warmup_for(100, steps=7) == 7


def test_constant_schedule_warms_up_then_holds():
    cfg = TrainConfig(max_steps=500, lr=2e-4, warmup_steps=15, schedule="constant")
    lrs = [lr_at(s, cfg) for s in range(500)]
    assert lrs[:15] == pytest.approx([2e-4 * (s + 1) / 15 for s in range(15)])
    assert all(v == 2e-4 for v in lrs[14:])


def test_warmup_flags(capsys):
    args = parse_args(ft.FinetuneArgs, RECIPE)
    assert args.warmup_ratio == 0.03 and args.warmup_steps is None and args.schedule == "constant"
    for bad, says in ((["--warmup-ratio", "0.1", "--warmup-steps", "5"], "either --warmup-steps or --warmup-ratio"),
                      (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1)"),
                      (["--warmup-ratio", "-0.1"], "--warmup-ratio must be in [0, 1)"),
                      (["--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1)")):
        with pytest.raises(SystemExit) as e:
            parse_args(ft.FinetuneArgs, bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


# --- the recipe: finetune.py, then serve.py -------------------------------------------------------

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A tiny GPT-Neo folder and '### Human: ... ### Assistant: ...' text (one conversation past 512 tokens)."""
    d = tmp_path_factory.mktemp("recipe")
    tiny_neo().save_pretrained(d / "base")
    pairs = [("What is the capital of France?", "Paris."), ("Name a colour.", "Blue."), ("Say hi.", "Hi!"),
             ("Count to three.", "One, two, three."), ("What is 2+2?", "4."), ("Who wrote Hamlet?", "Shakespeare."),
             ("Spell cat.", "C-A-T."), ("Translate hola.", "Hello."), ("Best pet?", "A dog."),
             ("Tell a long story.", "Once upon a time a small robot went for a walk. " * 60)]
    (d / "guanaco.txt").write_text("\n\n".join(f"### Human: {q}### Assistant: {a}" for q, a in pairs) + "\n")
    return d


def serve_answers(model_dir: Path) -> dict:
    """Start `serve.py --model model_dir` on a free loopback port, ask one chat completion, stop it."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    p = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", str(port),
                          "--threads", "1", "--max-batch", "2", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(p, url, timeout=90)
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0})
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_recipe_finetune_then_serve(recipe, tmp_path, capsys, quantize):
    out = tmp_path / "out"
    steps = 3
    result = ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in (
        "--base", recipe / "base", "--data", recipe / "guanaco.txt", *RECIPE, "--max-steps", steps,
        "--out-dir", out, *QUIET, *(["--quantize", quantize] if quantize else []))]))
    assert result["step"] == steps
    train = json.loads((out / "run.json").read_text())["train"]
    assert (train["schedule"], train["batch_size"], train["grad_accum"], train["lr"]) == ("constant", 4, 4, 2e-4)
    assert train["warmup_steps"] == math.ceil(0.03 * steps) == 1
    meta = json.loads((out / "minigpt_finetune.json").read_text())
    assert (meta["max_length"], meta["quantize"], meta["lora"]["targets"]) == (512, quantize, ["q_proj", "v_proj"])
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "lr" in r] == [2e-4]                  # after warmup: constant
    assert "max length 512, 1 truncated" in capsys.readouterr().out         # the long conversation: 512 tokens
    reply = serve_answers(out)
    choice = reply["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] >= 1


# --- chat.py --model EleutherAI/gpt-neo-125m from the Hugging Face cache ---------------------------

def _fill_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """`files` cached as `repo_id` at main: by huggingface_hub itself from a fake Hub on 127.0.0.1
    (where it is installed), else written in its layout by minigpt.weights.hf_cache."""
    try:
        import huggingface_hub
        from fakehub import FakeHub
    except ImportError:
        import hashlib

        from minigpt.weights.hf_cache import link_blob, repo_folder, write_ref
        folder, commit = repo_folder(repo_id, cache), "0" * 40
        for name, data in files.items():
            etag = hashlib.sha256(data).hexdigest()
            (folder / "blobs").mkdir(parents=True, exist_ok=True)
            (folder / "blobs" / etag).write_bytes(data)
            link_blob(folder, commit, name, etag)
        write_ref(folder, "main", commit)
        return
    hub = FakeHub().start()
    try:
        hub.add(repo_id, files)
        for name in files:
            huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache, endpoint=hub.url)
    finally:
        hub.stop()


def test_chat_gpt_neo_125m_from_the_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    model = tiny_neo(block_size=128, seed=3)
    model.save_pretrained(tmp_path / "src")
    _fill_cache(tmp_path / "hf", "EleutherAI/gpt-neo-125m",
                {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf"), HF_HOME=str(tmp_path / "hfhome"), HF_HUB_OFFLINE="1",
               MINIGPT_HOME=str(tmp_path / "minigpt"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "chat.py", "--model", "EleutherAI/gpt-neo-125m", "--temperature", "0",
                        "--max-new-tokens", "8", "--device", "cpu"], input="Name a colour.\n", capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    torch.manual_seed(0)
    expected = ChatSession(GPT.from_pretrained(tmp_path / "src"), get_tokenizer(), temperature=0.0,
                           max_new_tokens=8).reply("Name a colour.")
    assert expected and r.stdout == expected + "\n", (r.stdout, expected)
