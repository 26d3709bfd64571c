"""DPO with LoRA, minigpt vs trl's DPOTrainer + peft: step speed, peak memory and end to end.

    python benchmarks/dpo.py --quick        # < 2 minutes: a tiny random GPT-2, smoke test of every part
    python benchmarks/dpo.py                # GPT-2 124M shape: 2 pairs x (64 prompt + 64 answer) tokens, 5 rounds
    python benchmarks/dpo.py --threads 1 --rounds 7 --batch 4 --prompt-len 128 --answer-len 128

Both libraries hold the same numbers: a transformers GPT2LMHeadModel built with a fixed seed (random
weights, dropout 0), saved once, loaded by both (minigpt with GPT.from_pretrained); GPT-2's tokenizer
for trl is built offline from the BPE ranks minigpt ships. fp32 on CPU. Recipe in both: LoRA r=8,
alpha=16, dropout 0 (trl disables dropout) on c_attn; the reference is the base with the adapter
switched off (peft's disable_adapter in trl, minigpt.methods.adapters_disabled); DPO sigmoid loss,
beta 0.1; AdamW (betas 0.9/0.95, no weight decay), constant learning rate 1e-4; grad clipping at 1.0.

1. Step (one process, interleaved): the same pairs of token ids, fixed lengths (--prompt-len,
   --answer-len, EOS included), --batch pairs a step. minigpt: Trainer.train_step() with the
   PreferenceLoss module on collate_shared_pairs batches (what finetune uses for GPT-2: one row a
   pair, the prompt computed once, the rejected answer masked from the chosen one). trl:
   DPOTrainer.training_step() on its own collator's batch of the same ids, then what its training
   loop does after it: clip, optimizer step, scheduler step, zero_grad. After a warm-up step each
   (the first step's losses are ln 2 in both, checked, and the policy's log-probs of the chosen
   answers must agree to 1e-3: same weights, same tokens), every round runs both once in rotating
   order; the ratio is trl's time / minigpt's in the same round; the median of the rounds is
   reported (examples = pairs per second).
2. Peak memory (one fresh process per library): after loading, LoRA and optimizer set-up and every
   weight read once, garbage collected and malloc_trim(0), the RSS high-water mark is reset and VmRSS
   taken as the baseline; after --mem-steps steps, peak = VmHWM. Compared: peak - baseline (what
   training adds to the loaded model); absolute peaks are in the JSON too.
3. End to end (one fresh process per run, alternating libraries, --e2e-rounds each): one epoch over a
   long-tailed preference set (--e2e-pairs pairs of random corpus words; prompt and answer lengths
   drawn from a log-normal: most short, a few near --e2e-max tokens), from the JSONL file to the
   trained adapter, through each library's user path: minigpt's finetune (--objective dpo --method
   lora --template none: length-grouped batches of one row a pair, padded per batch) and trl's DPOTrainer.train()
   (its default random order, padded per batch). Wall time from reading the data to the end of
   training (model loading included, Python imports not); pairs per second and the ratio.
Results: benchmarks/results/dpo[_quick].json with the CPU model and flags (benchmarks/common.py).
"""
from __future__ import annotations

import json
import math
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

from common import (  # noqa: E402
    bench_parser,
    machine_info,
    peak_rss_mb,
    release_free_memory,
    reset_peak_rss,
    rss_mb,
    run_worker,
    serve_as_worker,
    write_json,
)

SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
         "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_positions=256)}
LORA = dict(r=8, alpha=16, targets=["c_attn"])
LR, BETA, EOS = 1e-4, 0.1, 50256


# --- shared set-up -----------------------------------------------------------------------------------

def _quiet_hf():
    warnings.filterwarnings("ignore")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def make_weights(size: str, path: str) -> None:
    """A seeded random transformers GPT-2 and GPT-2's tokenizer (from minigpt's BPE ranks) in `path`."""
    _quiet_hf()
    from importlib import resources

    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(path)
    ranks = str(resources.files("minigpt").joinpath("assets/gpt2.tiktoken"))
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tok = TikTokenConverter(vocab_file=ranks, pattern=pattern, extra_special_tokens=["<|endoftext|>"]).converted()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(path)


