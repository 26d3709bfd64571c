"""A LoRA adapter trained by `finetune --objective dpo` generalises like trl's own: on a tiny GPT-2
(minigpt's save_pretrained folder, which transformers loads), trl's DPOTrainer + peft LoRA and minigpt
train with the same recipe (pairs, steps, learning rate and schedule, AdamW betas, grad clipping, beta,
r, alpha, targets, batch); both adapters are then loaded with peft onto the base in transformers and
scored on held-out pairs the same way.

The task: prompts "Q: <word> is a\\nA:" with one of 8 colour words as the chosen answer and one of 8
number words as the rejected one (the base is random: the words mean nothing to it). Held-out pairs
put those answers after 8 prompts never trained on, and in new pairings after the trained prompts, so
preferring them needs the preference learnt across prompts, not memorised pairs. Scores: the share of
held-out pairs whose chosen answer gets the higher summed log-prob (EOS included) under the adapted
model, and under the untrained base.

Tolerance: the two runs see the pairs in different orders (trl's shuffling vs minigpt's
length-grouped batches) from different random LoRA A matrices, so they are not the same trajectory;
loss and gradients on the same batch are equal to 1e-5 (test_preference.py). With 48 held-out pairs
we allow 6 pairs (0.125) between the two and require each adapter >= the base + 0.3.
"""
from __future__ import annotations

import json
from importlib import resources

import pytest
import tiny
import torch

from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

COLOURS = ["red", "blue", "green", "white", "black", "yellow", "pink", "brown", "grey", "orange", "purple", "gold"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve", "twenty"]
WORDS = ["apple", "sky", "grass", "snow", "coal", "sun", "night", "fire", "sea", "rose", "stone", "leaf", "cloud",
         "milk", "bread", "rain", "tree", "road", "door", "wall", "hat", "cup", "bird", "fish"]
RECIPE = dict(steps=16, lr=8e-3, beta=0.1, r=4, alpha=8, batch=4)


def _rows(words, colours, numbers, shift):
    return [{"prompt": f"Q: {w} is a\nA:", "chosen": " " + colours[(i * 5 + shift) % len(colours)],
             "rejected": " " + numbers[(i * 7 + shift) % len(numbers)]} for i, w in enumerate(words)]


def _hf_tokenizer(folder):
    """GPT-2's tokenizer for transformers, built offline from the BPE ranks minigpt ships."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = str(resources.files("minigpt").joinpath("assets/gpt2.tiktoken"))
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tok = TikTokenConverter(vocab_file=ranks, pattern=pattern, extra_special_tokens=["<|endoftext|>"]).converted()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                 unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    hf.save_pretrained(folder)
    return hf


def _train_trl(base, tok, train, out):
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = DPOConfig(output_dir=str(out), per_device_train_batch_size=RECIPE["batch"], max_steps=RECIPE["steps"],
                    learning_rate=RECIPE["lr"], beta=RECIPE["beta"], lr_scheduler_type="linear", warmup_steps=0,
                    weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, use_cpu=True,
                    report_to=[], save_strategy="no", logging_steps=1000, seed=0, dataloader_num_workers=0,
                    disable_tqdm=True, bf16=False, fp16=False)
    lora = LoraConfig(r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=0.0, target_modules=["c_attn"],
                      fan_in_fan_out=True, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(train),
                         processing_class=tok, peft_config=lora)
    trainer.train()
    trainer.model.save_pretrained(out)


def _train_minigpt(base, data, out):
    argv = ["--base", base, "--data", data, "--out-dir", out, "--objective", "dpo", "--method", "lora",
            "--lora-r", RECIPE["r"], "--lora-alpha", RECIPE["alpha"], "--lora-dropout", 0, "--lora-targets",
            "c_attn", "--template", "none", "--batch-size", RECIPE["batch"], "--grad-accum", 1, "--max-steps",
            RECIPE["steps"], "--lr", RECIPE["lr"], "--schedule", "linear", "--warmup-steps", 0, "--beta",
            RECIPE["beta"], "--val-fraction", 0, "--eval-batches", 0, "--samples", 0, "--exact-match", 0,
            "--precision", "fp32", "--device", "cpu", "--threads", 2, "--seed", 0]
    ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in argv]))


@torch.no_grad()
def _chosen_preferred(model, tok, pairs) -> float:
    """The share of pairs whose chosen answer (+ EOS) has the higher summed log-prob after the prompt."""
    def logp(prompt, answer):
        p, a = tok(prompt)["input_ids"], tok(answer)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + a])
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
        return float(logits.log_softmax(-1).gather(1, torch.tensor(a)[:, None]).sum())
    return sum(logp(r["prompt"], r["chosen"]) > logp(r["prompt"], r["rejected"]) for r in pairs) / len(pairs)


def test_minigpt_dpo_adapter_generalises_like_trls(tmp_path):
    from peft import PeftModel

    base = tmp_path / "base"
    tiny.gpt(block_size=64, std=0.2, seed=11).save_pretrained(base)
    tok = _hf_tokenizer(base)
    train = _rows(WORDS[:16], COLOURS[:8], NUMBERS[:8], 0) + _rows(WORDS[:16], COLOURS[:8], NUMBERS[:8], 3)
    held = [r for s in (1, 2, 5, 6) for r in _rows(WORDS[16:], COLOURS[:8], NUMBERS[:8], s)] + \
        _rows(WORDS[:16], COLOURS[:8], NUMBERS[:8], 1)
    assert len(held) == 48
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    _train_trl(base, tok, train, tmp_path / "trl")
    _train_minigpt(base, data, tmp_path / "ours")

    def load(adapter=None):
        m = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        return PeftModel.from_pretrained(m, adapter).eval() if adapter else m
    scores = {name: _chosen_preferred(load(a), tok, held) for name, a in
              (("base", None), ("trl", tmp_path / "trl"), ("minigpt", tmp_path / "ours"))}
    print(scores)
    assert abs(scores["minigpt"] - scores["trl"]) <= 0.125, scores
    assert min(scores["minigpt"], scores["trl"]) >= scores["base"] + 0.3, scores
