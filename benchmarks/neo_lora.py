"""The GPT-Neo chatbot recipe's LoRA step, minigpt vs transformers + peft, on the GPT-Neo 1.3B shape.

    python benchmarks/neo_lora.py                    # 1.3B shape, batch 1 x 128, fp32, 1 warm-up + 3 rounds
    python benchmarks/neo_lora.py --quick            # 125M shape, same batch (< 2 minutes)
    python benchmarks/neo_lora.py --size 125m --batch 4 --block 512 --rounds 2   # the recipe's micro-batch
    python benchmarks/neo_lora.py --recipe-check     # + finetune.py with the recipe's flags, 1 step, then chat
    #   --weights DIR (keep the random base between runs), --bf16 (bf16 autocast rows too), --profile,
    #   --threads N | auto (all cores on an idle machine, 1 on a busy one)

The recipe (a GPT-Neo 1.3B chatbot fine-tuned on openassistant-guanaco): LoRA r=8, alpha=16, dropout
0.05 on q_proj and v_proj (peft's default for GPT-Neo), max length 512, batch 4 x accumulation 4,
lr 2e-4 constant, warmup ratio 0.03. Random weights of that shape (nothing is downloaded): minigpt
builds the model (GPT-2's init, seed 0) and saves it with save_pretrained; both libraries load that
folder (transformers as GPTNeoForCausalLM, dropout 0 outside LoRA). A step is one micro-batch of
forward + loss, backward, loss.item(), grad clipping at 1.0, fused AdamW on the adapter, zero_grad:
minigpt's Trainer.train_step() against model(input_ids, labels=input_ids).loss on peft's model, the
machinery of benchmarks/train_step.py (its timing and memory workers; see its docstring): timing
interleaved in one process with rotating order, ratios per round, the step-0 losses checked equal;
peak memory in one fresh process per system (peak RSS over the loaded model, and absolute peak).
With --bf16, a third system "minigpt-bf16base": minigpt with the frozen weight matrices held in bf16
(the same values reach the matmuls as under autocast, checked by its step-0 loss): what finetune.py
does for any parameter-efficient run in bf16 (minigpt.methods.hold_frozen_matrices).

The recipe's micro-batch (4 x 512) costs ~16 TFLOP at 1.3B: minutes per step on a 2-core CPU, so
the 1.3B rows use batch 1 x 128 and the file says so; --size 125m --batch 4 --block 512 runs the
recipe's micro-batch on the 125M shape. --recipe-check runs `finetune.py --lora --base <1.3B folder>`
with the recipe's flags for 1 optimizer step (16 short guanaco-style examples) and `chat.py --model
OUT` on the result, recording wall time and peak RSS.
Results: benchmarks/results/neo_lora[_125m][_bBxT][_quick].json with the CPU model, flags and load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import train_step as ts  # noqa: E402
from common import machine_info, run_worker, write_json  # noqa: E402

LORA = dict(r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"))
BF16_BASE = "minigpt-bf16base"            # minigpt with its frozen weight matrices held in bf16 (--bf16)
PRESETS = {"1.3b": "gpt-neo-1.3B", "125m": "gpt-neo-125m"}
RECIPE_FLAGS = ["--lora", "--max-length", "512", "--batch-size", "4", "--grad-accum", "4", "--lr", "2e-4",
                "--schedule", "constant", "--warmup-ratio", "0.03"]


# --- worker side: the two systems, on train_step.py's worker -----------------------------------

def hold_frozen_matrices_in_bf16(model) -> None:
    """What finetune.py does for a LoRA run in bf16 (minigpt.methods.hold_frozen_matrices): the frozen
    weight matrices stored in bf16, the same values autocast would cast them to each step. The other
    parameters are copied off the loaded file's mapping so that its fp32 pages can go."""
    from minigpt.methods import hold_frozen_matrices

    hold_frozen_matrices(model, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype == torch.float32:
                p.data = p.data.clone()


class NeoMinigpt(ts.MinigptSystem):
    """minigpt's Trainer.train_step() on the GPT-Neo folder with LoRA on q_proj, v_proj."""

    bf16_base = False

    def __init__(self, spec, batches):
        from minigpt import GPT
        from minigpt.methods.lora import add_lora
        from minigpt.training.config import TrainConfig
        from minigpt.training.trainer import Trainer

        model = GPT.from_pretrained(spec["weights"]).train()
        add_lora(model, **LORA)
        if self.bf16_base:
            hold_frozen_matrices_in_bf16(model)
        self.data = [(x, torch.cat([lab[:, 1:], torch.full_like(x[:, :1], -100)], 1))
                     for x, lab in ((x, ts.labels_for(x, spec)) for x in batches)]
        self.i = 0
        cfg = TrainConfig(out_dir=os.path.join(spec["tmp"], "unused-out"), max_steps=10 ** 9,
                          batch_size=batches[0].size(0), lr=spec["lr"], warmup_steps=0, schedule="constant",
                          weight_decay=ts.OPT["weight_decay"], beta1=ts.OPT["betas"][0], beta2=ts.OPT["betas"][1],
                          grad_clip=ts.OPT["grad_clip"], precision="fp32", device="cpu")
        self.trainer = Trainer(model, cfg, data=lambda step, micro: self.data[self.i % len(self.data)],
                               evaluate=lambda m: {}, save_weights=lambda m, d: None,
                               load_weights=lambda m, d: None, quiet=True)
        self.model = model


class NeoMinigptBf16Base(NeoMinigpt):
    """The same, its frozen weight matrices held in bf16 (hold_frozen_matrices_in_bf16); bf16 rows only."""

    bf16_base = True


class NeoHF(ts.HFSystem):
    """transformers GPTNeoForCausalLM + peft LoRA (q_proj, v_proj), a plain training loop."""

    def __init__(self, spec, batches):
        ts._quiet_hf()
        from peft import LoraConfig, get_peft_model
        from transformers import GPTNeoForCausalLM

        from minigpt.training.trainer import param_groups
        self.device = torch.device("cpu")
        model = GPTNeoForCausalLM.from_pretrained(spec["weights"], dtype=torch.float32, resid_dropout=0.0,
                                                  embed_dropout=0.0, attention_dropout=0.0)
        model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                 target_modules=list(LORA["targets"]), task_type="CAUSAL_LM"))
        self.model = self.fwd = model.train()
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        self.opt = torch.optim.AdamW(param_groups(model, ts.OPT["weight_decay"]), lr=spec["lr"],
                                     betas=ts.OPT["betas"], fused=True)
        self.lr, self.data, self.i = spec["lr"], [(x, ts.labels_for(x, spec)) for x in batches], 0


