"""Training-step speed and peak memory, minigpt vs transformers (+ peft), side by side.

    python benchmarks/train_step.py lora --quick      # < 1 minute: batch 1 x 128, fp32
    python benchmarks/train_step.py pretrain --quick  # < 1 minute: tiny model, fp32 + bf16
    python benchmarks/train_step.py lora --profile    # LoRA step, GPT-2 124M, 4 x 256, fp32 (+ bf16 with native bf16)
    python benchmarks/train_step.py lora --memory-only  # the peak-RSS processes only, 4 x 256, fp32 (~2 minutes)
    python benchmarks/train_step.py pretrain --profile  # tiny 16 x 128 and GPT-2 124M 2 x 512

Both libraries hold the same numbers: the timing worker builds a transformers GPT2LMHeadModel
with a fixed seed (random weights, dropout 0) and saves it; both libraries load that directory
(minigpt with GPT.from_pretrained). LoRA dropout is 0.05 in both. fp32 on CPU unless a row says
bf16 (CPU autocast, fp32 master weights, in both libraries).

A step is what each library's user runs, end to end: forward + loss, backward, loss.item(),
grad-norm clipping at 1.0, fused AdamW (betas 0.9/0.95, weight decay 0.1 on 2-D non-embedding
weights, the same parameter groups and the same torch kernel in both: transformers' Trainer
defaults to it with torch >= 2.8), zero_grad.
  minigpt:       minigpt.training.trainer.Trainer.train_step() (CausalLMLoss: fused head + cross-entropy;
                 add_lora for LoRA), precision "fp32" or "bf16".
  transformers:  model(input_ids, labels=labels).loss; for LoRA, peft.get_peft_model with
                 LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True).
Same token batches (Shakespeare from minigpt's embedded corpus). labels = input_ids (with the first
--mask-prompt fraction of each sequence set to -100); minigpt's targets are those labels shifted
by one with -100 at the last position, exactly what transformers computes internally, so the
step-0 losses must agree: checked, |diff| < 1e-4 in fp32, else the run exits non-zero.

Timing: one worker process holds both libraries and runs their steps interleaved: after warm-up,
each round runs every system once, in rotating order, so machine noise hits them alike. Ratios
are per round (transformers time / minigpt time, same precision), then the median; both wall
time ("results") and process CPU time ("results_cpu_clock", which leaves out time spent
descheduled; meaningful with 1 thread) are recorded. --profile adds one torch.profiler step per
system: GEMM / attention / other time and the speedup ceiling that GEMM time implies.
Peak memory: every system again in its OWN fresh process (no cross-library pollution): after the
model is loaded, LoRA/optimizer set up and every weight read once (mmap'd weights are paged in),
garbage is collected and malloc_trim(0) run, the kernel's RSS high-water mark is reset
(/proc/self/clear_refs = 5) and VmRSS taken as the baseline; after --mem-steps training steps
(AdamW state is allocated in the first), peak = VmHWM. The figure compared is peak - baseline:
what training adds to the loaded model (activations, gradients, optimizer state, loss
temporaries). Absolute peaks are in the JSON too.
--threads auto (default) uses every core on an idle machine and 1 thread on a busy one (see
pick_threads); --allocator reuse applies minigpt.device.reuse_freed_memory() in every process.
Targets (issue 38, LoRA fp32): step >= 1.25x transformers + peft, absolute peak RSS <= 0.6x.
Results: benchmarks/results/train_step_{lora,pretrain}[_quick][_memory][_tN][_reuse][_maskF].json, with
machine info, the load average before/after and per round.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine_info, peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb, run_worker, write_json  # noqa: E402

from minigpt.device import cpu_has_native_bf16  # noqa: E402

LORA = dict(r=8, alpha=16, dropout=0.05, targets=("c_attn",))
OPT = dict(weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0)
SIZES = {  # HF GPT2Config fields
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, n_positions=128),
}


# ================================================================================================
# Worker side: builds one or more systems and runs steps
# ================================================================================================
def _quiet_hf():
    warnings.filterwarnings("ignore")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def labels_for(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """transformers-style labels (shifted inside the model): the inputs, with the first
    `mask_prompt` fraction of every sequence set to -100 (a masked instruction prompt)."""
    labels = x.clone()
    labels[:, : int(spec.get("mask_prompt", 0.0) * x.size(1))] = -100
    return labels


class MinigptSystem:
    """minigpt the way train.py / finetune.py run it: Trainer.train_step().
    Optional spec keys (benchmarks/gpu.py): "device" (default "cpu"; batches are moved there once,
    so the timed step copies nothing) and "compile" (TrainConfig.compile, default False)."""

    lib = "minigpt"

    def __init__(self, spec, batches):
        from minigpt import GPT
        from minigpt.methods.lora import add_lora
        from minigpt.training.config import TrainConfig
        from minigpt.training.trainer import Trainer
        device = spec.get("device", "cpu")
        model = GPT.from_pretrained(spec["weights"]).train()
        if spec["bench"] == "lora":
            add_lora(model, **LORA)
        self.data = [(x, torch.cat([lab[:, 1:], torch.full_like(x[:, :1], -100)], 1))
                     for x, lab in ((x, labels_for(x, spec)) for x in batches)]
        if device != "cpu":
            self.data = [(x.to(device), y.to(device)) for x, y in self.data]
        self.i = 0
        cfg = TrainConfig(out_dir=os.path.join(spec["tmp"], "unused-out"), max_steps=10 ** 9,
                          batch_size=batches[0].size(0), lr=spec["lr"], warmup_steps=0,
                          schedule="constant", weight_decay=OPT["weight_decay"],
                          beta1=OPT["betas"][0], beta2=OPT["betas"][1], grad_clip=OPT["grad_clip"],
                          precision="fp32", device=device, compile=bool(spec.get("compile", False)))
        self.trainer = Trainer(model, cfg, data=lambda step, micro: self.data[self.i % len(self.data)],
                               evaluate=lambda m: {}, save_weights=lambda m, d: None,
                               load_weights=lambda m, d: None, quiet=True)
        self.model = model

    def step(self, precision: str) -> float:
        self.trainer.precision = precision          # the Trainer reads it at each step (autocast)
        loss, _ = self.trainer.train_step()
        self.i += 1
        return loss

    @torch.no_grad()
    def initial_loss(self, precision: str) -> float:
        self.trainer.precision = precision
        x, y = self.data[0]
        with self.trainer.autocast():
            return self.trainer.fwd_model(x, y).item()


class HFSystem:
    """A plain transformers training loop (labels=input_ids), with peft for LoRA.
    Optional spec keys (benchmarks/gpu.py): "device" (default "cpu"; on CUDA the model and batches
    move there) and "compile" (torch.compile the
    model; default False)."""

    lib = "transformers"

    def __init__(self, spec, batches):
        _quiet_hf()
        from transformers import GPT2LMHeadModel

        from minigpt.training.trainer import param_groups  # same groups rule: identical AdamW work
        self.device = torch.device(spec.get("device", "cpu"))
        model = GPT2LMHeadModel.from_pretrained(spec["weights"], dtype=torch.float32)
        if spec["bench"] == "lora":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(
                r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                target_modules=list(LORA["targets"]), fan_in_fan_out=True, task_type="CAUSAL_LM"))
        if self.device.type != "cpu":
            model = model.to(self.device)
        self.model = model.train()
        self.fwd = torch.compile(self.model) if spec.get("compile") else self.model
        self.attn_implementation = getattr(model.config, "_attn_implementation", None)
        # fused AdamW, as transformers' Trainer uses by default (torch >= 2.8) and minigpt's Trainer
        # does: both libraries run the same optimizer kernel
        self.opt = torch.optim.AdamW(param_groups(model, OPT["weight_decay"]), lr=spec["lr"],
                                     betas=OPT["betas"], fused=True)
        self.lr, self.data, self.i = spec["lr"], [(x, labels_for(x, spec)) for x in batches], 0
        if self.device.type != "cpu":
            self.data = [(x.to(self.device), lab.to(self.device)) for x, lab in self.data]

    def _ctx(self, precision):
        if precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, precision: str) -> float:
        x, labels = self.data[self.i % len(self.data)]
        for g in self.opt.param_groups:
            g["lr"] = self.lr
        with self._ctx(precision):
            loss = self.fwd(input_ids=x, labels=labels).loss
        loss.backward()
        val = loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPT["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.i += 1
        return val

    @torch.no_grad()
    def initial_loss(self, precision: str) -> float:
        x, labels = self.data[0]
        with self._ctx(precision):
            return self.model(input_ids=x, labels=labels).loss.item()


LIBS = {"minigpt": MinigptSystem, "transformers": HFSystem}


@torch.no_grad()
def _touch(model) -> None:
    """Read every parameter and buffer once. transformers (and partly minigpt) keep weights mapped
    from the safetensors file, paged in on first use; without this the first step would count the
    weights themselves as training memory."""
    for t in list(model.parameters()) + list(model.buffers()):
        t.sum()


def _rss_split() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def worker(spec: dict) -> dict:
    if spec.get("allocator") == "reuse":     # what train.py / finetune.py do (process-wide)
        from minigpt.device import reuse_freed_memory
        reuse_freed_memory()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(1234)                                 # LoRA A init, dropout masks
    if spec["role"] == "weights":             # --memory-only: the weights the memory processes load
        make_weights(spec["size"], spec["weights"])
        return {}
    batches = torch.load(spec["batches"])
    if spec["role"] == "memory":
        lib, precision = spec["system"]
        rss_start = rss_mb()
        system = LIBS[lib](spec, batches)
        _touch(system.model)      # weights mmap'd from the safetensors file count once paged in
        release_free_memory()
        method = reset_peak_rss()
        base = rss_mb()
        split = _rss_split()
        times, losses = [], []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            losses.append(system.step(precision))
            times.append(time.perf_counter() - t0)
        peak = peak_rss_mb(method)
        return {"rss_before_load_mb": round(rss_start, 1), "rss_after_setup_mb": round(base, 1),
                "rss_after_setup_split_mb": split,
                "peak_rss_mb": round(peak, 1), "train_peak_over_setup_mb": round(peak - base, 1),
                "method": method, "step_s": [round(t, 3) for t in times],
                "losses": [round(v, 5) for v in losses]}

    # timing: all systems in this one process, interleaved
    if not os.path.exists(spec["weights"]):
        make_weights(spec["size"], spec["weights"])
    systems = [tuple(s) for s in spec["systems"]]
    libs = {lib: LIBS[lib](spec, batches) for lib in dict.fromkeys(lib for lib, _ in systems)}
    out = {"attn_implementation": libs["transformers"].attn_implementation
           if "transformers" in libs else None}
    # fp32 step-0 losses come from the first training step; reduced precision gets a no-grad
    # forward on the loaded weights as well (its first step runs after the fp32 one)
    out["initial_loss"] = {f"{lib} {p}": libs[lib].initial_loss(p) for lib, p in systems if p != "fp32"}
    first = {}
    for w in range(spec["warmup"]):                       # fp32 systems first: step 0 on the loaded weights
        for lib, p in sorted(systems, key=lambda s: s[1] != "fp32"):
            loss = libs[lib].step(p)
            if w == 0:
                first[f"{lib} {p}"] = loss
    out["step0_loss"] = first
    times = {f"{lib} {p}": [] for lib, p in systems}
    cpu_times = {f"{lib} {p}": [] for lib, p in systems}
    loads = []
    for r in range(spec["rounds"]):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for lib, p in order:
            t0, c0 = time.perf_counter(), time.process_time()
            libs[lib].step(p)
            times[f"{lib} {p}"].append(time.perf_counter() - t0)
            cpu_times[f"{lib} {p}"].append(time.process_time() - c0)
        loads.append(round(os.getloadavg()[0], 2))
    out["times"] = times
    out["cpu_times"] = cpu_times
    out["load_1min_per_round"] = loads
    if spec.get("profile"):
        out["profile"] = {f"{lib} {p}": profile_step(libs[lib], p) for lib, p in systems}
    return out


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::_addmm_activation",
            "mkldnn::_linear_pointwise")          # the last: minigpt.model.linear's oneDNN products


def profile_step(system, precision: str) -> dict:
    """One step under torch.profiler: where the time goes (self CPU time per op, in seconds)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        system.step(precision)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    gemm = sum(e.self_cpu_time_total for e in ev if e.key in GEMM_OPS) / 1e6
    attn = sum(e.self_cpu_time_total for e in ev if "scaled_dot_product" in e.key) / 1e6
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"total_s": round(total, 3), "gemm_s": round(gemm, 3), "attention_s": round(attn, 3),
            "other_s": round(total - gemm - attn, 3), "gemm_calls": sum(e.count for e in ev if e.key in GEMM_OPS),
            "op_calls": sum(e.count for e in ev if e.key.startswith("aten::")),
            "top_ops": [[e.key, round(e.self_cpu_time_total / 1e6, 3), e.count] for e in top]}