def step_pairs(n: int, prompt_len: int, answer_len: int, seed: int = 0) -> list[dict]:
    """n pairs of token ids from the embedded corpus: a prompt of prompt_len tokens, two answers of
    answer_len tokens each (the last one EOS)."""
    from minigpt import get_tokenizer
    from minigpt.data.corpus import embedded_corpus_text

    ids = get_tokenizer().encode_ordinary(embedded_corpus_text()[:400_000])
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = int(torch.randint(0, len(ids) - 3 * (prompt_len + answer_len), (1,), generator=g))
        p, c = ids[s:s + prompt_len], ids[s + prompt_len:s + prompt_len + answer_len - 1] + [EOS]
        r0 = s + 2 * (prompt_len + answer_len)
        out.append({"prompt": p, "chosen": c, "rejected": ids[r0:r0 + answer_len - 1] + [EOS]})
    return out


def long_tailed_set(n: int, max_tokens: int, path: str, seed: int = 0) -> dict:
    """A JSONL preference set of n pairs of corpus words, lengths log-normal (median ~max/10), capped."""
    import random

    from minigpt.data.corpus import embedded_corpus_text

    words = embedded_corpus_text()[:200_000].split()
    rng = random.Random(seed)

    def text(k):
        s = rng.randrange(len(words) - k)
        return " ".join(words[s:s + k])

    def length(cap):
        return max(2, min(cap, int(rng.lognormvariate(math.log(max_tokens / 12), 0.9))))
    lens = []
    with open(path, "w") as f:
        for _ in range(n):
            lp, lc, lr = length(max_tokens // 2), length(max_tokens // 2), length(max_tokens // 2)
            lens.append(lp + max(lc, lr))
            f.write(json.dumps({"prompt": text(lp), "chosen": " " + text(lc), "rejected": " " + text(lr)}) + "\n")
    lens.sort()
    return {"pairs": n, "words_per_pair_median": lens[n // 2], "words_per_pair_p90": lens[int(n * 0.9)],
            "words_per_pair_max": lens[-1]}


def _touch(model) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()


# --- the two systems (one step) ------------------------------------------------------------------------

class Minigpt:
    lib = "minigpt"

    def __init__(self, spec, pairs):
        from minigpt import GPT
        from minigpt.data.preferences import collate_shared_pairs
        from minigpt.methods import method_config
        from minigpt.training.config import TrainConfig
        from minigpt.training.preference import PreferenceLoss
        from minigpt.training.trainer import Trainer

        self.model = GPT.from_pretrained(spec["weights"]).train()
        method_config("lora", r=LORA["r"], alpha=LORA["alpha"], dropout=0.0, targets=tuple(LORA["targets"])
                      ).apply(self.model)
        B = spec["batch"]
        self.batches = [collate_shared_pairs(pairs[i:i + B]) for i in range(0, len(pairs), B)]
        self.i = 0
        cfg = TrainConfig(out_dir=os.path.join(spec["tmp"], "unused"), max_steps=10 ** 9, batch_size=B, lr=LR,
                          warmup_steps=0, schedule="constant", weight_decay=0.0, beta1=0.9, beta2=0.95,
                          grad_clip=1.0, precision="fp32", device="cpu")
        self.loss = PreferenceLoss(self.model, "dpo", BETA, reference="adapters")

        def batch(step, micro):
            x, y, t, seg = self.batches[self.i % len(self.batches)]
            return x, y, int((t != -100).sum()), {"targets": t, "segments": seg}
        self.trainer = Trainer(self.model, cfg, batch, None, lambda m, d: None, lambda m, d: None,
                               loss_module=self.loss, quiet=True)

    def step(self) -> tuple[float, dict]:
        loss, _ = self.trainer.train_step()
        self.i += 1
        return loss, self.loss.pop_metrics()


class Trl:
    lib = "trl"

    def __init__(self, spec, pairs):
        _quiet_hf()
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, GPT2LMHeadModel
        from trl import DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        tok = AutoTokenizer.from_pretrained(spec["weights"])
        model = GPT2LMHeadModel.from_pretrained(spec["weights"], dtype=torch.float32)
        B = spec["batch"]
        args = _trl_config(spec, B, max_steps=10 ** 6)
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                          fan_in_fan_out=True, task_type="CAUSAL_LM")
        dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
        self.trainer = DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok, peft_config=lora)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10 ** 6)
        self.trainer.current_gradient_accumulation_steps = 1        # (what its loop sets per step)
        self.model = self.trainer.model
        collate = DataCollatorForPreference(pad_token_id=EOS)
        self.batches = [collate([{"prompt_ids": e["prompt"], "chosen_ids": e["chosen"], "rejected_ids": e["rejected"]}
                                 for e in pairs[i:i + B]]) for i in range(0, len(pairs), B)]
        self.i = 0

    def step(self) -> tuple[float, dict]:
        t = self.trainer
        loss = t.training_step(self.model, self.batches[self.i % len(self.batches)])
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        t.optimizer.step()
        t.lr_scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        self.i += 1
        metrics = {k: v[-1] for k, v in t._metrics["train"].items() if v}
        return float(loss), metrics


