"""Instruction-tune a GPT-2 model, with LoRA (--lora) or all weights, on the shared Trainer;
with no arguments (plus --lora), GPT-2 or your train.py model on the embedded instruction set.

examples:
  minigpt finetune --lora                                    # embedded instructions, defaults
  minigpt finetune --lora --base gpt2 --data my.jsonl --out-dir out-mine
  minigpt finetune --lora --lora-r 16 --lora-targets c_attn c_proj --merge
  minigpt finetune --base out --epochs 5 --lr 5e-5           # full fine-tuning
  minigpt finetune --lora --resume                           # continue an interrupted run exactly
  minigpt finetune --objective dpo --data prefs.jsonl --method lora --beta 0.1   # preference tuning (ipo, orpo)
  minigpt finetune --objective dpo --base out-finetune/merged   # the embedded pairs, after an SFT --merge run
  minigpt chat --model out-finetune                          # then talk to the result
(`python finetune.py ...` is the same command.)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.formats import parse_columns
from ..data.templates import DEFAULT_TEMPLATE, TEMPLATE_NAMES
from ..methods import table
from ..methods.adapter import NON_LINEARITIES, PLACEMENTS, AdapterConfig
from ..methods.ia3 import DEFAULTS as IA3_DEFAULTS
from ..methods.lora import DEFAULT_TARGETS as LORA_DEFAULTS
from ..methods.lora import LoRAConfig
from ..methods.prefix_tuning import PROMPT_INITS, PrefixConfig, PromptConfig
from ..methods.table import MERGEABLE, METHODS, NAMES, QUANTIZABLE, SMALL_BASE_PARAMS, TABLE
from ..model.quant import QUANT_MODES
from .args import CLIError, RunArgs, check, command_main, field
from .finetune_pairs import check_objective_flags

OBJECTIVE_NAMES = ("sft", "dpo", "ipo", "orpo")       # (minigpt.training.preference.OBJECTIVES + sft)

LORA_FLAGS = ("--lora-r", "--lora-alpha", "--lora-dropout")
# each method's own flags (a flag given to another method is an error), its default learning rates and
# whether it runs on a quantized base: minigpt.methods.table; the defaults in the help: the method configs


@dataclass
class FinetuneArgs(RunArgs):
    DEFAULTS = dict(out_dir=None, max_steps=None, batch_size=2, grad_accum=4, lr=None,
                    schedule="linear", weight_decay=0.0, eval_interval=50, eval_batches=None, seed=42)
    HELP = dict(data="instruction data: a file, folder or glob of JSON, JSONL, CSV, TSV or Parquet records "
                     "(Alpaca, messages, ShareGPT conversations, prompt/response, prompt/completion) or "
                     "'### Human:/### Assistant:' text (default: the embedded set); with --objective dpo, ipo or "
                     "orpo: preference pairs (default: the embedded pairs)",
                out_dir="where the adapter (or model), checkpoints and metrics go (default: out-finetune; "
                        "out-dpo, out-ipo, out-orpo with --objective)",
                max_steps="optimizer steps (default: from --epochs)",
                lr="peak learning rate (default: per method and base size, see minigpt.methods.table: "
                   f"lora {TABLE['lora'].lr:g} on GPT-2 124M+, {TABLE['lora'].small_base_lr:g} on a small base "
                   "such as train.py's)",
                eval_batches="validation batches per evaluation (default: all; 0 = no evaluation)",
                val_fraction="share held out for validation when the data has no 'split' field, in [0, 1)",
                samples="held-out prompts answered before and after training",
                warmup_steps="linear warmup steps (default: 5%% of the steps; or --warmup-ratio)")

    warmup_ratio: Optional[float] = field(None, "warmup as a share of the steps: ceil(X x steps), as "
                                                "transformers' warmup_ratio (0.03 of 500 steps: 15)")

    base: Optional[str] = field(None, "base model: any GPT.from_pretrained source (Hub name ORG/NAME, preset "
                                      "name, HF or minigpt folder, OpenAI checkpoint). Default: gpt2 when "
                                      "cached, else the latest train.py output (out/)")
    revision: Optional[str] = field(None, "Hub revision of a --base ORG/NAME: a branch, tag or "
                                          "commit sha (default: main)", metavar="REV")
    method: Optional[str] = field(None, "parameter-efficient method (base frozen); without it all weights are "
                                        "trained", choices=METHODS)
    lora: bool = field(False, "short for --method lora")
    lora_r: Optional[int] = field(None, f"LoRA/DoRA rank (default: {LoRAConfig.r})")
    lora_alpha: Optional[float] = field(None, "LoRA/DoRA alpha, update scaled by alpha / r "
                                              f"(default: {LoRAConfig.alpha:g})")
    lora_dropout: Optional[float] = field(None, f"dropout on the LoRA/DoRA input path (default: {LoRAConfig.dropout})")
    lora_targets: Optional[list[str]] = field(None, "modules to adapt: c_attn, c_proj, attn.c_proj, mlp.c_proj, "
                                                    "c_fc, lm_head, or q k v (slices of c_attn); GPT-Neo: q_proj, "
                                                    "k_proj, v_proj, out_proj, c_fc, c_proj, lm_head (default: "
                                                    f"{' '.join(LORA_DEFAULTS['gpt2'])}; GPT-Neo: "
                                                    f"{' '.join(LORA_DEFAULTS['gpt_neo'])})", metavar="NAME")
    rslora: Optional[bool] = field(None, "rank-stabilised LoRA/DoRA: scale by alpha / sqrt(r)")
    ia3_targets: Optional[list[str]] = field(None, "IA3: modules whose outputs (or, for --ia3-feedforward ones, "
                                                   "inputs) are rescaled (default: "
                                                   f"{' '.join(IA3_DEFAULTS['gpt2'][0])}; GPT-Neo: "
                                                   f"{' '.join(IA3_DEFAULTS['gpt_neo'][0])})", metavar="NAME")
    ia3_feedforward: Optional[list[str]] = field(None, "IA3: targets rescaled at their input "
                                                       f"(default: {' '.join(IA3_DEFAULTS['gpt2'][1])}; GPT-Neo: "
                                                       f"{' '.join(IA3_DEFAULTS['gpt_neo'][1])})", metavar="NAME")
    num_virtual_tokens: Optional[int] = field(None, "prefix/prompt tuning: virtual tokens "
                                                    f"(default: {PrefixConfig.num_virtual_tokens})")
    prefix_projection: Optional[bool] = field(None, "prefix tuning: reparameterise the prefixes through an MLP")
    encoder_hidden_size: Optional[int] = field(None, "prefix tuning: hidden width of that MLP (default: n_embd)")
    prompt_init: Optional[str] = field(None, "prompt tuning: initial virtual tokens, random or the embeddings of "
                                             f"--prompt-init-text (default: {PromptConfig.init})", choices=PROMPT_INITS)
    prompt_init_text: Optional[str] = field(None, "prompt tuning: the text for --prompt-init text")
    adapter_size: Optional[int] = field(None, f"bottleneck adapters: bottleneck width (default: {AdapterConfig.size})")
    adapter_placement: Optional[str] = field(None, "bottleneck adapters: houlsby (after attention and MLP) or "
                                                   f"pfeiffer (after the MLP) (default: {AdapterConfig.placement})",
                                             choices=tuple(PLACEMENTS))
    adapter_nonlinearity: Optional[str] = field(None, "bottleneck adapters: activation "
                                                      f"(default: {AdapterConfig.non_linearity})",
                                                choices=tuple(NON_LINEARITIES))
    template: str = field(DEFAULT_TEMPLATE, "prompt template (none: the prompt text as is, the response right "
                                            "after it)", choices=TEMPLATE_NAMES)
    columns: Optional[str] = field(None, "read other column names as the record fields, e.g. "
                                         "prompt=question,response=answer (fields: instruction, input, output, "
                                         "system, messages, conversations, prompt, response, completion, text)",
                                   metavar="FIELD=COLUMN,...")
    mask_prompt: bool = field(True, "train on responses only (--no-mask-prompt: on prompts too)")
    max_length: Optional[int] = field(None, "max tokens per example, longer ones are cut at the end "
                                            "(default: 256, or the base model's context if shorter)")
    pack: bool = field(False, "pack several examples into each row of --max-length tokens, attention and "
                              "positions kept per example (same loss, less padding); --batch-size counts rows")
    epochs: Optional[float] = field(None, "passes over the training data (default: 3; "
                                          "use either --epochs or --max-steps)")
    exact_match: int = field(16, "checkable validation records scored by exact match at each "
                                 "evaluation (greedy decoding; 0 = off)")
    quantize: Optional[str] = field(None, "QLoRA: load the base quantized and frozen, nf4 (4-bit NormalFloat, "
                                          "double-quantised) or int8; with any --method but dora",
                                    choices=QUANT_MODES)
    gradient_checkpointing: bool = field(False, "recompute activations in the backward pass (less memory)")
    merge: bool = field(False, "also write OUT_DIR/merged: the adapter merged into a plain GPT-2 model "
                               "(lora, dora, ia3)")
    objective: str = field("sft", "training objective: sft (supervised), or preference tuning on "
                                  "prompt/chosen/rejected pairs: dpo, ipo (DPO's squared-loss variant), orpo "
                                  "(SFT plus an odds-ratio term, no reference model)", choices=OBJECTIVE_NAMES)
    beta: Optional[float] = field(None, "dpo/ipo/orpo: beta, the strength of the reference (dpo: the reward "
                                        "scale; ipo: the margin is 1/(2 beta); orpo: the odds-ratio weight) "
                                        "(default: 0.1)")
    label_smoothing: Optional[float] = field(None, "dpo: the share of pairs taken to be mislabelled, in "
                                                   "[0, 0.5) (conservative DPO; default: 0)")
    ref_model: Optional[str] = field(None, "dpo/ipo: the reference model, any --base source (default: the base, "
                                           "with the adapter switched off, or a frozen copy of it)", metavar="SRC")
    precompute_ref_logps: bool = field(False, "dpo/ipo: compute the reference's log-probs of every pair once, "
                                              "before training, and keep no reference model (full fine-tuning "
                                              "without a frozen copy; trl's precompute_ref_log_probs)")

    def __post_init__(self) -> None:
        if self.out_dir is None:
            self.out_dir = "out-finetune" if self.objective == "sft" else f"out-{self.objective}"
        self._resolve_method()
        super().__post_init__()
        check(0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)", self.val_fraction)
        check(self.max_length is None or self.max_length >= 2, "max_length", "at least 2", self.max_length)
        check(self.exact_match >= 0, "exact_match", ">= 0", self.exact_match)
        check(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)", self.warmup_ratio)
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise CLIError("use either --warmup-steps or --warmup-ratio, not both")
        parse_columns(self.columns)
        check_objective_flags(self)
        if self.epochs is not None and self.max_steps is not None:
            raise CLIError("use either --epochs or --max-steps, not both")
        check(self.epochs is None or (self.epochs > 0 and self.epochs < float("inf")), "epochs", "> 0", self.epochs)
        if self.peft:
            cfg = self.peft_config()
            if self.merge and any(t.endswith("lm_head") for t in getattr(cfg, "targets", ())):
                raise CLIError("--merge cannot fold a LoRA on lm_head (it is tied to the input embeddings); "
                               "drop lm_head from --lora-targets or leave out --merge")

    def _resolve_method(self) -> None:
        """--lora = --method lora; every method flag belongs to the chosen method; --quantize and
        --merge only where the method allows them."""
        if self.lora:
            if self.method not in (None, "lora"):
                raise CLIError(f"--lora is short for --method lora; it cannot be combined with --method {self.method}")
            self.method = "lora"
        for flag in dict.fromkeys(f for m in TABLE.values() for f in m.flags):
            if getattr(self, flag) is not None and flag not in (TABLE[self.method].flags if self.method else ()):
                owners = ", ".join(m.name for m in TABLE.values() if flag in m.flags)
                given = f"--method {self.method}" if self.method else "a full fine-tune (no --method)"
                raise CLIError(f"--{flag.replace('_', '-')} applies to --method {owners}, not to {given}")
        if self.quantize and self.method not in QUANTIZABLE:
            why = (f"{NAMES[self.method]} on a quantized base is not supported" if self.method else
                   "a quantized base is frozen, so full fine-tuning would have nothing to train")
            raise CLIError(f"--quantize needs --method {', '.join(QUANTIZABLE)} (or --lora): {why}")
        if self.merge and self.method is not None and self.method not in MERGEABLE:
            raise CLIError(f"--merge: {NAMES[self.method]} cannot be merged into the weights (it adds "
                           f"{'virtual tokens' if self.method in ('prefix', 'prompt') else 'modules'}); "
                           "leave out --merge and load the adapter on its base")

    @property
    def peft(self) -> bool:
        """True for a parameter-efficient run (an adapter), False for full fine-tuning."""
        return self.method is not None

    def peft_config(self):
        """The chosen method's validated config object (None for full fine-tuning)."""
        if self.method in ("lora", "dora"):
            given = dict(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                         targets=tuple(self.lora_targets) if self.lora_targets else None)   # None: LoRAConfig's
            return LoRAConfig(**{k: v for k, v in given.items() if v is not None}, rslora=bool(self.rslora),
                              use_dora=self.method == "dora", flags=LORA_FLAGS)
        if self.method is None:
            return None
        from ..methods import method_config

        kw = {"ia3": dict(targets=self.ia3_targets, feedforward=self.ia3_feedforward),
              "prefix": dict(num_virtual_tokens=self.num_virtual_tokens, projection=self.prefix_projection,
                             encoder_hidden_size=self.encoder_hidden_size),
              "prompt": dict(num_virtual_tokens=self.num_virtual_tokens, init=self.prompt_init,
                             init_text=self.prompt_init_text),
              "adapter": dict(size=self.adapter_size, placement=self.adapter_placement,
                              non_linearity=self.adapter_nonlinearity)}[self.method]
        return method_config(self.method, **{k: (tuple(v) if isinstance(v, list) else v)
                                             for k, v in kw.items() if v is not None})


