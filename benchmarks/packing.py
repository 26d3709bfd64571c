"""Packing (`finetune.py --pack`) against length-grouped padding: tokens per second and wall time
per epoch of the shared Trainer, on the embedded instruction set and on a long-tailed synthetic set.

    python benchmarks/packing.py --threads 1    # both sets, 2 rounds (~5 minutes on a busy 2-core box)
    python benchmarks/packing.py --quick        # 150 records per set, 1 round

The same examples train both ways, with the same Trainer step (fused head + cross-entropy, AdamW,
token-weighted step loss) on a random 4-layer, 128-wide GPT-2 (train.py's shape), fp32, batch
8 x 1: padded, 8 examples per micro-batch grouped by length and padded to the longest (today's
default); packed, 8 rows of up to max_length - 1 positions, each holding several examples
(block-diagonal causal mask, positions restarting per example). One epoch is every example once:
padded ceil(N / 8) steps, packed ceil(rows / 8). tok/s counts real (non-padding) positions;
"computed" counts every position the model ran, padding included. Rounds alternate the order of
the two modes. The long-tailed set (300 records) imitates Alpaca's lengths: log-normal prompt
(median ~20 words) and response (median ~45 words, sigma 1.0) lengths, cut at max_length 512 as
finetune.py would. Results: benchmarks/results/packing[_quick].json.
"""
from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from common import bench_parser, machine_info, write_json  # noqa: E402

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.data.instruct import InstructionDataset, tokenize_records  # noqa: E402
from minigpt.data.records import default_instructions_path, load_records  # noqa: E402
from minigpt.data.tokenizer import get_tokenizer  # noqa: E402
from minigpt.training.config import TrainConfig  # noqa: E402
from minigpt.training.trainer import Trainer  # noqa: E402

MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=512)       # train.py's default shape, context 512
BATCH = 8


def long_tailed_records(n: int, seed: int = 0) -> list[dict]:
    """Alpaca-like records (instruction, optional input, output) of words from the embedded set,
    with log-normal lengths."""
    words = " ".join(m["content"] for r in load_records(default_instructions_path()) for m in r["messages"]).split()
    rng = random.Random(seed)

    def text(median: float, sigma: float) -> str:
        return " ".join(rng.choice(words) for _ in range(max(1, round(rng.lognormvariate(0, sigma) * median))))

    def record() -> dict:
        user = {"role": "user", "content": text(14, 0.6), "input": text(6, 1.0) if rng.random() < 0.4 else ""}
        return {"messages": [user, {"role": "assistant", "content": text(45, 1.0)}], "system": None}

    return [record() for _ in range(n)]


def epoch(examples: list[dict], max_length: int, pack: bool) -> dict:
    """One epoch with a fresh model (same seed): wall time, steps, real and computed positions."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL, vocab_size=50257))
    ds = InstructionDataset(examples, BATCH, seed=1, pack=max_length - 1 if pack else None)
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(out_dir=d, max_steps=ds.per_epoch, batch_size=BATCH, lr=1e-4, warmup_steps=1,
                          precision="fp32", device="cpu")
        trainer = Trainer(model, cfg, ds, None, lambda m, d: None, lambda m, d: None, quiet=True)
        computed = sum(ds.batch(s)[0].numel() for s in range(ds.per_epoch))
        trainer.train_step()                                   # warm-up (not counted)
        trainer.step = 0
        t0, tokens = time.perf_counter(), 0
        while trainer.step < ds.per_epoch:
            tokens += trainer.train_step()[1]
            trainer.step += 1
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "steps": ds.per_epoch, "tokens": tokens, "computed": computed,
            "tok_per_s": round(tokens / wall, 1), "padding": round(1 - tokens / computed, 3)}


def main() -> None:
    ap = bench_parser(__doc__, "150 records per set, 1 round")
    ap.add_argument("--rounds", type=int, default=None, help="default 2 (1 with --quick)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, rounds = (150, 1) if args.quick else (None, args.rounds or 2)
    tok = get_tokenizer()
    sets = {"embedded": (load_records(default_instructions_path())[:n], 256),
            "long_tailed": (long_tailed_records(n or 300), 512)}
    out = {"machine": machine_info(), "model": MODEL, "batch": BATCH, "rounds": rounds, "precision": "fp32",
           "note": "shared 2-core machine with other jobs running (see load_average); medians over rounds",
           "sets": {}}
    for name, (records, max_length) in sets.items():
        examples, _ = tokenize_records(records, tok, "alpaca", max_length, True)
        lengths = sorted(len(e["input_ids"]) for e in examples)
        runs: dict[str, list[dict]] = {"padded": [], "packed": []}
        for r in range(rounds):
            for mode in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
                runs[mode].append(epoch(examples, max_length, mode == "packed"))
                print(name, mode, runs[mode][-1], flush=True)
        res = {"examples": len(examples), "max_length": max_length,
               "length_p50_p90_p99_max": [lengths[int(q * (len(lengths) - 1))] for q in (0.5, 0.9, 0.99, 1.0)]}
        for mode, rs in runs.items():
            res[mode] = {**rs[0], "wall_s": statistics.median(x["wall_s"] for x in rs),
                         "tok_per_s": statistics.median(x["tok_per_s"] for x in rs),
                         "wall_s_rounds": [x["wall_s"] for x in rs]}
        res["speedup_wall"] = round(res["padded"]["wall_s"] / res["packed"]["wall_s"], 2)
        out["sets"][name] = res
        print(name, f"packed {res['speedup_wall']}x faster per epoch", flush=True)
    out["machine"]["load_average_end"] = machine_info()["load_average"]
    print(write_json("packing_quick.json" if args.quick else "packing.json", out))


if __name__ == "__main__":
    main()
