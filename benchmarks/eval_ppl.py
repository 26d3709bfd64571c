"""Sliding-window perplexity: `minigpt eval`'s library function vs the transformers docs' loop, same
weights, same text, same window and stride, same run.

GPT-2 124M (the cached gpt2 weights when present, else random weights with transformers' init: the
speed is the same), saved by transformers' save_pretrained and loaded by both sides. The text is the
embedded corpus (minigpt.data.corpus.embedded_corpus_text), its first --tokens tokens; window 1024,
stride 512, fp32, 2 threads. minigpt: minigpt.training.perplexity.sliding_window_perplexity (batched
windows, head on the scored positions only, prepacked fp32 weights). transformers: the docs' loop
("Perplexity of fixed-length models": GPT2LMHeadModel(input_ids, labels=...) per window), with the
loss's token count taken exactly. Rounds alternate which side goes first; tokens/s = tokens scored /
wall seconds; the ratio is per round, then the median.

    python benchmarks/eval_ppl.py            # 8192 tokens, 3 rounds -> benchmarks/results/eval_ppl.json
    python benchmarks/eval_ppl.py --quick    # 2048 tokens, 1 round (a smoke run)
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, machine_info, write_json  # noqa: E402

from minigpt import GPT, get_tokenizer  # noqa: E402
from minigpt.data.corpus import embedded_corpus_text  # noqa: E402
from minigpt.training.perplexity import sliding_window_perplexity  # noqa: E402


def hf_docs_loop(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """(total NLL in nats, tokens scored): the transformers docs' loop over one sequence."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())        # what the loss averages over, after the shift
        nll_sum += loss.item() * n
        n_tokens += n
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def load_models(tmp: Path):
    """(transformers model, minigpt model, weights description): the same weights on both sides."""
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        hf = GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=True)
        what = "gpt2 124M (cached pretrained weights)"
    except (OSError, ValueError):
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config())
        what = "gpt2 124M shape, random weights (transformers init; gpt2 not cached)"
    hf.save_pretrained(tmp / "gpt2")
    hf = GPT2LMHeadModel.from_pretrained(tmp / "gpt2").eval()
    return hf, GPT.from_pretrained(tmp / "gpt2").eval(), what


def main(argv=None) -> dict:
    ap = bench_parser(__doc__, "2048 tokens, 1 round (a smoke run)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens of text (default 8192; 2048 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4, help="minigpt's windows per forward")
    ap.add_argument("--out", default="eval_ppl.json", help="results file name under benchmarks/results ('' = none)")
    args = ap.parse_args(argv)
    n_tokens = args.tokens or (2048 if args.quick else 8192)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    ids = get_tokenizer().encode_ordinary(embedded_corpus_text()[: n_tokens * 8])[:n_tokens]
    load_before = list(os.getloadavg())

    with tempfile.TemporaryDirectory() as tmp:
        hf, mg, what = load_models(Path(tmp))
        systems = {
            "transformers (docs loop)": lambda: hf_docs_loop(hf, ids, args.window, args.stride),
            "minigpt (sliding_window_perplexity)": lambda: (lambda r: (r["nll"], r["tokens"]))(
                sliding_window_perplexity(mg, tokens=ids, window=args.window, stride=args.stride,
                                          batch_size=args.batch_size)),
        }
        warm = ids[: args.window + args.stride]                # one short pass each: allocator, oneDNN
        hf_docs_loop(hf, warm, args.window, args.stride)
        sliding_window_perplexity(mg, tokens=warm, window=args.window, stride=args.stride)
        order, times, outs = list(systems), {k: [] for k in systems}, {}
        for r in range(rounds):
            for name in order[r % 2:] + order[:r % 2]:
                t0 = time.perf_counter()
                outs[name] = systems[name]()
                times[name].append(time.perf_counter() - t0)

    scored = {name: n for name, (_, n) in outs.items()}
    ppl = {name: math.exp(nll / n) for name, (nll, n) in outs.items()}
    hf_name, mg_name = order
    results = {name: {"tok_per_s_median": round(scored[name] / statistics.median(ts), 1),
                      "tok_per_s_best": round(scored[name] / min(ts), 1), "seconds": [round(t, 2) for t in ts],
                      "perplexity": ppl[name], "tokens_scored": scored[name]} for name, ts in times.items()}
    per_round = [round(a / b, 3) for a, b in zip(times[hf_name], times[mg_name])]
    payload = {"benchmark": "sliding-window perplexity: minigpt vs the transformers docs' loop, same weights",
               "model": what, "text": "embedded corpus (Shakespeare), first tokens", "tokens": n_tokens,
               "window": args.window, "stride": args.stride, "minigpt_batch_size": args.batch_size,
               "rounds": rounds, "threads": args.threads, "results": results,
               "speed_ratio_median": round(statistics.median(per_round), 3), "per_round": per_round,
               "perplexity_rel_diff": abs(ppl[mg_name] / ppl[hf_name] - 1),
               "load_average_before": [round(x, 2) for x in load_before], "machine": machine_info()}
    for name, r in results.items():
        print(f"{name:38s} {r['tok_per_s_median']:8.1f} tok/s   perplexity {r['perplexity']:.6f}")
    print(f"minigpt / transformers: {payload['speed_ratio_median']:.2f}x (per round {per_round}); "
          f"perplexity rel. diff {payload['perplexity_rel_diff']:.2e}; load before {payload['load_average_before']}")
    if args.out:
        print(f"wrote {write_json(args.out, payload)}")
    return payload


if __name__ == "__main__":
    main()
