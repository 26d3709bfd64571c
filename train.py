"""Pretrain a GPT-2 model. `python train.py` trains a small model on the embedded Shakespeare corpus.

Examples:
    python train.py                                   # default quickstart, ~5 min on 2 CPU cores
    python train.py --data my.txt --out-dir out-my    # your own text (file, folder of .txt, or .bin)
    python train.py --model gpt2 --precision bf16     # GPT-2 124M shape, on a GPU
    python train.py --init-from gpt2 --data my.txt    # continue pretraining from weights
    python train.py --resume                          # continue an interrupted run exactly
    torchrun --nproc_per_node 4 train.py --model gpt2 # data parallel
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from minigpt.cli import field, parse_args, run_main


@dataclass
class TrainArgs:
    data: Optional[str] = field(None, "text file, folder of .txt files, or uint16 .bin of token ids "
                                      "(default: the embedded Shakespeare corpus)")
    out_dir: str = field("out", "where checkpoints, metrics and the final model go")
    model: Optional[str] = field(None, "preset shape to train from scratch (gpt2, gpt2-medium, ...)")
    init_from: Optional[str] = field(None, "continue pretraining from any GPT.from_pretrained source")
    n_layer: int = field(4, "layers (ignored with --model/--init-from)")
    n_head: int = field(4, "attention heads")
    n_embd: int = field(256, "embedding width")
    block_size: int = field(128, "context length in tokens")
    dropout: float = field(0.0, "dropout probability")
    max_steps: int = field(320, "optimizer steps")
    batch_size: int = field(16, "sequences per micro-batch")
    grad_accum: int = field(1, "micro-batches per optimizer step")
    lr: float = field(2e-3, "peak learning rate")
    min_lr: Optional[float] = field(None, "final learning rate (default lr/10)")
    warmup_steps: int = field(20, "linear warmup steps")
    schedule: str = field("cosine", "learning-rate decay", choices=["cosine", "linear", "constant"])
    weight_decay: float = field(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = field(1.0, "max gradient norm (0 = off)")
    eval_interval: int = field(160, "steps between evaluations and checkpoints")
    eval_batches: int = field(10, "validation batches per evaluation")
    save_interval: Optional[int] = field(None, "steps between checkpoints (default: eval interval)")
    log_interval: int = field(10, "steps between metric records")
    keep_last: int = field(2, "checkpoints to keep")
    precision: str = field("auto", "auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16",
                           choices=["auto", "fp32", "bf16", "fp16"])
    compile: bool = field(False, "torch.compile the model")
    device: str = field("auto", "auto, cpu, cuda, cuda:N")
    threads: Optional[int] = field(None, "CPU threads for torch (default: all cores)")
    seed: int = field(1337, "random seed (init and data order)")
    resume: bool = field(False, "continue from the newest checkpoint in --out-dir")
    overwrite: bool = field(False, "start over in an --out-dir that holds an earlier run")
    eval_text: Optional[str] = field(None, "also report bits per byte on this held-out text file")
    samples: int = field(3, "text samples printed at the end")
    sample_tokens: int = field(80, "tokens per sample")
    val_fraction: float = field(0.05, "share of the tokens held out for validation")
    debug: bool = field(False, "show tracebacks")


def train(args: TrainArgs) -> dict:
    """Library-level body of train.py (importable for tests and notebooks)."""
    import torch

    from minigpt import GPT, GPTConfig
    from minigpt.cli import CLIError
    from minigpt.data import TokenDataset, prepare_data
    from minigpt.evaluate import evaluate_bpb, evaluate_loss
    from minigpt.tokenizer import get_tokenizer
    from minigpt.trainer import Trainer, TrainConfig, claim_out_dir, resolve_device, resolve_precision

    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be a positive integer, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model and args.init_from:
        raise CLIError("use either --model (fresh weights) or --init-from (existing weights), not both")
    eval_text = None
    if args.eval_text:
        try:
            eval_text = open(args.eval_text, encoding="utf-8").read()
        except OSError as e:
            raise CLIError(f"--eval-text {args.eval_text}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise CLIError(f"--eval-text {args.eval_text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    cfg = TrainConfig(
        out_dir=args.out_dir, max_steps=args.max_steps, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        schedule=args.schedule, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, save_interval=args.save_interval, log_interval=args.log_interval, keep_last=args.keep_last,
        precision=args.precision, compile=args.compile, seed=args.seed, device=args.device)
    resolve_precision(cfg.precision, resolve_device(cfg.device))   # fail fast, before any work
    if args.init_from and Path(args.init_from).expanduser().resolve() == Path(args.out_dir).resolve():
        raise CLIError(f"--out-dir {args.out_dir} is the --init-from model's folder; training would "
                       "overwrite those weights: choose another --out-dir")
    claim_out_dir(args.out_dir, args.resume, args.overwrite)

    torch.manual_seed(args.seed)
    if args.init_from:
        model = GPT.from_pretrained(args.init_from)
        if args.block_size > model.config.block_size:
            raise CLIError(f"--block-size {args.block_size} exceeds the model's context "
                           f"({model.config.block_size})")
    else:
        mcfg = (GPTConfig.from_name(args.model, dropout=args.dropout) if args.model else
                GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block_size, dropout=args.dropout, name="minigpt-train"))
        model = GPT(mcfg)
    block = min(args.block_size, model.config.block_size)

    data_dir = prepare_data(args.data, f"{args.out_dir}/data", val_fraction=args.val_fraction)
    train_ds = TokenDataset(data_dir / "train.bin", block)
    val_ds = TokenDataset(data_dir / "val.bin", block)

    def get_batch(step, micro):
        return train_ds.batch(args.batch_size, args.seed, step, micro=micro)

    def evaluate(m):
        r = evaluate_loss(m, val_ds.sequential(args.batch_size, args.eval_batches), autocast=trainer.autocast())
        out = {"val_loss": r["loss"], "val_bpb": r["bpb"]}
        if eval_text is not None:
            out["eval_text_bpb"] = evaluate_bpb(m, eval_text, block_size=block, batch_size=args.batch_size)["bpb"]
        return out

    tok = get_tokenizer()

    def sample(m, n_tokens=None, seed=None) -> str:
        """A short sample from <|endoftext|>; its own generator keeps the global RNG untouched."""
        dev = next(m.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(args.seed if seed is None else seed)
        out = m.generate(torch.tensor([[tok.eot_token]], device=dev), max_new_tokens=min(n_tokens or 32, m.config.block_size - 1),
                         temperature=0.8, top_k=200, generator=gen)
        return tok.decode(out[0, 1:].tolist()).strip()

    def save(m, d):
        m.save_pretrained(d)

    def load(m, d):
        saved = GPT.from_pretrained(d)
        shape = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
        if [getattr(saved.config, k) for k in shape] != [getattr(m.config, k) for k in shape]:
            have = ", ".join(f"{k}={getattr(saved.config, k)}" for k in shape)
            want = ", ".join(f"{k}={getattr(m.config, k)}" for k in shape)
            raise CLIError(f"--resume: checkpoint {d} holds a model with {have} but this run builds "
                           f"{want}; resume with the original run's model flags")
        m.load_state_dict(saved.state_dict())

    n = model.num_params()
    trainer = Trainer(model, cfg, get_batch, evaluate, save, load,
                      sample=(lambda m: "sample: " + " / ".join(sample(m).splitlines()[:4])) if args.samples else None,
                      run_info={"kind": "pretrain", "data": args.data or "embedded:shakespeare",
                                "model": model.config.to_dict()})
    if trainer.is_main:
        print(f"model: {model.config.n_layer} layers x {model.config.n_embd} dims, {n / 1e6:.1f}M params | "
              f"data: {len(train_ds):,} train / {len(val_ds):,} val tokens | device {trainer.device} "
              f"{trainer.precision}")
    result = trainer.fit(resume=args.resume)
    if trainer.is_main:
        if args.samples:
            print("\nsamples:")
        for i in range(args.samples):
            print("-" * 40 + "\n" + sample(model, args.sample_tokens, seed=args.seed + i))
        print("-" * 40)
        print(f"saved model to {args.out_dir}  (load with GPT.from_pretrained({args.out_dir!r}) "
              f"or chat with: python chat.py --model {args.out_dir})")
    return result


def main(argv=None) -> int:
    args = parse_args(TrainArgs, argv, description=__doc__.splitlines()[0], prog="train.py")
    from minigpt.trainer import reuse_freed_memory
    reuse_freed_memory()   # large per-step tensors: keep freed memory instead of re-faulting it
    return run_main(lambda: (train(args), 0)[1], args.debug)


if __name__ == "__main__":
    sys.exit(main())
