"""Quickstart quality: run the no-argument `python train.py` from a clean output folder, time it
end to end (start-up and tokenisation included), and report bits per byte on the validation split
and on held-out text the model never saw (default: Milton's Paradise Regained).

    python benchmarks/quickstart.py            # the real default run (~5 minutes on 2 cores)
    python benchmarks/quickstart.py --quick    # 30 steps, to try the pipeline (< 1 minute)
    python benchmarks/quickstart.py --text other_verse.txt

Writes benchmarks/results/quickstart.json (quickstart_quick.json with --quick).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, write_json  # noqa: E402

# nanoGPT's README CPU recipe (char-level Shakespeare, 4 x 128, block 64, batch 12) measured on the
# same held-out verse on this class of machine: see shared performance notes.
NANOGPT = {"94 s (2,000 iters)": 3.17, "305 s (6,000 iters)": 2.93}
TARGET_BPB = 2.6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 steps instead of the full default")
    ap.add_argument("--text", default=str(HERE / "data" / "paradise_regained.txt"),
                    help="held-out text for bits per byte")
    ap.add_argument("--keep", default=None, help="keep the trained run in this folder")
    args = ap.parse_args(argv)

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quickstart-"))
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(HERE.parent / "train.py"), "--out-dir", str(out)]
    if args.quick:
        cmd += ["--max-steps", "30", "--eval-interval", "30", "--warmup-steps", "5"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=HERE.parent)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"train.py failed with exit code {r.returncode}", file=sys.stderr)
        return 1

    import torch

    from minigpt import GPT
    from minigpt.evaluate import evaluate_bpb

    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_val = [r for r in recs if "val_loss" in r][-1]
    model = GPT.from_pretrained(out)
    text = Path(args.text).read_text(encoding="utf-8")
    with torch.no_grad():
        held = evaluate_bpb(model, text, block_size=model.config.block_size, batch_size=16)
    run = json.loads((out / "run.json").read_text())
    result = {
        "benchmark": "python train.py with no arguments, from a clean output folder",
        "quick": args.quick,
        "wall_seconds": round(wall, 1),
        "steps": last_val["step"],
        "model": run["model"],
        "train": {**run["train"], "out_dir": out.name},      # no machine paths in results
        "val_loss": round(last_val["val_loss"], 4),
        "val_bpb": round(last_val["val_bpb"], 4),
        "heldout_text": Path(args.text).name,
        "heldout_bpb": round(held["bpb"], 4),
        "heldout_loss_nats_per_token": round(held["loss"], 4),
        "heldout_bytes_per_token": round(held["bytes"] / held["tokens"], 3),
        "target_bpb": TARGET_BPB,
        "nanogpt_char_cpu_recipe_bpb": NANOGPT,
        "machine": machine_info(),
    }
    path = write_json("quickstart_quick.json" if args.quick else "quickstart.json", result)
    print(f"\nwall {wall:.0f} s | val bpb {last_val['val_bpb']:.3f} | held-out bpb {held['bpb']:.3f} "
          f"({Path(args.text).name}; target <= {TARGET_BPB}, nanoGPT char CPU recipe 2.93 after 305 s)")
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
