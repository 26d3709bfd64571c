"""A parameter-efficient fine-tune in bf16 holds its frozen weight matrices in bf16
(methods.hold_frozen_matrices): the same training as casting fp32 weights under autocast each step,
bit for bit, with half the memory; --merge still merges into the full-precision base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minigpt import GPT, GPTConfig
from minigpt.commands import finetune as ft
from minigpt.commands.args import parse_args
from minigpt.methods import add_lora, hold_frozen_matrices, merge_and_unload

COMMON = ["--batch-size", "4", "--grad-accum", "1", "--max-length", "48", "--threads", "1", "--max-steps", "5",
          "--sample-tokens", "3", "--samples", "1", "--precision", "bf16", "--device", "cpu", "--eval-batches", "1",
          "--lr", "3e-3", "--lora-dropout", "0", "--log-interval", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    m.save_pretrained(d)
    return d


def _run(tmp: Path, base: Path, name: str, extra=(), held: bool = True, monkeypatch=None) -> tuple[dict, Path]:
    if not held:
        monkeypatch.setattr(ft, "_hold_base_in_bf16", lambda *a: False)
    out = tmp / name
    r = ft.finetune(parse_args(ft.FinetuneArgs, ["--base", str(base), "--out-dir", str(out), *COMMON, *extra]))
    if not held:
        monkeypatch.undo()
    return r, out


def _losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r.get("loss"), r.get("val_loss")) for r in rows]


def test_bf16_held_base_trains_bit_identically_and_merges_in_fp32(tmp_path, base, monkeypatch):
    held, out_h = _run(tmp_path, base, "held", ["--lora", "--merge"])
    cast, out_c = _run(tmp_path, base, "cast", ["--lora", "--merge"], held=False, monkeypatch=monkeypatch)
    frozen = [p for n, p in held["model"].named_parameters() if not p.requires_grad and p.dim() == 2]
    assert {p.dtype for n, p in held["model"].named_parameters() if "lora_" in n} == {torch.float32}
    assert "transformer.wte.weight" in dict(held["model"].named_parameters())
    assert held["model"].transformer.wte.weight.dtype == torch.float32          # embeddings / tied head stay
    assert sum(p.dtype == torch.bfloat16 for p in frozen) == len(frozen) - 2    # all but wte, wpe
    assert cast["model"].transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    assert _losses(out_h) == _losses(out_c) and len(_losses(out_h)) >= 5
    a, b = load_file(out_h / "adapter_model.safetensors"), load_file(out_c / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((out_h / "minigpt_finetune.json").read_text())
    assert meta["frozen_base_dtype"] == "bf16"
    # merged into the fp32 base loaded again: equal to merging the same adapter into the fp32 model
    mh, mc = GPT.from_pretrained(out_h / "merged"), merge_and_unload(cast["model"])
    sd_h, sd_c = mh.state_dict(), mc.state_dict()
    assert all(v.dtype == torch.float32 for v in sd_h.values())
    for k in sd_c:
        torch.testing.assert_close(sd_h[k], sd_c[k], rtol=0, atol=1e-6)


def test_dora_and_fp32_keep_fp32_bases(tmp_path, base):
    dora, _ = _run(tmp_path, base, "dora", ["--method", "dora"])
    assert dora["model"].transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    fp32, _ = _run(tmp_path, base, "fp32", ["--lora", "--precision", "fp32"])
    assert fp32["model"].transformer.h[0].mlp.c_fc.weight.dtype == torch.float32


def test_hold_frozen_matrices_same_logits_under_autocast():
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, arch="gpt_neo", window_size=8))
    add_lora(m, r=4, alpha=8, targets=("q_proj", "v_proj"))
    x = torch.randint(0, 50257, (2, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = m(x)
        assert hold_frozen_matrices(m, torch.bfloat16) == 2 * 6    # q k v out_proj c_fc c_proj per layer
        got = m(x)
    assert torch.equal(got, want)