def _trl_config(spec, batch: int, max_steps: int):
    from trl import DPOConfig

    return DPOConfig(output_dir=os.path.join(spec["tmp"], "trl-out"), per_device_train_batch_size=batch,
                     max_steps=max_steps, learning_rate=LR, beta=BETA, lr_scheduler_type="constant",
                     warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=10 ** 6, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False)


SYSTEMS = {"minigpt": Minigpt, "trl": Trl}


# --- workers --------------------------------------------------------------------------------------------

def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(1234)
    role = spec["role"]
    if role == "e2e":
        return _e2e(spec)
    pairs = [dict(p) for p in json.loads(Path(spec["pairs"]).read_text())]
    if role == "memory":
        rss0 = rss_mb()
        system = SYSTEMS[spec["lib"]](spec, pairs)
        _touch(system.model)
        release_free_memory()
        method = reset_peak_rss()
        base = rss_mb()
        losses = [system.step()[0] for _ in range(spec["mem_steps"])]
        peak = peak_rss_mb(method)
        return {"rss_before_load_mb": round(rss0, 1), "rss_after_setup_mb": round(base, 1),
                "peak_rss_mb": round(peak, 1), "train_peak_over_setup_mb": round(peak - base, 1), "method": method,
                "losses": [round(v, 6) for v in losses]}
    systems = {lib: cls(spec, pairs) for lib, cls in SYSTEMS.items()}
    first = {lib: s.step() for lib, s in systems.items()}                    # warm-up (and the checks)
    times, loads = {lib: [] for lib in systems}, []
    for r in range(spec["rounds"]):
        order = list(systems) if r % 2 == 0 else list(systems)[::-1]
        for lib in order:
            t0 = time.perf_counter()
            systems[lib].step()
            times[lib].append(time.perf_counter() - t0)
        loads.append(round(os.getloadavg()[0], 2))
    return {"first_step": {lib: {"loss": v[0], "logps/chosen": v[1].get("logps/chosen"),
                                 "logps/rejected": v[1].get("logps/rejected")} for lib, v in first.items()},
            "times": times, "load_1min_per_round": loads}


