"""benchmarks/quickstart.py's own parts: nanoGPT's data files, the iteration plan, char-level bits per
byte and the CPU kind (the side-by-side run itself needs a nanoGPT checkout and minutes)."""
from __future__ import annotations

import importlib.util
import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qs():
    spec = importlib.util.spec_from_file_location("quickstart_bench", ROOT / "benchmarks" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cpu_kind(qs):
    cpu_kind = sys.modules["common"].cpu_kind        # benchmarks/common.py, loaded by quickstart.py
    assert cpu_kind(["avx2", "fma", "avx512f", "avx512_bf16"]) == "avx512_bf16"
    assert cpu_kind(["avx2", "fma", "amx_bf16", "avx512_bf16"]) == "amx_bf16"
    assert cpu_kind(["avx2", "fma", "f16c"]) == "avx2"
    assert cpu_kind(["asimd"]) == "neon"


def test_char_data_in_nanogpts_format(qs, tmp_path):
    text = "To be, or not to be: that is the question.\n" * 7
    info = qs.write_char_data(tmp_path, text)
    meta = pickle.loads((tmp_path / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == len(set(text)) == info["vocab_size"]
    assert sorted(meta["stoi"]) == sorted(set(text)) and meta["itos"][meta["stoi"]["q"]] == "q"
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    assert "".join(meta["itos"][int(i)] for i in np.concatenate([train, val])) == text


def test_heldout_texts_fit_the_corpus_vocabulary(qs):
    from minigpt.data.corpus import embedded_corpus_text

    vocab = set(embedded_corpus_text())
    for p in qs.TEXTS:
        text = p.read_text(encoding="utf-8")
        assert 50_000 < len(text.encode()) < 300_000 and not set(text) - vocab, p.name


def test_plan_iters_from_a_probe_log(qs):
    log = "step 0: train loss 4.4000, val loss 4.4100\n" + "iter 0: loss 4.4, time 900.00ms, mfu -100.00%\n"
    log += "".join(f"iter {i}: loss 3.0, time 50.00ms, mfu 1.00%\n" for i in range(1, 20))
    log += "step 20: train loss 2.9000, val loss 2.9500\niter 20: loss 2.9, time 800.00ms, mfu 1.00%\n"
    probe = {"iters": 20, "wall_seconds": 5.05, **qs.parse_nanogpt_log(log)}
    assert probe["evals"][-1] == (20, 2.9, 2.95) and len(probe["iter_ms"]) == 21
    plan = qs.plan_iters(probe, target_wall=104.0)
    assert plan["ms_per_iter"] == 50.0 and plan["fixed_seconds"] == pytest.approx(4.0)
    assert plan["iters"] == 1999                  # 4 s + 2,000 iterations x 50 ms = 104 s


class Uniform(torch.nn.Module):
    """A char model that predicts every character with the same probability, nanoGPT's call shape."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, idx, targets=None):
        return torch.zeros(*idx.shape, self.vocab), None


def test_time_matching_replans_when_the_long_run_is_slower_than_the_probe(qs):
    """The probe said 37 ms/iter; the long run really takes 45 ms/iter (+3 s fixed): the first try
    overshoots by ~20%, the second, planned from the first's own pace, lands within 5%."""
    def run(n):
        return {"iters": n, "wall_seconds": 3.0 + (n + 1) * 0.045,
                "iter_ms": {i: 45.0 for i in range(1, n)}}
    target = 300.0
    first = qs.plan_iters({"iters": 200, "wall_seconds": 3.0 + 201 * 0.037,
                           "iter_ms": {i: 37.0 for i in range(1, 200)}}, target)
    final, tries = qs.time_matched_run(run, first["iters"], first["fixed_seconds"], target)
    assert len(tries) == 2 and tries[0]["wall_seconds"] > 1.15 * target
    assert abs(final["wall_seconds"] / target - 1) <= qs.MATCH_TOLERANCE
    assert tries[1]["iters"] == final["iters"] < tries[0]["iters"]
    assert tries[0]["mean_ms_per_iter"] == 45.0
    _, once = qs.time_matched_run(run, first["iters"], first["fixed_seconds"], target, retries=0)
    assert len(once) == 1                                  # --quick: no second run


def test_char_bpb_uniform_model_and_unknown_characters(qs):
    stoi = {c: i for i, c in enumerate("abcdefgh ")}
    text = "abc defgh " * 30
    r = qs.char_bpb(Uniform(len(stoi)), text, stoi, block_size=16)
    assert r["bpb"] == pytest.approx(math.log2(9)) and r["unknown_chars"] == 0
    assert r["predicted_bytes"] == len(text) - 1
    odd = text + "é"                              # 2 UTF-8 bytes, not in the vocabulary: 8 bits each
    r = qs.char_bpb(Uniform(len(stoi)), odd, stoi, block_size=16)
    assert r["unknown_chars"] == 1 and r["predicted_bytes"] == len(text) + 1
    assert r["bpb"] == pytest.approx(((len(text) - 1) * math.log2(9) + 16) / (len(text) + 1))


def test_missing_nanogpt_says_how_to_get_it(qs, tmp_path):
    with pytest.raises(SystemExit, match="git clone https://github.com/karpathy/nanoGPT"):
        qs.find_nanogpt(None)
    with pytest.raises(SystemExit, match="not a nanoGPT checkout"):
        qs.find_nanogpt(tmp_path)
