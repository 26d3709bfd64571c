"""Instruction data in the shapes and containers it is published in: readers, --columns, finetune.py on
each (the same records train the same adapter, bit for bit), and fixtures of the reproduced systems'
recipes: a support bot on prompt/response, a guanaco chatbot on ShareGPT / '### Human:' text at
max length 512, and Chatbot Arena data, which SFT refuses. Bad input per format: the rows of
tests/reliability/test_bad_input_data.py; reader-level errors here."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file

from minigpt import get_tokenizer
from minigpt.commands import finetune as ft
from minigpt.data.formats import parse_columns
from minigpt.data.instruct import tokenize_records
from minigpt.data.records import load_records
from minigpt.errors import ConfigError, DataError

tok = get_tokenizer()
PAIRS = [("Say red.", "red"), ("Add 2 and 3.", "5"), ("Reverse: abc", "cba"), ("Capital of France?", "Paris"),
         ("Say, with a comma, hi.", "hi, there"), ("Two lines?", "one\ntwo"), ("Quote \"this\".", "\"this\""),
         ("Tab\tseparated?", "yes\tno")]
# a tiny, fast, deterministic LoRA run (the adapters of two runs on the same examples are bit-identical)
RUN = ["--lora", "--threads", "1", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2", "--max-length", "32",
       "--samples", "0", "--exact-match", "0", "--eval-batches", "0", "--val-fraction", "0", "--precision", "fp32",
       "--device", "cpu"]


def write_csv(p: Path, header: list[str], rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return p


def write_jsonl(p: Path, rows: list[dict]) -> Path:
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p


def write_parquet(p: Path, rows: list[dict], row_group_size: int = 3) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), p, row_group_size=row_group_size)
    return p


ALPACA = [{"instruction": q, "input": "", "output": a} for q, a in PAIRS]


def _as(kind: str, d: Path) -> tuple[Path, list[str]]:
    """The PAIRS dataset written as `kind`: (the --data path, extra flags)."""
    if kind == "alpaca.jsonl":
        return write_jsonl(d / kind, ALPACA), []
    if kind == "alpaca.json":
        (d / kind).write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
        return d / kind, []
    if kind == "train-object.json":
        (d / kind).write_text(json.dumps({"version": "1.0", "train": ALPACA}, indent=1), encoding="utf-8")
        return d / kind, []
    if kind in ("alpaca.csv", "alpaca.tsv"):
        return write_csv(d / kind, ["instruction", "input", "output"], [[q, "", a] for q, a in PAIRS],
                         "\t" if kind.endswith("tsv") else ","), []
    if kind == "alpaca.parquet":
        return write_parquet(d / kind, ALPACA), []
    if kind == "messages.jsonl":
        return write_jsonl(d / kind, [{"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": a}]} for q, a in PAIRS]), []
    if kind == "sharegpt.json":
        rows = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                for i, (q, a) in enumerate(PAIRS)]
        (d / kind).write_text(json.dumps(rows), encoding="utf-8")
        return d / kind, []
    if kind == "prompt-response.jsonl":
        return write_jsonl(d / kind, [{"response": a, "prompt": q} for q, a in PAIRS]), []
    if kind == "qa.csv --columns":
        p = write_csv(d / "qa.csv", ["id", "question", "answer"], [[i, q, a] for i, (q, a) in enumerate(PAIRS)])
        return p, ["--columns", "prompt=question,response=answer"]
    if kind == "folder":                  # two files of different containers and shapes, read in name order
        (d / "parts").mkdir()
        write_jsonl(d / "parts" / "a.jsonl", ALPACA[:5])
        write_csv(d / "parts" / "b.tsv", ["prompt", "response"], [[q, a] for q, a in PAIRS[5:]], "\t")
        (d / "parts" / "README.md").write_text("not data\n")
        return d / "parts", []
    raise AssertionError(kind)


KINDS = ["alpaca.jsonl", "alpaca.json", "train-object.json", "alpaca.csv", "alpaca.tsv", "alpaca.parquet",
         "messages.jsonl", "sharegpt.json", "prompt-response.jsonl", "qa.csv --columns", "folder"]


def _examples(path, extra) -> list[dict]:
    cols = extra[1] if extra else None
    return tokenize_records(load_records(path, columns=cols), tok, "alpaca", 64)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_container_and_shape_gives_the_same_examples(tmp_path, kind):
    path, extra = _as(kind, tmp_path)
    ref = _examples(*_as("alpaca.jsonl", tmp_path))
    assert _examples(path, extra) == ref
    recs = load_records(path, columns=extra[1] if extra else None)
    assert [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in recs] == PAIRS


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    tiny.gpt().save_pretrained(d)                       # 2 layers x 64, context 64
    return d


def _train(base: Path, data: Path, out: Path, *extra) -> dict[str, torch.Tensor]:
    assert ft.main([str(a) for a in ["--base", base, "--data", data, "--out-dir", out, *RUN, *extra]]) == 0
    return load_file(out / "adapter_model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_records_train_the_same_adapter_in_any_container(base, tmp_path):
    """finetune.py --lora on the same records as Alpaca JSONL, JSON, CSV, TSV, Parquet, ShareGPT and
    prompt/response with --columns: the adapters are equal bit for bit."""
    kinds = ["alpaca.jsonl", "alpaca.json", "alpaca.csv", "alpaca.tsv", "sharegpt.json", "qa.csv --columns"]
    try:
        import pyarrow  # noqa: F401
        kinds.append("alpaca.parquet")
    except ImportError:
        pass
    ref = None
    for i, kind in enumerate(kinds):
        path, extra = _as(kind, tmp_path)
        got = _train(base, path, tmp_path / f"out{i}", *extra)
        ref = got if ref is None else ref
        assert _same(got, ref), kind
    assert not _same(ref, _train(base, _as("alpaca.jsonl", tmp_path)[0], tmp_path / "other", "--seed", "1"))


def test_prompt_completion_with_template_none(base, tmp_path):
    """trl's prompt/completion: the text as is (spaces kept), the completion right after the prompt,
    EOS after it; JSONL and CSV train the same adapter."""
    rows = [{"prompt": f"Count to {n}:", "completion": " " + " ".join(map(str, range(1, n + 1)))} for n in range(1, 7)]
    jl = write_jsonl(tmp_path / "pc.jsonl", rows)
    cv = write_csv(tmp_path / "pc.csv", ["prompt", "completion"], [[r["prompt"], r["completion"]] for r in rows])
    (ex,), _ = tokenize_records(load_records(jl)[:1], tok, "none", 64)
    prompt, completion = tok.encode("Count to 1:"), tok.encode(" 1")
    assert ex["input_ids"] == prompt + completion + [50256]
    assert ex["labels"] == [-100] * len(prompt) + completion + [50256]
    assert _same(_train(base, jl, tmp_path / "a", "--template", "none"),
                 _train(base, cv, tmp_path / "b", "--template", "none"))
    conv = {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}
    (r,) = load_records(write_jsonl(tmp_path / "conv.jsonl", [conv]))
    assert [m["content"] for m in r["messages"]] == ["Hi", "Hello"]


# --- fixtures of the reproduced systems, from the CLI -------------------------------------------------

SUPPORT = [("How do I reset my password?", "Open Settings > Security and choose Reset password."),
           ("Can I change my username?", "Yes: Settings > Profile > Username."),
           ("Where is my invoice?", "Invoices are under Billing > History."),
           ("How do I cancel my plan?", "Go to Billing and choose Cancel plan."),
           ("Is there a mobile app?", "Yes, for iOS and Android."),
           ("How do I contact support?", "Write to support@example.com."),
           ("Can I export my data?", "Settings > Privacy > Export data."),
           ("Why was I logged out?", "Sessions end after 30 days; log in again.")]


def test_support_bot_recipe_on_prompt_response(base, tmp_path, capsys):
    """The GPT-2 support bot: chatbot_instruction_prompts' columns (response, prompt), LoRA r 8,
    alpha 16 on c_attn, batch 2 x 4, lr 2e-4."""
    p = write_jsonl(tmp_path / "chatbot_instruction_prompts.jsonl", [{"response": a, "prompt": q} for q, a in SUPPORT])
    out = tmp_path / "support-bot"
    argv = ["--base", base, "--data", p, "--out-dir", out, "--lora", "--lora-r", 8, "--lora-alpha", 16,
            "--lora-targets", "c_attn", "--batch-size", 2, "--grad-accum", 4, "--lr", "2e-4", "--max-steps", 2,
            "--max-length", 64, "--samples", 0, "--exact-match", 0, "--threads", 1, "--precision", "fp32",
            "--device", "cpu"]
    assert ft.main([str(a) for a in argv]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (8, 16, ["c_attn"])
    assert "7 train / 1 val examples" in capsys.readouterr().out


def _guanaco_text(i: int) -> str:
    long_answer = " ".join(f"Step {k}: check the cable, restart the router and wait a minute." for k in range(12))
    return (f"### Human: My internet is down ({i}). What should I do?### Assistant: {long_answer}"
            "### Human: Thanks!### Assistant: You are welcome.")


def test_guanaco_chatbot_recipe_at_max_length_512(tmp_path, capsys):
    """openassistant-guanaco's {"text": "### Human: ...### Assistant: ..."} JSONL beside a ShareGPT JSON
    (a folder of both), on a GPT-Neo base with --max-length 512: the long conversations are not cut."""
    base = tmp_path / "neo"
    tiny.gpt(block_size=512, arch="gpt_neo", window_size=64).save_pretrained(base)
    data = tmp_path / "guanaco"
    data.mkdir()
    write_jsonl(data / "openassistant_best_replies_train.jsonl", [{"text": _guanaco_text(i)} for i in range(6)])
    share = [{"id": f"s{i}", "conversations": [{"from": "system", "value": "You are a helpful assistant."},
                                               {"from": "human", "value": f"Name a colour ({i})."},
                                               {"from": "gpt", "value": "Blue."}]} for i in range(4)]
    (data / "sharegpt.json").write_text(json.dumps(share, indent=1))
    recs = load_records(data)
    assert len(recs) == 10 and len(recs[0]["messages"]) == 4 and recs[9]["system"] == "You are a helpful assistant."
    examples, stats = tokenize_records(recs, tok, "human-assistant", 512)
    assert max(len(e["input_ids"]) for e in examples) > 200 and stats["truncated"] == 0
    out = tmp_path / "chatbot"
    argv = ["--base", base, "--data", data, "--out-dir", out, "--lora", "--template", "human-assistant",
            "--max-length", 512, "--max-steps", 2, "--samples", 0, "--exact-match", 0, "--eval-batches", 1,
            "--threads", 1, "--precision", "fp32", "--device", "cpu"]
    assert ft.main([str(a) for a in argv]) == 0
    assert "max length 512, 0 truncated" in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_chatbot_arena_is_refused_for_sft(tmp_path):
    """Chatbot Arena rows (conversation_a, conversation_b, winner) are preference data: one line pointing
    to the preference objective, in any container (the CLI row: test_bad_input_data.py)."""
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rows = [{"question_id": f"q{i}", "model_a": "a", "model_b": "b", "winner": w, "judge": "arena_user",
             "conversation_a": conv, "conversation_b": conv, "turn": 1, "language": "English"}
            for i, w in enumerate(["model_a", "model_b", "tie", "tie (bothbad)"])]
    paths = [write_jsonl(tmp_path / "arena.jsonl", rows)]
    try:
        paths.append(write_parquet(tmp_path / "arena.parquet", rows))
    except pytest.skip.Exception:
        pass
    for p in paths:
        with pytest.raises(DataError, match="Chatbot Arena record .* preference objective") as e:
            load_records(p)
        assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r":1: a preference record \(prompt, chosen, rejected\)"):
        load_records(write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Hi", "chosen": "Hello", "rejected": "Go"}]))


# --- readers: places, conversions, errors ---------------------------------------------------------------

def test_places_name_the_line_row_or_row_group(tmp_path):
    p = write_csv(tmp_path / "d.csv", ["instruction", "input", "output", "exact", "split"],
                  [["a", "", "one\nline two", "true", ""], ["b", "x", "c", "FALSE", "val"]])
    recs = load_records(p)
    assert [r["source"] for r in recs] == [f"{p}:2", f"{p}:4"]             # a cell with a line break
    assert (recs[0]["exact"], recs[1]["exact"], recs[1]["split"]) == (True, False, "val") and "split" not in recs[0]
    p = tmp_path / "w.json"
    p.write_text('{"version": 2,\n "data": [\n  {"prompt": "a", "response": "b"},\n'
                 '  {"prompt": "c", "response": "d"}]}')
    assert [r["source"] for r in load_records(p)] == [f"{p}:3", f"{p}:4"]


def test_parquet_places_count_row_groups_and_rows_from_0(tmp_path):
    p = write_parquet(tmp_path / "d.parquet", [{"prompt": str(i), "response": "r"} for i in range(5)], 2)
    assert [r["source"].split(":", 1)[1] for r in load_records(p)][-2:] == ["row-group 1, row 1", "row-group 2, row 0"]


def test_sharegpt_roles_and_turn_spellings(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                               {"from": "chatgpt", "value": "d"}]},
            {"conversations": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]},
            {"conversations": json.dumps([{"from": "human", "value": "g"}, {"from": "gpt", "value": "h"}])}]
    recs = load_records(write_jsonl(tmp_path / "s.jsonl", rows))
    assert recs[0]["system"] == "S" and [m["content"] for m in recs[0]["messages"]] == list("abcd")
    assert [m["role"] for m in recs[0]["messages"]] == ["user", "assistant"] * 2
    assert [m["content"] for r in recs[1:] for m in r["messages"]] == list("efgh")


def test_glob_sorted_and_mixed(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2", "response": "x"}])
    write_csv(tmp_path / "a.csv", ["instruction", "output"], [["1", "x"]])
    (tmp_path / "c.txt").write_text("### Human: 3\n### Assistant: x\n")
    assert [r["messages"][0]["content"] for r in load_records(tmp_path / "*")] == ["1", "2", "3"]
    assert [r["messages"][0]["content"] for r in load_records(str(tmp_path / "[ab].*"))] == ["1", "2"]
    with pytest.raises(FileNotFoundError, match="no files match"):
        load_records(tmp_path / "*.parquet")


@pytest.mark.parametrize("name,text,place,fragment", [
    ("shape.jsonl", '{"instruction": "a", "output": "b"}\n{"q": "a", "a": "b"}\n', ":2:",
     "; the record holds 'q', 'a' (map other names with --columns"),
    ("prompt.jsonl", '{"prompt": "a"}\n', ":1:", "'prompt' with 'response' or 'completion'"),
    ("role.json", '[{"conversations": [{"from": "bot", "value": "a"}]}]', ":1:", "turn 1: unknown role 'bot'"),
    ("turn.jsonl", '{"conversations": [{"speaker": "human", "text": "a"}]}\n', ":1:",
     "turn 1: missing or non-string 'role'"),
    ("order.jsonl", '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}\n', ":1:",
     "alternate"),
    ("mixed.jsonl", '{"prompt": [{"role": "user", "content": "a"}], "completion": "b"}\n', ":1:",
     "must both be strings"),
    ("fields.csv", "instruction,output\na,b\nc,d,e\n", ":3:", "row has 3 fields, the header 2"),
    ("dup.csv", "output,output\na,b\n", ":1:", "names column 'output' twice"),
    ("quote.csv", 'instruction,output\na,b\n"c,d\ne,f\n', ":3:", "invalid CSV (unexpected end of data"),
    ("quote2.tsv", 'instruction\toutput\n"a"b\tc\n', ":2:", "invalid TSV"),
    ("empty.tsv", "instruction\toutput\n", ":1:", "empty dataset"),
    ("cell.csv", 'messages\n"[{""role"": ""user"", ""content"": ""a""}, oops"\n', ":2:",
     "field 'messages': invalid JSON"),
    ("plain.txt", "a,b\n1,2\n", ":1:", "or a .csv, .tsv or .parquet file"),
])
def test_malformed_data_names_the_place(tmp_path, name, text, place, fragment):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_records(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}{place}") and fragment in msg and "\n" not in msg, msg


def test_columns_mapping():
    assert parse_columns("prompt=question, response=answer") == {"prompt": "question", "response": "answer"}
    assert parse_columns({"instruction": "q", "output": "a"}) == {"instruction": "q", "output": "a"}
    assert parse_columns(None) == {}
    for bad, frag in [("prompt", "expected FIELD=COLUMN"), ("question=prompt", "unknown field 'question'"),
                      ("prompt=", "no column given"), ("prompt=a,prompt=b", "mapped twice")]:
        with pytest.raises(ConfigError, match=frag):
            parse_columns(bad)


def test_columns_flag_is_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ft.main(["--columns", "answer=response", "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and "unknown field 'answer'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