def _e2e(spec: dict) -> dict:
    """One epoch over the long-tailed set through the library's user path; seconds from data to trained adapter."""
    n = spec["e2e_n"]
    steps = math.ceil(n / spec["batch"])
    t0 = time.perf_counter()
    if spec["lib"] == "minigpt":
        from minigpt.commands.args import parse_args
        from minigpt.commands.finetune import FinetuneArgs, finetune

        argv = ["--base", spec["weights"], "--data", spec["e2e_data"], "--out-dir", os.path.join(spec["tmp"], "e2e-m"),
                "--overwrite", "--objective", "dpo", "--method", "lora", "--lora-r", LORA["r"], "--lora-alpha",
                LORA["alpha"], "--lora-dropout", 0, "--lora-targets", *LORA["targets"], "--template", "none",
                "--batch-size", spec["batch"], "--grad-accum", 1, "--max-steps", steps, "--lr", LR,
                "--schedule", "constant", "--warmup-steps", 0, "--beta", BETA, "--val-fraction", 0,
                "--eval-batches", 0, "--samples", 0, "--exact-match", 0, "--precision", "fp32", "--device", "cpu",
                "--threads", spec["threads"], "--save-interval", 10 ** 6, "--max-length", spec["e2e_max_length"]]
        finetune(parse_args(FinetuneArgs, [str(a) for a in argv]))
    else:
        _quiet_hf()
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoTokenizer, GPT2LMHeadModel
        from trl import DPOTrainer

        rows = [json.loads(ln) for ln in Path(spec["e2e_data"]).read_text().splitlines()]
        tok = AutoTokenizer.from_pretrained(spec["weights"])
        model = GPT2LMHeadModel.from_pretrained(spec["weights"], dtype=torch.float32)
        args = _trl_config(spec, spec["batch"], max_steps=steps)
        args.max_length = spec["e2e_max_length"]
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                          fan_in_fan_out=True, task_type="CAUSAL_LM")
        DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                   peft_config=lora).train()
    return {"seconds": time.perf_counter() - t0, "pairs": n, "steps": steps}


# --- parent --------------------------------------------------------------------------------------------

def _summary(run: dict, mem: dict, e2e: dict, batch: int) -> dict:
    t = run["times"]
    per = [a / b for a, b in zip(t["trl"], t["minigpt"])]
    out = {"step": {"minigpt_step_s_median": round(statistics.median(t["minigpt"]), 4),
                    "trl_step_s_median": round(statistics.median(t["trl"]), 4),
                    "minigpt_pairs_per_s": round(batch / statistics.median(t["minigpt"]), 3),
                    "trl_pairs_per_s": round(batch / statistics.median(t["trl"]), 3),
                    "speedup_per_round": [round(x, 3) for x in per], "speedup_median": round(statistics.median(per), 3),
                    "target": ">= 1.5"}}
    m, h = mem["minigpt"]["train_peak_over_setup_mb"], mem["trl"]["train_peak_over_setup_mb"]
    out["memory"] = {"minigpt_train_mb": m, "trl_train_mb": h, "ratio": round(m / h, 3) if h > 0 else None,
                     "absolute_peak_ratio": round(mem["minigpt"]["peak_rss_mb"] / mem["trl"]["peak_rss_mb"], 3),
                     "target": "<= 0.7"}
    ms = [r["seconds"] for r in e2e["minigpt"]]
    ts = [r["seconds"] for r in e2e["trl"]]
    out["end_to_end"] = {"minigpt_s": [round(x, 2) for x in ms], "trl_s": [round(x, 2) for x in ts],
                         "speedup_per_round": [round(b / a, 3) for a, b in zip(ms, ts)],
                         "speedup_median": round(statistics.median([b / a for a, b in zip(ms, ts)]), 3),
                         "minigpt_pairs_per_s": round(e2e["minigpt"][0]["pairs"] / statistics.median(ms), 3),
                         "trl_pairs_per_s": round(e2e["trl"][0]["pairs"] / statistics.median(ts), 3),
                         "target": ">= 3"}
    return out


def _checks(run: dict) -> dict:
    f = run["first_step"]
    lc = {lib: f[lib]["logps/chosen"] for lib in f}
    ok_loss = all(abs(f[lib]["loss"] - math.log(2)) < 1e-4 for lib in f)
    ok_logps = abs(lc["minigpt"] - lc["trl"]) <= 1e-3 * max(1.0, abs(lc["trl"]))
    return {"first_step_losses": {lib: f[lib]["loss"] for lib in f}, "first_step_logps_chosen": lc,
            "ok": ok_loss and ok_logps}


