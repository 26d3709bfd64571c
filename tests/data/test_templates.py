"""Prompt templates: their strings, names, and the stop strings derived from their turn markers."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from minigpt.data.templates import DEFAULT_TEMPLATE, STOP_STRINGS, TEMPLATE_NAMES, TEMPLATES, get_template
from minigpt.inference import generate


def alpaca(instruction, output, inp=""):
    return {"messages": [{"role": "user", "content": instruction, "input": inp},
                         {"role": "assistant", "content": output}], "system": None}


def test_alpaca_template_strings():
    t = get_template()
    assert t is TEMPLATES["alpaca"] and get_template("alpaca") is t and get_template(t) is t
    assert t.render(alpaca("Add 2 and 3.", "5")) == [
        ("### Instruction:\nAdd 2 and 3.\n\n### Response:\n", False), ("5", True)]
    assert t.render_text(alpaca("Uppercase.", "HI", inp="hi")) == (
        "### Instruction:\nUppercase.\n\n### Input:\nhi\n\n### Response:\nHI<|endoftext|>")
    rec = {**alpaca("Q", "A"), "system": "Be nice."}
    assert t.render_text(rec) == "Be nice.\n\n### Instruction:\nQ\n\n### Response:\nA<|endoftext|>"
    assert "### Instruction:" in t.stop_strings


def test_human_assistant_and_chat_templates():
    conv = {"system": None, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    ha = get_template("human-assistant")
    assert ha.render(conv) == [("### Human: Hi\n### Assistant:", False), (" Hello", True),
                               ("### Human: Bye\n### Assistant:", False), (" Ciao", True)]
    assert ha.stop_strings == ("### Human:", "### Assistant:")
    chat = get_template("chat")
    assert chat.render_text({**conv, "system": "S"}) == (
        "<|system|>\nS\n<|user|>\nHi\n<|assistant|>\nHello<|endoftext|>"
        "<|user|>\nBye\n<|assistant|>\nCiao<|endoftext|>")
    assert ha.render_text(alpaca("Do it.", "ok", inp="ctx")) == (
        "### Human: Do it.\n\nctx\n### Assistant: ok<|endoftext|>")
    with pytest.raises(ValueError, match="unknown prompt template"):
        get_template("nope")


def test_none_template_is_the_text_as_is():
    """--template none: prompt then response, nothing added (trl's prompt/completion); EOS after each answer."""
    t = get_template("none")
    rec = {"system": None, "messages": [{"role": "user", "content": "The sky is"},
                                        {"role": "assistant", "content": " blue."}]}
    assert t.render(rec) == [("The sky is", False), (" blue.", True)]
    assert t.render_text(rec) == "The sky is blue.<|endoftext|>" and t.stop_strings == ()


def test_names_and_default():
    assert TEMPLATE_NAMES == ("alpaca", "human-assistant", "chat", "none") == tuple(TEMPLATES)
    assert DEFAULT_TEMPLATE == "alpaca" and get_template() is get_template(None) is TEMPLATES[DEFAULT_TEMPLATE]
    assert all(TEMPLATES[n].name == n for n in TEMPLATE_NAMES)


def test_each_template_stops_at_its_own_markers():
    assert TEMPLATES["alpaca"].stop_strings == ("### Instruction:", "### Input:", "### Response:")
    assert TEMPLATES["human-assistant"].stop_strings == ("### Human:", "### Assistant:")
    assert TEMPLATES["chat"].stop_strings == ("<|user|>", "<|system|>", "<|assistant|>")


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_stop_strings_are_exactly_the_markup(name):
    """Every stop string occurs in a rendered conversation, and nothing but them (and whitespace)
    is left once the contents and EOS are removed: the markers cannot drift from the formats."""
    t = TEMPLATES[name]
    rec = {"system": "SYS", "messages": [{"role": "user", "content": "USR", "input": "INP"},
                                         {"role": "assistant", "content": "ANS"}]}
    text = t.render_text(rec)
    assert all(s in text for s in t.stop_strings)
    for s in (*t.stop_strings, "SYS", "USR", "INP", "ANS", "<|endoftext|>"):
        text = text.replace(s, "")
    assert not text.strip(), repr(text)


def test_stop_strings_cover_every_template():
    assert STOP_STRINGS == ("### Instruction:", "### Input:", "### Response:", "### Human:", "### Assistant:",
                            "<|user|>", "<|system|>", "<|assistant|>")
    assert all(set(t.stop_strings) <= set(STOP_STRINGS) for t in TEMPLATES.values())
    assert len(set(STOP_STRINGS)) == len(STOP_STRINGS)
    assert generate.DEFAULT_STOP is STOP_STRINGS


def test_templates_module_imports_no_torch():
    """At module level templates.py (and errors.py, all it imports from the package) import only the
    standard library."""
    pkg = Path(__file__).resolve().parents[2] / "minigpt"
    for name, allowed in (("data/templates.py", {"..errors"}), ("errors.py", set())):
        tree = ast.parse((pkg / name).read_text(encoding="utf-8"))
        mods = {("." * n.level + (n.module or "")) if isinstance(n, ast.ImportFrom) else a.name
                for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])}
        assert {m for m in mods if m.split(".")[0] in sys.stdlib_module_names or m == "__future__"} | allowed \
            >= mods, (name, mods)
