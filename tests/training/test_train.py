"""train.py and the shared Trainer: end to end, exact resume after kill -9, DDP, Ctrl-C, bad flags."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from minigpt import GPT
from minigpt.commands import train
from minigpt.training.config import TrainConfig, lr_at

ROOT = Path(__file__).resolve().parents[2]
TINY = tiny.train_flags(eval_batches=2, log_interval=1, lr="3e-3", warmup_steps=5, precision="fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n" for i in range(3000))
    (d / "a.txt").write_text(text)
    (d / "b.txt").write_text(text.upper())
    return d


def losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return ([(r["step"], r["loss"]) for r in recs if "loss" in r],
            [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r])


def run(args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, **kw)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)         # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, warmup_steps=0, max_steps=100, schedule="linear")
    assert lr_at(50, lin) == pytest.approx(0.5)


def test_train_end_to_end(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--max-steps", "40",
                       "--eval-interval", "20", "--sample-tokens", "8", *TINY, "--samples", "1"]) == 0
    tr, va = losses(out)
    assert len(tr) == 40 and va[0][0] == 20 and va[-1][0] == 40
    assert tr[-1][1] < tr[0][1] - 3.0                      # learns visibly: 10.8 nats -> well below
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_bpb" in r for r in recs if "val_loss" in r)
    model = GPT.from_pretrained(out)                       # the output dir is a model dir
    assert model.config.n_layer == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000040"]
    assert (out / "best" / "model.safetensors").exists()
    printed = capsys.readouterr().out
    assert "saved model to" in printed and "samples:" in printed
    # a second fresh run into the same folder refuses to mix with the first one's checkpoints
    assert train.main(["--data", str(corpus), "--out-dir", str(out), "--max-steps", "2", *TINY]) == 1
    assert "already holds a pretrain run" in capsys.readouterr().err
    assert (out / "checkpoints" / "step-0000040").exists()


def test_resume_after_kill_is_exact(tmp_path, corpus):
    common = ["--data", str(corpus), "--max-steps", "30", "--eval-interval", "10", "--save-interval", "4",
              "--dropout", "0.1", *TINY]
    ref = tmp_path / "ref"
    assert run(["--out-dir", str(ref), *common]).returncode == 0
    out = tmp_path / "killed"
    # kill -9 once a few checkpoints exist, possibly mid-write; then resume (twice if needed)
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out-dir", str(out), *common],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints" / "step-0000012").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "checkpoints").exists()
    r = run(["--out-dir", str(out), "--resume", *common])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr + r.stdout
    assert losses(out) == losses(ref)                      # every step's loss, bit for bit
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_and_resumes(tmp_path, corpus):
    out = tmp_path / "int"
    common = ["--data", str(corpus), "--max-steps", "400", "--eval-interval", "1000", *TINY]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--out-dir", str(out), *common],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130
    assert "Traceback" not in err
    assert "checkpoint saved" in err and "--resume" in err
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and int(ckpts[0].name[5:]) >= 5


def test_ddp_two_processes_match_single(tmp_path, corpus):
    common = ["--data", str(corpus), "--max-steps", "6", "--eval-interval", "6", "--grad-accum", "2", *TINY]
    single = tmp_path / "single"
    assert run(["--out-dir", str(single), *common]).returncode == 0
    ddp = tmp_path / "ddp"
    # --standalone: a rendezvous on a free local port (a fixed port collides with a second run)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train.py"), "--out-dir", str(ddp),
                        "--device", "cpu", *common], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (s_tr, s_va), (d_tr, d_va) = losses(single), losses(ddp)
    assert [s for s, _ in s_tr] == [s for s, _ in d_tr]
    for (_, a), (_, b) in zip(s_tr + s_va, d_tr + d_va):
        assert a == pytest.approx(b, abs=1e-4)
    a, b = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--max-steps", "0"], "--max-steps must be > 0"),
    (["--precision", "fp8"], "invalid choice"),
    (["--optimizer", "sgd"], "invalid choice"),
    (["--muon-lr", "-1"], "--muon-lr must be > 0"),
    (["--data", "/nonexistent/corpus.txt"], "no such file"),
    (["--resume", "--out-dir", "/nonexistent/run"], "no checkpoint"),
    (["--init-from", "/nonexistent/model"], "error:"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs CUDA"),
    (["--time-budget", "5x"], "--time-budget must be a duration such as 5m, 300s, 1.5m or 1h, got '5x'"),
    (["--time-budget", "0s"], "--time-budget must be a duration"),
    (["--time-budget", "5m", "--max-steps", "10"], "use either --max-steps (a fixed step count) or --time-budget"),
])
def test_bad_input_is_one_line(args, message, tmp_path):
    r = run(["--out-dir", str(tmp_path / "o"), *args] if "--out-dir" not in args else args)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_adamw_is_fused_where_torch_has_it_and_matches_the_loop(monkeypatch):
    """make_adamw: torch's fused kernel (one pass per parameter) on CPU, the same updates as the
    per-tensor loop, and the loop when the device has no fused kernel."""
    from minigpt.training.trainer import make_adamw

    def run(opt_fn):
        g = torch.Generator().manual_seed(0)
        p = [torch.randn(30, 20, generator=g).requires_grad_(), torch.randn(20, generator=g).requires_grad_()]
        opt = opt_fn([{"params": [p[0]], "weight_decay": 0.1}, {"params": [p[1]], "weight_decay": 0.0}])
        for step in range(20):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - step / 25)
            for x in p:
                x.grad = torch.randn(x.shape, generator=g)
            opt.step()
        return opt, [x.detach() for x in p]

    fused, a = run(lambda groups: make_adamw(groups, lr=1e-2, betas=(0.9, 0.95)))
    assert fused.defaults["fused"] is True
    assert (a[0] - torch.randn(30, 20, generator=torch.Generator().manual_seed(0))).abs().max() > 0.1  # it trained
    _, b = run(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95)))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    real_adamw = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real_adamw(params, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    loop, c = run(lambda groups: make_adamw(groups, lr=1e-2, betas=(0.9, 0.95)))
    assert not loop.defaults.get("fused")
    for x, y in zip(c, b):
        assert torch.equal(x, y)


def test_concurrent_data_preparation_is_safe(tmp_path, corpus):
    """DDP ranks tokenise the same corpus into the same cache at once: every writer uses a temp
    file of its own, so none trips over another's rename, and all see the same complete data."""
    import threading

    import numpy as np

    from minigpt.data.corpus import prepare_data
    for attempt in range(5):                                # the race, when present, shows within a few
        cache = tmp_path / f"cache{attempt}"
        results, errors = [], []

        def work(cache=cache, results=results, errors=errors):
            try:
                results.append(prepare_data(str(corpus), cache))
            except Exception as e:                                  # noqa: BLE001 (collected)
                errors.append(e)
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(set(results)) == 1
        out = results[0]
        meta = json.loads((out / "meta.json").read_text())
        assert np.fromfile(out / "train.bin", dtype=np.uint16).size == meta["train_tokens"]
        assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]   # no temp left