def make_weights(spec: dict) -> dict:
    """minigpt's GPT-Neo of the preset's shape (GPT-2's init, seed 0), saved with save_pretrained."""
    from minigpt import GPT, GPTConfig

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(spec["preset"]))
    model.save_pretrained(spec["weights"])
    return {"params": model.num_params(), "seconds": round(time.perf_counter() - t0, 1)}


def worker(spec: dict) -> dict:
    if spec.get("role") == "make":
        return make_weights(spec)
    # train_step's worker, on these systems
    ts.LIBS.update({"minigpt": NeoMinigpt, "transformers": NeoHF, BF16_BASE: NeoMinigptBf16Base})
    return ts.worker(spec)


# --- the recipe through the command line -------------------------------------------------------

GUANACO = [("What is the capital of France?", "The capital of France is Paris."),
           ("Give me a synonym for happy.", "Joyful."), ("How many legs does a spider have?", "Eight."),
           ("Write a haiku about rain.", "Soft rain on the roof, / the garden drinks quietly, / puddles hold the sky."),
           ("What is 12 times 12?", "144."), ("Name a primary colour.", "Red.")]


def write_guanaco(path: Path, n: int = 20) -> Path:
    """n '### Human: ... ### Assistant: ...' conversations (openassistant-guanaco's text format)."""
    convs = [f"### Human: {q} ({i})### Assistant: {a}" for i, (q, a) in
             ((i, GUANACO[i % len(GUANACO)]) for i in range(n))]
    path.write_text("\n\n".join(convs) + "\n", encoding="utf-8")
    return path


