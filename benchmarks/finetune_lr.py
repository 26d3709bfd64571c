"""Learning-rate sweep of `finetune.py --method M` on one base: which rate each method needs.

    python benchmarks/finetune_lr.py --base out                   # the train.py model (default)
    python benchmarks/finetune_lr.py --base gpt2 --methods lora   # a cached pretrained GPT-2
    python benchmarks/finetune_lr.py --quick                      # tiny random base, 2 rates, 20 steps
A run replaces the rows of the (method, lr) pairs it ran in the results file and keeps the others.

Each (method, lr) runs the command's own code (minigpt.commands.finetune, in process) with every
other flag at its default: the embedded instruction set, 3 epochs, batch 2 x 4, linear decay, and
the held-out masked validation loss and exact match of the base ("before") and after training.
Results: benchmarks/results/finetune_lr[_quick].json with the CPU model and flags; the default rates
in minigpt.methods.table (lr: pretrained GPT-2; small_base_lr: small bases such as train.py's) come from here.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import RESULTS, machine_info, write_json  # noqa: E402

GRID = {"lora": [2e-4, 1e-3, 3e-3, 1e-2], "dora": [1e-3, 3e-3, 1e-2], "ia3": [3e-3, 1e-2, 3e-2, 1e-1, 3e-1],
        "prefix": [3e-3, 1e-2, 3e-2, 1e-1], "prompt": [1e-2, 3e-2, 1e-1, 3e-1], "adapter": [3e-4, 1e-3, 3e-3, 1e-2]}


def one(base: str, method: str, lr: float, extra: list[str], out: Path) -> dict:
    import io
    from contextlib import redirect_stdout

    from minigpt.commands import finetune as ft
    from minigpt.commands.args import parse_args

    argv = ["--base", base, "--method", method, "--lr", str(lr), "--out-dir", str(out), "--overwrite",
            "--samples", "0", "--threads", "2", *extra]
    t0 = time.perf_counter()
    with redirect_stdout(io.StringIO()):
        ft.finetune(parse_args(ft.FinetuneArgs, argv))
    meta = json.loads((out / "minigpt_finetune.json").read_text())
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"val_loss"' in ln]
    before, after = meta.get("before") or {}, evals[-1]
    return {"method": method, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
            "val_loss_before": before.get("val_loss"), "val_loss_after": after["val_loss"],
            "exact_match_before": before.get("exact_match"), "exact_match_after": after.get("exact_match"),
            "steps": after["step"]}


def base_info(base: str) -> dict:
    """The base by its shape and training (not its path on this machine)."""
    d = Path(base)
    if not (d / "config.json").is_file():
        return {"name": base}
    cfg = json.loads((d / "config.json").read_text())
    run = json.loads((d / "run.json").read_text()) if (d / "run.json").is_file() else {}
    return {"name": d.name, **{k: cfg.get(k) for k in ("n_layer", "n_head", "n_embd", "n_positions")},
            "train_steps": (run.get("train") or {}).get("max_steps"),
            "train_precision": (run.get("train") or {}).get("precision")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="out")
    ap.add_argument("--methods", default=",".join(GRID))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lrs", default=None, help="comma-separated rates instead of each method's grid")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    base, extra = args.base, []
    if args.quick:
        import torch

        from minigpt import GPT, GPTConfig
        torch.manual_seed(0)
        base = str(Path(tmp.name) / "base")
        GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).save_pretrained(base)
        extra = ["--max-steps", "20", "--exact-match", "0"]
    rows = []
    for method in args.methods.split(","):
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else GRID[method]
        for lr in lrs[:2] if args.quick else lrs:
            virtual = ["--num-virtual-tokens", "4"] if args.quick and method in ("prefix", "prompt") else []
            r = one(base, method, lr, extra + virtual, Path(tmp.name) / "run")
            rows.append(r)
            print(f"{method:8s} lr {lr:<7g} val loss {r['val_loss_before']:.3f} -> {r['val_loss_after']:.3f}  "
                  f"exact match {r['exact_match_before']} -> {r['exact_match_after']}  ({r['seconds']} s)", flush=True)
    name = "finetune_lr_quick.json" if args.quick else "finetune_lr.json"
    old = RESULTS / name
    if not args.quick and old.is_file():                      # keep the rows this run did not redo
        ran = {(r["method"], r["lr"]) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if (r["method"], r["lr"]) not in ran] + rows
    best = {m: min((r for r in rows if r["method"] == m), key=lambda r: r["val_loss_after"])["lr"]
            for m in dict.fromkeys(r["method"] for r in rows)}
    out = {"machine": machine_info(), "base": base_info(base) if not args.quick else "tiny random", "rows": rows,
           "best_lr": best}
    print("best lr per method:", best)
    print("wrote", write_json(name, out))
    return out


if __name__ == "__main__":
    main()
