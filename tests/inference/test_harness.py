"""lm-evaluation-harness on minigpt, checked with lm-eval itself (a test-only reference, offline): on local
JSON tasks (multiple choice, rolling log-likelihood, greedy generation), its `local-completions` backend
against a minigpt server and the in-process model class (minigpt.inference.harness, `minigpt eval --tasks`)
give the same accuracies, per-item log-likelihoods (within 1e-4) and generations as its `hf` backend on the
same tiny model exported to HF format; adapters against the hf backend's peft, a quantized base against
transformers holding its dequantized weights."""
from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch
from test_serve import Live
from tiny import gpt as tiny_gpt

from minigpt import GPT
from minigpt.commands import run

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install \"minigpt[eval]\")")
transformers = pytest.importorskip("transformers")
pytest.importorskip("uvicorn")

MC = [{"question": q, "choices": c, "label": a} for q, c, a in [
    ("The sky on a clear day is", ["blue", "green", "made of cheese", "loud"], 0),
    ("Two plus two equals", ["four", "five", "a fish", "twenty-two"], 0),
    ("Cats like to chase", ["mice", "cars", "taxes", "clouds"], 0),
    ("Water freezes into", ["ice", "steam", "fire", "sand"], 0),
    ("The opposite of hot is", ["cold", "warm", "spicy", "loud"], 0),
    ("A week has seven", ["days", "years", "legs", "colours"], 0),
    ("Bees make", ["honey", "bread", "cars", "music"], 0),
    ("At night we see the", ["moon", "sun", "sea", "soup"], 0)]]
TEXTS = [{"text": t} for t in ["Once upon a time there was a small village by the sea.",
                               "The committee met on Tuesday and agreed on the budget for next year.",
                               "Rain fell all night; by morning the river had risen over its banks.",
                               "She opened the letter, read it twice, and laughed."]]
QA = [{"question": q, "answer": a} for q, a in [("Q: What colour is grass?\nA:", "green"),
                                                 ("Q: Name a fruit.\nA:", "apple"),
                                                 ("Q: What do cows drink?\nA:", "water")]]

TASKS = {
    "tiny_mc": """task: tiny_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/mc.jsonl}}, cache_dir: {d}/cache}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
doc_to_choice: choices
metric_list: [{{metric: acc, aggregation: mean, higher_is_better: true}},
              {{metric: acc_norm, aggregation: mean, higher_is_better: true}}]
""",
    "tiny_rolling": """task: tiny_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/texts.jsonl}}, cache_dir: {d}/cache}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list: [{{metric: word_perplexity}}, {{metric: byte_perplexity}}, {{metric: bits_per_byte}}]
""",
    "tiny_gen": """task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/qa.jsonl}}, cache_dir: {d}/cache}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["\\n", "Q:"], max_gen_toks: 6, do_sample: false}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
"""}


def write_hf_tokenizer(folder) -> None:
    """GPT-2's tokenizer in HF format, built offline from the ranks minigpt ships (tiktoken's file)."""
    from transformers import PreTrainedTokenizerFast
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        pytest.skip("this transformers has no TikTokenConverter (to write GPT-2's tokenizer offline)")

    ranks = str(resources.files("minigpt").joinpath("assets/gpt2.tiktoken"))
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    tok = TikTokenConverter(vocab_file=ranks, pattern=pattern, extra_special_tokens=["<|endoftext|>"]).converted()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    model = tiny_gpt(block_size=64, std=0.2)
    model.save_pretrained(d / "model")
    write_hf_tokenizer(d / "model")
    for name, rows in (("mc", MC), ("texts", TEXTS), ("qa", QA)):
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (d / "tasks").mkdir()
    for name, text in TASKS.items():
        (d / "tasks" / f"{name}.yaml").write_text(text.format(d=d), encoding="utf-8")
    from lm_eval.tasks import TaskManager
    return d, TaskManager(include_path=str(d / "tasks"), include_defaults=False)


def evaluate(model, setup, tasks=tuple(TASKS), **model_args) -> dict:
    r = lm_eval.simple_evaluate(model=model, model_args=model_args or None, tasks=list(tasks),
                                task_manager=setup[1], batch_size=4, device="cpu", log_samples=True,
                                bootstrap_iters=0)
    return {"results": r["results"], "samples": {t: [s["filtered_resps"] for s in sorted(r["samples"][t],
                                                                                         key=lambda s: s["doc_id"])]
                                                 for t in r["samples"]}}


def assert_same(got: dict, want: dict) -> None:
    """Same metrics (the log-likelihood ones within 1e-4 relative) and per-item results."""
    for task, metrics in want["results"].items():
        for k, v in metrics.items():
            if isinstance(v, float) and "stderr" not in k:
                assert got["results"][task][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, k)
    for task, items in want["samples"].items():
        for mine, ref in zip(got["samples"][task], items, strict=True):
            for a, b in zip(mine, ref, strict=True):
                if isinstance(b, str):
                    assert a == b, task
                elif isinstance(b, (tuple, list)):                      # (log-likelihood, is_greedy)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and bool(a[1]) == bool(b[1]), task
                else:
                    assert a == pytest.approx(b, abs=1e-4), task


