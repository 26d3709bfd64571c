"""`/v1/completions` with echo + logprobs (the prompt's own log-probabilities, OpenAI's legacy format),
token-id prompts and several prompts per request, the tokenizer routes: with the official `openai`
client against a live server, checked against transformers' GPT2LMHeadModel on the same weights."""
from __future__ import annotations

import pytest
import torch
from test_serve import TOK, Live, alone
from tiny import gpt as tiny_gpt

from minigpt import GPT, prepare_for_decoding
from minigpt.inference.scoring import Scorer

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Shall I compare thee to a summer's day?", "a b"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny model saved to HF format, and transformers' model on the same file."""
    d = tmp_path_factory.mktemp("echo") / "model"
    tiny_gpt(block_size=64, std=0.2).save_pretrained(d)
    transformers.logging.set_verbosity_error()
    return d, transformers.GPT2LMHeadModel.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def live(weights):
    """A server decoding with fp16 weights; its scorer made from the fp32 model before the swap."""
    model = GPT.from_pretrained(weights[0])
    scorer = Scorer(model)
    prepare_for_decoding(model, "fp16")
    srv = Live(model=model, scorer=scorer)
    yield srv
    srv.close()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-softmax of transformers' logits: row i is the distribution after ids[:i + 1]."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)


def test_echo_scores_the_prompt_exactly_in_fp32(weights, live):
    hf = weights[1]
    ids = [TOK.encode_ordinary(p) for p in PROMPTS]
    r = live.client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=3, max_tokens=0, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 0
    worst_fp16 = 0.0
    for c, p, want_ids in zip(r.choices, PROMPTS, ids):
        lp = c.logprobs
        assert c.text == p and c.finish_reason == "length"
        assert lp.tokens == [TOK.decode([t]) for t in want_ids]
        assert lp.text_offset == [len(TOK.decode(want_ids[:i])) for i in range(len(want_ids))]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(want_ids)
        ref = hf_logprobs(hf, want_ids)
        want = [float(ref[i - 1, want_ids[i]]) for i in range(1, len(want_ids))]
        assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
        for i in range(1, len(want_ids)):
            v, j = ref[i - 1].topk(3)
            assert list(lp.top_logprobs[i]) == [TOK.decode([int(t)]) for t in j]
            assert list(lp.top_logprobs[i].values()) == pytest.approx(v.tolist(), abs=1e-4)
        with torch.no_grad():                         # what the fp16 decoding weights would have said
            fp16 = torch.log_softmax(live.model(torch.tensor([want_ids]))[0].double(), -1)
        worst_fp16 = max(worst_fp16, max(abs(float(fp16[i - 1, want_ids[i]]) - w) for i, w in
                                         zip(range(1, len(want_ids)), want)))
    assert worst_fp16 > 1e-4                          # so the exact numbers above are the fp32 path's


def test_echo_with_generated_tokens_string_prompt_and_lm_eval_shape(weights, live):
    hf = weights[1]
    ids = TOK.encode_ordinary(PROMPTS[0])
    ref = hf_logprobs(hf, ids)
    # what lm-eval's local-completions sends: a list of token-id lists, echo, logprobs 1, max_tokens 1
    body = {"model": "tiny", "prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    c = httpx.post(live.url + "/v1/completions", json=body).json()["choices"][0]
    nxt = int(ref[-1].argmax())
    assert c["logprobs"]["token_logprobs"][-1] == pytest.approx(float(ref[-1, nxt]), abs=1e-4)
    assert c["logprobs"]["tokens"][-1] == TOK.decode([nxt]) and c["text"] == PROMPTS[0] + TOK.decode([nxt])
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    [(total, greedy)] = LocalCompletionsAPI.parse_logprobs({"choices": [c]}, ctxlens=[4])
    assert total == pytest.approx(float(sum(ref[i - 1, ids[i]] for i in range(4, len(ids)))), abs=1e-4)
    assert greedy == all(int(ref[i - 1].argmax()) == ids[i] for i in range(4, len(ids)))
    # a string prompt, k > 1 generated tokens: the prompt exact, then what the (fp16) engine decodes
    r = live.client.completions.create(model="tiny", prompt=PROMPTS[0], echo=True, logprobs=1, max_tokens=5,
                                       temperature=0)
    gen = alone(live.model, ids, 5)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == PROMPTS[0] + TOK.decode(gen) and lp.tokens[len(ids):] == [TOK.decode([t]) for t in gen]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                          abs=1e-4)
    assert len(lp.token_logprobs) == len(ids) + 5 and all(v <= 0 for v in lp.token_logprobs[1:])
    # echo without logprobs: the text only
    r = live.client.completions.create(model="tiny", prompt=PROMPTS[2], echo=True, max_tokens=0)
    assert r.choices[0].text == PROMPTS[2] and r.choices[0].logprobs is None


def test_several_prompts_without_echo_are_one_choice_each(live):
    ids = [TOK.encode_ordinary(p) for p in PROMPTS]
    r = live.client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, ids):
        assert c.text == TOK.decode(alone(live.model, p, 6))
    one = live.client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)
    assert one.choices[0].text == r.choices[1].text


def test_quantized_base_scores_its_dequantized_weights(weights):
    """An int8 base decoding with its own kernels: the prompt is scored with the dequantized weights
    in fp32 (the reference: transformers' model holding those dequantized weights)."""
    from minigpt.inference.decode_weights import for_decoding
    from minigpt.model.quant import QuantLinear

    model = GPT.from_pretrained(weights[0], quantize="int8")
    hf = transformers.GPT2LMHeadModel.from_pretrained(weights[0]).eval()
    with torch.no_grad():                             # HF Conv1D weights are (in, out)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                hf.get_submodule(name).weight.copy_(m.dense(torch.float32).t())
    scorer = Scorer(model)
    for_decoding(model)
    srv = Live(model=model, scorer=scorer)
    try:
        ids = TOK.encode_ordinary(PROMPTS[1])[:9]     # short: int8 layers take their bf16 kernel for few rows
        r = srv.client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=0)
    finally:
        srv.close()
    ref = hf_logprobs(hf, ids)
    assert r.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)


