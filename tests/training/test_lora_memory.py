"""What a LoRA step holds in memory: the loaded base owns its weights (no file mapping kept resident
next to converted copies), and a frozen head's loss runs in fewer rows at a time with the same bits."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tiny
import torch
import torch.nn.functional as F

import minigpt.training.loss as loss_mod
from minigpt import GPT
from minigpt.training.loss import fused_lm_loss


def _file_ranges(name: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of files called `name` (/proc/self/maps)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[-1].endswith(name):
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_gpt2_keeps_no_view_of_its_weights_file(tmp_path):
    """GPT-2 files hold Conv1D (in, out) weights that loading transposes into copies; the tensors
    that need no conversion are copied too, so the file's mapping is not kept alive by them (its
    pages would stay resident beside the copies)."""
    src = tiny.gpt(std=0.2, vocab_size=301)
    src.save_pretrained(tmp_path)
    m = GPT.from_pretrained(tmp_path)
    ranges = _file_ranges("model.safetensors")
    ptrs = {n: p.untyped_storage().data_ptr() for n, p in m.named_parameters()}
    mapped = [n for n, a in ptrs.items() if any(lo <= a < hi for lo, hi in ranges)]
    assert not mapped, mapped
    assert len(set(ptrs.values())) == len(ptrs)                    # one storage each (the tie is one name)
    for (n, a), b in zip(m.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_frozen_head_loss_same_bits_in_fewer_rows(monkeypatch, precision):
    """A head without weight gradient (LoRA) runs 128 rows at a time here instead of 1024: the loss
    is bit-identical (summed over the same rows at a time), the hidden states' gradient equal up to
    the matmul kernel's rounding (row for row the same products; a 2-row remainder chunk may take
    another kernel), and both equal to cross-entropy on full logits."""
    torch.manual_seed(0)
    N, C, V = 600, 16, 2000
    h = torch.randn(1, N, C) * 2
    w = torch.randn(V, C)
    y = torch.randint(0, V, (1, N))
    y[0, ::7] = -100                                                 # ignored rows (masked prompts)
    monkeypatch.setattr(loss_mod, "SCRATCH_BYTES", 1 << 20)         # (V x 6 bytes a row: 128 rows fit)
    rows = loss_mod._frozen_head_rows(1024, V, torch.float32, torch.float32)
    assert rows == 128

    def run(capped: bool):
        with monkeypatch.context() as m:
            if not capped:
                m.setattr(loss_mod, "_frozen_head_rows", lambda chunk, *a: chunk)
            hh = h.clone().requires_grad_()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            with ctx:
                loss = fused_lm_loss(hh, w, y, workspace={})
            loss.backward()
            return loss.detach(), hh.grad

    (l1, g1), (l2, g2) = run(True), run(False)
    assert torch.equal(l1, l2)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-7)
    hr = h.clone().requires_grad_()
    ref = F.cross_entropy((hr @ w.t()).view(-1, V), y.view(-1), ignore_index=-100)
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if precision == "fp32" else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(l1, ref.detach(), **tol)
    torch.testing.assert_close(g1, hr.grad, **tol)


def test_trained_head_keeps_its_chunk(monkeypatch):
    """A head whose weight is trained keeps the given rows per chunk (each chunk adds into the
    weight gradient), so pretraining runs as before."""
    calls = []
    real = loss_mod._frozen_head_rows
    monkeypatch.setattr(loss_mod, "_frozen_head_rows", lambda *a: calls.append(a) or real(*a))
    h = torch.randn(1, 8, 4, requires_grad=True)
    w = torch.randn(50, 4, requires_grad=True)
    fused_lm_loss(h, w, torch.randint(0, 50, (1, 8))).backward()
    assert calls == [] and w.grad is not None
    fused_lm_loss(h, w.detach(), torch.randint(0, 50, (1, 8))).backward()
    assert len(calls) == 1
