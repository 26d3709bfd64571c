"""Instruction data: readers and splits (records), masking, truncation, collation, batching."""
from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from minigpt import get_tokenizer
from minigpt.data.instruct import (
    Collator,
    exact_match_accuracy,
    length_grouped_batches,
    tokenize_example,
    tokenize_records,
)
from minigpt.data.records import checkable_records, default_instructions_path, load_records, split_records
from minigpt.data.templates import TEMPLATE_NAMES, get_template
from minigpt.errors import DataError

EOS = 50256
tok = get_tokenizer()


def write(p: Path, text: str) -> Path:
    p.write_text(text, encoding="utf-8")
    return p


def alpaca(instruction, output, inp=""):
    return {"messages": [{"role": "user", "content": instruction, "input": inp},
                         {"role": "assistant", "content": output}], "system": None}


# --- readers ----------------------------------------------------------------------------------

def test_alpaca_json_list(tmp_path):
    data = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"},
            {"instruction": "Uppercase this.", "input": "hello", "output": "HELLO", "split": "val"}]
    p = write(tmp_path / "d.json", json.dumps(data, indent=2))
    recs = load_records(p)
    assert len(recs) == 2
    assert recs[0]["messages"] == [{"role": "user", "content": "Add 2 and 3.", "input": ""},
                                   {"role": "assistant", "content": "5"}]
    assert recs[0]["system"] is None
    assert recs[1]["messages"][0]["input"] == "hello" and recs[1]["split"] == "val"
    assert recs[0]["source"] == f"{p}:2" and recs[1]["source"] == f"{p}:7"


def test_alpaca_jsonl_and_missing_input(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"instruction": "Say hi.", "output": "hi"}\n\n'
                                    '{"instruction": "Echo", "input": null, "output": " x \\n"}\n')
    recs = load_records(p)
    assert [r["messages"][1]["content"] for r in recs] == ["hi", "x"]
    assert recs[1]["messages"][0]["input"] == "" and recs[1]["source"].endswith(":3")


