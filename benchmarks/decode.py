"""Decoding speed, minigpt vs transformers, side by side in one process.

GPT-2 124M with random weights (transformers' init, copied into minigpt so both hold the same
numbers), batch 1, a 32-token prompt, greedy decoding, 2 threads. Each round runs every system
once, in turn, so machine noise hits them alike; ratios are per round, then the median.
Timing covers the whole generate call (prefill + decode), tokens/s = new tokens / seconds.

    python benchmarks/decode.py            # full: 128 new tokens, 5 rounds (+ llama.cpp if installed)
    python benchmarks/decode.py --quick    # under a minute: 32 new tokens, 2 rounds
    python benchmarks/decode.py --quality out   # + held-out bits/byte of a trained model per mode
    python benchmarks/decode.py --profile       # + where each mode's per-token time goes (step_profile)

llama.cpp decodes the same weights in the same rounds (--llama, on by default when llama-cpp-python is
installed: minigpt.weights.gguf.export_gguf writes f32, f16 and q8_0 files, llama.cpp's own greedy sampler), and
every speed is shown beside its ceiling: the machine's read bandwidth (measured in the run) divided
by the bytes of weights one token reads. vs_llama_cpp holds the per-round ratios against the targets
(fp32 >= 0.8x llama.cpp f32; fp16/bf16 >= 1x f16; int8 and w8a8 >= 1x q8_0; int4 ahead of q8_0).
"minigpt fp32 (plain)" is `generate` on the unprepared model, as a user calls it.

fp32 systems must produce exactly transformers' tokens (checked); reduced-precision systems
report how many of their tokens agree with transformers' (greedy paths diverge for good after the
first different token, so both the agreeing prefix and the overall match are given).
"""
from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import decoding_parser, llama_system, machine_info, read_bandwidth_gb_s, write_json  # noqa: E402

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.inference.decode_weights import prepare_for_decoding  # noqa: E402
from minigpt.inference.generate import generate  # noqa: E402
from minigpt.weights.keymap import hf_to_minigpt  # noqa: E402


def agreement(out: torch.Tensor, ref: torch.Tensor, prompt: int) -> dict:
    """How many of the NEW tokens agree with the reference's (prompt left out)."""
    a, b = out[0, prompt:].tolist(), ref[0, prompt:].tolist()
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"match": sum(same) / len(same), "prefix": prefix, "identical": a == b}


