"""LoRA fine-tuning end to end: the HF recipe (transformers Trainer + peft) vs `finetune.py --lora`,
same base, same examples, same run.

The recipe (seed-000): GPT-2 124M, LoRA r 8, alpha 16, dropout 0.05 on c_attn, lr 2e-4 (linear,
5% warm-up), AdamW betas 0.9 / 0.95 (minigpt's; set on the Trainer too), batch 2 x 4 (gradient
accumulation), max length 256, fp32, one pass over the same training examples. The HF side pads
every example to max length on the right, as that recipe's tokenisation (padding="max_length")
does, with labels -100 on the prompt and the padding; minigpt runs its own CLI as a user would
(`finetune.py --lora ...`): dynamic padding to the longest example of each micro-batch,
length-grouped batches, the head skipped on masked rows. A second minigpt row uses one micro-batch
of 8 instead of 2 x 4 (the same examples per optimizer step).

    python benchmarks/finetune_recipe.py             # gpt2-size random base, 96 examples (12 steps)
    python benchmarks/finetune_recipe.py --quick     # < 1 minute: tiny base, 16 examples
    python benchmarks/finetune_recipe.py --data alpaca_data.json --examples 160

Base: transformers' GPT-2 init (std 0.02, seed 0), saved once and loaded by both. Data: the embedded
instruction set (or --data, any format finetune.py reads), its train/val split, a seeded subset of
--examples training records written to one file that both read. Each system runs in its own process:
wall time of the whole process (start-up, loading, tokenising, training, saving), training time (HF:
Trainer's train_runtime; minigpt: the metrics it logs, real tokens / tokens-per-second per record),
examples/s and real (non-pad) tokens/s over the training time, peak RSS of the process (ru_maxrss), and
the masked validation loss after training, computed for every system by one function on the same val
examples (minigpt's model with each saved adapter loaded; the HF worker also reports its own).
Results: benchmarks/results/finetune_recipe_<cpu kind>[_quick].json with the CPU model and flags.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import bench_parser, kind_tag, machine_info, serve_as_worker, worker_result, write_json  # noqa: E402

RECIPE = dict(r=8, alpha=16, dropout=0.05, targets=["c_attn"], lr=2e-4, batch=2, accum=4, max_length=256)


def examples(data: str, max_length: int) -> tuple[list[dict], list[dict]]:
    """(train, val) tokenised exactly as finetune.py does (default template, prompt masked)."""
    from minigpt.data.instruct import tokenize_records
    from minigpt.data.records import load_records, split_records
    from minigpt.data.templates import DEFAULT_TEMPLATE

    train, val = split_records(load_records(data), 0.1, seed=42)
    return (tokenize_records(train, None, DEFAULT_TEMPLATE, max_length)[0],
            tokenize_records(val, None, DEFAULT_TEMPLATE, max_length)[0])


def val_loss(logits_fn, val: list[dict]) -> float:
    """Masked next-token loss over the val examples (one example at a time, no padding), token mean."""
    import torch.nn.functional as F
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in val:
            x = torch.tensor([ex["input_ids"][:-1]])
            y = torch.tensor(ex["labels"][1:])
            keep = y != -100
            if keep.any():
                total += F.cross_entropy(logits_fn(x)[0].float()[keep], y[keep], reduction="sum").item()
                n += int(keep.sum())
    return total / max(n, 1)


# --- the HF side (its own process) --------------------------------------------------------------

def hf_worker(spec: dict) -> dict:
    """transformers Trainer + peft on examples padded to max length; train_runtime and val loss."""
    import peft
    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(spec["threads"])
    train, val = examples(spec["data"], spec["max_length"])
    L, pad = spec["max_length"], 50256

    def padded(ex):
        n = len(ex["input_ids"])
        return {"input_ids": torch.tensor(ex["input_ids"] + [pad] * (L - n)),
                "attention_mask": torch.tensor([1] * n + [0] * (L - n)),
                "labels": torch.tensor(ex["labels"] + [-100] * (L - n))}

    model = GPT2LMHeadModel.from_pretrained(spec["base"])
    cfg = peft.LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=RECIPE["dropout"],
                          target_modules=RECIPE["targets"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, cfg)
    args = TrainingArguments(output_dir=spec["out"], per_device_train_batch_size=RECIPE["batch"],
                             gradient_accumulation_steps=RECIPE["accum"], learning_rate=RECIPE["lr"],
                             num_train_epochs=1, lr_scheduler_type="linear", warmup_steps=spec["warmup"],
                             weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             eval_strategy="no", report_to="none", use_cpu=True, seed=42,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=[padded(ex) for ex in train])
    out = trainer.train()
    model.save_pretrained(Path(spec["out"]) / "adapter")
    model.eval()
    return {"train_runtime_s": out.metrics["train_runtime"], "steps": out.global_step,
            "examples": len(train), "own_val_loss": val_loss(lambda x: model(input_ids=x).logits, val)}


# --- the parent: base, data, both systems, one yardstick --------------------------------------

def timed_child(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd; wall seconds and its own peak RSS (os.wait4 on its pid)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with p.stdout, p.stderr:                      # stderr may be large (progress bars): read both
        import threading
        chunks = {"out": [], "err": []}
        ts = [threading.Thread(target=lambda k, f: chunks[k].append(f.read()), args=(k, f))
              for k, f in (("out", p.stdout), ("err", p.stderr))]
        for t in ts:
            t.start()
        _, status, usage = os.wait4(p.pid, 0)
        for t in ts:
            t.join()
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {p.returncode}):\n{''.join(chunks['err'])[-3000:]}")
    return subprocess.CompletedProcess(cmd, 0, "".join(chunks["out"]), "".join(chunks["err"])), wall, \
        usage.ru_maxrss / 1024


def make_base(path: Path, quick: bool) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128) if quick else GPT2Config()
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def write_subset(data: str, n: int, path: Path) -> dict:
    """n seeded training records + every val record of a JSON/JSONL file, marked with their split,
    in one JSONL file (the records as written, so both systems read the same text)."""
    from minigpt.data.records import load_records, split_records
    text = Path(data).read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    raw = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in lines]
    norm = load_records(data)
    if len(norm) != len(raw):
        raise SystemExit(f"{data}: expected one record per JSON object")
    for i, r in enumerate(norm):
        r["_row"] = i
    train, val = split_records(norm, 0.1, seed=42)
    pick = random.Random(0).sample(train, min(n, len(train)))
    with open(path, "w", encoding="utf-8") as f:
        for split, recs in (("train", pick), ("val", val)):
            for r in recs:
                f.write(json.dumps({**raw[r["_row"]], "split": split}) + "\n")
    return {"train_records": len(pick), "val_records": len(val)}


def minigpt_train_seconds(out: Path) -> float:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return sum(r["tokens"] / r["tok_per_s"] for r in recs if r.get("tok_per_s"))


def adapter_val_loss(base: str, adapter: Path, val: list[dict]) -> float:
    from minigpt import GPT
    from minigpt.methods import load_adapter
    model = load_adapter(GPT.from_pretrained(base), adapter).eval()
    return val_loss(model, val)


def summarise(row: dict, train: list[dict], max_length: int, hf_pad: bool) -> dict:
    n = len(train)
    real = sum(len(ex["input_ids"]) - 1 for ex in train)
    processed = n * (max_length - 1) if hf_pad else None
    row.update(examples=n, real_tokens=real, examples_per_s=round(n / row["train_s"], 3),
               real_tok_per_s=round(real / row["train_s"], 1))
    if processed:
        row["processed_tokens"] = processed
    return row


def main(argv=None) -> dict:
    if serve_as_worker(argv, "_hf", hf_worker):
        return {}
    ap = bench_parser(__doc__, "tiny base (2 x 128), 16 examples, max length 128")
    ap.add_argument("--data", default=None, help="instruction data (default: the embedded set)")
    ap.add_argument("--examples", type=int, default=None, help="training examples (default 96; 16 with --quick)")
    args = ap.parse_args(argv)
    from minigpt.data.records import default_instructions_path

    tmp = Path(tempfile.mkdtemp(prefix="recipe-"))
    data = args.data or str(default_instructions_path())
    max_length = 128 if args.quick else RECIPE["max_length"]
    n = args.examples or (16 if args.quick else 96)
    base = make_base(tmp / "base", args.quick)
    subset = tmp / "data.jsonl"
    sizes = write_subset(data, n, subset)
    train, val = examples(str(subset), max_length)
    steps = -(-len(train) // (RECIPE["batch"] * RECIPE["accum"]))
    warmup = max(1, round(0.05 * steps))
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    rows = {}

    spec = dict(base=base, data=str(subset), max_length=max_length, threads=args.threads, warmup=warmup,
                out=str(tmp / "hf"))
    p, wall, peak = timed_child([sys.executable, __file__, "_hf", json.dumps(spec)], env)
    hf = worker_result(p.stdout)
    rows["transformers Trainer + peft (pad to max length)"] = summarise(
        {"train_s": hf["train_runtime_s"], "wall_s": round(wall, 1), "peak_rss_mb": round(peak), "steps": hf["steps"],
         "val_loss": adapter_val_loss(base, tmp / "hf" / "adapter", val), "own_val_loss": hf["own_val_loss"]},
        train, max_length, True)

    for name, (b, a) in {"minigpt finetune.py --lora (2 x 4)": (2, 4),
                         "minigpt finetune.py --lora (8 x 1)": (8, 1)}.items():
        out = tmp / f"mini-{b}x{a}"
        cmd = [sys.executable, str(HERE.parent / "finetune.py"), "--lora", "--base", base, "--data", str(subset),
               "--epochs", "1", "--lr", str(RECIPE["lr"]), "--batch-size", str(b), "--grad-accum", str(a),
               "--max-length", str(max_length), "--precision", "fp32", "--threads", str(args.threads),
               "--samples", "0", "--exact-match", "0", "--eval-batches", "0", "--out-dir", str(out)]
        p, wall, peak = timed_child(cmd, env)
        rows[name] = summarise({"train_s": round(minigpt_train_seconds(out), 2), "wall_s": round(wall, 1),
                                "peak_rss_mb": round(peak), "steps": None, "val_loss": adapter_val_loss(base, out, val),
                                "command": "finetune.py " + " ".join(cmd[2:]).replace(str(tmp), "$TMP")},
                               train, max_length, False)
        rows[name]["steps"] = json.loads((out / "run.json").read_text())["train"]["max_steps"]

    from minigpt import GPT
    base_val = val_loss(GPT.from_pretrained(base).eval(), val)
    ref = rows["transformers Trainer + peft (pad to max length)"]
    for name, r in rows.items():
        r["examples_per_s_vs_hf"] = round(r["examples_per_s"] / ref["examples_per_s"], 2)
        r["wall_vs_hf"] = round(ref["wall_s"] / r["wall_s"], 2)
        r["memory_vs_hf"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
        print(f"{name:48s} {r['examples_per_s']:7.2f} ex/s ({r['examples_per_s_vs_hf']:.2f}x) "
              f"{r['real_tok_per_s']:8.0f} real tok/s  train {r['train_s']:6.1f} s  wall {r['wall_s']:6.1f} s  "
              f"peak {r['peak_rss_mb']} MiB ({r['memory_vs_hf']:.2f}x)  val loss {r['val_loss']:.4f}", flush=True)
    result = {"benchmark": "LoRA fine-tuning end to end: transformers Trainer + peft vs finetune.py --lora",
              "recipe": {**RECIPE, "max_length": max_length, "epochs": 1, "warmup_steps": warmup,
                         "precision": "fp32", "base": "gpt2 2x128 (quick)" if args.quick else "gpt2 124M",
                         "base_init": "transformers GPT-2 init, seed 0"},
              "data": {"source": args.data or "embedded:instructions", **sizes,
                       "train_examples": len(train), "val_examples": len(val),
                       "mean_real_tokens_per_example": round(sum(len(e["input_ids"]) for e in train) / len(train), 1)},
              "base_val_loss": base_val, "target": {"examples_per_s_vs_hf": 3.0}, "threads": args.threads, "rows": rows,
              "machine": machine_info()}
    print(f"val loss of the base before training: {base_val:.4f}")
    print("wrote", write_json(f"finetune_recipe_{kind_tag()}{'_quick' if args.quick else ''}.json", result))
    return result


if __name__ == "__main__":
    main()