# ================================================================================================
# Parent side
# ================================================================================================
def make_weights(size: str, path: str) -> str:
    """transformers GPT2LMHeadModel with a fixed seed (random init), saved once for every process
    (done by the timing worker, which imports transformers anyway)."""
    _quiet_hf()
    from transformers import GPT2Config, GPT2LMHeadModel
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    cfg = GPT2Config(**SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    del model
    release_free_memory()
    torch.set_rng_state(rng)
    return path


def make_batches(n: int, batch: int, block: int, tmp: str, tag: str) -> str:
    """n distinct (batch, block) token batches of Shakespeare (minigpt's embedded corpus)."""
    from minigpt import get_tokenizer
    from minigpt.data.corpus import embedded_corpus_text
    need = n * batch * block
    text = embedded_corpus_text()
    ids = get_tokenizer().encode_ordinary(text[: need * 6])
    assert len(ids) >= need, "corpus slice too short"
    t = torch.tensor(ids[:need], dtype=torch.long).view(n, batch, block)
    path = os.path.join(tmp, f"batches-{tag}.pt")
    torch.save([t[i].clone() for i in range(n)], path)
    return path


def _med(xs):
    return statistics.median(xs)


def summarize(run: dict, tokens_per_step: int, ref: str, clock: str = "wall") -> dict:
    """Per-system medians; ratios per round vs `ref` and vs the other library at equal precision.
    clock "cpu": the process's CPU time (user + system) instead of wall time, which leaves out the
    time the process sat descheduled; meaningful with 1 thread (more threads add their spinning)."""
    times = run["times"] if clock == "wall" else run["cpu_times"]
    res = {}
    for name, ts in times.items():
        lib, prec = name.split(" ")
        other = ("transformers" if lib == "minigpt" else "minigpt") + " " + prec
        r = {"step_s_median": round(_med(ts), 3), "step_s_all": [round(t, 3) for t in ts],
             "tok_per_s_median": round(tokens_per_step / _med(ts), 1)}
        r[f"speedup_vs_{ref.replace(' ', '_')}_median"] = round(_med([a / b for a, b in zip(times[ref], ts)]), 3)
        if lib == "minigpt" and other in times:
            per = [a / b for a, b in zip(times[other], ts)]
            r["speedup_vs_transformers_same_precision_per_round"] = [round(x, 3) for x in per]
            r["speedup_vs_transformers_same_precision_median"] = round(_med(per), 3)
        if clock != "wall":
            res[name] = r
            continue
        if name in run["initial_loss"]:
            r["initial_loss"] = round(run["initial_loss"][name], 6)
        r["step0_loss"] = round(run["step0_loss"][name], 6)
        res[name] = r
    return res


def loss_check(run: dict, tol: float = 1e-4) -> dict:
    a, b = run["step0_loss"]["minigpt fp32"], run["step0_loss"]["transformers fp32"]
    return {"minigpt_fp32": a, "transformers_fp32": b, "abs_diff": abs(a - b), "tol": tol,
            "ok": abs(a - b) < tol}


def profile_summary(prof: dict | None) -> dict:
    """What the profile says about the ceiling: a step that kept transformers' own GEMM time and
    spent nothing on anything else would be transformers_total / transformers_gemm faster."""
    out = {}
    for name, p in (prof or {}).items():
        lib, prec = name.split(" ")
        if lib == "transformers" and f"minigpt {prec}" in prof:
            m = prof[f"minigpt {prec}"]
            out[prec] = {"transformers_gemm_share": round(p["gemm_s"] / p["total_s"], 3),
                         "speedup_ceiling_gemm_only": round(p["total_s"] / p["gemm_s"], 3),
                         "minigpt_gemm_share": round(m["gemm_s"] / m["total_s"], 3),
                         "profiled_speedup": round(p["total_s"] / m["total_s"], 3),
                         "non_gemm_s": {"minigpt": round(m["total_s"] - m["gemm_s"], 3),
                                        "transformers": round(p["total_s"] - p["gemm_s"], 3)}}
    return out


def print_profile(prof: dict | None) -> None:
    for name, p in (prof or {}).items():
        ceiling = ""
        print(f"  profile {name:20s} total {p['total_s']:7.2f}s  gemm {p['gemm_s']:7.2f}s ({p['gemm_calls']} calls)  "
              f"attention {p['attention_s']:6.2f}s  other {p['other_s']:6.2f}s ({p['op_calls']} aten calls){ceiling}")
    for prec, c in profile_summary(prof).items():
        print(f"  {prec}: transformers spends {c['transformers_gemm_share']:.0%} of its step in GEMMs -> "
              f"ceiling {c['speedup_ceiling_gemm_only']:.2f}x for an implementation with the same GEMMs and "
              f"nothing else (profiled step: {c['profiled_speedup']:.2f}x)")


def print_table(title: str, res: dict, mem: dict | None = None, res_cpu: dict | None = None) -> None:
    print(f"\n{title}")
    print(f"{'system':22s} {'step s (med)':>12s} {'tok/s':>8s} {'x HF same prec (med)':>21s} "
          f"{'per round':>30s} {'x HF fp32':>10s} {'train mem MiB':>14s} {'cpu clock: x HF same prec':>26s}")
    for name, r in res.items():
        c = (res_cpu or {}).get(name, {}).get("speedup_vs_transformers_same_precision_median")
        sp = r.get("speedup_vs_transformers_same_precision_median")
        per = r.get("speedup_vs_transformers_same_precision_per_round")
        m = (mem or {}).get(name)
        vs32 = r["speedup_vs_transformers_fp32_median"]
        print(f"{name:22s} {r['step_s_median']:12.3f} {r['tok_per_s_median']:8.1f} "
              f"{(f'{sp:.2f}x' if sp else ''):>21s} {(' '.join(f'{x:.2f}' for x in per) if per else ''):>30s} "
              f"{vs32:9.2f}x {(format(m['train_peak_over_setup_mb'], '.0f') if m else ''):>14s} "
              f"{(f'{c:.2f}x' if c else ''):>26s}")


def run_memory(script, base_spec, systems, concurrent: bool = False) -> dict:
    """One fresh process per system, one after another (--quick: at the same time, which leaves
    each process's own peak RSS unchanged but makes their step times meaningless)."""
    specs = {f"{lib} {p}": {**base_spec, "role": "memory", "system": [lib, p]} for lib, p in systems}
    if not concurrent:
        return {k: run_worker(script, v) for k, v in specs.items()}
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(specs)) as ex:
        futs = {k: ex.submit(run_worker, script, v) for k, v in specs.items()}
        return {k: f.result() for k, f in futs.items()}