def test_chat_jsonl(tmp_path):
    conv = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    p = write(tmp_path / "c.jsonl", json.dumps(conv) + "\n")
    (r,) = load_records(p)
    assert r["system"] == "Be brief."
    assert [(m["role"], m["content"]) for m in r["messages"]] == [
        ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4")]


def test_plain_text_turns(tmp_path):
    text = ("### Human: What is 1+1?\n### Assistant: 2\n### Human: And 2+2?\n### Assistant: 4\n"
            "\n"
            "### Human: Write two lines.\n### Assistant: line one\n\nline two\n"
            "\n\n"
            "### Human: inline one### Assistant: inline answer\n")
    recs = load_records(write(tmp_path / "t.txt", text))
    assert len(recs) == 3
    assert [(m["role"], m["content"]) for m in recs[0]["messages"]] == [
        ("user", "What is 1+1?"), ("assistant", "2"), ("user", "And 2+2?"), ("assistant", "4")]
    assert recs[1]["messages"][1]["content"] == "line one\n\nline two"
    assert [m["content"] for m in recs[2]["messages"]] == ["inline one", "inline answer"]
    assert [r["source"].rsplit(":", 1)[1] for r in recs] == ["1", "6", "12"]


@pytest.mark.parametrize("name,text,line,fragment", [
    ("broken.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"}\n{"instruction": "a",\n',
     3, "invalid JSON"),
    ("missing.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', 2, "missing field 'output'"),
    ("type.jsonl", '{"instruction": "a", "output": 5}\n', 1, "must be a string"),
    ("empty_field.jsonl", '{"instruction": "  ", "output": "b"}\n', 1, "is empty"),
    ("role.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'
                   '{"messages": [{"role": "robot", "content": "a"}]}\n', 1, "ends with a user turn"),
    ("role2.jsonl", '{"messages": [{"role": "robot", "content": "a"}]}\n', 1, "unknown role 'robot'"),
    ("order.jsonl", '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     1, "alternate"),
    ("notobj.jsonl", '[1, 2]\n', 1, "expected a JSON object"),
    ("fields.jsonl", '{"question": "a", "answer": "b"}\n', 1, "expected Alpaca fields"),
    ("msgtype.jsonl", '{"messages": "hi"}\n', 1, "non-empty list"),
    ("list.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n', 3, "missing field"),
    ("listbroken.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": 1}\n]\n',
     3, "invalid JSON"),
    ("empty.jsonl", "\n\n", 1, "empty dataset"),
    ("emptylist.json", "[]", 1, "empty dataset"),
    ("lead.txt", "hello\n### Human: a\n### Assistant: b\n", 1, "before the first"),
    ("twohuman.txt", "### Human: a\n### Human: b\n### Assistant: c\n", 2, "expected a '### Assistant:'"),
    ("endhuman.txt", "### Human: a\n### Assistant: b\n### Human: c\n", 1, "ends with a user turn"),
    ("emptyturn.txt", "### Human: a\n### Assistant:\n\n", 2, "empty Assistant turn"),
    ("nomarkers.txt", "just some text\n", 1, "no '### Human:'"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, text, line, fragment):
    p = write(tmp_path / name, text)
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{line}:"), msg
    assert fragment in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("text,kind", [("null", "null"), ("null\n", "null"), ("  42 \n\n", "a number"),
                                       ('"hello"', "a string"), ("true", "a boolean")])
def test_json_scalar_is_not_records(tmp_path, text, kind):
    p = write(tmp_path / "d.json", text)
    with pytest.raises(DataError) as e:
        load_records(p)
    assert str(e.value) == (f"{p}: expected a JSON array of records or JSON lines (one object per line), "
                            f"got {kind}")


def test_json_scalar_line_names_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '\nnull\n{"instruction": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r":2: expected a JSON array of records or JSON lines .*got null$"):
        load_records(p)
    p = write(tmp_path / "e.jsonl", '{"instruction": "a", "output": "b"}\nnull\n')
    with pytest.raises(DataError, match=r":2: expected a JSON object, got null$"):
        load_records(p)
    with pytest.raises(DataError, match=r":1: expected a JSON list of records, got null$"):
        load_records(write(tmp_path / "f.json", "null"), format="json")


def test_not_a_regular_file_is_refused_before_reading(tmp_path):
    with pytest.raises(DataError) as e:
        load_records("/dev/zero")            # reading it would never end
    assert str(e.value) == "/dev/zero: not a regular file"
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)                          # opening a FIFO with no writer would block
    with pytest.raises(DataError, match="not a regular file"):
        load_records(fifo)
    with pytest.raises(DataError, match="folder holds no instruction data files"):
        load_records(tmp_path)               # a folder: its data files, never the FIFO


# --- templates: training tokens = chat prompt tokens (template strings: test_templates.py) ----------

@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_prompt_for_new_turn_matches_training_tokens(name):
    t = get_template(name)
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Times 3?"}, {"role": "assistant", "content": "12"}]
    full = tokenize_example({"messages": msgs, "system": "Sys"}, tok, t, max_length=512)
    p = t.prompt_ids(msgs[:3], tok, system="Sys")
    assert full["input_ids"][:len(p)] == p
    assert full["labels"][len(p)] != -100 and full["labels"][len(p) - 1] == -100
    text = t.prompt_text(msgs[:3], system="Sys")
    assert tok.encode(text, allowed_special={"<|endoftext|>"}) == p
    with pytest.raises(ValueError):
        t.prompt_ids(msgs[:2], tok)


# --- tokenisation, masking, truncation ---------------------------------------------------------

def test_masking_and_eos():
    rec = alpaca("Add 2 and 3.", "The answer is 5.")
    ex = tokenize_example(rec, tok)
    prompt = tok.encode("### Instruction:\nAdd 2 and 3.\n\n### Response:\n")
    resp = tok.encode("The answer is 5.")
    assert ex["input_ids"] == prompt + resp + [EOS]
    assert ex["labels"] == [-100] * len(prompt) + resp + [EOS]


def test_multi_turn_supervises_every_answer():
    rec = {"system": None, "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    ex = tokenize_example(rec, tok, "chat")
    sup = [t for t, l in zip(ex["input_ids"], ex["labels"]) if l != -100]
    assert sup == tok.encode("b") + [EOS] + tok.encode("d") + [EOS]
    assert all(l in (-100, t) for t, l in zip(ex["input_ids"], ex["labels"]))


def test_no_mask_prompt():
    ex = tokenize_example(alpaca("Say hi.", "hi"), tok, mask_prompt=False)
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == EOS


def test_truncation_keeps_prompt_and_drops_long_prompts():
    rec = alpaca("Count.", " ".join(["one two three"] * 20))
    full = tokenize_example(rec, tok, max_length=1000)
    n_prompt = sum(l == -100 for l in full["labels"])
    ex = tokenize_example(rec, tok, max_length=n_prompt + 5)
    assert len(ex["input_ids"]) == n_prompt + 5
    assert ex["input_ids"] == full["input_ids"][:n_prompt + 5]
    assert ex["labels"][:n_prompt] == [-100] * n_prompt and -100 not in ex["labels"][n_prompt:]
    assert tokenize_example(rec, tok, max_length=n_prompt + 1)["labels"][-1] != -100
    assert tokenize_example(rec, tok, max_length=n_prompt) is None
    examples, stats = tokenize_records([rec, alpaca("Hi", "ok"), rec], tok, max_length=n_prompt + 3)
    assert stats == {"total": 3, "kept": 3, "dropped": 0, "truncated": 2}
    examples, stats = tokenize_records([rec, alpaca("Hi", "ok")], tok, max_length=n_prompt)
    assert stats["dropped"] == 1 and stats["kept"] == 1 and len(examples) == 1


# --- collation and batching -------------------------------------------------------------------

def test_collator_shapes_padding_and_shift():
    a = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}
    b = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}
    out = Collator()([a, b])
    assert set(out) == {"input_ids", "labels", "attention_mask"}
    assert all(v.dtype == torch.long and v.shape == (2, 4) for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [1, 2, EOS, EOS]]
    assert out["labels"].tolist() == [[-100, 7, 8, 9], [2, 3, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    out = Collator(pad_id=0, pad_to_multiple_of=8)([a, b])
    assert out["input_ids"].shape == (2, 8) and out["input_ids"][1, 2:].eq(0).all()
    assert out["labels"][:, 4:].eq(-100).all()


def test_collator_loss_ignores_prompt_and_padding():
    from minigpt import lm_loss
    examples, _ = tokenize_records([alpaca("Say hi.", "hi"), alpaca("Add 2 and 3, please.", "5")], tok)
    batch = Collator()(examples)
    logits = torch.zeros(*batch["input_ids"].shape, 50257)
    logits[..., 0] = 1.0          # any fixed logits: loss only counts the supervised positions
    n_sup = sum(sum(l != -100 for l in ex["labels"][1:]) for ex in examples)
    assert int((batch["labels"] != -100).sum()) == n_sup == 2 + 2   # "hi"+EOS, "5"+EOS
    expected = torch.nn.functional.cross_entropy(logits[batch["labels"] != -100],
                                                 batch["labels"][batch["labels"] != -100])
    assert torch.allclose(lm_loss(logits, batch["labels"]), expected)


def test_length_grouped_batches_cover_all_once():
    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    batches = length_grouped_batches(lengths, batch_size=8, seed=3, mega_batch_mult=4)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    assert all(len(b) <= 8 for b in batches)
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    assert batches == length_grouped_batches(lengths, batch_size=8, seed=3, mega_batch_mult=4)
    assert batches != length_grouped_batches(lengths, batch_size=8, seed=4, mega_batch_mult=4)
    # grouping reduces padding compared to plain seeded random batches
    def pad(bs):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in bs)
    order = list(range(len(lengths)))
    random.Random(3).shuffle(order)
    assert pad(batches) < 0.5 * pad([order[i:i + 8] for i in range(0, len(order), 8)])
    dl = length_grouped_batches(lengths, batch_size=8, seed=3, drop_last=True)
    assert all(len(b) == 8 for b in dl) and len({i for b in dl for i in b}) == 8 * len(dl)


# --- splits, evaluation, embedded data -----------------------------------------------------------

def test_split_records():
    recs = [alpaca(str(i), "x") for i in range(50)]
    tr, va = split_records(recs, val_fraction=0.1, seed=0)
    assert len(va) == 5 and len(tr) == 45 and split_records(recs, 0.1, 0)[1] == va
    recs[3]["split"] = "val"
    tr, va = split_records(recs)
    assert va == [recs[3]] and len(tr) == 49


def test_exact_match_accuracy():
    recs = [alpaca("What is 2 + 2?", "4"), alpaca("What is 3 + 3?", "6"), alpaca("Reverse 'ab'.", "ba")]
    answers = {"2 + 2": " 4\n### Instruction:\nmore", "3 + 3": "7", "'ab'": "ba<|endoftext|>junk"}

    def gen(prompt):
        assert prompt.startswith("### Instruction:\n") and prompt.endswith("### Response:\n")
        return next(v for k, v in answers.items() if k in prompt)
    res = exact_match_accuracy(recs, gen)
    assert res["correct"] == 2 and res["total"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    assert [r["correct"] for r in res["results"]] == [True, False, True]


def test_embedded_instruction_set():
    p = default_instructions_path()
    assert p.is_file() and p.stat().st_size < 300_000
    recs = load_records(p)
    assert 300 <= len(recs) <= 600
    train, val = split_records(recs)
    assert 0.07 * len(recs) <= len(val) <= 0.13 * len(recs)
    assert len(checkable_records(val)) >= 30
    def prompts(rs):
        return {json.dumps(r["messages"][:-1]) for r in rs}
    assert not prompts(train) & prompts(val)          # no validation prompt is also trained on
    assert any(len(r["messages"]) > 2 for r in recs)  # some multi-turn chats
    assert sum(r.get("task") == "support" for r in recs) >= 80
    _, stats = tokenize_records(recs, tok, max_length=256)
    assert stats["dropped"] == 0 and stats["truncated"] == 0
    for r in checkable_records(recs):               # spot-check a few exact answers
        q, a = r["messages"][0]["content"], r["messages"][-1]["content"]
        if r["task"] == "add" and q.startswith("What is ") and q.endswith("?") and "+" in q:
            x, y = q[len("What is "):-1].split(" + ")
            assert int(a) == int(x) + int(y)
        if r["task"] == "reverse_word":
            assert a == q.split("'")[1][::-1]


def test_generator_reproduces_embedded_file():
    script = Path(__file__).resolve().parents[2] / "scripts" / "make_instructions.py"
    spec = importlib.util.spec_from_file_location("make_instructions", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = [json.dumps(r, ensure_ascii=False) for r in mod.build()]
    assert default_instructions_path().read_text(encoding="utf-8").splitlines() == lines
