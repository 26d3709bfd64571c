"""Generate minigpt/assets/preferences.jsonl, minigpt's embedded preference set, from the embedded
instruction set (minigpt/assets/instructions.jsonl, written for this project; see make_instructions.py).

One pair per instruction record, its prompt and its own answer as `chosen`; `rejected` is a worse
answer taken from the same set by a fixed rule (the "rule" field says which):

    other-answer   the answer of another record of the same task, different from the chosen one:
                   for the checkable tasks (arithmetic, reversing, counting, formatting, ...) an answer
                   of the right form with the wrong value; for the support questions a fluent answer
                   to another question
    truncated      (the questions about minigpt, the records not checkable by exact match: half of
                   them, by a seeded coin) the record's own answer cut after the first half of its
                   words: it stops mid-sentence

The prompt is the record's user turn (`prompt`, with Alpaca's `input` when it has one) or, for a
chat record, its messages before the last answer (system message included). Each pair keeps its
record's `task` and `split`, so the held-out pairs are those of the instruction set's held-out
records: prompts and chosen answers that SFT on the embedded set never trains on (a rejected answer
may be another record's, held out or not). Deterministic (seeded): rerunning reproduces the file
byte for byte.

    python scripts/make_preferences.py            # writes minigpt/assets/preferences.jsonl
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 20240801
ASSETS = Path(__file__).resolve().parent.parent / "minigpt" / "assets"
SOURCE, OUT = ASSETS / "instructions.jsonl", ASSETS / "preferences.jsonl"


def _answer(r: dict) -> str:
    return r["messages"][-1]["content"] if "messages" in r else r["output"]


def _truncated(text: str) -> str:
    """The text up to the end of the first half of its words (at least one word is cut)."""
    words = list(re.finditer(r"\S+", text))
    keep = max(1, min(len(words) // 2, len(words) - 1))
    return text[:words[keep - 1].end()]


def _pair(r: dict, rejected: str, rule: str) -> dict:
    if "messages" in r:
        head = {"prompt": r["messages"][:-1]}
    else:
        head = {"prompt": r["instruction"], **({"input": r["input"]} if r.get("input") else {})}
    return {**head, "chosen": _answer(r), "rejected": rejected, "rule": rule, "task": r["task"], "split": r["split"]}


def build(records: list[dict]) -> list[dict]:
    """The pairs of `records` (the instruction set's, in file order), by the rule above."""
    rng = random.Random(SEED)
    by_task: dict[str, list[str]] = {}
    for r in records:
        by_task.setdefault(r["task"], [])
        if _answer(r) not in by_task[r["task"]]:
            by_task[r["task"]].append(_answer(r))
    pairs = []
    for r in records:
        chosen = _answer(r)
        support = not r.get("exact", False)
        if support and len(re.findall(r"\S+", chosen)) >= 4 and rng.random() < 0.5:
            pairs.append(_pair(r, _truncated(chosen), "truncated"))
            continue
        others = [a for a in by_task[r["task"]] if a.strip() != chosen.strip()]
        if not others:
            raise ValueError(f"task {r['task']!r} has a single answer: no other-answer for {chosen!r}")
        pairs.append(_pair(r, rng.choice(others), "other-answer"))
    return pairs


def main() -> None:
    records = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = build(records)
    with open(OUT, "w", encoding="utf-8", newline="\n") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    rules = {k: sum(p["rule"] == k for p in pairs) for k in ("other-answer", "truncated")}
    n_val = sum(p["split"] == "val" for p in pairs)
    print(f"wrote {len(pairs)} pairs ({n_val} val; {rules}) to {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