LORA_TARGETS = {"speedup_fp32": 1.25, "absolute_peak_rss_ratio_fp32": 0.6}    # issue 38's


def memory_ratios(mem: dict, precs) -> dict:
    """{precision: minigpt / transformers peak figures} for the precisions both ran."""
    out = {}
    for p in precs:
        m, h = mem.get(f"minigpt {p}"), mem.get(f"transformers {p}")
        if m and h:
            out[p] = {"train_peak_over_setup": round(m["train_peak_over_setup_mb"] / h["train_peak_over_setup_mb"], 3),
                      "absolute_peak_rss": round(m["peak_rss_mb"] / h["peak_rss_mb"], 3),
                      "rss_after_setup": round(m["rss_after_setup_mb"] / h["rss_after_setup_mb"], 3)}
    return out


def print_memory(mem: dict, ratios: dict) -> None:
    for name, r in mem.items():
        print(f"  memory {name:18s} after setup {r['rss_after_setup_mb']:7.0f} MiB {r['rss_after_setup_split_mb']}  "
              f"peak {r['peak_rss_mb']:7.0f} MiB  (+{r['train_peak_over_setup_mb']:.0f})  losses {r['losses']}")
    for p, mr in ratios.items():
        print(f"memory {p}: minigpt/transformers absolute peak RSS {mr['absolute_peak_rss']:.3f} (target <= "
              f"{LORA_TARGETS['absolute_peak_rss_ratio_fp32']}), training peak over setup "
              f"{mr['train_peak_over_setup']:.3f}, RSS after setup {mr['rss_after_setup']:.3f}")


