"""Quickstart side by side: the no-argument `python train.py` against nanoGPT's README CPU recipe,
given the same wall time on the same machine, scored in bits per byte on held-out verse.

    python benchmarks/quickstart.py --nanogpt ~/nanoGPT            # full: minigpt's 5-minute default
    python benchmarks/quickstart.py --nanogpt ~/nanoGPT --quick    # pipeline check (< 2 minutes)
    python benchmarks/quickstart.py --no-nanogpt                   # minigpt alone

nanoGPT is not part of this repository: pass a checkout (`git clone https://github.com/karpathy/nanoGPT`)
with --nanogpt DIR or NANOGPT_DIR. Protocol:
- minigpt: `train.py` with no training flags (its 5-minute time budget), from a clean folder, timed
  end to end (start-up, tokenisation, evaluation, samples and saving included).
- nanoGPT: its own train.py with config/train_shakespeare_char.py and the README's CPU flags (char-level,
  4 x 128, block 64, batch 12, dropout 0). Its data files (train.bin / val.bin as uint16 char ids,
  meta.pkl with stoi / itos / vocab_size) are written here from minigpt's embedded corpus, split 90/10
  by characters as nanoGPT's shakespeare_char preparation splits its text, so both read the same
  Shakespeare. A short probe run measures its time per iteration and its fixed cost; max_iters (=
  lr_decay_iters) is then set so that the whole run takes minigpt's measured wall time; when the long
  run's pace differs from the probe's (its wall time off by more than 5%), it is planned again from the
  long run's own pace and rerun (at most twice; every try is recorded). eval_interval
  = max_iters: it evaluates at the start and the end, so the checkpoint it saves is its final model.
- Both use the same number of threads (--threads, default 2; OMP_NUM_THREADS and torch's setting).
- Bits per byte on each held-out text: the text is cut into consecutive non-overlapping windows of the
  model's context (minigpt: 128 GPT-2 tokens; nanoGPT: 64 characters); every token but the text's first
  is predicted from its window; bpb = summed cross-entropy (nats) / ln 2 / UTF-8 bytes of the predicted
  text. minigpt uses minigpt.training.evaluate.evaluate_bpb; nanoGPT's checkpoint is scored with its own model.py.
  A character outside nanoGPT's vocabulary (none in the shipped texts) is fed as a space and charged
  8 bits per UTF-8 byte, the cost of sending it verbatim; the count is reported.

Writes benchmarks/results/quickstart_<cpu kind>.json (_quick.json with --quick); the CPU kind comes from
the CPU flags: amx_bf16, avx512_bf16, avx512, avx2, neon.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
from common import kind_tag, machine_info, write_json  # noqa: E402

TEXTS = [HERE / "data" / "paradise_regained.txt", HERE / "data" / "milton_poems_1645.txt"]
GOAL_MARGIN_BPB = 0.3            # issue 23: minigpt at least this much better than nanoGPT on every text
NANOGPT_HINT = ("nanoGPT checkout needed: git clone https://github.com/karpathy/nanoGPT, then pass "
                "--nanogpt DIR or set NANOGPT_DIR (or run --no-nanogpt)")
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")
MATCH_TOLERANCE = 0.05      # nanoGPT's wall time within 5% of minigpt's, else it runs again
MATCH_RETRIES = 2
# nanoGPT's README CPU recipe (max_iters / lr_decay_iters are set per run)
NANOGPT_RECIPE = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                  "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0"]
UNKNOWN_BITS_PER_BYTE = 8.0
QUICK_MINIGPT = ["--max-steps", "30", "--eval-interval", "30", "--warmup-steps", "5"]
QUICK_NANOGPT_CAP = 50


def find_nanogpt(path) -> Path:
    """The nanoGPT checkout, checked for the files the benchmark runs; SystemExit with a hint if absent."""
    if not path:
        raise SystemExit(NANOGPT_HINT)
    d = Path(path).expanduser().resolve()
    missing = [f for f in NANOGPT_FILES if not (d / f).is_file()]
    if missing:
        raise SystemExit(f"{d}: not a nanoGPT checkout (missing {', '.join(missing)}); {NANOGPT_HINT}")
    return d


def thread_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# --- minigpt -----------------------------------------------------------------------------------------

def run_minigpt(out: Path, threads: int, quick: bool, budget) -> dict:
    """`train.py` from a clean folder, timed end to end; what it decided and its validation figures."""
    flags = ["--threads", str(threads)] + (QUICK_MINIGPT if quick else [])
    flags += ["--time-budget", budget] if budget else []
    cmd = [sys.executable, str(ROOT / "train.py"), "--out-dir", str(out)] + flags
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=thread_env(threads))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"train.py failed with exit code {r.returncode}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_val = [x for x in recs if "val_loss" in x][-1]
    run = json.loads((out / "run.json").read_text())
    return {"command": "python train.py " + " ".join(flags), "wall_seconds": round(wall, 1),
            "time_budget_seconds": (run.get("budget") or {}).get("seconds"),
            "steps": last_val["step"], "budget": run.get("budget"), "model": run["model"], "head": run.get("head"),
            "spelling": run.get("spelling"),
            "train": {**run["train"], "out_dir": out.name},          # no machine paths in results
            "val_loss": round(last_val["val_loss"], 4), "val_bpb": round(last_val["val_bpb"], 4)}


def minigpt_heldout(out: Path, texts: dict) -> dict:
    import torch

    from minigpt import GPT
    from minigpt.training.evaluate import evaluate_bpb

    model = GPT.from_pretrained(out)
    res = {}
    with torch.no_grad():
        for name, text in texts.items():
            r = evaluate_bpb(model, text, block_size=model.config.block_size, batch_size=16)
            res[name] = {"bpb": round(r["bpb"], 4), "loss_nats_per_token": round(r["loss"], 4),
                         "bytes_per_token": round(r["bytes"] / r["tokens"], 3), "predicted_bytes": r["bytes"]}
    return res


# --- nanoGPT data, runs and evaluation ------------------------------------------------------------------

def write_char_data(dest: Path, text: str, train_fraction: float = 0.9) -> dict:
    """nanoGPT's char-level dataset files from `text`: train.bin / val.bin (uint16 ids) and meta.pkl."""
    import numpy as np

    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    itos = {i: c for i, c in enumerate(chars)}
    n = int(len(text) * train_fraction)
    dest.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", text[:n]), ("val", text[n:])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(dest / f"{split}.bin")
    with open(dest / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return {"vocab_size": len(chars), "train_chars": n, "val_chars": len(text) - n,
            "val_bytes_per_char": round(len(text[n:].encode("utf-8")) / max(1, len(text) - n), 4)}


def parse_nanogpt_log(log: str) -> dict:
    """Per-iteration times (ms) and evaluations from nanoGPT's train.py output."""
    iters = {int(m[1]): float(m[2]) for m in re.finditer(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", log, re.M)}
    evals = [(int(m[1]), float(m[2]), float(m[3]))
             for m in re.finditer(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log, re.M)]
    return {"iter_ms": iters, "evals": evals}


def run_nanogpt(nano: Path, work: Path, iters: int, threads: int, tag: str) -> dict:
    """nanoGPT's train.py on the data under work/data, `iters` iterations; wall time and its log."""
    out = work / f"out-{tag}"
    shutil.rmtree(out, ignore_errors=True)
    args = [str(nano / "config" / "train_shakespeare_char.py")] + NANOGPT_RECIPE + [
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}", f"--out_dir={out}"]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(nano / "train.py")] + args, cwd=work, env=thread_env(threads),
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work / f"{tag}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not (out / "ckpt.pt").is_file():
        raise SystemExit(f"nanoGPT train.py ({tag}) failed with exit code {p.returncode}:\n{p.stderr[-2000:]}")
    return {"iters": iters, "wall_seconds": wall, "ckpt": out / "ckpt.pt",
            "command": "python train.py config/train_shakespeare_char.py " + " ".join(args[1:-1]),
            **parse_nanogpt_log(p.stdout)}


def iter_drift(run: dict) -> dict:
    """Mean ms per iteration over the first and the last tenth of a run (a pace that drifts shows here)."""
    ms = [v for i, v in sorted(run["iter_ms"].items()) if 0 < i < run["iters"]]
    k = max(1, len(ms) // 10)
    return ({"first_tenth_ms_per_iter": round(sum(ms[:k]) / k, 2), "last_tenth_ms_per_iter": round(sum(ms[-k:]) / k, 2),
             "mean_ms_per_iter": round(sum(ms) / len(ms), 2), "max_ms_per_iter": round(max(ms), 1)} if ms else {})


def time_matched_run(run, iters: int, fixed: float, target_wall: float, retries: int = MATCH_RETRIES):
    """(final run, tries): run(iters), and while its wall time is off target_wall by more than
    MATCH_TOLERANCE, plan again from that run's own pace and run again (at most `retries` times)."""
    final = run(iters)
    tries = [{"iters": iters, "wall_seconds": round(final["wall_seconds"], 1), **iter_drift(final)}]
    while len(tries) <= retries and abs(final["wall_seconds"] / target_wall - 1) > MATCH_TOLERANCE:
        t_iter = max(1e-4, (final["wall_seconds"] - fixed) / (iters + 1))
        iters = max(1, int((target_wall - fixed) / t_iter) - 1)
        print(f"nanoGPT ran {final['wall_seconds']:.0f} s for {target_wall:.0f} s "
              f"({t_iter * 1000:.1f} ms/iter over the run): again with {iters} iters", flush=True)
        final = run(iters)
        tries.append({"iters": iters, "wall_seconds": round(final["wall_seconds"], 1), **iter_drift(final)})
    return final, tries


def plan_iters(probe: dict, target_wall: float) -> dict:
    """max_iters for a run of `target_wall` seconds, from a probe run of the same shape.

    train.py trains iterations 0..max_iters; the first and last include the evaluations and the save.
    Model: wall = fixed + (max_iters + 1) * t_iter, t_iter the mean of the probe's other iterations.
    """
    P = probe["iters"]
    steady = [ms for i, ms in probe["iter_ms"].items() if 0 < i < P]
    if not steady:
        raise SystemExit("nanoGPT probe logged no steady iterations")
    t_iter = sum(steady) / len(steady) / 1000
    fixed = max(0.0, probe["wall_seconds"] - (P + 1) * t_iter)
    n = max(1, int((target_wall - fixed) / t_iter) - 1)
    return {"iters": n, "ms_per_iter": round(t_iter * 1000, 2), "fixed_seconds": round(fixed, 1)}


def load_nanogpt_model(nano: Path, ckpt: Path):
    """nanoGPT's GPT (its own model.py) with the weights of `ckpt`, in eval mode."""
    import torch

    name = "nanogpt_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, nano / "model.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod                     # dataclasses look the module up while it loads
        spec.loader.exec_module(mod)
    mod = sys.modules[name]
    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):          # it prints its parameter count
        model = mod.GPT(mod.GPTConfig(**ck["model_args"]))
    state = {k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()}
    model.load_state_dict(state)
    return model.eval(), ck


def char_bpb(model, text: str, stoi: dict, block_size: int, batch_size: int = 64) -> dict:
    """Bits per UTF-8 byte of `text` under a char-level model, windows as in minigpt.evaluate_bpb.

    Characters missing from `stoi` are fed as a space and cost UNKNOWN_BITS_PER_BYTE per byte."""
    import torch
    import torch.nn.functional as F

    fill = stoi.get(" ", 0)
    ids = torch.tensor([stoi.get(c, fill) for c in text], dtype=torch.long)
    known = torch.tensor([c in stoi for c in text])
    char_bytes = torch.tensor([len(c.encode("utf-8")) for c in text], dtype=torch.float64)
    T, n = block_size, len(text) - 1
    windows = [(s, min(T, n - s)) for s in range(0, n, T)]
    nats = 0.0
    with torch.no_grad():
        for b0 in range(0, len(windows), batch_size):
            group = windows[b0: b0 + batch_size]
            for length in sorted({k for _, k in group}):
                rows = [s for s, k in group if k == length]
                x = torch.stack([ids[s: s + length] for s in rows])
                y = torch.stack([ids[s + 1: s + length + 1] for s in rows])
                logits, _ = model(x, y)                           # full logits when targets are given
                nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
                ok = torch.stack([known[s + 1: s + length + 1] for s in rows]).flatten()
                nats += float(nll[ok].double().sum())
    unknown = ~known[1:]
    unknown_bytes = float(char_bytes[1:][unknown].sum())
    nbytes = float(char_bytes[1:].sum())
    bits = nats / math.log(2) + UNKNOWN_BITS_PER_BYTE * unknown_bytes
    return {"bpb": bits / nbytes, "nats_per_char": nats / max(1, int((~unknown).sum())),
            "predicted_bytes": int(nbytes), "unknown_chars": int(unknown.sum()),
            "unknown_byte_fraction": unknown_bytes / nbytes}


def nanogpt_version(nano: Path) -> dict:
    """What identifies the nanoGPT code that ran: its git commit if known, hashes of the two scripts."""
    info = {f: hashlib.sha1((nano / f).read_bytes()).hexdigest()[:12] for f in ("train.py", "model.py")}
    info["commit"] = None
    try:
        out = subprocess.run(["git", "-C", str(nano), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.split()
        if len(out) == 2 and Path(out[0]).resolve() == nano:     # its own repository, not one around it
            info["commit"] = out[1]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def run_nanogpt_side(nano: Path, work: Path, target_wall: float, threads: int, quick: bool, texts: dict) -> dict:
    """Data, probe, the time-matched run and held-out scores for nanoGPT."""
    import torch

    from minigpt.data.corpus import embedded_corpus_text

    data = write_char_data(work / "data" / "shakespeare_char", embedded_corpus_text())
    link = work / "configurator.py"                 # train.py reads it from its working directory
    if not link.exists():
        link.symlink_to(nano / "configurator.py")
    probe = run_nanogpt(nano, work, 10 if quick else 200, threads, "probe")
    plan = plan_iters(probe, target_wall)
    iters = min(plan["iters"], QUICK_NANOGPT_CAP) if quick else plan["iters"]
    print(f"nanoGPT probe: {probe['iters']} iters in {probe['wall_seconds']:.1f} s ({plan['ms_per_iter']} ms/iter, "
          f"{plan['fixed_seconds']} s fixed) -> {plan['iters']} iters for {target_wall:.0f} s"
          + (f", capped at {iters} (--quick)" if iters != plan["iters"] else ""), flush=True)
    final, tries = time_matched_run(lambda n: run_nanogpt(nano, work, n, threads, "final"), iters,
                                    plan["fixed_seconds"], target_wall, retries=0 if quick else MATCH_RETRIES)
    iters = final["iters"]
    torch.set_num_threads(threads)
    model, ck = load_nanogpt_model(nano, final["ckpt"])
    with open(work / "data" / "shakespeare_char" / "meta.pkl", "rb") as f:
        stoi = pickle.load(f)["stoi"]
    held = {name: {k: round(v, 4) if isinstance(v, float) else v
                   for k, v in char_bpb(model, text, stoi, ck["model_args"]["block_size"]).items()}
            for name, text in texts.items()}
    last = final["evals"][-1] if final["evals"] else None
    return {"version": nanogpt_version(nano), "command": final["command"], "data": data,
            "probe": {"iters": probe["iters"], "wall_seconds": round(probe["wall_seconds"], 1),
                      "ms_per_iter": plan["ms_per_iter"], "fixed_seconds": plan["fixed_seconds"]},
            "iters": iters, "time_matched_iters": plan["iters"], "tries": tries,
            "wall_seconds": round(final["wall_seconds"], 1),
            "wall_ratio_to_minigpt": round(final["wall_seconds"] / target_wall, 3),
            "checkpoint_iter": int(ck["iter_num"]),
            "val_loss_nats_per_char": last[2] if last else None,
            "val_bpb": round(last[2] / math.log(2) / data["val_bytes_per_char"], 4) if last else None,
            "heldout": held}


# --- the benchmark ---------------------------------------------------------------------------------------

def compare(mini: dict, nano: dict | None, quick: bool) -> dict:
    """Held-out bpb differences (positive: minigpt better) and the goal; no verdict from a --quick run."""
    if nano is None:
        return {}
    diff = {n: round(nano["heldout"][n]["bpb"] - mini["heldout"][n]["bpb"], 4) for n in mini["heldout"]}
    return {"nanogpt_minus_minigpt_bpb": diff, "goal_margin_bpb": GOAL_MARGIN_BPB,
            "goal_met": None if quick else all(d >= GOAL_MARGIN_BPB for d in diff.values())}


def summary(mini: dict, nano: dict | None, cmp: dict) -> str:
    lines = [f"minigpt: {mini['steps']} steps, wall {mini['wall_seconds']:.0f} s"
             + (f" (budget {mini['time_budget_seconds']:.0f} s)" if mini["time_budget_seconds"] else "")
             + f" | val bpb {mini['val_bpb']:.3f}"]
    if nano:
        lines.append(f"nanoGPT: {nano['iters']} iters, wall {nano['wall_seconds']:.0f} s "
                     f"({nano['wall_ratio_to_minigpt']:.2f}x minigpt's) | val bpb {nano['val_bpb']:.3f}")
    for name, r in mini["heldout"].items():
        line = f"{name}: minigpt {r['bpb']:.3f} bpb"
        if nano:
            line += (f" | nanoGPT {nano['heldout'][name]['bpb']:.3f} bpb | nanoGPT - minigpt "
                     f"{cmp['nanogpt_minus_minigpt_bpb'][name]:+.3f} (goal >= +{GOAL_MARGIN_BPB})")
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--nanogpt", default=os.environ.get("NANOGPT_DIR"), metavar="DIR",
                    help="a nanoGPT checkout (default: $NANOGPT_DIR)")
    ap.add_argument("--no-nanogpt", action="store_true", help="run minigpt alone")
    ap.add_argument("--quick", action="store_true",
                    help=f"minigpt 30 steps, nanoGPT at most {QUICK_NANOGPT_CAP} iterations: a pipeline check")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both (default 2)")
    ap.add_argument("--time-budget", default=None, help="passed to train.py (default: its own, 5m)")
    ap.add_argument("--text", action="append", default=None, metavar="FILE",
                    help="held-out text (repeatable; default: the two under benchmarks/data)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep both runs in this folder")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    nano = None if args.no_nanogpt else find_nanogpt(args.nanogpt)
    texts = {Path(p).name: Path(p).read_text(encoding="utf-8") for p in (args.text or TEXTS)}
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quickstart-"))
    shutil.rmtree(root / "minigpt", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    try:
        mini = run_minigpt(root / "minigpt", args.threads, args.quick, args.time_budget)
        mini["heldout"] = minigpt_heldout(root / "minigpt", texts)
        side = (run_nanogpt_side(nano, root / "nanogpt", mini["wall_seconds"], args.threads, args.quick, texts)
                if nano else None)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    kind = kind_tag()
    cmp = compare(mini, side, args.quick)
    result = {"benchmark": "python train.py (no training flags) vs nanoGPT's README CPU recipe at equal wall time",
              "quick": args.quick, "cpu_kind": kind, "threads": args.threads,
              "heldout_texts": {n: {"bytes": len(t.encode("utf-8")), "sha1": hashlib.sha1(t.encode()).hexdigest()[:12]}
                                for n, t in texts.items()},
              "minigpt": mini, "nanogpt": side, **cmp, "machine": machine_info()}
    path = write_json(f"quickstart_{kind}{'_quick' if args.quick else ''}.json", result)
    print("\n" + summary(mini, side, cmp))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
