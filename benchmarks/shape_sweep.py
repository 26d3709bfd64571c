"""Which model shape buys the most quality per CPU-second: `train.py` under the same time budget
with several shapes, scored on held-out verse (bits per byte, lower is better).

    python benchmarks/shape_sweep.py                     # 2-minute budget per shape
    python benchmarks/shape_sweep.py --budget 5m --shapes 4x256x16,4x128x16
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/shape_sweep.py   # AVX2 kernels

A shape is LAYERSxWIDTHxBATCH[xBLOCK][@LR][:OPTIMIZER[=MUON_LR]] (heads = width / 64, block 128 unless
given, every other flag at train.py's default; e.g. 4x128x8@4e-3, 4x128x8x256, 4x128x16:adamw,
4x128x16:muon=8e-3); held-out text is scored in windows of
the run's block. Each run starts from a clean folder; the results file
(shape_sweep_<cpu kind>.json) records tokens/s, steps, validation and held-out bits per byte, the CPU model and flags.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import kind_tag, machine_info, write_json  # noqa: E402
from quickstart import TEXTS  # noqa: E402


def one(shape: str, budget: str, texts: list[str], threads: int) -> dict:
    from minigpt import GPT
    from minigpt.training.evaluate import evaluate_bpb

    shape_lr, _, opt = shape.partition(":")
    dims, _, lr = shape_lr.partition("@")
    opt, _, muon_lr = opt.partition("=")
    n_layer, n_embd, batch, *block = (int(x) for x in dims.split("x"))
    block = block[0] if block else 128
    out = Path(tempfile.mkdtemp(prefix="sweep-")) / "run"
    cmd = [sys.executable, str(HERE.parent / "train.py"), "--out-dir", str(out), "--time-budget", budget,
           "--n-layer", str(n_layer), "--n-embd", str(n_embd), "--n-head", str(max(1, n_embd // 64)),
           "--batch-size", str(batch), "--block-size", str(block), "--samples", "0",
           "--threads", str(threads)] + (["--lr", lr] if lr else []) + (["--optimizer", opt] if opt else []) \
        + (["--muon-lr", muon_lr] if muon_lr else [])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    tps = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    model = GPT.from_pretrained(out)
    held = {Path(t).name: round(evaluate_bpb(model, Path(t).read_text(encoding="utf-8"), block_size=block,
                                             batch_size=16)["bpb"], 4) for t in texts}
    run = json.loads((out / "run.json").read_text())
    return {"shape": shape, "params_m": round(model.num_params() / 1e6, 1), "wall_s": round(wall, 1),
            "steps": run["train"]["max_steps"], "precision": run["train"]["precision"],
            "tok_per_s": round(sorted(tps)[len(tps) // 2]) if tps else None,
            "lr": run["train"]["lr"], "optimizer": run["train"].get("optimizer"),
            "muon_lr": run["train"].get("muon_lr"), "val_bpb": [r for r in recs if "val_bpb" in r][-1]["val_bpb"],
            "heldout_bpb": held}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="2m")
    ap.add_argument("--shapes", default="4x256x16,4x128x16,4x192x16,3x256x8")
    ap.add_argument("--texts", default=",".join(str(t) for t in TEXTS),
                    help="held-out texts, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tag", default="", help="prefix of the results file name (keeps earlier sweeps)")
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes.split(","):
        r = one(shape, args.budget, args.texts.split(","), args.threads)
        rows.append(r)
        print(f"{shape:10s} {r['params_m']:5.1f}M {r['precision']} {r['steps']:4d} steps {r['tok_per_s']} tok/s "
              f"{r['wall_s']:.0f} s | val {r['val_bpb']:.3f} held-out "
              + " / ".join(f"{v:.3f}" for v in r["heldout_bpb"].values()) + " bits/byte", flush=True)
    kind = kind_tag()
    out = {"budget": args.budget, "heldout_texts": [Path(t).name for t in args.texts.split(",")], "rows": rows,
           "machine": machine_info()}
    print("wrote", write_json(f"shape_sweep_{args.tag}{kind}.json", out))
    return out


if __name__ == "__main__":
    main()