@pytest.mark.parametrize("body,fragment", [
    ({"prompt": [1] * 60, "echo": True, "logprobs": 1, "max_tokens": 5}, "exceeds the model's context of 64"),
    ({"prompt": [1] * 65, "echo": True, "logprobs": 1, "max_tokens": 0}, "exceeds the model's context of 64"),
    ({"prompt": [[1, 2], [1] * 70], "echo": True, "max_tokens": 0}, "prompt 1 of 70 tokens"),
    ({"prompt": "hi", "max_tokens": 0}, "'max_tokens' must be >= 1"),
    ({"prompt": "hi", "echo": True, "max_tokens": -1}, "'max_tokens' must be >= 0"),
    ({"prompt": "hi", "echo": True, "stream": True}, "'stream' is not supported with 'echo'"),
    ({"prompt": ["a", "b"], "stream": True}, "or with several prompts"),
    ({"prompt": [1, 50257]}, "token id 50257, outside the vocabulary"),
    ({"prompt": [[1], True]}, "'prompt[1]' must be a non-empty string or a non-empty list of token ids"),
    ({"prompt": ["a", [1, "b"]]}, "'prompt[1]' must be"),
    ({"prompt": []}, "'prompt' must be a non-empty string, a list of token ids, or a list of either"),
    ({"prompt": "hi", "echo": "yes"}, "'echo' must be bool"),
    ({"prompt": "hi", "echo": True, "logprobs": 9}, "'logprobs' must be an integer in [0, 5]"),
], ids=["echo+k-too-long", "echo-too-long", "second-too-long", "max-tokens-0", "echo-negative", "echo-stream",
        "several-stream", "bad-id", "bool-item", "mixed", "empty", "echo-not-bool", "logprobs-9"])
def test_bad_echo_requests_get_one_line_400s(live, body, fragment):
    r = httpx.post(live.url + "/v1/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and fragment in err["message"] and "\n" not in err["message"], err
    if "context" in fragment:
        assert err["code"] == "context_length_exceeded"


def test_tokenizer_routes_serve_lm_evals_remote_tokenizer(live):
    text = "Hello world<|endoftext|> again"
    r = httpx.post(live.url + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == TOK.encode(text, allowed_special="all") and r["tokens"][2] == 50256
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    assert httpx.post(live.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    info = httpx.get(live.url + "/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    bad = httpx.post(live.url + "/detokenize", json={"tokens": [1, -2]})
    assert bad.status_code == 400 and "'tokens' must be a list of token ids" in bad.json()["error"]["message"]
    utils = pytest.importorskip("lm_eval.utils")
    assert utils.check_remote_tokenizer_support(live.url + "/v1/completions")
    tok = utils.RemoteTokenizer(live.url + "/v1/completions")
    assert tok.eos_token_id == 50256 and tok.encode("a cat") == TOK.encode("a cat") and tok.decode([64]) == "a"


@pytest.mark.parametrize("weights_flag", ["auto", "int8"])
def test_serve_command_scores_in_fp32_whatever_it_decodes_with(weights, weights_flag):
    """`minigpt serve`: with the default weights (fp32, repacked) the scorer reuses the decoding layers;
    with int8 it keeps the fp32 ones it made before the swap."""
    import signal
    import subprocess
    import sys

    from serving import free_port, wait_healthy

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "minigpt", "serve", "--model", str(weights[0]), "--port", str(port),
                          "--weights", weights_flag, "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ids = TOK.encode_ordinary(PROMPTS[1])
    try:
        wait_healthy(p, f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1,
                                                                          "max_tokens": 0}).json()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
    assert ("weights int8" if weights_flag == "int8" else "weights fp32") in out
    ref = hf_logprobs(weights[1], ids)
    assert r["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4)