def default_lr(args: FinetuneArgs, model) -> tuple[float, str]:
    """(peak learning rate, why): --lr, else the method's default for the base's size."""
    if args.lr is not None:
        return args.lr, "--lr"
    n = model.num_params()
    small = n < SMALL_BASE_PARAMS
    lr = table.default_lr(args.method, n)
    return lr, (f"default for {args.method or 'full fine-tuning'} on a {'small' if small else 'GPT-2-sized'} base "
                f"({n / 1e6:.0f}M params {'<' if small else '>='} {SMALL_BASE_PARAMS // 1_000_000}M)")


def default_base() -> str:
    """gpt2 when its weights are cached, else the newest train.py output."""
    from ..training.runs import find_latest_run
    from ..weights.hub import is_preset_cached

    if is_preset_cached("gpt2"):
        return "gpt2"
    run = find_latest_run("pretrain")
    if run is not None:
        return str(run)
    raise CLIError("no base model: the gpt2 weights are not cached and no train.py output (out/) was "
                   "found; run `minigpt train` first, or pass --base (e.g. --base gpt2 when online)")


def _check_resume_method(args: FinetuneArgs) -> None:
    from ..training.runs import read_finetune_meta

    meta = read_finetune_meta(args.out_dir) if args.resume else None
    method = args.method or "full"
    if meta is not None and meta.get("method") != method:
        was = meta.get("method")
        how = "without --method" if was == "full" else f"with --method {was}"
        raise CLIError(f"--resume: {args.out_dir} holds a {was} fine-tune, not {method}; resume it {how}")