def bench_lora(args, tmp) -> dict:
    batch, block = (args.batch or 1, args.block or 128) if args.quick else (args.batch or 4, args.block or 256)
    rounds = args.rounds or (2 if args.quick else 5)
    # bf16 rows: --bf16, or a full timing run on a CPU with native bf16 (elsewhere autocast emulates
    # it, ~30x slower than fp32, which no user would pick)
    bf16 = args.bf16 or (not args.quick and not args.memory_only and cpu_has_native_bf16())
    precs = ["fp32", "bf16"] if bf16 else ["fp32"]
    systems = [[lib, p] for p in precs for lib in ("minigpt", "transformers")]
    spec = dict(bench="lora", size="gpt2", weights=os.path.join(tmp, "weights-gpt2"), tmp=tmp,
                threads=args.threads, lr=1e-4, allocator=args.allocator, mask_prompt=args.mask_prompt,
                batches=make_batches(4, batch, block, tmp, "lora"))
    mem_steps = args.mem_steps or (1 if args.quick else 2)
    payload = {
        "benchmark": "LoRA training step: GPT-2 124M (random weights, same in both), LoRA r=8 alpha=16 "
                     "dropout=0.05 on c_attn, AdamW on the LoRA params, CPU",
        "batch": batch, "block": block, "tokens_per_step": batch * block, "mask_prompt": args.mask_prompt,
        "quick": args.quick, "memory_only": args.memory_only, "threads": args.threads,
        "memory_method": "separate process per system; peak RSS (VmHWM after clear_refs=5) minus RSS after "
                         "model load + LoRA setup + touching every weight + gc + malloc_trim, over the first "
                         f"{mem_steps} training step(s); absolute_peak_rss compares the peaks themselves",
        "targets": LORA_TARGETS}
    run = None
    if args.memory_only:
        run_worker(__file__, {**spec, "role": "weights"})
    else:
        run = run_worker(__file__, {**spec, "role": "timing", "systems": systems, "rounds": rounds,
                                    "warmup": 1, "profile": args.profile})
    mem = run_memory(__file__, {**spec, "steps": mem_steps}, [s for s in systems if s[1] == "fp32" or not args.quick],
                     concurrent=args.quick)
    ratios = memory_ratios(mem, precs)
    payload.update(memory=mem, memory_ratio_vs_transformers=ratios)
    met = {"absolute_peak_rss_ratio_fp32": ratios["fp32"]["absolute_peak_rss"] <= LORA_TARGETS[
        "absolute_peak_rss_ratio_fp32"]}
    if run is not None:
        res = summarize(run, batch * block, "transformers fp32")
        res_cpu = summarize(run, batch * block, "transformers fp32", clock="cpu")
        for p, r in ratios.items():
            res[f"minigpt {p}"]["memory_ratio_vs_transformers"] = r
        check = loss_check(run)
        met["speedup_fp32"] = res["minigpt fp32"]["speedup_vs_transformers_same_precision_median"] >= \
            LORA_TARGETS["speedup_fp32"]
        payload.update(
            rounds=rounds, step0_loss_check=check, load_1min_per_round=run["load_1min_per_round"],
            results=res, results_cpu_clock=res_cpu,
            systems={"minigpt": "Trainer.train_step (CausalLMLoss fused head+CE, add_lora)",
                     "transformers": "transformers GPT2LMHeadModel + peft get_peft_model, "
                                     f"model(input_ids, labels=input_ids).loss, attn={run['attn_implementation']}"},
            timing="interleaved in one process, rotating order per round; ratio = transformers / minigpt per round; "
                   "results: wall clock, results_cpu_clock: process CPU time (user+system)",
            **({"profile": run["profile"], "profile_summary": profile_summary(run["profile"])}
               if "profile" in run else {}))
        print_table(f"LoRA step, gpt2, batch {batch} x {block}, {rounds} rounds", res, mem, res_cpu)
        print_profile(run.get("profile"))
        print(f"step-0 loss: minigpt {check['minigpt_fp32']:.6f} transformers {check['transformers_fp32']:.6f} "
              f"|diff| {check['abs_diff']:.2e} ({'ok' if check['ok'] else 'MISMATCH'})")
    else:       # the step-0 losses of the memory processes (rounded to 5 decimals there)
        a, b = mem["minigpt fp32"]["losses"][0], mem["transformers fp32"]["losses"][0]
        payload["step0_loss_check"] = {"minigpt_fp32": a, "transformers_fp32": b, "abs_diff": abs(a - b),
                                       "tol": 2e-5, "ok": abs(a - b) <= 2e-5, "from": "memory processes"}
    payload["met"] = met
    print(f"\nLoRA step memory, gpt2, batch {batch} x {block}, {mem_steps} step(s) per process")
    print_memory(mem, ratios)
    return payload


