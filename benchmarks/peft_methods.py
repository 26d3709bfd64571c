"""Parameter-efficient methods side by side: LoRA, DoRA, IA3, prefix tuning, prompt tuning and
bottleneck adapters trained with one recipe, minigpt vs peft (on transformers) where peft has the method.

    python benchmarks/peft_methods.py --quick              # < 1 minute: tiny random base, 3 steps
    python benchmarks/peft_methods.py                      # base: ./out (python train.py), 60 steps
    python benchmarks/peft_methods.py --base DIR --steps 100 --methods lora,ia3

The recipe (the same for every method and both libraries): the embedded instruction set, alpaca
template, prompt tokens masked, max length 256 (or the base's context less 20), batch 2 x 4 (grad
accumulation), AdamW (betas 0.9/0.95, no weight decay), linear warm-up (5%) and decay from the
method's default learning rate for the base's size (minigpt.methods.table.default_lr),
gradient clipping at 1.0, fp32, the same batches in the same order.
Method settings: LoRA/DoRA r 8, alpha 16, dropout 0.05 on c_attn; IA3 peft's GPT-2 defaults
(c_attn and mlp.c_proj, mlp.c_proj at its input); prefix and prompt tuning 20 virtual tokens
(random init, no projection); bottleneck adapters (minigpt only) size 64, houlsby placement.

minigpt: GPT.from_pretrained(base) + minigpt.methods.method_config(method).apply, loss through
minigpt's CausalLMLoss (the Trainer's). peft: transformers.GPT2LMHeadModel.from_pretrained(base) +
peft.get_peft_model, the loss from the logits (for prompt tuning the virtual positions are dropped).
Each (library, method) runs in its own fresh process: trainable parameters, the median step time
(after 2 warm-up steps), the peak RSS over training (VmHWM reset after loading) and the masked
validation loss after the last step. Results: benchmarks/results/peft_methods[_quick].json
with the CPU model and flags.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    bench_parser,
    machine_info,
    peak_rss_mb,
    reset_peak_rss,
    run_worker,
    serve_as_worker,
    write_json,
)

PEFT_HAS = ("lora", "dora", "ia3", "prefix", "prompt")
SETTINGS = {"lora": dict(r=8, alpha=16.0, dropout=0.05, targets=("c_attn",)),
            "dora": dict(r=8, alpha=16.0, dropout=0.05, targets=("c_attn",)),
            "ia3": {}, "prefix": dict(num_virtual_tokens=20), "prompt": dict(num_virtual_tokens=20),
            "adapter": dict(size=64, placement="houlsby")}


def _data(spec: dict):
    """(train dataset, val batches) of the embedded instructions, as finetune.py builds them."""
    from minigpt.data.instruct import InstructionDataset, tokenize_records
    from minigpt.data.records import default_instructions_path, load_records, split_records
    from minigpt.data.templates import get_template
    from minigpt.data.tokenizer import get_tokenizer

    tok, template = get_tokenizer(), get_template("alpaca")
    train, val = split_records(load_records(default_instructions_path()), 0.1, seed=42)
    max_length = spec["max_length"]
    train_ex, _ = tokenize_records(train, tok, template, max_length, True)
    val_ex, _ = tokenize_records(val, tok, template, max_length, True)
    ds = InstructionDataset(train_ex, spec["batch"], seed=42, grad_accum=spec["accum"])
    val_ds = InstructionDataset(val_ex, 8)
    return ds, list(val_ds.sequential(8, spec.get("val_batches")))


def _minigpt_system(spec: dict):
    """(model, trainable params, loss_fn(x, y), logits_fn(x)) for minigpt."""
    from minigpt import GPT
    from minigpt.methods import method_config
    from minigpt.methods.lora import LoRAConfig
    from minigpt.training.loss import CausalLMLoss

    model = GPT.from_pretrained(spec["base"])
    method = spec["method"]
    if method in ("lora", "dora"):
        cfg = LoRAConfig(**SETTINGS[method], use_dora=method == "dora")
    else:
        cfg = method_config(method, **SETTINGS[method])
    cfg.apply(model)
    loss = CausalLMLoss(model)
    return model, loss, model


def _peft_system(spec: dict):
    """(model, loss_fn(x, y), logits_fn(x)) for transformers + peft."""
    import peft
    import torch.nn.functional as F
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(spec["base"])
    hf.config.use_cache = False
    method = spec["method"]
    if method in ("lora", "dora"):
        s = SETTINGS[method]
        cfg = peft.LoraConfig(r=s["r"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                              target_modules=list(s["targets"]), fan_in_fan_out=True,
                              use_dora=method == "dora", task_type="CAUSAL_LM")
    elif method == "ia3":
        cfg = peft.IA3Config(task_type="CAUSAL_LM")
    elif method == "prefix":
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    else:
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
    model = peft.get_peft_model(hf, cfg)
    skip = 20 if method == "prompt" else 0

    def logits(x):
        return model(input_ids=x).logits[:, skip:]

    def loss(x, y):
        out = logits(x)
        return F.cross_entropy(out.float().reshape(-1, out.size(-1)), y.reshape(-1), ignore_index=-100)
    return model, loss, logits


def _val_loss(logits_fn, batches) -> float:
    import torch.nn.functional as F
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            out = logits_fn(x)
            keep = y != -100
            total += F.cross_entropy(out.float()[keep], y[keep], reduction="sum").item()
            n += int(keep.sum())
    return total / max(n, 1)


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    ds, val = _data(spec)
    model, loss_fn, logits_fn = (_minigpt_system if spec["side"] == "minigpt" else _peft_system)(spec)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    steps, warm = spec["steps"], max(1, round(0.05 * spec["steps"]))
    how = reset_peak_rss()
    times, losses = [], []
    model.train()
    for step in range(steps):
        lr = spec["lr"] * ((step + 1) / warm if step < warm else max(0.0, (steps - step) / (steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        t0, total_loss = time.perf_counter(), 0.0
        for micro in range(spec["accum"]):
            x, y, _ = ds.batch(step, micro)
            loss = loss_fn(x, y) / spec["accum"]
            loss.backward()
            total_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(total_loss)
    peak = peak_rss_mb(how)
    model.eval()
    return {"trainable": trainable, "total": total, "step_s": statistics.median(times[2:] or times),
            "peak_rss_mb": round(peak, 1), "val_loss": _val_loss(logits_fn, val),
            "first_loss": losses[0], "last_loss": losses[-1], "steps": steps}


def _quick_base(d: Path) -> str:
    from minigpt import GPT, GPTConfig
    torch.manual_seed(0)
    GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128)).save_pretrained(d)
    return str(d)


def main(argv=None) -> dict:
    if serve_as_worker(argv, "_worker", worker):
        return {}
    from minigpt import GPT
    from minigpt.methods.table import METHODS, default_lr

    ap = bench_parser(__doc__, "tiny random base, 3 steps, max length 64")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--base", default=None, help="base model folder (default: ./out, the train.py output)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 60; 3 with --quick)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    tmp = tempfile.TemporaryDirectory()
    base = _quick_base(Path(tmp.name)) if args.quick else (args.base or "out")
    if not (Path(base) / "config.json").is_file():
        sys.exit(f"error: no base model in {base}: run `python train.py` first or pass --base DIR")
    block = json.loads((Path(base) / "config.json").read_text()).get("n_positions", 1024)
    max_length = min(64 if args.quick else 256, block - 20)      # room for 20 virtual tokens, for every method
    spec = dict(base=str(Path(base).resolve()), steps=args.steps or (3 if args.quick else 60), batch=2, accum=4,
                max_length=max_length, threads=args.threads, val_batches=2 if args.quick else None)
    n_params = GPT.from_pretrained(base).num_params()
    rates = {m: default_lr(m, n_params) for m in METHODS}
    rows = []
    for method in methods:
        for side in ("minigpt", "peft") if method in PEFT_HAS else ("minigpt",):
            r = run_worker(__file__, {**spec, "side": side, "method": method, "lr": rates[method]})
            rows.append({"method": method, "library": side, "lr": rates[method], **r})
            print(f"{method:8s} {side:8s} trainable {r['trainable']:>10,}  step {r['step_s']:.3f} s  "
                  f"peak {r['peak_rss_mb']:.0f} MiB  val loss {r['val_loss']:.3f}", flush=True)
    for r in rows:
        ref = next((o for o in rows if o["method"] == r["method"] and o["library"] == "peft"), None)
        if ref is not None and r["library"] == "minigpt":
            r["speedup_vs_peft"] = round(ref["step_s"] / r["step_s"], 2)
            r["memory_vs_peft"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
            r["same_trainable_as_peft"] = r["trainable"] == ref["trainable"]
    out = {"machine": machine_info(), "settings": {**spec, "base": base, "methods": SETTINGS}, "rows": rows}
    path = write_json("peft_methods_quick.json" if args.quick else "peft_methods.json", out)
    print(f"wrote {path}")
    if any(not math.isfinite(r["val_loss"]) for r in rows):
        sys.exit(1)
    return out


if __name__ == "__main__":
    main()
