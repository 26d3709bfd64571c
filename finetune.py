"""Instruction-tune a GPT-2 model, with LoRA (--lora) or all weights, on the shared Trainer.

`python finetune.py --lora` tunes GPT-2 (or your train.py model) on the embedded instruction set.

Examples:
    python finetune.py --lora                                    # embedded instructions, defaults
    python finetune.py --lora --base gpt2 --data my.jsonl --out-dir out-mine
    python finetune.py --lora --lora-r 16 --lora-targets c_attn c_proj --merge
    python finetune.py --base out --epochs 5 --lr 5e-5           # full fine-tuning
    python finetune.py --lora --resume                           # continue an interrupted run exactly
    python chat.py --model out-finetune                          # then talk to the result
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from minigpt.cli import field, parse_args, run_main

TEMPLATE_NAMES = ["alpaca", "human-assistant", "chat"]


@dataclass
class FinetuneArgs:
    base: Optional[str] = field(None, "base model: any GPT.from_pretrained source (preset name, HF or "
                                      "minigpt folder, OpenAI checkpoint). Default: gpt2 when cached, "
                                      "else the latest train.py output (out/)")
    lora: bool = field(False, "train a LoRA adapter (base frozen) instead of all weights")
    lora_r: int = field(8, "LoRA rank")
    lora_alpha: float = field(16.0, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = field(0.05, "dropout on the LoRA input path")
    lora_targets: list[str] = field(["c_attn"], "modules to adapt: c_attn, c_proj, attn.c_proj, "
                                                "mlp.c_proj, c_fc, lm_head, or q k v (slices of c_attn)")
    rslora: bool = field(False, "rank-stabilised LoRA: scale by alpha / sqrt(r)")
    data: Optional[str] = field(None, "instruction data: Alpaca JSON/JSONL, chat JSONL (messages) or "
                                      "'### Human:/### Assistant:' text (default: the embedded set)")
    template: str = field("alpaca", "prompt template", choices=TEMPLATE_NAMES)
    mask_prompt: bool = field(True, "train on responses only (--no-mask-prompt: on prompts too)")
    max_length: Optional[int] = field(None, "max tokens per example, longer ones are truncated at the end "
                                            "(default 256, or the base model's context if shorter)")
    val_fraction: float = field(0.1, "share held out for validation when the data has no 'split' field")
    epochs: Optional[float] = field(None, "passes over the training data (default 3; "
                                          "use either --epochs or --max-steps)")
    max_steps: Optional[int] = field(None, "optimizer steps (overrides the epoch count)")
    batch_size: int = field(2, "examples per micro-batch")
    grad_accum: int = field(4, "micro-batches per optimizer step")
    lr: float = field(2e-4, "peak learning rate")
    min_lr: Optional[float] = field(None, "final learning rate (default 0 for linear decay)")
    warmup_steps: Optional[int] = field(None, "linear warmup steps (default: 5%% of the steps)")
    schedule: str = field("linear", "learning-rate decay", choices=["linear", "cosine", "constant"])
    weight_decay: float = field(0.0, "AdamW weight decay (matrices only)")
    grad_clip: float = field(1.0, "max gradient norm (0 = off)")
    eval_interval: int = field(50, "steps between evaluations")
    save_interval: Optional[int] = field(None, "steps between checkpoints (default: --eval-interval)")
    eval_batches: int = field(50, "validation batches per evaluation (0 = all)")
    exact_match: int = field(16, "checkable validation records scored by exact match at each "
                                 "evaluation (greedy decoding; 0 = off)")
    log_interval: int = field(10, "steps between metric records")
    keep_last: int = field(2, "checkpoints to keep")
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass (less memory)")
    precision: str = field("auto", "auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16",
                           choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = field(False, "torch.compile the model")
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    threads: Optional[int] = field(None, "CPU threads for torch (default: all cores)")
    seed: int = field(42, "random seed (LoRA init, dropout, data order, split)")
    out_dir: str = field("out-finetune", "where the adapter (or model), checkpoints and metrics go")
    resume: bool = field(False, "continue from the newest checkpoint in --out-dir")
    overwrite: bool = field(False, "start over in an --out-dir that holds an earlier run")
    merge: bool = field(False, "also write out_dir/merged: the adapter merged into a plain GPT-2 model")
    samples: int = field(3, "held-out prompts answered before and after training")
    sample_tokens: int = field(64, "max new tokens per sample answer")
    debug: bool = field(False, "show tracebacks")


# Files finetune.py writes at the top of --out-dir (cleared when a fresh run starts there).
_OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
            "minigpt_finetune.json", "samples.json", "metrics.jsonl", "loss.png", "run.json")
_OUTPUT_DIRS = ("checkpoints", "best", "merged")


def _check_args(args: FinetuneArgs) -> None:
    from minigpt.cli import CLIError

    if args.lora:
        if args.lora_r <= 0:
            raise CLIError(f"--lora-r must be a positive integer, got {args.lora_r}")
        if not args.lora_alpha > 0:
            raise CLIError(f"--lora-alpha must be > 0, got {args.lora_alpha}")
        if not 0.0 <= args.lora_dropout < 1.0:
            raise CLIError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
        if args.merge and any(t.endswith("lm_head") for t in args.lora_targets):
            raise CLIError("--merge cannot fold a LoRA on lm_head (it is tied to the input embeddings); "
                           "drop lm_head from --lora-targets or leave out --merge")
    if args.epochs is not None and args.max_steps is not None:
        raise CLIError("use either --epochs or --max-steps, not both")
    if args.epochs is not None and not args.epochs > 0:
        raise CLIError(f"--epochs must be > 0, got {args.epochs}")
    if args.max_steps is not None and args.max_steps <= 0:
        raise CLIError(f"--max-steps must be > 0, got {args.max_steps}")
    if args.max_length is not None and args.max_length < 2:
        raise CLIError(f"--max-length must be at least 2, got {args.max_length}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CLIError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be a positive integer, got {args.threads}")
    for name in ("batch_size", "grad_accum", "eval_interval", "log_interval", "keep_last"):
        if getattr(args, name) <= 0:
            raise CLIError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("eval_batches", "exact_match", "samples", "sample_tokens"):
        if getattr(args, name) < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")


def _default_base() -> str:
    from minigpt.checkpoint import is_preset_cached
    from minigpt.cli import CLIError
    from minigpt.runs import find_latest_run

    if is_preset_cached("gpt2"):
        return "gpt2"
    run = find_latest_run("pretrain")
    if run is not None:
        return str(run)
    raise CLIError("no base model: the gpt2 weights are not cached and no train.py output (out/) was "
                   "found; run `python train.py` first, or pass --base (e.g. --base gpt2 when online)")


def _prepare_out_dir(args: FinetuneArgs, base_path, clear: bool = True) -> None:
    """Refuse to clobber an earlier run (or the base model); clear stale outputs of a fresh run."""
    import shutil
    from pathlib import Path

    from minigpt.cli import CLIError
    from minigpt.runs import read_finetune_meta, read_run_info
    from minigpt.trainer import check_out_dir, latest_checkpoint

    check_out_dir(args.out_dir)
    out = Path(args.out_dir)
    if base_path is not None and out.resolve() == Path(base_path).resolve():
        raise CLIError(f"--out-dir {args.out_dir} is the base model's folder; choose another --out-dir")
    info = read_run_info(out)
    if info is not None and info.get("kind") not in (None, "finetune"):
        raise CLIError(f"--out-dir {args.out_dir} holds a {info.get('kind')} run (not finetune.py's); "
                       "choose another --out-dir")
    meta = read_finetune_meta(out)
    if args.resume:
        if latest_checkpoint(out) is None:
            raise CLIError(f"--resume: no checkpoint found in {args.out_dir}/checkpoints")
        if meta is not None and meta.get("method") != ("lora" if args.lora else "full"):
            raise CLIError(f"--resume: {args.out_dir} holds a {meta.get('method')} fine-tune; "
                           f"resume it {'with' if meta.get('method') == 'lora' else 'without'} --lora")
        return
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not args.overwrite:
        raise CLIError(f"--out-dir {args.out_dir} already holds a fine-tuning run (checkpoint {ckpt.name}); "
                       "pass --resume to continue it, --overwrite to start over, or another --out-dir")
    if not clear:
        return
    for name in _OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def _answers(model, tok, template, records, max_new_tokens: int, device) -> list[str]:
    """Greedy answers to each record's last user turn (one left-padded batch at a time)."""
    import torch

    from minigpt.generate import generate

    prompts = [template.prompt_ids(r["messages"][:-1], tok, r.get("system")) for r in records]
    block = model.config.block_size
    out: list[str] = []
    for s in range(0, len(prompts), 16):
        group = prompts[s:s + 16]
        group = [p[-(block - 1):] for p in group]                      # keep room for one token
        T = max(len(p) for p in group)
        n_new = max(1, min(max_new_tokens, block - T))
        idx = torch.full((len(group), T), tok.eot_token, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for i, p in enumerate(group):
            idx[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        ids = generate(model, idx.to(device), n_new, temperature=0.0, eos_token_id=tok.eot_token,
                       stop=list(template.stop_strings), tokenizer=tok, attention_mask=mask.to(device))
        for row in ids[:, T:].tolist():
            if tok.eot_token in row:
                row = row[:row.index(tok.eot_token)]
            text = tok.decode(row)
            for stop in template.stop_strings:
                text = text.split(stop)[0]
            out.append(text.strip())
    return out


def finetune(args: FinetuneArgs) -> dict:
    """Library-level body of finetune.py (importable for tests and notebooks).

    Returns the Trainer's result ({"step", "best_val_loss", last evaluation metrics}) plus
    "out_dir", "samples" (before/after answers) and "model" (the trained model; with --merge and
    --lora, the merged plain GPT)."""
    import json
    import math
    from pathlib import Path

    import torch

    from minigpt import GPT
    from minigpt.cli import CLIError
    from minigpt.data import (Collator, checkable_records, default_instructions_path, exact_match_accuracy,
                              get_template, length_grouped_batches, load_records, split_records,
                              tokenize_records)
    from minigpt.evaluate import evaluate_loss
    from minigpt.lora import add_lora, count_parameters, load_adapter, merge_and_unload, save_adapter
    from minigpt.runs import FINETUNE_META, resolve_base
    from minigpt.tokenizer import get_tokenizer
    from minigpt.trainer import Trainer, TrainConfig

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = get_tokenizer()
    template = get_template(args.template)

    # --- data ---------------------------------------------------------------------------------
    data_path = Path(args.data) if args.data else default_instructions_path()
    records = load_records(data_path)
    train_recs, val_recs = split_records(records, args.val_fraction, seed=args.seed)
    if not train_recs:
        raise CLIError(f"{data_path}: no training records (all {len(records)} are in the validation split)")

    # --- base model ---------------------------------------------------------------------------
    base_src = args.base or _default_base()
    base_path = Path(base_src).expanduser() if Path(base_src).expanduser().exists() else None
    if args.resume or not args.overwrite:
        _prepare_out_dir(args, base_path, clear=False)     # fail early, before loading anything
    model = GPT.from_pretrained(base_src)
    block = model.config.block_size
    max_length = args.max_length if args.max_length is not None else min(256, block)
    if max_length > block:
        raise CLIError(f"--max-length {max_length} exceeds the base model's context ({block} tokens)")
    _prepare_out_dir(args, base_path)
    base_id = resolve_base(base_src)

    train_ex, tstats = tokenize_records(train_recs, tok, template, max_length, args.mask_prompt)
    val_ex, vstats = tokenize_records(val_recs, tok, template, max_length, args.mask_prompt)
    if not train_ex:
        raise CLIError(f"{data_path}: every training example's prompt is longer than --max-length "
                       f"{max_length}")
    collate = Collator()

    # deterministic batches: global micro-batch g -> epoch g // per_epoch, batch g % per_epoch of
    # that epoch's length-grouped order (seeded by (seed, epoch)); a pure function of (step, micro)
    lengths = [len(e["input_ids"]) for e in train_ex]
    per_epoch = math.ceil(len(train_ex) / args.batch_size)
    orders: dict[int, list[list[int]]] = {}

    def epoch_batches(epoch: int) -> list[list[int]]:
        if epoch not in orders:
            if len(orders) > 4:
                orders.clear()
            orders[epoch] = length_grouped_batches(lengths, args.batch_size, seed=args.seed * 100_003 + epoch)
        return orders[epoch]

    def get_batch(step: int, micro: int):
        g = step * args.grad_accum + micro
        b = collate([train_ex[i] for i in epoch_batches(g // per_epoch)[g % per_epoch]])
        return b["input_ids"], b["labels"]

    if args.max_steps is not None:
        max_steps = args.max_steps
    else:
        max_steps = max(1, math.ceil((args.epochs or 3.0) * per_epoch / args.grad_accum))
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * max_steps))
    cfg = TrainConfig(
        out_dir=args.out_dir, max_steps=max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, min_lr=args.min_lr, warmup_steps=warmup, schedule=args.schedule,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_interval=args.eval_interval,
        save_interval=args.save_interval, log_interval=args.log_interval, keep_last=args.keep_last,
        precision=args.precision, compile=args.compile, seed=args.seed, device=args.device)

    # --- model: LoRA or full ------------------------------------------------------------------
    torch.manual_seed(args.seed)
    lora_cfg = None
    if args.lora:
        targets = [t for arg in args.lora_targets for t in arg.replace(",", " ").split()]
        add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                 targets=targets, use_rslora=args.rslora)
        lora_cfg = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                    "targets": targets, "rslora": args.rslora}

        def save(m, d):
            save_adapter(m, d, base_model_name_or_path=base_id)

        def load(m, d):
            load_adapter(m, d)
    else:
        def save(m, d):
            m.save_pretrained(d)

        def load(m, d):
            m.load_state_dict(GPT.from_pretrained(d).state_dict())
    model.gradient_checkpointing = args.gradient_checkpointing
    trainable, total = count_parameters(model)

    meta = {"kind": "finetune", "method": "lora" if args.lora else "full", "base": base_id,
            "template": template.name, "mask_prompt": args.mask_prompt, "max_length": max_length,
            "lora": lora_cfg, "data": str(data_path) if args.data else "embedded:instructions",
            "merged": None}

    # --- evaluation ---------------------------------------------------------------------------
    val_order = sorted(range(len(val_ex)), key=lambda i: len(val_ex[i]["input_ids"]))
    val_batches = []
    for s in range(0, len(val_order), args.batch_size * 4):
        b = collate([val_ex[i] for i in val_order[s:s + args.batch_size * 4]])
        val_batches.append((b["input_ids"], b["labels"]))
    if args.eval_batches:
        val_batches = val_batches[:args.eval_batches]
    checkable = checkable_records(val_recs)[:args.exact_match]
    sample_recs = val_recs[:args.samples] if val_recs else train_recs[:args.samples]

    def exact_match(m) -> dict:
        if not checkable:
            return {}
        longest = max(len(tok.encode_ordinary(r["messages"][-1]["content"])) for r in checkable)
        got = _answers(m, tok, template, checkable, longest + 4, trainer.device)
        prompts = {template.prompt_text(r["messages"][:-1], r.get("system")): g
                   for r, g in zip(checkable, got)}
        return exact_match_accuracy(checkable, lambda p: prompts[p], template)

    def evaluate(m) -> dict:
        out = {}
        if val_batches:
            r = evaluate_loss(m, val_batches, autocast=trainer.autocast())
            out.update(val_loss=r["loss"], val_acc=r["acc"])
        em = exact_match(m)
        if em:
            out.update(exact_match=em["accuracy"], exact_match_n=em["total"])
        return out

    trainer = Trainer(model, cfg, get_batch, evaluate, save, load,
                      run_info={"kind": "finetune", "finetune": meta})
    out_dir = Path(args.out_dir)
    if trainer.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FINETUNE_META).write_text(json.dumps(meta, indent=1) + "\n")
        what = (f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on {','.join(lora_cfg['targets'])}"
                if args.lora else "full fine-tuning")
        print(f"base: {base_src} ({model.config.n_layer} layers x {model.config.n_embd} dims) | {what}: "
              f"{trainable:,} of {total:,} params trainable ({trainable / total:.2%})")
        print(f"data: {data_path if args.data else 'embedded instructions'}: {len(train_ex)} train / "
              f"{len(val_ex)} val examples (template {template.name}, max length {max_length}, "
              f"{tstats['truncated'] + vstats['truncated']} truncated, {tstats['dropped'] + vstats['dropped']} "
              f"dropped) | {max_steps} steps of {args.batch_size}x{args.grad_accum} examples "
              f"(~{max_steps * args.grad_accum / per_epoch:.2g} epochs) | device {trainer.device} "
              f"{trainer.precision}")

    def one_line(text: str, width: int = 160) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else text[:width - 3] + "..."

    def show(title: str, answers: list[str]) -> None:
        if not answers:
            return
        print(f"\n{title}")
        for r, a in zip(sample_recs, answers):
            user = r["messages"][-2]
            q = user["content"] + (f"\n{user['input']}" if user.get("input") else "")
            print("-" * 60 + f"\n>>> {one_line(q)}\n[expected] {one_line(r['messages'][-1]['content'])}"
                  f"\n[model]    {one_line(a)}")
        print("-" * 60)

    before = []
    if trainer.is_main and sample_recs:
        before = _answers(model, tok, template, sample_recs, args.sample_tokens, trainer.device)
        show("samples before fine-tuning:", before)

    result = trainer.fit(resume=args.resume)

    if trainer.is_main:
        after = _answers(model, tok, template, sample_recs, args.sample_tokens, trainer.device) if sample_recs else []
        show("samples after fine-tuning:", after)
        samples = [{"prompt": template.prompt_text(r["messages"][:-1], r.get("system")),
                    "expected": r["messages"][-1]["content"], "before": b, "after": a}
                   for r, b, a in zip(sample_recs, before, after)]
        (out_dir / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
        if args.merge:
            if args.lora:
                merged = merge_and_unload(model)
                merged.save_pretrained(out_dir / "merged")
                meta["merged"] = "merged"
                (out_dir / "merged" / FINETUNE_META).write_text(json.dumps(
                    {**meta, "method": "full", "merged": None, "merged_from": str(out_dir.resolve())},
                    indent=1) + "\n")
                print(f"merged model written to {out_dir / 'merged'}")
            else:
                print(f"note: --merge only applies to --lora; {out_dir} already holds the full model")
        (out_dir / FINETUNE_META).write_text(json.dumps(meta, indent=1) + "\n")
        kind = "adapter" if args.lora else "model"
        print(f"saved {kind} to {out_dir}  (load with minigpt.runs.load_finetuned({str(out_dir)!r}) "
              f"or chat with: python chat.py --model {out_dir})")
        result = {**result, "out_dir": str(out_dir), "samples": samples}
    return {**result, "model": model}


def main(argv=None) -> int:
    args = parse_args(FinetuneArgs, argv, description=__doc__.splitlines()[0], prog="finetune.py")
    from minigpt.trainer import reuse_freed_memory
    reuse_freed_memory()   # large per-step tensors: keep freed memory instead of re-faulting it
    return run_main(lambda: (finetune(args), 0)[1], args.debug)


if __name__ == "__main__":
    sys.exit(main())