def bench_pretrain(args, tmp) -> dict:
    if args.quick:   # the tiny model only (the full mode adds GPT-2 124M and peak memory)
        configs = [("tiny", 8, 128, args.rounds or 2, ["fp32", "bf16"])]
    else:
        configs = [("tiny", 16, 128, args.rounds or 5, ["fp32", "bf16"]),
                   ("gpt2", args.batch or 2, args.block or 512, args.rounds or 3, ["fp32", "bf16"])]
    out = {"benchmark": "full pretraining step (all weights, AdamW), minigpt vs a plain transformers loop, CPU",
           "quick": args.quick, "threads": args.threads,
           "systems": {"minigpt": "Trainer.train_step (CausalLMLoss fused head+CE), precision fp32 / bf16 autocast",
                       "transformers": "GPT2LMHeadModel, model(input_ids, labels=input_ids).loss, "
                                       "same AdamW groups, fp32 / torch.autocast('cpu', bfloat16)"},
           "timing": "interleaved in one process, rotating order per round; ratio = transformers / minigpt per round; "
                     "results: wall clock, results_cpu_clock: process CPU time (user+system)",
           "sizes": {}}
    for size, batch, block, rounds, precs in configs:
        systems = [[lib, p] for p in precs for lib in ("minigpt", "transformers")]
        spec = dict(bench="pretrain", size=size, weights=os.path.join(tmp, f"weights-{size}"), tmp=tmp,
                    threads=args.threads, lr=6e-4, allocator=args.allocator,
                    batches=make_batches(4, batch, block, tmp, f"pre-{size}"))
        run = run_worker(__file__, {**spec, "role": "timing", "systems": systems, "rounds": rounds,
                                    "warmup": 1, "profile": args.profile})
        res = summarize(run, batch * block, "transformers fp32")
        res_cpu = summarize(run, batch * block, "transformers fp32", clock="cpu")
        mem = None
        if not args.quick and not args.no_memory:
            mem = run_memory(__file__, {**spec, "steps": args.mem_steps or 2}, [s for s in systems if s[1] == "fp32"])
            m, h = mem["minigpt fp32"], mem["transformers fp32"]
            res["minigpt fp32"]["memory_ratio_vs_transformers"] = {
                "train_peak_over_setup": round(m["train_peak_over_setup_mb"] / h["train_peak_over_setup_mb"], 3),
                "absolute_peak_rss": round(m["peak_rss_mb"] / h["peak_rss_mb"], 3)}
        check = loss_check(run)
        out["sizes"][size] = {"config": SIZES[size], "batch": batch, "block": block,
                              "tokens_per_step": batch * block, "rounds": rounds,
                              "attn_implementation": run["attn_implementation"],
                              "step0_loss_check": check, "load_1min_per_round": run["load_1min_per_round"],
                              "results": res, "results_cpu_clock": res_cpu, **({"memory": mem} if mem else {}),
                              **({"profile": run["profile"], "profile_summary": profile_summary(run["profile"])}
                                 if "profile" in run else {})}
        print_table(f"pretraining step, {size} {SIZES[size]}, batch {batch} x {block}, {rounds} rounds", res, mem,
                    res_cpu)
        print_profile(run.get("profile"))
        print(f"step-0 loss: minigpt {check['minigpt_fp32']:.6f} transformers {check['transformers_fp32']:.6f} "
              f"|diff| {check['abs_diff']:.2e} ({'ok' if check['ok'] else 'MISMATCH'})")
    return out


