"""What `minigpt finetune --objective dpo|ipo|orpo` adds to instruction tuning: the preference pairs
(--data, or the embedded set built from the embedded instructions), the objective's loss module with
its reference, and the reference log-probs computed once before training (--precompute-ref-logps)."""
from __future__ import annotations

from pathlib import Path

from .args import CLIError, check

EMBEDDED = "embedded preferences"


def check_objective_flags(args) -> None:
    """--beta, --label-smoothing, --ref-model, --precompute-ref-logps: only with the objectives that use
    them (ORPO has no reference); --pack only with SFT."""
    pref = args.objective != "sft"
    for flag in ("beta", "label_smoothing", "ref_model", "precompute_ref_logps"):
        if getattr(args, flag) not in (None, False) and not pref:
            raise CLIError(f"--{flag.replace('_', '-')} applies to --objective dpo, ipo or orpo, not to sft")
    check(args.beta is None or 0 < args.beta < float("inf"), "beta", "> 0", args.beta)
    check(args.label_smoothing is None or 0 <= args.label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)",
          args.label_smoothing)
    if args.label_smoothing and args.objective != "dpo":
        raise CLIError(f"--label-smoothing applies to --objective dpo, not to {args.objective}")
    for flag in ("ref_model", "precompute_ref_logps"):
        if getattr(args, flag) not in (None, False) and args.objective == "orpo":
            raise CLIError(f"--{flag.replace('_', '-')}: ORPO needs no reference model (it trains against the odds "
                           "of the rejected answer); leave it out, or use --objective dpo")
    if pref and args.pack:
        raise CLIError(f"--pack applies to --objective sft; {args.objective} batches pairs of whole sequences")


def pair_datasets(args, tok, template, max_length: int, share_prompt: bool = False):
    """(train records, val records, train dataset, val dataset or None, stats) of the preference data.
    The records are SFT-shaped views of the pairs (the chosen answer as the response: what the
    before/after samples show). share_prompt: one row per pair, the prompt computed once (GPT-2)."""
    from ..data.preferences import PreferenceDataset, default_preferences_path, load_preferences, tokenize_pairs
    from ..data.records import split_records

    path = Path(args.data) if args.data else default_preferences_path()
    pairs, counts = load_preferences(path, columns=args.columns)
    train_p, val_p = split_records(pairs, args.val_fraction, seed=args.seed)
    train_ex, tstats = tokenize_pairs(train_p, tok, template, max_length)
    val_ex, vstats = tokenize_pairs(val_p, tok, template, max_length)
    if not train_ex:
        raise CLIError(f"{path}: no training pairs (after {counts['ties']} ties, {counts['identical']} with "
                       f"chosen = rejected and {tstats['dropped']} prompts longer than --max-length were left out)")
    stats = {k: tstats[k] + vstats[k] for k in ("truncated", "dropped")}
    stats.update(unit="pairs", source=args.data or EMBEDDED,
                 note=f", {counts['ties']} Arena ties dropped, {counts['identical']} with chosen = rejected skipped")

    def view(p):
        return {**p, "messages": [*p["messages"], {"role": "assistant", "content": p["chosen"]}]}
    return ([view(p) for p in train_p], [view(p) for p in val_p],
            PreferenceDataset(train_ex, args.batch_size, seed=args.seed, grad_accum=args.grad_accum,
                              share_prompt=share_prompt),
            PreferenceDataset(val_ex, args.batch_size * 4, share_prompt=share_prompt) if val_ex else None, stats)


def _reference_model(args):
    from ..model.gpt import GPT

    return GPT.from_pretrained(args.ref_model, quantize=args.quantize)


def preference_loss(args, model):
    """The objective's loss module (None for SFT): the reference is --ref-model, else the base with the
    adapter switched off (a parameter-efficient run) or a frozen copy of the model (full fine-tuning);
    with --precompute-ref-logps none is kept (precompute() fills the datasets first)."""
    if args.objective == "sft":
        return None
    import copy

    from ..training.preference import PreferenceLoss

    ref = None
    if args.objective != "orpo":
        ref = "precomputed" if args.precompute_ref_logps else _reference_model(args) if args.ref_model else \
            "adapters" if args.peft else copy.deepcopy(model)
    return PreferenceLoss(model, args.objective, 0.1 if args.beta is None else args.beta,
                          label_smoothing=args.label_smoothing or 0.0, reference=ref)


def precompute(args, model, train_ds, val_ds, precision: str) -> None:
    """--precompute-ref-logps: each dataset's ref_logps from --ref-model (loaded, then dropped), else from
    `model` before training (its adapter switched off: the base), on the run's device and precision."""
    if not args.precompute_ref_logps:
        return
    import os

    import torch

    from ..device import autocast, resolve_device
    from ..training.preference import precompute_ref_logps

    device = resolve_device(args.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    ref = _reference_model(args).to(device) if args.ref_model else model.to(device)
    with autocast(precision, device):
        for name, ds in (("train", train_ds), ("val", val_ds)):
            if ds is not None:
                ds.ref_logps = precompute_ref_logps(ref, ds.examples, batch_size=args.batch_size * 4,
                                                    adapters_off=not args.ref_model and args.peft,
                                                    progress=f"reference log-probs ({name})",
                                                    share_prompt=ds.share_prompt)


def closing_line(before, after) -> str:
    """The held-out pairs before and after training: the loss, logps/accuracies (the share of pairs whose
    chosen answer the model gives the higher log-prob) and, after, rewards/accuracies (the share whose
    implicit reward, the log-prob ratio to the reference, prefers the chosen answer)."""
    before, after = before or {}, after or {}
    if "val_loss" not in after:
        return "no held-out pairs were evaluated"
    parts = [f"held-out pairs: {'val_loss'} {before.get('val_loss', float('nan')):.4f} -> {after['val_loss']:.4f}"]
    if "val_logps/accuracies" in after:
        parts.append(f"chosen preferred by log-prob {before.get('val_logps/accuracies', float('nan')):.1%} -> "
                     f"{after['val_logps/accuracies']:.1%}")
    parts.append(f"reward accuracy {after['val_rewards/accuracies']:.1%} (margin "
                 f"{after['val_rewards/margins']:.3f})")
    return " | ".join(parts)
