"""Decoding the exported GGUF in llama.cpp beside minigpt's own decoding paths, same weights, same run.

GPT-2 124M with random weights (transformers' init, std 0.02), batch 1, a 32-token prompt, greedy,
2 threads. The model is exported with minigpt.weights.gguf.export_gguf to f16 and q8_0 and decoded by
llama.cpp (llama-cpp-python, its own sampler at temperature 0); minigpt decodes the same weights
with prepare_for_decoding's fp16 and int8 (weight-only, per-channel) paths and its exact fp32
path. Each round runs every system once, in turn (rotating who goes first); tokens/s = new tokens
/ wall seconds of the whole call (prefill + decode); ratios are per round, then the median.

    python benchmarks/gguf.py            # 128 new tokens, 5 rounds -> benchmarks/results/gguf.json
    python benchmarks/gguf.py --quick    # 32 new tokens, 2 rounds (a smoke run)

Tokens are compared with minigpt's fp32 greedy continuation (agreeing prefix and overall match).
Needs llama-cpp-python (pip install llama-cpp-python; builds llama.cpp from source).
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

from common import decoding_parser, llama_system, machine_info, write_json  # noqa: E402

from minigpt import GPT, GPTConfig  # noqa: E402
from minigpt.inference.decode_weights import prepare_for_decoding  # noqa: E402
from minigpt.inference.generate import generate  # noqa: E402
from minigpt.weights.gguf import export_gguf  # noqa: E402


def agreement(new: list[int], ref: list[int]) -> dict:
    same = [x == y for x, y in zip(new, ref)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"match": round(sum(same) / len(same), 4), "prefix": prefix, "identical": new == ref}


def minigpt_system(model, prompt: list[int]):
    idx = torch.tensor([prompt])

    def run(n: int) -> list[int]:
        return generate(model, idx, n)[0, len(prompt):].tolist()
    return run


def build_systems(args, tmp: Path, prompt: list[int]) -> dict:
    import llama_cpp
    from transformers import GPT2Config, GPT2LMHeadModel

    from minigpt.weights.keymap import hf_to_minigpt
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    base = GPT(GPTConfig.from_name("gpt2")).eval()
    base.load_state_dict(hf_to_minigpt(hf.state_dict()), strict=False)
    del hf
    systems = {"minigpt fp32 (prepare_for_decoding)": minigpt_system(
        prepare_for_decoding(copy.deepcopy(base), "fp32"), prompt)}
    for gguf_dtype, mode in (("f16", "fp16"), ("q8_0", "int8")):
        path = export_gguf(base, tmp / f"gpt2-{gguf_dtype}.gguf", gguf_dtype)
        systems[f"llama.cpp {gguf_dtype} (exported GGUF)"] = llama_system(llama_cpp, path, prompt, args.threads)
        systems[f"minigpt {mode} (prepare_for_decoding)"] = minigpt_system(
            prepare_for_decoding(copy.deepcopy(base), mode), prompt)
    return systems


def main(argv=None) -> dict:
    ap = decoding_parser(__doc__)
    ap.add_argument("--out", default="gguf.json", help="results file name under benchmarks/results ('' = none)")
    args = ap.parse_args(argv)
    n_new = args.new_tokens or (32 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 50257, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()

    with tempfile.TemporaryDirectory() as tmp:
        systems = build_systems(args, Path(tmp), prompt)
        for f in systems.values():                               # warm-up
            f(4)
        order, times, outs = list(systems), {k: [] for k in systems}, {}
        for r in range(rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                outs[name] = systems[name](n_new)
                times[name].append(time.perf_counter() - t0)
                assert len(outs[name]) == n_new, (name, len(outs[name]))

    ref = outs["minigpt fp32 (prepare_for_decoding)"]
    results = {name: {"tok_per_s_median": round(n_new / statistics.median(ts), 2),
                      "tok_per_s_best": round(n_new / min(ts), 2),
                      "tokens_vs_minigpt_fp32": agreement(outs[name], ref)} for name, ts in times.items()}
    pairs = {}
    for gguf_dtype, mode in (("f16", "fp16"), ("q8_0", "int8")):
        a, b = times[f"llama.cpp {gguf_dtype} (exported GGUF)"], times[f"minigpt {mode} (prepare_for_decoding)"]
        pairs[f"minigpt {mode} / llama.cpp {gguf_dtype}"] = {
            "speed_ratio_median": round(statistics.median(x / y for x, y in zip(a, b)), 3),
            "per_round": [round(x / y, 3) for x, y in zip(a, b)]}
    payload = {"benchmark": "gguf decoding: llama.cpp on the exported file vs minigpt, same weights",
               "model": "gpt2 124M, random weights (transformers init)", "prompt_tokens": args.prompt,
               "new_tokens": n_new, "rounds": rounds, "threads": args.threads, "results": results,
               "ratios": pairs, "machine": machine_info()}
    try:
        import llama_cpp
        payload["machine"]["llama_cpp_python"] = llama_cpp.__version__
    except (ImportError, AttributeError):
        pass
    for name, r in results.items():
        print(f"{name:42s} {r['tok_per_s_median']:8.1f} tok/s   tokens vs fp32: {r['tokens_vs_minigpt_fp32']}")
    for name, r in pairs.items():
        print(f"{name:42s} {r['speed_ratio_median']:.2f}x (per round {r['per_round']})")
    if args.out:
        print(f"wrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
