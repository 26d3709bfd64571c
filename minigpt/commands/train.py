"""Pretrain a GPT-2 model; with no arguments, a small model on the embedded Shakespeare corpus.

The no-argument run trains for a time budget (--time-budget, default 5m): after a few measured
warm-up steps it fixes its step count, and so its learning-rate schedule, to end within the budget
with its evaluations, samples and saving; if the pace falls behind later in the run, it chooses
once more, fewer steps, the schedule stretched to end there. The decision is recorded in run.json
("budget") and in the checkpoints: --resume continues with the same step count, and --max-steps N (the steps
chosen) with the same other flags trains the same model. --max-steps trains a fixed step count.

examples:
  minigpt train                                   # quickstart: 5 minutes
  minigpt train --time-budget 20m                 # a longer budget, a longer schedule
  minigpt train --max-steps 320                   # a fixed step count (no budget)
  minigpt train --data my.txt --out-dir out-my    # your own text (file, folder of .txt, or .bin)
  minigpt train --model gpt2 --max-steps 20000 --precision bf16   # GPT-2 124M shape, on a GPU
  minigpt train --init-from gpt2 --data my.txt    # continue pretraining from weights
  minigpt train --resume                          # continue an interrupted run exactly
  torchrun --nproc_per_node 4 train.py --model gpt2 --max-steps 20000   # data parallel
(`python train.py ...` is the same command.)
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..training.budget import parse_duration
from ..training.config import TrainConfig
from .args import CLIError, RunArgs, check, command_main, field

DEFAULT_BUDGET = "5m"          # the run's wall time when --max-steps is not given
FIXED_EVAL_INTERVAL = 160      # with --max-steps; with a budget: BUDGET_EVALUATIONS over the chosen steps
BUDGET_EVALUATIONS = 2         # mid-run and at the end
BUDGET_MARGIN = 0.05           # plan to end at 95% of the budget; re-plan once if the pace would end it
                               # past 100% or before 90% (TimeBudget: 1 - 2 margin), i.e. within -10%


@dataclass
class TrainArgs(RunArgs):
    DEFAULTS = dict(max_steps=None, lr=2e-3, warmup_steps=20, eval_interval=None, seed=1337, val_fraction=0.05,
                    sample_tokens=80, optimizer="muon", schedule="linear")   # linear decay to 0: see README
    HELP = dict(data="text file, folder of .txt files, or uint16 .bin of token ids (default: the embedded "
                     "Shakespeare corpus)",
                out_dir="where checkpoints, metrics and the final model go",
                min_lr="final learning rate (default: lr / 10 for cosine, 0 for linear)",
                max_steps="optimizer steps: a fixed count instead of a time budget",
                eval_interval=f"steps between evaluations (default: {FIXED_EVAL_INTERVAL} with --max-steps; with a "
                              f"time budget, the chosen steps / {BUDGET_EVALUATIONS})",
                warmup_steps="linear warmup steps",
                val_fraction="share of the tokens held out for validation, in (0, 0.5)")

    model: Optional[str] = field(None, "preset shape to train from scratch (gpt2, gpt2-medium, ...)")
    init_from: Optional[str] = field(None, "continue pretraining from any GPT.from_pretrained source")
    n_layer: int = field(4, "layers (ignored with --model/--init-from)")
    n_head: int = field(2, "attention heads (ignored with --model/--init-from)")
    n_embd: int = field(128, "embedding width (ignored with --model/--init-from)")
    block_size: int = field(128, "context length in tokens")
    dropout: float = field(0.0, "dropout probability")
    eval_text: Optional[str] = field(None, "also report bits per byte on this held-out text file")
    head: str = field("auto", "auto: with fresh weights and a corpus that uses under 80%% of the vocabulary, "
                              "tie the rows of the tokens it never uses and run the head over the used ones "
                              "(the full head's loss and gradients, fewer FLOPs); full: the whole head",
                      choices=("auto", "full"))
    spelling: str = field("auto", "auto: with fresh weights, train the embedding with spelling-shared updates (a "
                                  "token's update also moves the tokens that share its character n-grams; the "
                                  "saved model is a plain GPT-2); off: plain embedding updates",
                          choices=("auto", "off"))
    time_budget: Optional[str] = field(None, "wall time for the whole run, e.g. 5m, 300s, 1.5m, 1h: the step count "
                                             "is fixed after a few measured steps to end within it (default: "
                                             f"{DEFAULT_BUDGET} unless --max-steps is given)", metavar="DURATION")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.val_fraction < 0.5, "val_fraction", "in (0, 0.5)", self.val_fraction)
        if self.model and self.init_from:
            raise CLIError("use either --model (fresh weights) or --init-from (existing weights), not both")
        if self.max_steps is not None and self.time_budget is not None:
            raise CLIError("use either --max-steps (a fixed step count) or --time-budget (the steps that fit "
                           "the time), not both")
        if self.time_budget is not None:
            try:
                parse_duration(self.time_budget)
            except ValueError:
                raise CLIError(f"--time-budget must be a duration such as 5m, 300s, 1.5m or 1h, got "
                               f"{self.time_budget!r}") from None

    def budget_seconds(self) -> Optional[float]:
        """The run's time budget in seconds; None with --max-steps."""
        return None if self.max_steps is not None else parse_duration(self.time_budget or DEFAULT_BUDGET)

    def model_config(self):
        """The GPTConfig of a fresh model (validated); None with --init-from."""
        from ..model.config import GPTConfig

        if self.init_from:
            return None
        if self.model:
            return GPTConfig.from_name(self.model, dropout=self.dropout)
        try:
            return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                             block_size=self.block_size, dropout=self.dropout, name="minigpt-train")
        except ValueError as e:                    # name the flag, not the config field
            raise CLIError(str(e).replace("GPTConfig.", "--").replace("_", "-")) from None