def recipe_check(weights: str, tmp: Path, threads: int, quantize: str | None) -> dict:
    """finetune.py with the recipe's flags for 1 step on the folder, then chat.py on the result."""
    from finetune_recipe import timed_child

    data, out = write_guanaco(tmp / "guanaco.txt"), tmp / f"out-{quantize or 'lora'}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    flags = RECIPE_FLAGS + ["--max-steps", "1", "--val-fraction", "0", "--eval-batches", "0", "--samples", "0",
                            "--exact-match", "0", "--threads", str(threads), "--device", "cpu"] + \
        (["--quantize", quantize] if quantize else [])
    cmd = [sys.executable, str(HERE.parent / "finetune.py"), "--base", weights, "--data", str(data),
           "--out-dir", str(out), *flags]
    _, wall, peak = timed_child(cmd, env)
    run = json.loads((out / "run.json").read_text())["train"]
    chat = [sys.executable, str(HERE.parent / "chat.py"), "--model", str(out), "--prompt", "Name a colour.",
            "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]
    p, chat_wall, chat_peak = timed_child(chat, env)
    row = {"command": "finetune.py --base $BASE --data guanaco.txt " + " ".join(flags), "wall_s": round(wall, 1),
           "peak_rss_mb": round(peak), "schedule": run["schedule"], "warmup_steps": run["warmup_steps"],
           "max_steps": run["max_steps"], "precision": run["precision"],
           "chat": {"reply": p.stdout.strip()[-200:], "wall_s": round(chat_wall, 1), "peak_rss_mb": round(chat_peak)}}
    print(f"recipe check{f' --quantize {quantize}' if quantize else ''}: finetune 1 step {row['wall_s']} s, "
          f"peak {row['peak_rss_mb']} MiB; chat {chat_wall:.1f} s -> {row['chat']['reply']!r}", flush=True)
    return row


# --- the parent ---------------------------------------------------------------------------------

def bench(args, tmp: str, weights: str) -> dict:
    batch, block = args.batch, args.block
    precs = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    systems = [[lib, p] for p in precs for lib in ("minigpt", "transformers")]
    systems += [[BF16_BASE, "bf16"]] if args.bf16 else []
    spec = dict(bench="lora", weights=weights, tmp=tmp, threads=args.threads, lr=2e-4, allocator=args.allocator,
                mask_prompt=0.0, batches=ts.make_batches(args.rounds + 1, batch, block, tmp, "neo"))
    run = run_worker(__file__, {**spec, "role": "timing", "systems": systems, "rounds": args.rounds,
                                "warmup": 1, "profile": args.profile})
    res = ts.summarize(run, batch * block, "transformers fp32")
    res_cpu = ts.summarize(run, batch * block, "transformers fp32", clock="cpu")
    mem = {} if args.no_memory else ts.run_memory(__file__, {**spec, "steps": args.mem_steps}, systems)
    if args.bf16:        # train_step's summary compares "minigpt" rows only: the bf16-base row by hand
        per = [a / b for a, b in zip(run["times"]["transformers bf16"], run["times"][f"{BF16_BASE} bf16"])]
        res[f"{BF16_BASE} bf16"].update(speedup_vs_transformers_same_precision_per_round=[round(x, 3) for x in per],
                                        speedup_vs_transformers_same_precision_median=round(ts._med(per), 3),
                                        initial_loss_equals_minigpt_bf16=run["initial_loss"][f"{BF16_BASE} bf16"]
                                        == run["initial_loss"]["minigpt bf16"])
    for name in [n for n in res if n.startswith("minigpt")]:
        m, h = mem.get(name), mem.get("transformers " + name.split(" ")[1])
        if m and h:
            res[name]["memory_ratio_vs_transformers"] = {
                "train_peak_over_setup": round(m["train_peak_over_setup_mb"] / h["train_peak_over_setup_mb"], 3),
                "absolute_peak_rss": round(m["peak_rss_mb"] / h["peak_rss_mb"], 3)}
    ts.print_table(f"LoRA step, {PRESETS[args.size]} shape, batch {batch} x {block}, {args.rounds} rounds",
                   res, mem, res_cpu)
    ts.print_profile(run.get("profile"))
    check = ts.loss_check(run)
    print(f"step-0 loss: minigpt {check['minigpt_fp32']:.6f} transformers {check['transformers_fp32']:.6f} "
          f"|diff| {check['abs_diff']:.2e} ({'ok' if check['ok'] else 'MISMATCH'})")
    met = {}
    for name, r in res.items():
        if name.startswith("minigpt"):
            mr = r.get("memory_ratio_vs_transformers", {})
            met[name] = {"speedup": r["speedup_vs_transformers_same_precision_median"] >= 1.2,
                         "memory_train_peak_over_setup": mr.get("train_peak_over_setup", 9) <= 0.7,
                         "memory_absolute_peak": mr.get("absolute_peak_rss", 9) <= 0.7}
    return {"batch": batch, "block": block, "tokens_per_step": batch * block, "rounds": args.rounds,
            "attn_implementation_transformers": run["attn_implementation"], "step0_loss_check": check,
            "load_1min_per_round": run["load_1min_per_round"],
            "targets": {"speedup_vs_transformers_same_precision": 1.2, "memory_ratio": 0.7}, "met": met,
            "results": res, "results_cpu_clock": res_cpu, "memory": mem,
            **({"profile": run["profile"], "profile_summary": ts.profile_summary(run["profile"])}
               if "profile" in run else {})}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_worker":
        print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 125M shape (default size 1.3b)")
    ap.add_argument("--size", choices=PRESETS, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=2, help="steps in each memory process")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast rows too")
    ap.add_argument("--profile", action="store_true", help="torch.profiler on one step of each system")
    ap.add_argument("--recipe-check", action="store_true", help="finetune.py + chat.py with the recipe's flags")
    ap.add_argument("--recipe-quantize", choices=["nf4", "int8"], default=None,
                    help="with --recipe-check: a second run with --quantize")
    ap.add_argument("--weights", default=None, help="folder of the random base (made when missing; kept)")
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--allocator", choices=["default", "reuse"], default="default")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = ap.parse_args(argv)
    args.size = args.size or ("125m" if args.quick else "1.3b")
    load_before = os.getloadavg()
    args.threads, threads_why = ts.pick_threads(args.threads, load_before[0])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigpt-neo-lora-") as tmp:
        weights = args.weights or os.path.join(tmp, "weights")
        made = None
        if not os.path.isfile(os.path.join(weights, "config.json")):
            made = run_worker(__file__, {"role": "make", "preset": PRESETS[args.size], "weights": weights})
            print(f"made {PRESETS[args.size]}-shaped random weights ({made['params'] / 1e6:.0f}M params) "
                  f"in {made['seconds']} s", flush=True)
        payload = {"benchmark": f"LoRA step of the GPT-Neo chatbot recipe, {PRESETS[args.size]} shape (random "
                                "weights, same in both): LoRA r=8 alpha=16 dropout=0.05 on q_proj, v_proj, fused "
                                "AdamW on the adapter, CPU",
                   "size": PRESETS[args.size], "quick": args.quick, "threads": args.threads,
                   "threads_choice": threads_why, "allocator": args.allocator,
                   "recipe": {"micro_batch": "4 x 512 (x 4 accumulation)", "measured_micro_batch":
                              f"{args.batch} x {args.block}", "why": "4 x 512 at 1.3B is ~16 TFLOP per micro-batch: "
                              "minutes per step on this CPU" if (args.batch, args.block) != (4, 512) else None},
                   "systems": {"minigpt": "Trainer.train_step (CausalLMLoss fused head+CE, add_lora q_proj v_proj)",
                               "transformers": "GPTNeoForCausalLM + peft get_peft_model(LoraConfig(r=8, "
                                               "lora_alpha=16, target_modules=[q_proj, v_proj])), "
                                               "model(input_ids, labels=input_ids).loss"},
                   "timing": "interleaved in one process after 1 warm-up step each, rotating order per round; "
                             "ratio = transformers / minigpt per round (median)",
                   "memory_method": "separate process per system; peak RSS (VmHWM after clear_refs=5) minus RSS "
                                    "after load + LoRA + optimizer setup + touching every weight, over "
                                    f"{args.mem_steps} steps; absolute peak RSS too",
                   "weights_made": made, **bench(args, tmp, weights)}
        if args.recipe_check:
            payload["recipe_check"] = {"lora": recipe_check(weights, Path(tmp), args.threads, None)}
            if args.recipe_quantize:
                payload["recipe_check"][args.recipe_quantize] = recipe_check(weights, Path(tmp), args.threads,
                                                                             args.recipe_quantize)
    payload["machine"] = {**machine_info(), "load_average_before": load_before}
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    shape = "" if (args.batch, args.block) == (1, 128) else f"_b{args.batch}x{args.block}"
    name = args.out or f"neo_lora{'' if args.size == '1.3b' else '_125m'}{shape}{'_quick' if args.quick else ''}.json"
    path = write_json(name, payload)
    print(f"load average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in payload['machine']['load_average'])}; {payload['wall_s']} s; wrote {path}")
    if not payload["step0_loss_check"]["ok"]:
        raise SystemExit("step-0 losses of minigpt and transformers differ by more than 1e-4")
    return payload


if __name__ == "__main__":
    main()
