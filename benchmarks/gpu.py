"""GPU benchmarks in one prepared run (~4-5 minutes on an H100/H200): minigpt vs transformers.

    python benchmarks/gpu.py                       # CUDA: the full run -> results/gpu.json
    python benchmarks/gpu.py --device cpu --quick  # smoke test, tiny sizes, seconds -> results/gpu_quick.json
    python benchmarks/gpu.py --parts a,b           # only some parts (a, b, c, d)

Needs `pip install -e '.[test]'` (transformers and peft for the reference systems; without them
the minigpt rows still run, on weights initialised by minigpt itself).

Parts (run in the order a, c, d, b so that the least important, slowest-to-compile one is last):
  (a) pretraining step, GPT-2 124M, batch 16 x 1024, bf16 autocast, torch.compile, fused AdamW:
      minigpt.training.trainer.Trainer.train_step() (what train.py runs, via train_step.MinigptSystem).
      tokens/s and MFU = tokens/s x flops_per_token / peak (minigpt.training.trainer's own
      flops_per_token: 6N + 12*L*H*Q*T with N = all parameters, the tied head counted once; and
      peak_flops: 989 TFLOPS bf16 dense on H100/H200). Target: MFU >= 55%. MFU with N = the
      non-embedding parameters only (a stricter count) is reported next to it.
  (b) the same step in a plain transformers GPT2LMHeadModel loop (same weights, same batches, bf16
      autocast, fused AdamW), torch.compile'd if that works, otherwise eager (the JSON says which).
  (c) LoRA fine-tuning step, r=8 alpha=16 dropout 0.05 on c_attn, batch 8 x 512, bf16 autocast,
      eager: minigpt add_lora + Trainer vs transformers + peft (fan_in_fan_out=True); tokens/s and
      torch.cuda.max_memory_allocated for each (each system alone on the GPU, in turn).
  (d) greedy decoding, batch 1, 32-token prompt, 128 new tokens, bf16 weights: minigpt
      generate(model, idx, 128), eager and with compile=True (CUDA graphs), vs transformers
      generate; target 3,000 tok/s for minigpt.

Both libraries train the same weights (train_step.make_weights: a seeded random GPT2LMHeadModel)
on the same Shakespeare batches (train_step.make_batches). The step-0 losses of minigpt and
transformers must agree within 2e-2 (bf16); the JSON records the check. Timing: warm-up steps
(compilation happens there), then --steps timed steps with torch.cuda.synchronize() around each.
A step is what train_step.py times: forward + loss, backward, loss.item(), grad clipping at 1.0,
AdamW (0.9/0.95, decay 0.1), zero_grad.

Every part runs in try/except under a time limit (whole run: --budget-s); a failed part is
recorded with its error and the others still run. The JSON is rewritten after every part, so an
interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine_info, write_json  # noqa: E402
from decode import agreement  # noqa: E402
from train_step import LORA, OPT, SIZES, HFSystem, MinigptSystem, make_batches, make_weights  # noqa: E402

MFU_TARGET = 0.55
DECODE_TARGET_TOK_S = 3000.0
LOSS_TOL_BF16 = 2e-2
ORDER = ("a", "c", "d", "b")
PART_NAMES = {"a": "pretrain_minigpt", "b": "pretrain_transformers", "c": "lora", "d": "decode"}


# ------------------------------------------------------------------------------------------------
# time limits, device helpers
# ------------------------------------------------------------------------------------------------
class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """Raise PartTimeout in the main thread after `seconds` (SIGALRM; nests: an inner limit never
    outlives an outer one, and the outer one is re-armed afterwards). No-op off the main thread."""
    if seconds is None or not hasattr(signal, "setitimer") or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = signal.getitimer(signal.ITIMER_REAL)[0]

    def handler(signum, frame):
        raise PartTimeout(f"time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, handler)
    t0 = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, max(min(seconds, outer) if outer else seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - t0), 0.01))


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def mem_now(device):
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None


def mem_reset(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def mem_peak(device):
    return torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None


def mib(x):
    return None if x is None else round(x / 2 ** 20, 1)


def cleanup(device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:
        pass
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def error_record(e: BaseException) -> dict:
    tb = traceback.format_exception(type(e), e, e.__traceback__)
    return {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": "".join(tb)[-4000:]}


def dynamo_stats() -> dict:
    """Graph breaks and graph count of what torch.compile did since the last reset."""
    try:
        from torch._dynamo.utils import counters
        breaks = {str(k)[:300]: v for k, v in counters["graph_break"].items()}
        return {"graph_breaks": sum(breaks.values()), "graph_break_reasons": breaks,
                "unique_graphs": counters["stats"].get("unique_graphs")}
    except Exception as e:
        return {"error": repr(e)}


def clear_dynamo_counters() -> None:
    try:
        from torch._dynamo.utils import counters
        counters.clear()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------
# shared inputs: weights and batches (made once per size, reused by every part)
# ------------------------------------------------------------------------------------------------
class Context:
    def __init__(self, args, tmp):
        self.args, self.tmp, self.device = args, tmp, args.device
        self._weights, self._batches, self.notes = {}, {}, {}
        self.step0 = {}                   # "pretrain minigpt" -> loss, for the a/b check

    def weights(self, size: str) -> str:
        """train_step.make_weights (seeded random GPT2LMHeadModel); without transformers the
        same-shaped minigpt init (seed 0) saved in the HF format."""
        if size not in self._weights:
            path = os.path.join(self.tmp, f"weights-{size}")
            try:
                make_weights(size, path)
                self.notes[f"weights_{size}"] = "transformers GPT2LMHeadModel, seed 0 (train_step.make_weights)"
            except ImportError as e:
                from minigpt import GPT, GPTConfig
                c = SIZES[size]
                rng = torch.get_rng_state()
                torch.manual_seed(0)
                GPT(GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"],
                              block_size=c["n_positions"], dropout=0.0)).save_pretrained(path)
                torch.set_rng_state(rng)
                self.notes[f"weights_{size}"] = f"minigpt GPT init, seed 0 (transformers missing: {e})"
            self._weights[size] = path
        return self._weights[size]

    def batches(self, n: int, batch: int, block: int) -> list:
        """n (batch, block) batches of Shakespeare (train_step.make_batches); random tokens if the
        tokenizer is unavailable."""
        key = (n, batch, block)
        if key not in self._batches:
            try:
                path = make_batches(n, batch, block, self.tmp, f"gpu-{n}-{batch}-{block}")
                self._batches[key] = torch.load(path)
            except Exception as e:
                g = torch.Generator().manual_seed(0)
                self._batches[key] = [torch.randint(0, 50257, (batch, block), generator=g) for _ in range(n)]
                self.notes[f"batches_{batch}x{block}"] = f"random tokens ({type(e).__name__}: {e})"
        return self._batches[key]


def system_spec(ctx: Context, bench: str, size: str, lr: float, compile_: bool) -> dict:
    return dict(bench=bench, size=size, weights=ctx.weights(size), tmp=ctx.tmp, lr=lr,
                device=ctx.device, compile=compile_, mask_prompt=0.0)


def time_training(system, precision: str, warmup: int, steps: int, device, tokens_per_step: int) -> dict:
    """Warm-up steps (compilation, AdamW state), then `steps` timed steps, each between two
    synchronize() calls. Peak memory (CUDA) is over all of them, from the set-up model on."""
    sync(device)
    base = mem_now(device)
    mem_reset(device)
    losses, t0 = [], time.perf_counter()
    for _ in range(warmup):
        losses.append(system.step(precision))
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(system.step(precision))
        sync(device)
        times.append(time.perf_counter() - t)
    peak = mem_peak(device)
    total = sum(times)
    return {"step0_loss": losses[0], "last_loss": losses[-1], "warmup_steps": warmup, "warmup_s": round(warm_s, 2),
            "timed_steps": steps, "step_ms_median": round(1e3 * statistics.median(times), 2),
            "step_ms_min": round(1e3 * min(times), 2), "step_ms_all": [round(1e3 * t, 2) for t in times],
            "tok_per_s": round(tokens_per_step * steps / total, 1),
            "memory_after_setup_mib": mib(base), "peak_memory_allocated_mib": mib(peak),
            "peak_over_setup_mib": mib(peak - base) if peak is not None else None}


def flops_info(ctx: Context, size: str, block: int) -> dict:
    """minigpt.training.trainer.flops_per_token (all parameters, tied head once; T = the model's context)
    and peak_flops, plus the count with N = non-embedding parameters only."""
    if "flops" not in ctx.notes:
        from minigpt import GPT
        from minigpt.device import peak_flops
        from minigpt.training.trainer import flops_per_token
        model = GPT.from_pretrained(ctx.weights(size))
        f = flops_per_token(model)
        n_all, n_nonemb = model.num_params(), model.num_params(non_embedding=True)
        peak = ctx.args.peak_tflops * 1e12 if ctx.args.peak_tflops else peak_flops(torch.device(ctx.device))
        ctx.notes["flops"] = {
            "flops_per_token": f, "flops_per_token_non_embedding_N": f - 6 * (n_all - n_nonemb),
            "params_all": n_all, "params_non_embedding": n_nonemb, "context": model.config.block_size,
            "trained_block": block, "peak_flops": peak,
            "formula": "minigpt.training.trainer.flops_per_token: 6N + 12*L*H*Q*T (N = all parameters, tied "
                       "wte/lm_head once; T = context); non_embedding_N: N without wte and wpe",
            "peak_source": "--peak-tflops" if ctx.args.peak_tflops else "minigpt.device.peak_flops"}
        if block != model.config.block_size:
            ctx.notes["flops"]["warning"] = "trained block != context: the attention term uses the context"
        del model
    return ctx.notes["flops"]


def add_mfu(res: dict, fl: dict) -> dict:
    if fl["peak_flops"]:
        res["mfu"] = round(res["tok_per_s"] * fl["flops_per_token"] / fl["peak_flops"], 4)
        res["mfu_non_embedding_N"] = round(
            res["tok_per_s"] * fl["flops_per_token_non_embedding_N"] / fl["peak_flops"], 4)
    else:
        res["mfu"] = None
    return res


# ------------------------------------------------------------------------------------------------
# the parts
# ------------------------------------------------------------------------------------------------
def pretrain_shape(args):
    return ("tiny", 4, 128) if args.quick else ("gpt2", args.batch, args.block)


def bench_pretrain_minigpt(args, ctx: Context) -> dict:
    """(a) minigpt Trainer.train_step, bf16 autocast, torch.compile (TrainConfig.compile), fused AdamW."""
    size, batch, block = pretrain_shape(args)
    batches = ctx.batches(4, batch, block)
    fl = flops_info(ctx, size, block)
    torch.manual_seed(1234)
    clear_dynamo_counters()
    system = MinigptSystem(system_spec(ctx, "pretrain", size, 6e-4, args.compile_on), batches)
    res = time_training(system, "bf16", args.warmup + (1 if args.compile_on else 0), args.steps, ctx.device,
                        batch * block)
    ctx.step0["pretrain minigpt"] = res["step0_loss"]
    add_mfu(res, fl)
    loss = "plain head + CE, compiled with the model" if args.compile_on and ctx.device.startswith("cuda") \
        else "fused chunked head + CE"
    out = {"system": f"minigpt Trainer.train_step (CausalLMLoss: {loss}), bf16 autocast, fused AdamW "
                     "on CUDA" + (", torch.compile (TrainConfig.compile)" if args.compile_on else ", eager"),
           "size": size, "config": SIZES[size], "batch": batch, "block": block, "grad_accum": 1,
           "compiled": args.compile_on, "optimizer_fused": system.trainer.optimizer.defaults.get("fused"),
           "flops": fl, **res, "target_mfu": MFU_TARGET,
           "target_met": (res["mfu"] >= MFU_TARGET) if res.get("mfu") is not None else None}
    if args.compile_on:
        out["dynamo"] = dynamo_stats()
    return out


def bench_pretrain_hf(args, ctx: Context, remaining) -> dict:
    """(b) transformers GPT2LMHeadModel loop, bf16 autocast, fused AdamW; compiled if it works."""
    size, batch, block = pretrain_shape(args)
    batches = ctx.batches(4, batch, block)
    fl = flops_info(ctx, size, block)
    attempts, res, system, compiled = [], None, None, False
    for compile_ in ([True, False] if args.compile_on else [False]):
        try:
            torch.manual_seed(1234)
            clear_dynamo_counters()
            system = HFSystem(system_spec(ctx, "pretrain", size, 6e-4, compile_), batches)
            # leave time for the eager fallback if compiling stalls
            limit = max(remaining() - 45, 10) if compile_ else None
            with time_limit(limit):
                res = time_training(system, "bf16", args.warmup + (1 if compile_ else 0), args.steps,
                                    ctx.device, batch * block)
            compiled = compile_
            attempts.append({"compile": compile_, "ok": True,
                             **({"dynamo": dynamo_stats()} if compile_ else {})})
            break
        except Exception as e:
            attempts.append({"compile": compile_, "ok": False, **error_record(e)})
            system = None
            cleanup(ctx.device)
            if not compile_:
                raise
    add_mfu(res, fl)
    out = {"system": "transformers GPT2LMHeadModel, model(input_ids, labels=input_ids).loss, bf16 autocast, "
                     "fused AdamW" + (", torch.compile(model)" if compiled else ", eager"),
           "compiled": compiled, "attempts": attempts, "attn_implementation": system.attn_implementation,
           "size": size, "batch": batch, "block": block, "flops": fl, **res}
    a = ctx.step0.get("pretrain minigpt")
    if a is not None:
        diff = abs(a - res["step0_loss"])
        out["step0_loss_check"] = {"minigpt": a, "transformers": res["step0_loss"], "abs_diff": diff,
                                   "tol": LOSS_TOL_BF16, "ok": diff < LOSS_TOL_BF16}
    return out


def bench_lora(args, ctx: Context) -> dict:
    """(c) LoRA step, minigpt vs transformers + peft, bf16 autocast, eager; each system alone."""
    size, batch, block = ("tiny", 2, 64) if args.quick else ("gpt2", args.lora_batch, args.lora_block)
    batches = ctx.batches(4, batch, block)
    out = {"config": {"lora": {**LORA, "targets": list(LORA["targets"])}, "optimizer": OPT, "lr": 1e-4,
                      "size": size, "batch": batch, "block": block, "precision": "bf16 autocast",
                      "compiled": False},
           "systems": {}}
    for lib, cls in (("minigpt", MinigptSystem), ("transformers", HFSystem)):
        try:
            torch.manual_seed(1234)                             # LoRA A init, dropout masks
            system = cls(system_spec(ctx, "lora", size, 1e-4, False), batches)
            trainable = sum(p.numel() for p in system.model.parameters() if p.requires_grad)
            out["systems"][lib] = {"trainable_params": trainable,
                                   **time_training(system, "bf16", args.warmup, args.steps, ctx.device, batch * block)}
        except Exception as e:
            out["systems"][lib] = error_record(e)
        finally:
            system = None
            cleanup(ctx.device)
    m, h = out["systems"].get("minigpt", {}), out["systems"].get("transformers", {})
    if "tok_per_s" in m and "tok_per_s" in h:
        out["speedup_minigpt_vs_transformers"] = round(m["tok_per_s"] / h["tok_per_s"], 3)
        if m["peak_memory_allocated_mib"] and h["peak_memory_allocated_mib"]:
            out["memory_ratio_minigpt_vs_transformers"] = {
                "peak_allocated": round(m["peak_memory_allocated_mib"] / h["peak_memory_allocated_mib"], 3),
                "peak_over_setup": round(m["peak_over_setup_mib"] / h["peak_over_setup_mib"], 3)}
        d = abs(m["step0_loss"] - h["step0_loss"])
        out["step0_loss_check"] = {"minigpt": m["step0_loss"], "transformers": h["step0_loss"], "abs_diff": d,
                                   "tol": LOSS_TOL_BF16, "ok": d < LOSS_TOL_BF16}
    return out


# ================================================================================================
# (d) DECODING: minigpt generate, eager and with compile=True (static-shape steps run as CUDA
# graphs, KV caches at fixed addresses; the warm-up call compiles and captures), vs transformers
# generate on the same bf16 weights. Greedy, batch 1; target 3,000 tok/s for GPT-2 124M.
# ================================================================================================
def bench_decode(args, ctx: Context) -> dict:
    from minigpt import GPT
    from minigpt.inference.generate import generate
    size = "tiny" if args.quick else "gpt2"
    n_new = 32 if args.quick else args.new_tokens
    dev = torch.device(ctx.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    weights = ctx.weights(size)
    idx = torch.randint(0, 50257, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(idx)
    model = GPT.from_pretrained(weights, dtype=dtype, device=dev).eval()

    systems = {"minigpt generate": lambda n: generate(model, idx, n),
               "minigpt generate(compile=True)": lambda n: generate(model, idx, n, compile=True)}
    hf_error = None
    try:
        from train_step import _quiet_hf
        _quiet_hf()
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(weights, dtype=dtype).to(dev).eval()
        hf.generation_config.eos_token_id = None                # never stop early: same work for all

        def run_hf(n):
            with torch.inference_mode():
                return hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=n, pad_token_id=50256)
        systems["transformers generate"] = run_hf
    except Exception as e:
        hf_error = error_record(e)

    out = {"config": {"size": size, "dtype": str(dtype).replace("torch.", ""), "batch": 1, "prompt": args.prompt,
                      "new_tokens": n_new, "rounds": args.decode_rounds, "greedy": True,
                      "timing": "whole generate call (prefill + decode) between synchronize(); "
                                "tok/s = new tokens / seconds; after one full-length warm-up call each"},
           "systems": {}, "target_tok_per_s": DECODE_TARGET_TOK_S}
    if hf_error:
        out["transformers_error"] = hf_error
    live, outs, times = {}, {}, {}
    for name, f in systems.items():                              # warm-up (and compilation)
        try:
            t0 = time.perf_counter()
            f(n_new)
            sync(dev)
            live[name] = f
            times[name] = []
            out["systems"][name] = {"warmup_s": round(time.perf_counter() - t0, 2)}
        except Exception as e:
            out["systems"][name] = error_record(e)
    order = list(live)
    for r in range(args.decode_rounds):                          # interleaved, rotating order
        for name in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            outs[name] = live[name](n_new)
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    ref = outs.get("transformers generate")
    for name, ts in times.items():
        rec = out["systems"][name]
        rec.update(tok_per_s=round(n_new / statistics.median(ts), 1), tok_per_s_best=round(n_new / min(ts), 1),
                   ms_per_call=[round(1e3 * t, 2) for t in ts])
        if ref is not None and name != "transformers generate":
            rec["tokens_vs_transformers"] = agreement(outs[name], ref, args.prompt)
        if name.startswith("minigpt"):
            rec["target_met"] = rec["tok_per_s"] >= DECODE_TARGET_TOK_S
    hf_rec = out["systems"].get("transformers generate", {})
    for name, rec in out["systems"].items():
        if name.startswith("minigpt") and "tok_per_s" in rec and "tok_per_s" in hf_rec:
            rec["speedup_vs_transformers"] = round(rec["tok_per_s"] / hf_rec["tok_per_s"], 2)
    return out


# ------------------------------------------------------------------------------------------------
# summary table
# ------------------------------------------------------------------------------------------------
def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def print_table(payload: dict) -> None:
    P = payload["parts"]
    rows = []

    def train_row(part, name, r):
        if "error" in r:
            rows.append((part, name, "", "", "", "ERROR " + r["error"][:70]))
            return
        rows.append((part, name, _f(r.get("tok_per_s"), ",.0f"),
                     _f(r.get("mfu"), ".1%") if r.get("mfu") is not None else "",
                     _f(r.get("peak_memory_allocated_mib"), ",.0f"), r.get("note", "")))

    for part in ("a", "b", "c", "d"):
        r = P.get(PART_NAMES[part])
        if r is None:
            continue
        if part in ("a", "b"):
            lib = "minigpt" if part == "a" else "transformers"
            if "error" in r or "skipped" in r:
                rows.append((part, f"{lib} pretrain", "", "", "", r.get("skipped") or "ERROR " + r["error"][:70]))
                continue
            note = ("compiled" if r.get("compiled") else "eager")
            if part == "a" and r.get("mfu") is not None:
                note += f"; MFU target {MFU_TARGET:.0%}: {'met' if r['target_met'] else 'MISSED'}"
            if part == "b" and "step0_loss_check" in r:
                c = r["step0_loss_check"]
                note += f"; step-0 loss diff vs minigpt {c['abs_diff']:.1e} ({'ok' if c['ok'] else 'MISMATCH'})"
            train_row(part, f"{lib} pretrain {r['batch']}x{r['block']}", {**r, "note": note})
            a, b = P.get("pretrain_minigpt", {}), P.get("pretrain_transformers", {})
            if part == "b" and "tok_per_s" in a and "tok_per_s" in b:
                rows.append(("a/b", "  minigpt / transformers", f"{a['tok_per_s'] / b['tok_per_s']:.2f}x", "", "", ""))
        elif part == "c":
            if "error" in r or "skipped" in r:
                rows.append((part, "LoRA", "", "", "", r.get("skipped") or "ERROR " + r["error"][:70]))
                continue
            cfg = r["config"]
            for lib, s in r["systems"].items():
                train_row(part, f"{lib} LoRA {cfg['batch']}x{cfg['block']}", {**s, "mfu": None, "note": ""})
            if "speedup_minigpt_vs_transformers" in r:
                mr = r.get("memory_ratio_minigpt_vs_transformers", {})
                c = r["step0_loss_check"]
                rows.append((part, "  minigpt / transformers", f"{r['speedup_minigpt_vs_transformers']:.2f}x", "",
                             _f(mr.get("peak_allocated"), ".2f"),
                             f"step-0 loss diff {c['abs_diff']:.1e} ({'ok' if c['ok'] else 'MISMATCH'})"))
        else:
            if "error" in r or "skipped" in r:
                rows.append((part, "decode", "", "", "", r.get("skipped") or "ERROR " + r["error"][:70]))
                continue
            for name, s in r["systems"].items():
                if "error" in s:
                    rows.append((part, name, "", "", "", "ERROR " + s["error"][:70]))
                    continue
                note = ""
                if "speedup_vs_transformers" in s:
                    note = f"{s['speedup_vs_transformers']:.2f}x transformers"
                if "target_met" in s:
                    note += f"; target {DECODE_TARGET_TOK_S:,.0f} tok/s: {'met' if s['target_met'] else 'MISSED'}"
                if "tokens_vs_transformers" in s:
                    t = s["tokens_vs_transformers"]
                    note += "; tokens " + ("identical" if t["identical"] else f"{t['match']:.0%} same")
                rows.append((part, name, _f(s.get("tok_per_s"), ",.0f"), "", "", note.strip("; ")))
    head = ("part", "system", "tok/s", "MFU", "peak MiB", "notes")
    w = [max(len(str(x[i])) for x in rows + [head]) for i in range(5)]
    print(f"\n{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:>{w[2]}}  {head[3]:>{w[3]}}  {head[4]:>{w[4]}}  {head[5]}")
    for r in rows:
        print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]:>{w[4]}}  {r[5]}")


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny model and batches (a smoke test, seconds on CPU)")
    ap.add_argument("--parts", default="a,b,c,d", help="comma-separated subset of a,b,c,d (run in the order a,c,d,b)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile for the pretraining parts (auto: on for CUDA, off on CPU)")
    ap.add_argument("--batch", type=int, default=16, help="pretraining batch (a, b)")
    ap.add_argument("--block", type=int, default=1024, help="pretraining sequence length (a, b)")
    ap.add_argument("--lora-batch", type=int, default=8)
    ap.add_argument("--lora-block", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per system (20; --quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (2; +1 when compiled; --quick 1)")
    ap.add_argument("--prompt", type=int, default=32, help="decode prompt length")
    ap.add_argument("--new-tokens", type=int, default=128, help="decode new tokens (--quick 32)")
    ap.add_argument("--decode-rounds", type=int, default=None, help="timed generate calls per system (3; --quick 2)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak bf16 TFLOPS for MFU (default: minigpt.device.peak_flops by device name)")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="time for the whole run; a part starts only with >= 15 s left")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 on --device cpu)")
    ap.add_argument("--out", default=None, help="results file under benchmarks/results")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    remaining = lambda: deadline - time.monotonic()  # noqa: E731
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --quick for a smoke test)")
    args.device = str(dev)
    args.compile_on = args.compile == "on" or (args.compile == "auto" and dev.type == "cuda")
    args.steps = args.steps or (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.decode_rounds = args.decode_rounds or (2 if args.quick else 3)
    if dev.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    if args.compile_on:                         # graph breaks are recorded in the JSON (dynamo_stats)
        import logging
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    if dev.type == "cuda":                      # what minigpt's Trainer sets; global, so for every part
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    parts = [p for p in ORDER if p in {x.strip() for x in args.parts.split(",")}]
    name = args.out or ("gpu_quick.json" if args.quick or dev.type == "cpu" else "gpu.json")
    caps = {"a": 150, "c": 75, "d": 75, "b": 150} if not args.quick else {p: 120 for p in ORDER}

    machine = machine_info()
    for mod in ("transformers", "peft"):
        try:
            machine[mod] = __import__(mod).__version__
        except Exception:
            machine[mod] = None
    payload = {"benchmark": "GPU: pretraining MFU (a, b), LoRA step (c), decoding (d); minigpt vs transformers",
               "device": args.device, "quick": args.quick, "status": "running",
               "settings": {k: v for k, v in vars(args).items()}, "tf32": dev.type == "cuda",
               "targets": {"pretrain_mfu": MFU_TARGET, "decode_tok_per_s": DECODE_TARGET_TOK_S,
                           "step0_loss_tol_bf16": LOSS_TOL_BF16},
               "machine": machine, "parts": {}, "part_wall_s": {}}
    name = machine.get("cuda", {}).get("device_name")
    print(f"gpu benchmark on {args.device}{f' ({name})' if name else ''}"
          f", parts {','.join(parts)}, compile {'on' if args.compile_on else 'off'}, budget {args.budget_s:.0f} s",
          flush=True)
    path = None
    with tempfile.TemporaryDirectory(prefix="minigpt-gpu-bench-") as tmp:
        ctx = Context(args, tmp)
        for part in parts:
            key = PART_NAMES[part]
            left = remaining()
            if left < 15:
                payload["parts"][key] = {"skipped": f"time budget spent ({args.budget_s:.0f} s)"}
                print(f"[{part}] {key}: skipped, budget spent", flush=True)
                continue
            t0 = time.monotonic()
            print(f"[{part}] {key} ...", flush=True)
            try:
                with time_limit(min(caps[part], left)):
                    if part == "a":
                        res = bench_pretrain_minigpt(args, ctx)
                    elif part == "b":
                        res = bench_pretrain_hf(args, ctx, remaining)
                    elif part == "c":
                        res = bench_lora(args, ctx)
                    else:
                        res = bench_decode(args, ctx)
            except Exception as e:
                res = error_record(e)
                print(f"[{part}] {key} failed: {res['error'][:300]}", flush=True)
            cleanup(args.device)
            payload["parts"][key] = res
            payload["part_wall_s"][key] = round(time.monotonic() - t0, 1)
            payload["input_notes"] = {k: v for k, v in ctx.notes.items() if k != "flops"}
            payload["wall_s"] = round(time.monotonic() - t_start, 1)
            path = write_json(name, payload)                    # after every part: nothing measured is lost
            print(f"[{part}] {key} done in {payload['part_wall_s'][key]} s", flush=True)
    payload["status"] = "complete"
    payload["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload["wall_s"] = round(time.monotonic() - t_start, 1)
    path = write_json(name, payload)
    print_table(payload)
    print(f"\n{payload['wall_s']} s; wrote {path}")
    return payload


if __name__ == "__main__":
    main()
