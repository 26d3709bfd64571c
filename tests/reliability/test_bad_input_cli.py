"""Bad command-line flags and over-long prompts give one clear line (or a one-line exception from
the library), never a traceback: unknown flags, impossible values (--lora-r 0, --lr nan, negative
--threads/--save-interval/--min-lr, an unknown --device, --block-size above the --init-from
model's context, --beta 0 or negative, ORPO given a reference flag), prompts longer than the
context; and --debug shows the traceback after all.

The rows run through bad_input.check_row (see tests/reliability/bad_input.py for what each row checks).
"""
from __future__ import annotations

import pytest
import torch
from bad_input import (
    Fx,
    Row,
    api,
    check_row,
    cli,
    shared_fx,
)

from minigpt import GPT
from minigpt.commands import chat as chat_cli
from minigpt.commands import finetune as ft
from minigpt.commands import train
from minigpt.errors import CheckpointError
from minigpt.inference.generate import generate


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fx:
    return shared_fx(tmp_path_factory)


def b_unknown_flag(t, fx, mp):
    return cli(ft, fx.ft("--lora-rank", "4", out=t / "o"))


def b_lora_r_zero(t, fx, mp):
    return cli(ft, fx.ft("--lora", "--lora-r", "0", out=t / "o"))


def b_lr_not_finite(t, fx, mp):
    return cli(train, fx.train("--lr", "nan", out=t / "o"))


def b_block_above_context(t, fx, mp):
    return cli(train, fx.train("--init-from", fx.base, "--block-size", "128", out=t / "o"), protect=[fx.base])


def b_threads_negative(t, fx, mp):
    return cli(train, fx.train("--threads", "-2", out=t / "o"))


def b_device_unknown(t, fx, mp):
    return cli(ft, fx.ft("--device", "tpu", out=t / "o"))


def b_save_interval_negative(t, fx, mp):
    return cli(train, fx.train("--save-interval", "-5", out=t / "o"))


def b_min_lr_negative(t, fx, mp):
    return cli(train, fx.train("--min-lr", "-0.0001", out=t / "o"))


def b_beta_zero(t, fx, mp):
    return cli(ft, fx.ft("--objective", "dpo", "--beta", "0", out=t / "o"))


def b_beta_negative(t, fx, mp):
    return cli(ft, fx.ft("--objective", "ipo", "--beta", "-0.5", out=t / "o"))


def b_orpo_ref_model(t, fx, mp):
    return cli(ft, fx.ft("--objective", "orpo", "--ref-model", fx.base, out=t / "o"), protect=[fx.base])


def b_orpo_precompute(t, fx, mp):
    return cli(ft, fx.ft("--objective", "orpo", "--precompute-ref-logps", out=t / "o"))


def b_generate_prompt_too_long(t, fx, mp):
    m = GPT.from_pretrained(fx.base)
    return api(lambda: generate(m, torch.zeros((1, 65), dtype=torch.long), 4))


def b_generate_no_room(t, fx, mp):
    m = GPT.from_pretrained(fx.base)
    return api(lambda: generate(m, torch.zeros((1, 60), dtype=torch.long), 10))


def b_chat_prompt_too_long(t, fx, mp):
    return cli(chat_cli, ["--model", fx.base, "--prompt", "word " * 400, "--temperature", "0",
                          "--max-new-tokens", "8"], protect=[fx.base])


ROWS = [
    # --- flags and impossible values ---
    Row("unknown-flag", b_unknown_flag, "unrecognized arguments: --lora-rank", rc=2,
        remedy="see --help for the flag names (here: --lora-r)"),
    Row("lora-r-zero", b_lora_r_zero, "--lora-r must be a positive integer", rc=2,
        remedy="use --lora-r 4, 8 or 16"),
    Row("lr-not-finite", b_lr_not_finite, "--lr must be a finite number", rc=2,
        remedy="pass a positive finite --lr"),
    Row("block-size-above-context", b_block_above_context, "exceeds the --init-from model's context (64)",
        remedy="--block-size must be at most the --init-from model's context"),
    Row("threads-negative", b_threads_negative, "--threads must be a positive integer", rc=2,
        remedy="pass --threads N with N >= 1 (or leave it out)"),
    Row("device-unknown", b_device_unknown, "unknown --device 'tpu'",
        remedy="use auto, cpu, cuda or cuda:N"),
    Row("save-interval-negative", b_save_interval_negative, "--save-interval must be >= 0", rc=2,
        remedy="pass a positive --save-interval (or leave it out: the eval interval)"),
    Row("min-lr-negative", b_min_lr_negative, "--min-lr must be >= 0", rc=2, remedy="--min-lr must be >= 0"),
    # --- context length ---
    Row("beta-zero", b_beta_zero, "--beta must be > 0, got 0.0", rc=2, remedy="--beta must be > 0 (default 0.1)"),
    Row("beta-negative", b_beta_negative, "--beta must be > 0, got -0.5", rc=2,
        remedy="--beta must be > 0 (default 0.1)"),
    Row("orpo-with-ref-model", b_orpo_ref_model, "--ref-model: ORPO needs no reference model", rc=2,
        remedy="leave it out, or use --objective dpo"),
    Row("orpo-with-precompute-ref-logps", b_orpo_precompute, "--precompute-ref-logps: ORPO needs no reference model",
        rc=2, remedy="leave it out, or use --objective dpo"),
    Row("generate-prompt-too-long", b_generate_prompt_too_long, "longer than the model's context",
        exc=ValueError, remedy="truncate the prompt to the model's context (block_size)"),
    Row("generate-no-room-for-new-tokens", b_generate_no_room, "lower max_new_tokens", exc=ValueError,
        remedy="shorten the prompt or lower max_new_tokens"),
    Row("chat-prompt-too-long", b_chat_prompt_too_long, "kept its last", rc=0,
        remedy="nothing: chat keeps the end of the message and says so"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, fx: Fx, tmp_path, monkeypatch, capsys):
    check_row(row, fx, tmp_path, monkeypatch, capsys)


def test_debug_flag_shows_the_traceback(fx, tmp_path):
    """--debug re-raises instead of printing one line (the escape hatch the messages mention)."""
    with pytest.raises(CheckpointError):
        chat_cli.main(["--model", str(tmp_path / "missing"), "--prompt", "hi", "--debug"])