def quality(model_dir: str, text_path: str, modes: list[str]) -> dict:
    """Held-out bits per byte under a trained model: plain fp32 weights vs each decoding mode."""
    from minigpt.training.evaluate import evaluate_bpb
    text = Path(text_path).read_text(encoding="utf-8")
    base = GPT.from_pretrained(model_dir).eval()
    bpb = {"fp32 plain": evaluate_bpb(base, text, batch_size=16)["bpb"]}
    for mode in modes:
        bpb[mode] = evaluate_bpb(prepare_for_decoding(copy.deepcopy(base), mode), text, batch_size=16)["bpb"]
    return {"model": Path(model_dir).name, "params_M": round(base.num_params() / 1e6, 1),
            "config": {k: getattr(base.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
            "text": Path(text_path).name, "bpb": {k: round(v, 4) for k, v in bpb.items()}}


# torch's own matrix-vector kernels (the weight reads) and its fused attention, by profiler name
KERNEL_OPS = ("aten::addmm", "aten::mm", "aten::mv", "aten::addmv_", "mkldnn::_linear_pointwise",
              "quantized::linear_dynamic", "quantized::linear_dynamic_fp16",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")


def _op_ms(run, n: int) -> dict:
    """Milliseconds per op name of run(n) under torch.profiler (self time: kernels, not their wrappers)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(n)
    return {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}


def step_profile(run, n_new: int, weight_mb: float, bandwidth: float, rounds: int = 3) -> dict:
    """Where a decoding step's time goes: per new token (prefill left out: the difference between
    calls of n_new and 1 tokens), the wall time (median of `rounds`, no profiler), the time inside
    torch's matrix-vector kernels and its fused attention (profiled), and the rest (small ops,
    casts, Python). kernel_GB_per_s = weight bytes read per token / kernel time, beside the
    machine's read bandwidth."""
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(n_new)
        t1 = time.perf_counter()
        run(1)
        per.append(((t1 - t0) - (time.perf_counter() - t1)) / (n_new - 1) * 1e3)
    wall = statistics.median(per)
    full, one = _op_ms(run, n_new), _op_ms(run, 1)

    def per_token(names):
        return sum(full.get(k, 0.0) - one.get(k, 0.0) for k in names) / (n_new - 1)
    kern, attn = per_token(KERNEL_OPS), per_token(ATTENTION_OPS)
    gbs = weight_mb / kern if kern > 0 else float("nan")
    return {"ms_per_token": round(wall, 3), "matmul_kernels_ms": round(kern, 3), "attention_ms": round(attn, 3),
            "other_ms": round(wall - kern - attn, 3), "matmul_share": round(kern / wall, 3),
            "weight_MB_per_token": round(weight_mb, 1), "kernel_GB_per_s": round(gbs, 1),
            "kernel_fraction_of_read_bandwidth": round(gbs / bandwidth, 3)}


# the targets against llama.cpp: (minigpt mode, llama.cpp type, speed ratio to reach)
LLAMA_TARGETS = (("fp32", "f32", 0.8), ("fp16", "f16", 1.0), ("bf16", "f16", 1.0), ("int8", "q8_0", 1.0),
                 ("w8a8", "q8_0", 1.0), ("int4", "q8_0", 1.0))


def llama_wanted(arg: str) -> list[str]:
    if arg == "none":
        return []
    if arg != "auto":
        return [t for t in arg.split(",") if t]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp not installed (pip install llama-cpp-python): no llama.cpp rows", flush=True)
        return []
    return ["f32", "f16", "q8_0"]


def vs_llama(times: dict, llama_types: list[str]) -> dict:
    """Per-round speed ratios minigpt mode / llama.cpp type (time of llama.cpp / time of minigpt), median."""
    out = {}
    for mode, gguf_type, target in LLAMA_TARGETS:
        a = times.get(f"llama.cpp {gguf_type} (same weights, GGUF)")
        b = times.get(f"minigpt {mode} (prepare_for_decoding)")
        if a and b and gguf_type in llama_types:
            per = [round(x / y, 3) for x, y in zip(a, b)]
            med = statistics.median(per)
            out[f"minigpt {mode} / llama.cpp {gguf_type}"] = {"ratio_median": round(med, 3), "per_round": per,
                                                            "target": target, "met": med >= target}
    return out


def main(argv=None) -> dict:
    ap = decoding_parser(__doc__)
    ap.add_argument("--modes", default="fp32,fp16,bf16,int8,w8a8,int4", help="prepare_for_decoding modes")
    ap.add_argument("--bases", default="", help="quantized bases too (minigpt.model.quant): nf4, int8 "
                                                "(nf4 decodes from dense fp16 copies, int8 with the int8 kernel)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time: with --threads 1 it ignores time spent waiting "
                         "for a busy, shared CPU (with more threads it counts spin-waiting)")
    ap.add_argument("--out", default=None, help="results file name under benchmarks/results")
    ap.add_argument("--quality", default=None, metavar="MODEL_DIR",
                    help="also measure what each mode costs in quality: bits per byte of held-out "
                         "text under a TRAINED model (e.g. the output of python train.py) with "
                         "plain fp32 weights and with each mode's weights")
    ap.add_argument("--quality-text", default=str(Path(__file__).resolve().parent / "data" / "paradise_regained.txt"))
    ap.add_argument("--profile", action="store_true", help="also split each prepared mode's per-token time: "
                    "torch's matrix-vector kernels (and their GB/s vs the read bandwidth), attention, the rest")
    ap.add_argument("--llama", default="auto", help="llama.cpp GGUF types to decode the same weights with, through "
                    "minigpt's GGUF export and llama-cpp-python: auto (f32,f16,q8_0 when llama_cpp imports), "
                    "a comma-separated list, or none")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    n_new = args.new_tokens or (32 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.generation_config.eos_token_id = None                     # never stop early: same work for all
    base = GPT(GPTConfig.from_name("gpt2")).eval()
    base.load_state_dict(hf_to_minigpt(hf.state_dict()), strict=False)
    idx = torch.randint(0, 50257, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(idx)

    def run_hf(n):
        with torch.inference_mode():
            return hf.generate(idx, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               pad_token_id=50256)

    systems = {"transformers fp32": run_hf,
               "minigpt fp32 (plain)": lambda n: generate(base, idx, n)}
    for mode in modes:
        fast = prepare_for_decoding(copy.deepcopy(base), mode)
        systems[f"minigpt {mode} (prepare_for_decoding)"] = (lambda f: lambda n: generate(f, idx, n))(fast)

    for mode in [m for m in args.bases.split(",") if m]:
        from minigpt.inference.decode_weights import for_decoding
        from minigpt.model.quant import quantize_model
        q = quantize_model(copy.deepcopy(base), mode)
        for_decoding(q)
        systems[f"minigpt {mode}-base (quantize_model + for_decoding)"] = (lambda f: lambda n: generate(f, idx, n))(q)
    llama_types = llama_wanted(args.llama)
    tmp = tempfile.TemporaryDirectory()
    for gguf_type in llama_types:
        import llama_cpp

        from minigpt.weights.gguf import export_gguf
        path = export_gguf(base, Path(tmp.name) / f"gpt2-{gguf_type}.gguf", gguf_type)
        run = llama_system(llama_cpp, path, idx[0].tolist(), args.threads)
        systems[f"llama.cpp {gguf_type} (same weights, GGUF)"] = (
            lambda f: lambda n: torch.cat([idx, torch.tensor([f(n)])], 1))(run)
    for f in systems.values():                                   # warm-up: allocators, oneDNN
        f(4)
    times = {k: [] for k in systems}
    outs = {}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    order = list(systems)
    for r in range(rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:   # rotate who goes first
            f = systems[name]
            t0 = clock()
            outs[name] = f(n_new)
            times[name].append(clock() - t0)
            assert outs[name].shape == (1, args.prompt + n_new)

    machine = machine_info()                                     # load_average: how noisy it was
    ref = outs["transformers fp32"]
    ref_t = times["transformers fp32"]
    n_weights = sum(p.numel() for n, p in base.named_parameters()
                    if n.endswith(".weight") and p.dim() == 2 and "wpe" not in n)   # Linears + tied head
    # int4: + a bf16 scale and zero per group of 32
    bytes_per_weight = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "w8a8": 1, "int4": 0.5 + 4 / 32,
                        "nf4-base": 2, "int8-base": 1,             # decoding copies: fp16 / int8 throughout
                        "f32": 4, "f16": 2, "q8_0": 34 / 32}       # llama.cpp: q8_0 = 32 int8 + an f16 scale
    bandwidth = read_bandwidth_gb_s(args.threads)
    results = {}
    for name, ts in times.items():
        mb = n_weights * bytes_per_weight[name.split()[1]] / 1e6
        ratios = [r / t for r, t in zip(ref_t, ts)]
        results[name] = {
            "tok_per_s_median": round(n_new / statistics.median(ts), 2),
            "tok_per_s_best": round(n_new / min(ts), 2),
            "speedup_vs_transformers_median": round(statistics.median(ratios), 2),
            "speedup_vs_transformers_best": round(min(ref_t) / min(ts), 2),
            "speedup_per_round": [round(r, 2) for r in ratios],
            "tokens_vs_transformers": agreement(outs[name], ref, args.prompt),
            "weight_MB_per_token": round(mb),
            "effective_GB_per_s_best": round(mb / 1e3 * n_new / min(ts), 1),
            "ceiling_tok_per_s": round(bandwidth * 1e3 / mb, 1),
        }
    fp32_ok = all(r["tokens_vs_transformers"]["identical"] for k, r in results.items() if "fp32" in k)
    profiles = {}
    if args.profile:
        n_head = base.lm_head.weight.numel()
        for mode in modes:
            name = f"minigpt {mode} (prepare_for_decoding)"
            head_bytes = 2 if mode == "fp32" and n_new >= 32 else bytes_per_weight[mode]  # certified fp16 head
            mb = ((n_weights - n_head) * bytes_per_weight[mode] + n_head * head_bytes) / 1e6
            profiles[name] = step_profile(systems[name], n_new, mb, bandwidth)
    payload = {
        "benchmark": "greedy decoding, batch 1, GPT-2 124M random weights (same in both libraries)",
        "prompt_tokens": args.prompt, "new_tokens": n_new, "rounds": rounds, "quick": args.quick,
        "clock": args.clock,
        "timing": "whole generate call (prefill + decode); tok/s = new tokens / seconds",
        "bytes_per_token_note": "each token reads every Linear weight and the tied head once "
                                "(123.5M weights: fp32 494 MB, fp16/bf16 247 MB, int8 124 MB, plus "
                                "~74 KB of fp32 KV cache per position); tok/s ceiling = memory "
                                "bandwidth / these bytes. effective_GB_per_s includes prefill time.",
        "fp32_tokens_identical": fp32_ok,
        "read_bandwidth_GB_per_s": bandwidth,
        "ceiling_note": "ceiling_tok_per_s = read bandwidth (best sum over a 512 MB fp32 buffer, same threads) "
                        "/ weight bytes per token",
        "machine": machine,
        "results": results,
        "vs_llama_cpp": vs_llama(times, llama_types),
    }
    if profiles:
        payload["step_profile"] = profiles
    if llama_types:
        import llama_cpp
        machine["llama_cpp_python"] = llama_cpp.__version__
        machine["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    if args.quality:
        payload["quality"] = quality(args.quality, args.quality_text, modes)
    name = args.out or ("decode_quick.json" if args.quick else "decode.json")
    path = write_json(name, payload)
    w = max(len(k) for k in results)
    print(f"{'system':{w}s}  tok/s(med)  tok/s(best)  x HF(med)  x HF(best)  tokens vs transformers")
    for k, r in results.items():
        a = r["tokens_vs_transformers"]
        agree = "identical" if a["identical"] else f"{a['match']:.0%} (first {a['prefix']} agree)"
        print(f"{k:{w}s}  {r['tok_per_s_median']:10.1f}  {r['tok_per_s_best']:11.1f}  "
              f"{r['speedup_vs_transformers_median']:9.2f}  {r['speedup_vs_transformers_best']:10.2f}  {agree}")
    for k, r in payload["vs_llama_cpp"].items():
        print(f"{k:48s} {r['ratio_median']:5.2f}x  (target {r['target']}: {'met' if r['met'] else 'MISSED'})")
    for k, r in profiles.items():
        print(f"{k:42s} {r['ms_per_token']:6.2f} ms/token: matmul kernels {r['matmul_kernels_ms']:.2f} "
              f"({r['kernel_GB_per_s']} GB/s, {r['kernel_fraction_of_read_bandwidth']:.0%} of read bandwidth), "
              f"attention {r['attention_ms']:.2f}, other {r['other_ms']:.2f}")
    print(f"read bandwidth {bandwidth} GB/s; fp32 tokens identical to transformers: {fp32_ok}; wrote {path}")
    if "quality" in payload:
        q = payload["quality"]
        print(f"quality: bits per byte of {q['text']} under {q['model']} ({q['params_M']}M params)")
        for k, r in q["bpb"].items():
            print(f"  {k:10s} {r:.4f}  ({r - q['bpb']['fp32 plain']:+.4f})")
    if not fp32_ok:
        raise SystemExit("fp32 tokens differ from transformers")
    return payload


if __name__ == "__main__":
    main()