def answers(model, tok, template, records, max_new_tokens: int, device) -> list[str]:
    """Greedy answers to each record's last user turn (one left-padded batch of 16 at a time)."""
    import torch

    from ..inference.generate import generate

    prompts = [template.prompt_ids(r["messages"][:-1], tok, r.get("system")) for r in records]
    block = model.context_length                          # less any virtual tokens
    out: list[str] = []
    for s in range(0, len(prompts), 16):
        group = [p[-(block - 1):] for p in prompts[s:s + 16]]          # keep room for one token
        T = max(len(p) for p in group)
        idx = torch.full((len(group), T), tok.eot_token, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        for i, p in enumerate(group):
            idx[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        ids = generate(model, idx.to(device), max(1, min(max_new_tokens, block - T)), temperature=0.0,
                       eos_token_id=tok.eot_token, stop=list(template.stop_strings), tokenizer=tok,
                       attention_mask=mask.to(device))
        for row in ids[:, T:].tolist():
            text = tok.decode(row[:row.index(tok.eot_token)] if tok.eot_token in row else row)
            for stop in template.stop_strings:
                text = text.split(stop)[0]
            out.append(text.strip())
    return out


def _load_data(args: FinetuneArgs, tok, template, max_length: int):
    """(train records, val records, train examples, val examples, stats) of --data."""
    from ..data.instruct import tokenize_records
    from ..data.records import default_instructions_path, load_records, split_records

    data_path = Path(args.data) if args.data else default_instructions_path()
    records = load_records(data_path, columns=args.columns)
    train_recs, val_recs = split_records(records, args.val_fraction, seed=args.seed)
    if not train_recs:
        raise CLIError(f"{data_path}: no training records (all {len(records)} are in the validation split)")
    train_ex, tstats = tokenize_records(train_recs, tok, template, max_length, args.mask_prompt)
    val_ex, vstats = tokenize_records(val_recs, tok, template, max_length, args.mask_prompt)
    if not train_ex:
        raise CLIError(f"{data_path}: every training example's prompt is longer than --max-length {max_length}")
    stats = {k: tstats[k] + vstats[k] for k in ("truncated", "dropped")}
    return train_recs, val_recs, train_ex, val_ex, stats


def _datasets(args: FinetuneArgs, tok, template, max_length: int, model):
    """(train records, val records, train dataset, val dataset or None, stats) for the objective (a
    preference objective's: minigpt.commands.finetune_pairs)."""
    from ..data.instruct import InstructionDataset

    if args.objective == "sft":
        train_recs, val_recs, train_ex, val_ex, stats = _load_data(args, tok, template, max_length)
        train_ds = InstructionDataset(train_ex, args.batch_size, seed=args.seed, grad_accum=args.grad_accum,
                                      pack=max_length - 1 if args.pack else None)
        val_ds = InstructionDataset(val_ex, args.batch_size * 4) if val_ex else None
        return train_recs, val_recs, train_ds, val_ds, stats
    from .finetune_pairs import pair_datasets

    return pair_datasets(args, tok, template, max_length, share_prompt=model.config.arch == "gpt2")


def _weights_io(args: FinetuneArgs, base_id: str):
    from ..methods import load_adapter, save_adapter
    from ..model.gpt import GPT

    if args.peft:
        return ((lambda m, d: save_adapter(m, d, base_model_name_or_path=base_id)),
                (lambda m, d: load_adapter(m, d, method=args.method)))
    return (lambda m, d: m.save_pretrained(d)), (lambda m, d: m.load_state_dict(GPT.from_pretrained(d).state_dict()))


def _evaluator(args: FinetuneArgs, precision: str, tok, template, val_ds, val_recs, loss_module=None):
    """evaluate(model) -> metrics: masked loss/accuracy on the validation batches + exact match; with a
    preference loss module: its val_loss and val_rewards/... on the validation pairs."""
    from ..data.instruct import exact_match_accuracy
    from ..data.records import checkable_records
    from ..device import autocast
    from ..training.evaluate import evaluate_loss

    val_batches = list(val_ds.sequential(args.batch_size * 4, args.eval_batches)) if val_ds else []
    if loss_module is not None:
        def evaluate_pairs(m) -> dict:
            with autocast(precision, m.device):
                return loss_module.evaluate(val_batches)
        return evaluate_pairs
    checkable = checkable_records(val_recs)[:args.exact_match]

    def evaluate(m) -> dict:
        out = {}
        if val_batches:
            r = evaluate_loss(m, val_batches, autocast=autocast(precision, m.device))
            out.update(val_loss=r["loss"], val_acc=r["acc"])
        if checkable:
            longest = max(len(tok.encode_ordinary(r["messages"][-1]["content"])) for r in checkable)
            with autocast(precision, m.device):
                got = answers(m, tok, template, checkable, longest + 4, m.device)
            by_prompt = {template.prompt_text(r["messages"][:-1], r.get("system")): g for r, g in zip(checkable, got)}
            em = exact_match_accuracy(checkable, lambda p: by_prompt[p], template)
            out.update(exact_match=em["accuracy"], exact_match_n=em["total"])
        return out
    return evaluate


def _show(title: str, recs, answers_: list[str]) -> None:
    def one_line(text: str, width: int = 160) -> str:
        text = text.replace("\n", "\\n")
        return text if len(text) <= width else text[:width - 3] + "..."

    if not answers_:
        return
    print(f"\n{title}")
    for r, a in zip(recs, answers_):
        user = r["messages"][-2]
        q = user["content"] + (f"\n{user['input']}" if user.get("input") else "")
        print("-" * 60 + f"\n>>> {one_line(q)}\n[expected] {one_line(r['messages'][-1]['content'])}"
              f"\n[model]    {one_line(a)}")
    print("-" * 60)


def _write_meta(out_dir: Path, meta: dict) -> None:
    from ..fileio import atomic_write_json
    from ..training.runs import FINETUNE_META

    atomic_write_json(out_dir / FINETUNE_META, meta)


def _merge(model, out_dir: Path, meta: dict) -> None:
    """out_dir/merged: the adapter folded into the full-precision base. model=None (a QLoRA run): the
    base is loaded again unquantized and the saved adapter merged there (merging into 4-bit weights
    would change the model: the quantisation is not additive)."""
    from ..methods import merge_and_unload
    from ..training.runs import load_finetuned

    merged = merge_and_unload(model) if model is not None else load_finetuned(out_dir, merge=True)[0]
    merged.save_pretrained(out_dir / "merged")
    meta["merged"] = "merged"
    _write_meta(out_dir / "merged", {**meta, "method": "full", "merged": None, "merged_from": str(out_dir.resolve())})
    print(f"merged model written to {out_dir / 'merged'}")


def finetune(args: FinetuneArgs) -> dict:
    """The body of `minigpt finetune` (importable for tests and notebooks).

    Returns the Trainer's result ({"step", "best_val_loss", last evaluation metrics}) plus
    "out_dir", "samples" (before/after answers) and "model" (the trained model)."""
    import torch

    from ..data.templates import get_template
    from ..data.tokenizer import get_tokenizer
    from ..device import process_rank, resolve_device, resolve_precision
    from ..methods import count_parameters
    from ..training.config import TrainConfig, warmup_for
    from ..training.runs import RunInput, check_run_dir, claim_run_dir, resolve_base
    from ..training.trainer import Trainer
    from .finetune_pairs import precompute, preference_loss

    # every check first: flags, data, the run folder, the base model; nothing is deleted before
    precision = resolve_precision(args.precision, resolve_device(args.device))
    base_src = args.base or default_base()
    run = dict(resume=args.resume, overwrite=args.overwrite, main_process=process_rank() == 0,
               inputs=[RunInput("--base", base_src, model=True), RunInput("--data", args.data)])
    check_run_dir(args.out_dir, "finetune", **run)
    _check_resume_method(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, template = get_tokenizer(), get_template(args.template)
    peft_cfg = args.peft_config()
    model, max_length = _load_base(args, base_src, getattr(peft_cfg, "num_virtual_tokens", 0))
    if args.quantize and precision == "bf16":         # QLoRA in bf16: the rest of the base in bf16 too
        from ..model.quant import cast_unquantized
        cast_unquantized(model, torch.bfloat16)
    train_recs, val_recs, train_ds, val_ds, stats = _datasets(args, tok, template, max_length, model)
    max_steps = args.max_steps or train_ds.steps_for(args.epochs or 3.0)
    warmup = warmup_for(max_steps, args.warmup_steps, args.warmup_ratio)
    lr, lr_why = default_lr(args, model)
    cfg = TrainConfig.from_args(args, max_steps=max_steps, warmup_steps=warmup, lr=lr)
    claim_run_dir(args.out_dir, "finetune", **run)
    base_id = resolve_base(base_src)

    torch.manual_seed(args.seed)
    if peft_cfg is not None:
        peft_cfg.apply(model)
    model.gradient_checkpointing = args.gradient_checkpointing
    trainable, total = count_parameters(model)
    meta = _run_meta(args, base_id, template, max_length, peft_cfg, lr, lr_why)
    held = meta["frozen_base_dtype"] = _hold_base_in_bf16(args, model, precision, peft_cfg)
    loss_module = preference_loss(args, model)                       # None: SFT's
    precompute(args, model, train_ds, val_ds, precision)            # --precompute-ref-logps
    evaluate = _evaluator(args, precision, tok, template, val_ds, val_recs, loss_module) \
        if args.eval_batches != 0 else None
    save, load = _weights_io(args, base_id)
    trainer = Trainer(model, cfg, train_ds, evaluate, save, load, run_info={"kind": "finetune", "finetune": meta},
                      loss_module=loss_module)
    out_dir = Path(args.out_dir)
    sample_recs = (val_recs or train_recs)[:args.samples]
    if trainer.is_main:
        _write_meta(out_dir, meta)
        what = (f"{peft_cfg.describe()}{f' over a frozen {args.quantize} base' if args.quantize else ''}"
                f"{' (frozen matrices held in bf16)' if held else ''}" if peft_cfg is not None else "full fine-tuning")
        print(f"base: {base_src} ({model.config.n_layer} layers x {model.config.n_embd} dims) | {what}: "
              f"{trainable:,} of {total:,} params trainable ({trainable / total:.2%})")
        unit = stats.get("unit", "examples")
        source = stats.get("source") or args.data or "embedded instructions"
        print(f"data: {source}: {len(train_ds)} train / {len(val_ds or ())} val {unit} "
              f"(template {template.name}, max length {max_length}, {stats['truncated']} truncated, "
              f"{stats['dropped']} dropped{stats.get('note', '')}) | {max_steps} steps of {args.batch_size}x"
              f"{args.grad_accum} {'packed rows' if args.pack else unit} "
              f"(~{max_steps / train_ds.steps_for(1.0):.2g} epochs) | device {trainer.device} {trainer.precision}")
        print(f"learning rate {cfg.lr:g} ({meta['lr_choice']})")
    before = _answers(trainer, model, tok, template, sample_recs, args.sample_tokens)
    if trainer.is_main:
        _show("samples before fine-tuning:", sample_recs, before)
        meta["before"] = _before_metrics(args, model, evaluate, trainer)

    result = trainer.fit(resume=args.resume)
    if trainer.is_main:
        after = _answers(trainer, model, tok, template, sample_recs, args.sample_tokens)
        _show("samples after fine-tuning:", sample_recs, after)
        result = {**result, **_finish(args, model, template, sample_recs, before, after, meta)}
    return {**result, "model": model}


def _answers(trainer, model, tok, template, records, max_new_tokens: int) -> list[str]:
    """answers() on the main process, under the run's autocast (as the model trains; a base held in
    bf16 needs it)."""
    if not (trainer.is_main and records):
        return []
    with trainer.autocast():
        return answers(model, tok, template, records, max_new_tokens, trainer.device)


def _hold_base_in_bf16(args: FinetuneArgs, model, precision: str, peft_cfg) -> Optional[str]:
    """A parameter-efficient run in bf16 holds its frozen weight matrices in bf16: the values autocast
    would cast them to each step, without the casts and with half the memory (GPT-Neo 1.3B LoRA:
    1.55x the step speed of transformers + peft, 0.42x its peak RSS). Not for DoRA (its
    weight norm reads the base in fp32) nor quantized bases (their own storage); --merge then
    merges into the base loaded again in full precision."""
    if peft_cfg is None or args.quantize or precision != "bf16" or args.method == "dora":
        return None
    import torch

    from ..methods import hold_frozen_matrices
    return "bf16" if hold_frozen_matrices(model, torch.bfloat16) else None


def _run_meta(args: FinetuneArgs, base_id: str, template, max_length: int, peft_cfg, lr: float, lr_why: str) -> dict:
    """The run's finetune metadata (what load_finetuned, chat and serve read back)."""
    return {"kind": "finetune", "method": args.method or "full", "base": base_id, "template": template.name,
            "mask_prompt": args.mask_prompt, "max_length": max_length, "quantize": args.quantize,
            "lora": peft_cfg.to_dict() if args.method in ("lora", "dora") else None,
            "peft": peft_cfg.to_dict() if peft_cfg is not None else None,
            "data": str(args.data) if args.data else "embedded:instructions" if args.objective == "sft" else
            "embedded:preferences", "merged": None,
            "lr": lr, "lr_choice": lr_why, "base_revision": args.revision, "pack": args.pack,
            "objective": args.objective, "beta": (0.1 if args.beta is None else args.beta) if args.objective != "sft"
            else None, "label_smoothing": args.label_smoothing, "ref_model": args.ref_model,
            "precompute_ref_logps": args.precompute_ref_logps}


def _before_metrics(args: FinetuneArgs, model, evaluate, trainer) -> Optional[dict]:
    """The held-out metrics of the untouched base (a resumed run keeps those of its first start)."""
    from ..training.runs import read_finetune_meta

    if args.resume:
        return (read_finetune_meta(args.out_dir) or {}).get("before")
    if evaluate is None:
        return None
    with trainer.autocast():
        m = evaluate(model)
    print("before fine-tuning: " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
    return m


def _last_eval(out_dir: Path) -> dict:
    """The last evaluation the run recorded in metrics.jsonl ({} when none)."""
    import json

    from ..training.runs import METRICS_FILE

    last = {}
    try:
        for line in (out_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line) if line.strip() else {}
            last = rec if "val_loss" in rec else last
    except (OSError, ValueError):
        pass
    return last


def _load_base(args: FinetuneArgs, base_src: str, virtual: int = 0):
    """The base model and the example length (--max-length, checked against its context less the
    `virtual` tokens of prefix / prompt tuning)."""
    from ..model.gpt import GPT

    model = GPT.from_pretrained(base_src, quantize=args.quantize, revision=args.revision)
    block = model.config.block_size
    room = block - virtual
    if room < 2:
        raise CLIError(f"--num-virtual-tokens {virtual} leaves {max(room, 0)} of the base model's {block} context "
                       "tokens for the examples; use fewer virtual tokens")
    max_length = args.max_length if args.max_length is not None else min(256, room)
    if max_length > room:
        what = f" less {virtual} virtual tokens = {room}" if virtual else ""
        raise CLIError(f"--max-length {max_length} exceeds the base model's context ({block} tokens{what})")
    return model, max_length


def _finish(args: FinetuneArgs, model, template, sample_recs, before, after, meta: dict) -> dict:
    """After training (main process): samples.json, --merge, the metadata, the closing line."""
    from ..fileio import atomic_write_json

    out_dir = Path(args.out_dir)
    samples = [{"prompt": template.prompt_text(r["messages"][:-1], r.get("system")),
                "expected": r["messages"][-1]["content"], "before": b, "after": a}
               for r, b, a in zip(sample_recs, before, after)]
    atomic_write_json(out_dir / "samples.json", samples)
    if args.merge and args.peft:
        _merge(model if not (args.quantize or meta.get("frozen_base_dtype")) else None, out_dir, meta)
    elif args.merge:
        print(f"note: --merge only applies to --lora; {out_dir} already holds the full model")
    _write_meta(out_dir, meta)
    first, last = (meta.get("before") or {}).get("val_loss"), _last_eval(out_dir).get("val_loss")
    if args.objective != "sft":
        from .finetune_pairs import closing_line
        print(closing_line(meta.get("before"), _last_eval(out_dir)))
    elif first is not None and last is not None:
        em = [(x or {}).get("exact_match") for x in (meta.get("before"), _last_eval(out_dir))]
        print(f"held-out masked val loss {first:.4f} -> {last:.4f}"
              + (f" | exact match {em[0]:.1%} -> {em[1]:.1%}" if None not in em else ""))
    print(f"saved {'adapter' if args.peft else 'model'} to {out_dir}  (load with "
          f"minigpt.training.runs.load_finetuned({str(out_dir)!r}) or chat with: minigpt chat --model {out_dir})")
    return {"out_dir": str(out_dir), "samples": samples}


def main(argv=None) -> int:
    return command_main(FinetuneArgs, finetune, argv, __doc__, "minigpt finetune", training=True)


if __name__ == "__main__":
    sys.exit(main())
