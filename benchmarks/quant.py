"""Quantized bases: model-state bytes for every GPT-2 size, and a QLoRA step against LoRA on a
bf16 and an fp32 base (peak memory and step time), each system in its own process.

    python benchmarks/quant.py            # bytes for all sizes; the step on gpt2-xl (1.5B)
    python benchmarks/quant.py --quick    # the step on gpt2 (124M)

The step: LoRA r=8 on c_attn (finetune's default), batch 2 x 256 tokens, gradient checkpointing
(the QLoRA recipe) in all three, fused head + loss, fused AdamW, 2 threads; random weights with
GPT-2's init. fp32: fp32 base, fp32 compute. bf16: base in bf16, LoRA in bf16, bf16 autocast
(what a user gets loading the base with dtype=bfloat16). nf4: NF4 blocks (double-quantised), the
rest of the base in bf16, LoRA in fp32, bf16 autocast (finetune --lora --quantize nf4
--gradient-checkpointing on a bf16 machine). Peak memory is the
peak RSS of the process over the timed steps (after setup, so the fp32 weights an NF4 base is
quantised from are gone), the model state included. Targets: NF4 peak <= 0.35x fp32 LoRA and
<= 0.6x bf16 LoRA; NF4 step time within 1.5x of bf16 LoRA.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import machine_info, peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb, run_worker, write_json  # noqa: E402

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.model.config import PRESETS  # noqa: E402


def state_bytes(cfg: GPTConfig) -> dict:
    """Model-state bytes of fp32 / int8 / nf4 bases, from the storage layout of minigpt.model.quant."""
    C, L, V, T = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.block_size
    shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)]                      # (out, in) per block
    other = 4 * (V * C + T * C + 2 * C + L * (4 * C + 3 * C + C + 4 * C + C))   # embeddings, LNs, biases
    dense = L * sum(o * i for o, i in shapes)

    def nf4(n):
        blocks = -(-n // 64)
        return blocks * 32 + blocks + 4 * -(-blocks // 256) + 4
    out = {"fp32": other + 4 * dense,
           "int8": other + L * sum(o * i + 4 * o for o, i in shapes),
           "nf4": other + L * sum(nf4(o * i) for o, i in shapes)}
    return {**out, "int8_ratio": round(out["int8"] / out["fp32"], 3), "nf4_ratio": round(out["nf4"] / out["fp32"], 3)}


def worker(spec: dict) -> dict:
    from minigpt.device import reuse_freed_memory
    from minigpt.methods.lora import add_lora
    from minigpt.model.quant import cast_unquantized, quant_bytes, quantize_model
    from minigpt.training.config import TrainConfig
    from minigpt.training.trainer import Trainer

    reuse_freed_memory()
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(spec["preset"]))
    role = spec["role"]
    if role == "nf4":
        quantize_model(model, "nf4")
        cast_unquantized(model, torch.bfloat16)                    # as finetune --quantize does in bf16
        release_free_memory()                                      # the fp32 weights it was made from
    elif role == "bf16":
        model = model.to(torch.bfloat16)
    add_lora(model, r=8, alpha=16, dropout=0.05, targets=("c_attn",))
    model.gradient_checkpointing = True
    B, T = spec["batch"], spec["tokens"]
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 50257, (B, T + 1), generator=g) for _ in range(4)]
    cfg = TrainConfig(out_dir="/nonexistent-unused", max_steps=10 ** 6, batch_size=B, warmup_steps=0, lr=1e-4,
                      precision="fp32" if role == "fp32" else "bf16", device="cpu")
    trainer = Trainer(model, cfg, lambda step, micro: (data[step % 4][:, :-1], data[step % 4][:, 1:]), None,
                      lambda m, d: None, lambda m, d: None, quiet=True)
    state = quant_bytes(model)["total"]
    trainer.train_step()                                           # warm-up (allocations, kernels)
    release_free_memory()
    method = reset_peak_rss()
    base = rss_mb()
    times, losses = [], []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        loss, _ = trainer.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"role": role, "step_s": min(times), "step_s_all": [round(t, 3) for t in times], "loss": losses,
            "peak_rss_mb": round(peak_rss_mb(method), 1), "rss_before_steps_mb": round(base, 1),
            "model_state_mb": round(state / 2 ** 20, 1), "peak_method": method}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        print("RESULT " + json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the step on gpt2 (124M) instead of gpt2-xl")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per system (default 3; xl: 1)")
    args = ap.parse_args()
    preset = "gpt2" if args.quick else "gpt2-xl"
    steps = args.steps or (3 if args.quick else 1)
    t0 = time.time()
    sizes = {name: state_bytes(GPTConfig.from_name(name)) for name in PRESETS}
    from minigpt.model.quant import quant_bytes, quantize_model
    measured = {}
    for mode in ("nf4", "int8"):                               # the formula, checked on gpt2 124M
        measured[mode] = quant_bytes(quantize_model(GPT(GPTConfig.from_name("gpt2")), mode))["total"]
    assert measured == {m: sizes["gpt2"][m] for m in measured}, (measured, sizes["gpt2"])
    for name, s in sizes.items():
        print(f"{name:<12} fp32 {s['fp32'] / 2**20:8.1f} MiB  int8 {s['int8'] / 2**20:8.1f} ({s['int8_ratio']:.3f}x)"
              f"  nf4 {s['nf4'] / 2**20:8.1f} ({s['nf4_ratio']:.3f}x)")
    steps_res = {}
    for role in ("nf4", "bf16", "fp32"):
        spec = {"role": role, "preset": preset, "batch": 2, "tokens": 256, "steps": steps, "threads": args.threads}
        steps_res[role] = run_worker(__file__, spec, timeout=3600)
        r = steps_res[role]
        print(f"{preset} LoRA step, {role:>4} base: {r['step_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MiB "
              f"(model state {r['model_state_mb']:.0f} MiB)", flush=True)
    n, b, f = (steps_res[k] for k in ("nf4", "bf16", "fp32"))
    ratios = {"nf4_vs_fp32_peak": round(n["peak_rss_mb"] / f["peak_rss_mb"], 3),
              "nf4_vs_bf16_peak": round(n["peak_rss_mb"] / b["peak_rss_mb"], 3),
              "nf4_vs_bf16_step_time": round(n["step_s"] / b["step_s"], 3)}
    met = {"peak_vs_fp32_le_0.35": ratios["nf4_vs_fp32_peak"] <= 0.35,
           "peak_vs_bf16_le_0.6": ratios["nf4_vs_bf16_peak"] <= 0.6,
           "time_vs_bf16_le_1.5": ratios["nf4_vs_bf16_step_time"] <= 1.5}
    print(json.dumps(ratios), json.dumps(met))
    payload = {"benchmark": "quant", "preset": preset, "batch": 2, "tokens": 256, "lora": "r=8 on c_attn",
               "gradient_checkpointing": True, "threads": args.threads, "machine": machine_info(),
               "state_bytes": sizes, "step": steps_res, "ratios": ratios, "met": met,
               "wall_s": round(time.time() - t0, 1)}
    print(f"wrote {write_json('quant_quick.json' if args.quick else 'quant.json', payload)}")


if __name__ == "__main__":
    main()
