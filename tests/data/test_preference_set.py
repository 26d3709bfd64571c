"""The embedded preference set (minigpt/assets/preferences.jsonl): rebuilt byte for byte by
scripts/make_preferences.py from the embedded instruction set, by its documented rule, with the
instruction set's held-out split, and tokenised exactly as SFT tokenises the same records."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from minigpt.data.instruct import tokenize_records
from minigpt.data.preferences import default_preferences_path, load_preferences, tokenize_pairs
from minigpt.data.records import default_instructions_path, load_records, split_records
from minigpt.data.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("make_preferences", ROOT / "scripts" / "make_preferences.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _instructions() -> list[dict]:
    return [json.loads(x) for x in default_instructions_path().read_text(encoding="utf-8").splitlines()]


def test_generator_reproduces_the_embedded_file():
    lines = [json.dumps(p, ensure_ascii=False) for p in _script().build(_instructions())]
    assert default_preferences_path().read_text(encoding="utf-8").splitlines() == lines


def test_pairs_follow_the_rule():
    recs, pairs = _instructions(), [json.loads(x) for x in default_preferences_path().read_text().splitlines()]
    assert len(pairs) == len(recs) == 572
    answers: dict[str, set] = {}
    for r in recs:
        answers.setdefault(r["task"], set()).add(r["messages"][-1]["content"] if "messages" in r else r["output"])
    rules = {"other-answer": 0, "truncated": 0}
    for r, p in zip(recs, pairs):
        own = r["messages"][-1]["content"] if "messages" in r else r["output"]
        assert (p["chosen"], p["task"], p["split"]) == (own, r["task"], r["split"])
        assert p["rejected"].strip() != p["chosen"].strip()
        if p["rule"] == "truncated":
            assert not r["exact"] and own.startswith(p["rejected"]) and len(p["rejected"]) < len(own)
        else:
            assert p["rule"] == "other-answer" and p["rejected"] in answers[r["task"]]
        rules[p["rule"]] += 1
        assert p["prompt"] == (r["messages"][:-1] if "messages" in r else r["instruction"])
    assert rules["truncated"] > 40 and rules["other-answer"] > 400


def test_held_out_pairs_and_tokens_are_sfts():
    """The held-out pairs are the instruction set's held-out records; prompt + chosen are SFT's tokens."""
    pairs, stats = load_preferences(default_preferences_path())
    records = load_records(default_instructions_path())
    assert stats == {"ties": 0, "identical": 0}
    (tp, vp), (tr, vr) = split_records(pairs, 0.1, seed=42), split_records(records, 0.1, seed=42)
    assert len(vp) == len(vr) == 57 and len(tp) == len(tr)
    tok = get_tokenizer()
    ex, _ = tokenize_pairs(pairs, tok, "alpaca", 256)
    sft, _ = tokenize_records(records, tok, "alpaca", 256, True)
    assert len(ex) == len(sft) == 572
    for e, s in zip(ex, sft):
        n = len(e["prompt"])
        assert s["input_ids"][:n] == e["prompt"] and s["input_ids"][n:n + len(e["chosen"])] == e["chosen"]