def _read_eval_text(path: Optional[str]) -> Optional[str]:
    from ..data.corpus import check_data_source

    if path is None:
        return None
    check_data_source(path, "--eval-text")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"--eval-text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _load_model(args: TrainArgs, mcfg):
    from ..model.gpt import GPT

    if mcfg is not None:
        return GPT(mcfg)
    model = GPT.from_pretrained(args.init_from)
    if args.block_size > model.config.block_size:
        raise CLIError(f"--block-size {args.block_size} exceeds the --init-from model's context "
                       f"({model.config.block_size})")
    return model


def _sampler(tok, seed: int):
    import torch

    def sample(m, n_tokens: int = 32, seed: int = seed) -> str:
        """A short sample from <|endoftext|>; its own generator keeps the global RNG untouched."""
        dev = next(m.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(seed)
        out = m.generate(torch.tensor([[tok.eot_token]], device=dev), min(n_tokens, m.config.block_size - 1),
                         temperature=0.8, top_k=200, generator=gen)
        return tok.decode(out[0, 1:].tolist()).strip()
    return sample


def _weights_io(model, vocab, filled):
    """save / load for the Trainer: saved models have their unseen rows filled (`filled`), a
    resumed run ties them again (`vocab`)."""
    from ..model.gpt import GPT

    def save(m, d):
        with filled():
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
        if vocab is not None:
            vocab.tie(m.lm_head.weight)         # (rows filled from their spelling when saved)
    return save, load


def _seen_vocab(args: TrainArgs, model, train_ds):
    """The seen-rows head (minigpt.training.loss.SeenVocab) for fresh weights, their unseen rows tied; None
    for --head full, --init-from weights (their rows differ) or a corpus using most tokens."""
    from ..training.loss import SeenVocab

    if args.head == "full" or args.init_from:
        return None
    vocab = SeenVocab.of_tokens(train_ds.tokens, model.config.vocab_size)
    if vocab is not None:
        vocab.tie(model.lm_head.weight)    # (a resumed run loads its own, equally tied, weights next)
    return vocab


def _spelling(args: TrainArgs, model, vocab):
    """Spelling-shared embedding updates (minigpt.training.spelling) for fresh weights, on the rows
    the head trains (the seen tokens; the tied unseen rows stay tied); None for --spelling off or
    --init-from weights."""
    from ..training.spelling import Spelling

    if args.spelling == "off" or args.init_from:
        return None
    return Spelling(model.lm_head.weight, rows=vocab.seen if vocab is not None else None)


def _unseen_filler(vocab, spelling):
    """A context factory: the unseen rows filled from their spelling while it runs (Spelling.filled:
    saves and held-out evaluations); a no-op without a seen-rows head or spelling."""
    if vocab is None or spelling is None:
        return contextlib.nullcontext
    return lambda: spelling.filled(vocab)


def _run_info(args: TrainArgs, model, vocab, spelling) -> dict:
    """What run.json records of the run beside the Trainer's own: data, model, seed, head, spelling."""
    return {"kind": "pretrain", "data": args.data or "embedded:shakespeare", "model": model.config.to_dict(),
            "seed": args.seed, "head": {"rows": len(vocab) + 1, "tied": vocab.unseen.numel()} if vocab else "full",
            "spelling": {"buckets": spelling.buckets, "rows": spelling.rows.numel()} if spelling else "off"}


def _eval_batch_count(args: TrainArgs, val_tokens: int, block: int, eval_text: Optional[str], tok) -> int:
    """Batches of one evaluation: the validation batches, and the --eval-text windows."""
    if not args.eval_batches:
        return 0
    rows = min((val_tokens - 1) // block, args.eval_batches * args.batch_size)
    n = -(-rows // args.batch_size)
    if eval_text is not None:
        n += -(-(len(tok.encode_ordinary(eval_text)) // block + 1) // args.batch_size)
    return n


def _time_budget(args: TrainArgs, start: float, eval_batch_s, eval_batches: int, sample):
    """The run's TimeBudget (None with --max-steps): `eval_batch_s(model)` times one evaluation
    batch, of which an evaluation runs `eval_batches`; `sample(model, n_tokens)` is the final samples'
    generator (one is timed)."""
    import time

    from ..training.budget import TimeBudget

    seconds = args.budget_seconds()
    if seconds is None:
        return None

    def final_cost(model) -> float:
        if not args.samples:
            return 0.0
        t = time.perf_counter()
        sample(model, args.sample_tokens)
        return (time.perf_counter() - t) * args.samples

    return TimeBudget(seconds, args.time_budget or DEFAULT_BUDGET, margin=BUDGET_MARGIN, start=start,
                      evaluations=None if args.eval_interval is not None else BUDGET_EVALUATIONS,
                      eval_cost=lambda m: eval_batch_s(m) * eval_batches, final_cost=final_cost)


def _banner(args: TrainArgs, model, trainer, n_train: int, n_val: int, vocab, budget) -> str:
    """The run's first line: model, data, device, optimizer, head and budget."""
    optimizer = "Muon (hidden matrices) + AdamW" if args.optimizer == "muon" else "AdamW"
    return (f"model: {model.config.n_layer} layers x {model.config.n_embd} dims, {model.num_params() / 1e6:.1f}M "
            f"params | data: {n_train:,} train / {n_val:,} val tokens | device {trainer.device} {trainer.precision}"
            f" | {optimizer}"
            + (" | spelling-shared embedding updates" if trainer.spelling else "")
            + (f" | head: the {len(vocab):,} tokens the corpus uses (+1 row for the {vocab.unseen.numel():,} tied)"
               if vocab else "")
            + ("" if args.eval_batches else " | no evaluation (--eval-batches 0)")
            + (f" | time budget {budget.label}" if budget else f" | {args.max_steps:,} steps"))


def train(args: TrainArgs) -> dict:
    """The body of `minigpt train` (importable for tests and notebooks): returns the Trainer's result."""
    import time

    import torch

    from ..data.corpus import TokenDataset, check_data_source, prepare_data
    from ..data.tokenizer import get_tokenizer
    from ..device import process_rank, resolve_device, resolve_precision
    from ..training.evaluate import evaluate_bpb, evaluate_loss
    from ..training.loss import CausalLMLoss
    from ..training.runs import RunInput, check_run_dir, claim_run_dir
    from ..training.trainer import Trainer

    start = time.perf_counter()           # a time budget counts from here
    # every check first: flags, inputs, the run folder; nothing is written or deleted before
    mcfg = args.model_config()
    cfg = TrainConfig.from_args(args, max_steps=args.max_steps or 1,       # (with a budget: decided later)
                                eval_interval=args.eval_interval or FIXED_EVAL_INTERVAL)
    resolve_precision(cfg.precision, resolve_device(cfg.device))
    check_data_source(args.data)
    eval_text = _read_eval_text(args.eval_text)
    inputs = [RunInput("--init-from", args.init_from, model=True), RunInput("--data", args.data),
              RunInput("--eval-text", args.eval_text)]
    run = dict(resume=args.resume, overwrite=args.overwrite, main_process=process_rank() == 0, inputs=inputs)
    check_run_dir(args.out_dir, "pretrain", **run)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = _load_model(args, mcfg)
    block = min(args.block_size, model.config.block_size)
    claim_run_dir(args.out_dir, "pretrain", **run)

    data_dir = prepare_data(args.data, f"{args.out_dir}/data", val_fraction=args.val_fraction)
    train_ds = TokenDataset(data_dir / "train.bin", block, args.batch_size, args.seed, args.grad_accum)
    val_ds = TokenDataset(data_dir / "val.bin", block)

    def evaluate(m):
        r = evaluate_loss(m, val_ds.sequential(args.batch_size, args.eval_batches), autocast=trainer.autocast(),
                          loss_fn=trainer.loss_module)         # the training head: chunked, no logits
        out = {"val_loss": r["loss"], "val_bpb": r["bpb"]}
        if eval_text is not None:
            with filled():                                     # as saved: unseen rows from their spelling
                out["eval_text_bpb"] = evaluate_bpb(m, eval_text, block_size=block, batch_size=args.batch_size)["bpb"]
        return out

    def eval_batch_s(m) -> float:     # one evaluation batch, timed warm (for the time budget's plan)
        times = []
        for _ in range(2):
            t = time.perf_counter()
            evaluate_loss(m, val_ds.sequential(args.batch_size, 1), autocast=trainer.autocast(),
                          loss_fn=trainer.loss_module)
            times.append(time.perf_counter() - t)
        return min(times)

    vocab = _seen_vocab(args, model, train_ds)
    spelling = _spelling(args, model, vocab)
    tok = get_tokenizer()
    sample = _sampler(tok, args.seed)
    filled = _unseen_filler(vocab, spelling)
    save, load = _weights_io(model, vocab, filled)
    budget = _time_budget(args, start, eval_batch_s, _eval_batch_count(args, len(val_ds), block, eval_text, tok),
                          sample)
    trainer = Trainer(model, cfg, train_ds, evaluate if args.eval_batches else None, save, load,
                      sample=(lambda m: "sample: " + " / ".join(sample(m).splitlines()[:4])) if args.samples else None,
                      run_info=_run_info(args, model, vocab, spelling), budget=budget, spelling=spelling,
                      loss_module=CausalLMLoss(model, vocab=vocab) if vocab else None)
    if trainer.is_main:
        print(_banner(args, model, trainer, len(train_ds), len(val_ds), vocab, budget))
    result = trainer.fit(resume=args.resume)
    if vocab is not None and spelling is not None:
        spelling.fill(vocab)                   # the model in memory as saved (samples, notebooks)
    if trainer.is_main:
        _report(args, model, sample, budget, result)
    return result


def _report(args: TrainArgs, model, sample, budget, result: dict) -> None:
    """The run's last lines: samples from the final model, where it is, and the budget's summary."""
    if args.samples:
        print("\nsamples:")
    for i in range(args.samples):
        print("-" * 40 + "\n" + sample(model, args.sample_tokens, seed=args.seed + i))
    print("-" * 40)
    print(f"saved model to {args.out_dir}  (load with GPT.from_pretrained({args.out_dir!r}) "
          f"or chat with: minigpt chat --model {args.out_dir})")
    if budget is not None:
        print(budget.summary(result["step"]))


def main(argv=None) -> int:
    return command_main(TrainArgs, train, argv, __doc__, "minigpt train", training=True)


if __name__ == "__main__":
    sys.exit(main())