@pytest.fixture(scope="module")
def hf_results(setup):
    return evaluate("hf", setup, pretrained=str(setup[0] / "model"), dtype="float32")


def test_hf_tokenizer_written_here_is_tiktokens(setup):
    from minigpt import get_tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(setup[0] / "model")
    for text in [m["question"] + " " + c for m in MC for c in m["choices"]] + [t["text"] for t in TEXTS]:
        assert hf(text, add_special_tokens=False).input_ids == get_tokenizer().encode(text)


def test_local_completions_against_minigpt_serve_equals_hf(setup, hf_results):
    srv = Live(model=GPT.from_pretrained(setup[0] / "model"))
    try:                                             # the tokenizer: the server's own (lm-eval's "remote" backend)
        got = evaluate("local-completions", setup, base_url=srv.url + "/v1/completions", num_concurrent=1)
    finally:
        srv.close()
    assert_same(got, hf_results)
    assert got["results"]["tiny_mc"]["acc,none"] == hf_results["results"]["tiny_mc"]["acc,none"]


def test_in_process_model_class_equals_hf_and_the_command(setup, hf_results, capsys):
    from minigpt.inference.harness import MinigptLM

    got = evaluate(MinigptLM(GPT.from_pretrained(setup[0] / "model"), batch_size=4), setup)
    assert_same(got, hf_results)
    files = ",".join(str(setup[0] / "tasks" / f"{t}.yaml") for t in ("tiny_mc", "tiny_rolling"))
    rc = run("eval", ["--model", str(setup[0] / "model"), "--tasks", files, "--batch-size", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cli = json.loads(out)["results"]
    for task in ("tiny_mc", "tiny_rolling"):
        for k, v in hf_results["results"][task].items():
            if isinstance(v, float) and "stderr" not in k:
                assert cli[task][k] == pytest.approx(v, rel=1e-4), (task, k)


def test_adapter_equals_hf_with_peft(setup):
    from minigpt.inference.harness import MinigptLM
    from minigpt.methods.lora import add_lora, save_adapter

    pytest.importorskip("peft")
    base = GPT.from_pretrained(setup[0] / "model")
    torch.manual_seed(3)
    add_lora(base, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_fc"))
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    adapter = save_adapter(copy.deepcopy(base), setup[0] / "adapter", base_model_name_or_path=str(setup[0] / "model"))
    want = evaluate("hf", setup, ("tiny_mc",), pretrained=str(setup[0] / "model"), peft=str(adapter), dtype="float32")
    got = evaluate(MinigptLM(str(setup[0] / "model"), adapter=str(adapter), batch_size=4), setup, ("tiny_mc",))
    assert_same(got, want)


def test_quantized_base_equals_hf_on_its_dequantized_weights(setup, hf_results):
    from minigpt.inference.harness import MinigptLM
    from minigpt.model.quant import QuantLinear

    lm = MinigptLM(str(setup[0] / "model"), quantize="int8", batch_size=4)
    hf = transformers.GPT2LMHeadModel.from_pretrained(setup[0] / "model").eval()
    with torch.no_grad():                            # HF Conv1D weights are (in, out)
        for name, m in lm.model.named_modules():
            if isinstance(m, QuantLinear):
                hf.get_submodule(name).weight.copy_(m.dense(torch.float32).t())
    tok = transformers.AutoTokenizer.from_pretrained(setup[0] / "model")
    tasks = ("tiny_mc", "tiny_rolling")
    want = evaluate("hf", setup, tasks, pretrained=hf, tokenizer=tok)
    got = evaluate(lm, setup, tasks)
    assert_same(got, want)
    assert got["samples"]["tiny_rolling"][0][0] != pytest.approx(hf_results["samples"]["tiny_rolling"][0][0],
                                                                 abs=1e-4)    # int8 numbers are not fp32's


BAD_MC = """task: bad_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {d}/bad.jsonl}}, cache_dir: {d}/cache}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: label
"""


@pytest.mark.parametrize("text,fragment", [
    (BAD_MC, "missing field doc_to_choice (a multiple_choice task needs"),
    (BAD_MC.replace("dataset_path: json\n", "") + "doc_to_choice: choices\n",
     "missing field dataset_path"),
    (BAD_MC + "doc_to_choice: choices\n", "lm_eval failed ("),
    (BAD_MC.replace("test_split: test", "test_split: validation") + "doc_to_choice: choices\n",
     "lm_eval failed (KeyError: 'validation')"),
    ("task: [unclosed\n", "cannot read it ("),
    ("- a\n- b\n", "Expected YAML dict"),
    (None, "no such task file"),
], ids=["no-choice", "no-dataset", "record-without-choices", "no-such-split", "broken-yaml", "not-a-mapping",
        "missing-file"])
def test_bad_task_files_get_one_line(setup, tmp_path, capsys, text, fragment):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "x", "label": 0}) + "\n", encoding="utf-8")
    path = tmp_path / "task.yaml"
    if text is not None:
        path.write_text(text.format(d=tmp_path), encoding="utf-8")
    rc = run("eval", ["--model", str(setup[0] / "model"), "--tasks", str(path)])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and out == "" and len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