def main(argv=None) -> int:
    if serve_as_worker(argv, "_worker", worker):
        return 0
    ap = bench_parser(__doc__, "tiny random GPT-2, 2 rounds, 8 long-tailed pairs end to end (< 2 minutes)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per step")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--answer-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--e2e-pairs", type=int, default=64)
    ap.add_argument("--e2e-max", type=int, default=512, help="longest prompt + answer, words")
    ap.add_argument("--e2e-rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if a.quick:
        a.prompt_len, a.answer_len, a.rounds, a.e2e_pairs, a.e2e_max, a.e2e_rounds = 16, 16, 2, 8, 96, 1
    size = "tiny" if a.quick else "gpt2"
    script = str(Path(__file__).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "weights")
        make_weights(size, weights)
        pairs = step_pairs(a.batch * 4, a.prompt_len, a.answer_len)
        (Path(tmp) / "pairs.json").write_text(json.dumps(pairs))
        e2e_stats = long_tailed_set(a.e2e_pairs, a.e2e_max, os.path.join(tmp, "e2e.jsonl"))
        spec = {"weights": weights, "tmp": tmp, "threads": a.threads, "batch": a.batch, "rounds": a.rounds,
                "mem_steps": a.mem_steps, "pairs": os.path.join(tmp, "pairs.json"),
                "e2e_data": os.path.join(tmp, "e2e.jsonl"), "e2e_n": a.e2e_pairs,
                "e2e_max_length": min(1024 if size == "gpt2" else 256, 2 * a.e2e_max)}
        load_before = os.getloadavg()[0]
        run = run_worker(script, {**spec, "role": "step"})
        mem = {lib: run_worker(script, {**spec, "role": "memory", "lib": lib}) for lib in SYSTEMS}
        e2e = {lib: [] for lib in SYSTEMS}
        for r in range(a.e2e_rounds):
            for lib in (SYSTEMS if r % 2 == 0 else list(SYSTEMS)[::-1]):
                e2e[lib].append(run_worker(script, {**spec, "role": "e2e", "lib": lib}))
    checks = _checks(run)
    summary = _summary(run, mem, e2e, a.batch)
    payload = {"benchmark": "dpo", "quick": a.quick, "size": size, "sizes": SIZES[size],
               "recipe": {"lora": LORA, "lora_dropout": 0.0, "lr": LR, "beta": BETA, "batch_pairs": a.batch,
                          "prompt_len": a.prompt_len, "answer_len": a.answer_len, "precision": "fp32",
                          "optimizer": "AdamW 0.9/0.95, no weight decay, clip 1.0"},
               "machine": machine_info(), "load_1min_before": round(load_before, 2), "checks": checks,
               "summary": summary, "step_run": run, "memory": mem, "end_to_end": e2e,
               "long_tailed_set": e2e_stats}
    path = write_json(f"dpo{'_quick' if a.quick else ''}{f'_t{a.threads}' if a.threads != 2 else ''}.json", payload)
    s = summary
    print(f"step ({a.batch} pairs, {a.prompt_len}+{a.answer_len} tokens): minigpt {s['step']['minigpt_pairs_per_s']} "
          f"vs trl {s['step']['trl_pairs_per_s']} pairs/s -> {s['step']['speedup_median']:.2f}x "
          f"(per round {s['step']['speedup_per_round']}; target >= 1.5)")
    print(f"training memory: minigpt {s['memory']['minigpt_train_mb']} vs trl {s['memory']['trl_train_mb']} MiB -> "
          f"{s['memory']['ratio']} (target <= 0.7); absolute peak ratio {s['memory']['absolute_peak_ratio']}")
    print(f"end to end ({a.e2e_pairs} long-tailed pairs, 1 epoch): {s['end_to_end']['speedup_median']:.2f}x "
          f"(minigpt {s['end_to_end']['minigpt_s']} s, trl {s['end_to_end']['trl_s']} s; target >= 3)")
    print(f"checks: {checks}\nwrote {path}")
    return 0 if checks["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