def pick_threads(arg: str, load1: float) -> tuple[int, str]:
    """--threads auto: every core when the machine is idle; 1 when other work is running. OpenMP
    threads wait for each other at the end of every parallel op, and on a busy machine a
    descheduled thread stalls its partner: on the shared 2-core box, 2 threads ran a LoRA step
    1.7x (batch 4 x 256) to 4x (batch 1 x 128) slower than 1 thread. Ratios at 1 thread there
    compare the two libraries' work rather than how many barriers each step crosses."""
    cores = os.cpu_count() or 1
    if arg != "auto":
        return int(arg), "given"
    if load1 < 0.5:
        return cores, f"auto: 1-min load {load1:.2f} < 0.5, all {cores} cores"
    return 1, f"auto: 1-min load {load1:.2f} >= 0.5 (busy machine), 1 thread"


def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_worker":
        print("RESULT " + json.dumps(worker(json.loads(argv[1]))), flush=True)
        return {}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", choices=["lora", "pretrain"])
    ap.add_argument("--quick", action="store_true",
                    help="fp32 only, batch 1 x 128 unless --batch/--block, fewer rounds (< 1 minute)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="batch size (LoRA, gpt2 pretraining)")
    ap.add_argument("--block", type=int, default=None, help="sequence length (LoRA, gpt2 pretraining)")
    ap.add_argument("--bf16", action="store_true", help="LoRA: also bf16 rows in --quick / --memory-only runs "
                    "and on CPUs without native bf16 (a full run has them where the CPU has native bf16)")
    ap.add_argument("--mask-prompt", type=float, default=0.0,
                    help="LoRA: label the first FRACTION of every sequence -100 in both libraries, "
                         "like an instruction prompt masked by the collator (default 0: every token counts)")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps in each memory process (2; --quick 1)")
    ap.add_argument("--no-memory", action="store_true", help="pretrain: skip the memory processes")
    ap.add_argument("--memory-only", action="store_true",
                    help="lora: only the peak-memory processes (fp32 unless --bf16; no timing rounds)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step of each system (torch.profiler): GEMM / attention / other time")
    ap.add_argument("--threads", default="auto",
                    help="torch threads in every process; auto: all cores on an idle machine, 1 on a busy one")
    ap.add_argument("--allocator", choices=["default", "reuse"], default="default",
                    help="reuse: every process (both libraries) keeps freed memory for reuse, as "
                         "minigpt's train.py/finetune.py do (minigpt.device.reuse_freed_memory)")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    args.threads, threads_why = pick_threads(args.threads, load_before[0])
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minigpt-train-step-") as tmp:
        payload = (bench_lora if args.bench == "lora" else bench_pretrain)(args, tmp)
    payload["threads_choice"] = threads_why
    payload["allocator"] = args.allocator
    payload["machine"] = machine_info()
    payload["machine"]["load_average_before"] = load_before
    payload["wall_s"] = round(time.perf_counter() - t0, 1)
    name = args.out or (f"train_step_{args.bench}{'_quick' if args.quick else ''}"
                        f"{'_memory' if getattr(args, 'memory_only', False) else ''}"
                        f"{'' if args.threads == 1 else f'_t{args.threads}'}"
                        f"{'' if args.allocator == 'default' else '_reuse'}"
                        f"{f'_mask{args.mask_prompt:g}' if getattr(args, 'mask_prompt', 0) else ''}.json")
    path = write_json(name, payload)
    checks = [payload["step0_loss_check"]] if "step0_loss_check" in payload else \
        [v["step0_loss_check"] for v in payload.get("sizes", {}).values()]
    print(f"\nload average before {tuple(round(x, 2) for x in load_before)}, after "
          f"{tuple(round(x, 2) for x in payload['machine']['load_average'])}; {payload['wall_s']} s; wrote {path}")
    if not all(c["ok"] for c in checks):
        raise SystemExit("step-0 losses of minigpt and transformers differ by more than 1e-4")
    return payload


if __name__ == "__main__":
    main()
