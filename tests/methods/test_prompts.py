"""Prefix tuning and prompt tuning (minigpt.methods.prefix_tuning): PEFT as the reference in both directions,
parameter counts, generation / engine / chat with virtual tokens in the KV cache, and errors."""
from __future__ import annotations

import copy
import json
import threading
import warnings

import pytest
import tiny
import torch

from minigpt import GPT, GPTConfig, get_tokenizer
from minigpt.errors import AdapterError, CheckpointError, ConfigError
from minigpt.inference.decode_weights import prepare_for_decoding
from minigpt.inference.generate import generate, stream
from minigpt.methods import count_parameters, load_adapter, method_config, method_of, save_adapter
from minigpt.methods.prefix_tuning import (
    MLP_KEY_PREFIX,
    PrefixConfig,
    PrefixTuning,
    PromptConfig,
    PromptTuning,
    remove,
    text_init_embeddings,
)

# PEFT's forward passes the prefix as `past_key_values` (deprecated in transformers 5) and warns that
# it ignores position ids: noise here
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning",
                                        "ignore:Position ids are not supported:UserWarning")
TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64)      # full GPT-2 vocabulary (text init)
INIT_TEXT = "Answer the question briefly and politely:"
CONFIGS = {
    "prefix": PrefixConfig(4),
    "prefix-mlp": PrefixConfig(4, projection=True, encoder_hidden_size=48),
    "prompt": PromptConfig(4),
    "prompt-text": PromptConfig(12, init="text", init_text=INIT_TEXT),
}


# --- helpers -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random GPT-2 (weights at std 0.2, LayerNorm gains near 1) saved in HF's layout."""
    m = tiny.gpt(**TINY, std=0.2, train=True)
    d = tmp_path_factory.mktemp("base")
    m.save_pretrained(d)
    return d


def ours(base_dir) -> GPT:
    return GPT.from_pretrained(base_dir).eval()


def hf(base_dir):
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.GPT2LMHeadModel.from_pretrained(str(base_dir)).eval()


def peft_from_dir(model, d):
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(d)).eval()


def randomize(module, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(seed=0, B=2, T=9):
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def real_logits(model, x):
    """A PEFT model's logits for the real tokens (prompt tuning's output has P virtual positions first)."""
    with torch.no_grad():
        out = model(input_ids=x).logits
    return out[:, -x.size(1):]


def greedy_by_full_forwards(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation recomputing every position each step (no KV cache)."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(prompt):].tolist()


# --- minigpt adapters in PEFT and back -------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_minigpt_adapter_loads_in_peft(tmp_path, base_dir, name):
    cfg = CONFIGS[name]
    m = cfg.apply(ours(base_dir))
    if name == "prompt-text":                          # the init: the text's token embeddings, repeated to P
        toks = get_tokenizer().encode(INIT_TEXT)
        assert 0 < len(toks) < 12
        want = m.transformer.wte.weight[torch.tensor((toks * 2)[:12])]
        assert torch.equal(m.kv_prefix.prompt_embeddings, want)
    randomize(m.kv_prefix)
    x = ids()
    with torch.no_grad():
        mine = m(x)
        base = hf(base_dir)(input_ids=x).logits
    save_adapter(m, tmp_path / "ad", base_model_name_or_path="tiny")
    conf = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    P = cfg.num_virtual_tokens
    assert (conf["num_virtual_tokens"], conf["token_dim"], conf["num_layers"], conf["num_attention_heads"],
            conf["num_transformer_submodules"], conf["task_type"]) == (P, 64, 2, 4, 1, "CAUSAL_LM")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    if name.startswith("prefix"):
        assert conf["peft_type"] == "PREFIX_TUNING" and conf["prefix_projection"] is cfg.projection
        assert conf["encoder_hidden_size"] == (48 if cfg.projection else 64)
        assert tensors["prompt_embeddings"].shape == (P, 2 * 2 * 64)
        assert {k for k in tensors if k.startswith(MLP_KEY_PREFIX)} == (
            {MLP_KEY_PREFIX + k for k in ("embedding", "transform.0.weight", "transform.0.bias",
                                           "transform.2.weight", "transform.2.bias")} if cfg.projection else set())
    else:
        assert conf["peft_type"] == "PROMPT_TUNING" and set(tensors) == {"prompt_embeddings"}
        assert tensors["prompt_embeddings"].shape == (P, 64)
        assert conf["prompt_tuning_init"] == ("TEXT" if cfg.init == "text" else "RANDOM")
        assert conf["prompt_tuning_init_text"] == cfg.init_text
    theirs = real_logits(peft_from_dir(hf(base_dir), tmp_path / "ad"), x)
    assert (mine - base).abs().max() > 1e-2                      # the virtual tokens matter
    assert (mine - theirs).abs().max() < 1e-4

    back = load_adapter(ours(base_dir), tmp_path / "ad")         # minigpt reads its own folder back
    assert method_of(back) == method_of(m) and count_parameters(back) == count_parameters(m)
    with torch.no_grad():
        assert (back(x) - mine).abs().max() < 1e-5
    if getattr(cfg, "projection", False):                       # exact resume keeps the MLP
        assert back.kv_prefix.projection and torch.equal(back.kv_prefix.embedding, m.kv_prefix.embedding)


def _peft_config(name, tokenizer_dir=None):
    from peft import PrefixTuningConfig, PromptTuningConfig
    if name == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    if name == "prefix-mlp":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=True,
                                  encoder_hidden_size=40)
    if name == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                              prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(tokenizer_dir))


@pytest.mark.parametrize("name", ["prefix", "prefix-mlp", "prompt"])
def test_peft_adapter_loads_in_minigpt(tmp_path, base_dir, name):
    from peft import get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf(base_dir), _peft_config(name))
    randomize(pm.prompt_encoder["default"], seed=3, std=0.3)
    pm.eval()
    x = ids(1)
    theirs = real_logits(pm, x)
    pm.save_pretrained(str(tmp_path / "peft"))

    m = load_adapter(ours(base_dir), tmp_path / "peft")
    with torch.no_grad():
        mine = m(x)
    assert (mine - theirs).abs().max() < 1e-4
    assert method_of(m) == name.split("-")[0] and m.num_virtual_tokens == 5 and m.context_length == 59
    if name == "prefix-mlp":               # PEFT keeps the projected table, not the MLP: loads as a table
        assert not m.kv_prefix.projection
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["kv_prefix.prompt_embeddings"]


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(tmp_path_factory):
    """transformers' GPT-2 tokenizer files rebuilt from minigpt's shipped ranks (no network)."""
    from test_tokenizer import bytes_to_unicode, recover_merges, shipped_ranks
    ranks = shipped_ranks()
    b2u = bytes_to_unicode()
    u = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    vocab = {u(t): r for t, r in ranks.items()}
    vocab["<|endoftext|>"] = 50256
    d = tmp_path_factory.mktemp("gpt2_tok")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{u(a)} {u(b)}" for a, b in recover_merges(ranks))
                                  + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    return d


@pytest.mark.parametrize("P", [5, 20])                  # the text cut, and repeated
def test_text_init_matches_peft(tmp_path, base_dir, gpt2_tokenizer_dir, P):
    from peft import PromptTuningConfig, get_peft_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf(base_dir), PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="TEXT",
            prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(gpt2_tokenizer_dir))).eval()
    m = PromptConfig(P, init="text", init_text=INIT_TEXT).apply(ours(base_dir))
    theirs = pm.prompt_encoder["default"].embedding.weight
    assert torch.equal(m.kv_prefix.prompt_embeddings, theirs)
    assert torch.equal(text_init_embeddings(m, INIT_TEXT, P), theirs)
    x = ids(2)
    with torch.no_grad():
        assert (m(x) - real_logits(pm, x)).abs().max() < 1e-4
    pm.save_pretrained(str(tmp_path / "peft"))
    back = load_adapter(ours(base_dir), tmp_path / "peft")
    assert (back.kv_prefix.init, back.kv_prefix.init_text) == ("text", INIT_TEXT)
    assert torch.equal(back.kv_prefix.prompt_embeddings, theirs)


# --- parameter counts (GPT-2 124M) ------------------------------------------------------------------

@pytest.mark.parametrize("ours_cfg,peft_kw,expected", [
    (PrefixConfig(20), dict(), 20 * 12 * 2 * 768),
    (PrefixConfig(20, projection=True), dict(prefix_projection=True),
     20 * 768 + (768 * 768 + 768) + (768 * 12 * 2 * 768 + 12 * 2 * 768)),
    (PrefixConfig(10, projection=True, encoder_hidden_size=128), dict(prefix_projection=True, encoder_hidden_size=128),
     10 * 768 + (768 * 128 + 128) + (128 * 12 * 2 * 768 + 12 * 2 * 768)),
    (PromptConfig(20), None, 20 * 768),
])
def test_gpt2_trainable_counts_equal_peft(ours_cfg, peft_kw, expected):
    import transformers
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    P = ours_cfg.num_virtual_tokens
    pc = (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P) if peft_kw is None
          else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **peft_kw))
    with torch.device("meta"):                        # shapes only: no memory, no init time
        m = GPT(GPTConfig.from_name("gpt2"))
        h = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    ours_cfg.apply(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainable, total = get_peft_model(h, pc).get_nb_trainable_parameters()
    assert count_parameters(m) == (trainable, total)
    assert trainable == expected


# --- generation with virtual tokens -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["prefix-mlp", "prompt-text"])
def test_padded_greedy_generate_equals_full_forwards(base_dir, name):
    m = CONFIGS[name].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=7, std=0.3)
    rows = [ids(3, 1, 3)[0].tolist(), ids(4, 1, 8)[0].tolist(), ids(5, 1, 6)[0].tolist()]
    T = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    out = generate(m, idx, 10, attention_mask=mask, compile=False)
    for i, r in enumerate(rows):
        assert out[i, T:].tolist() == greedy_by_full_forwards(m, r, 10), i
    assert list(stream(m, rows[1], 10)) == out[1, T:].tolist()


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_greedy_generate_equals_peft_generate(tmp_path, base_dir, name):
    """PEFT's cached generate ignores the virtual tokens under transformers 5 (its prompt goes in
    `past_key_values`, the model reads `cache`); its uncached generate is the reference."""
    m = CONFIGS[name].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=9, std=0.5)
    save_adapter(m, tmp_path / "ad")
    x = ids(6, 1, 7)
    with torch.no_grad():
        theirs = peft_from_dir(hf(base_dir), tmp_path / "ad").generate(
            input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False,
            use_cache=False, pad_token_id=50256, eos_token_id=None)
    assert torch.equal(generate(m, x, 16), theirs)


@pytest.mark.parametrize("cache_length", [256, 8], ids=["full-caches", "caches-grow"])
def test_engine_equals_generate_with_a_prefix(base_dir, monkeypatch, cache_length):
    from minigpt.inference.engine import Engine, Request
    from minigpt.inference.sampling import SamplingConfig
    from minigpt.model.gpt import KVCache
    moves = []
    real_copy_row = KVCache.copy_row
    monkeypatch.setattr(KVCache, "copy_row", lambda self, *a: moves.append(a) or real_copy_row(self, *a))
    m = CONFIGS["prefix"].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=11, std=0.5)
    prompts = [ids(20 + i, 1, 3 + 2 * i)[0].tolist() for i in range(5)]
    lengths = [9, 4, 12, 6, 8]                         # rows finish at different steps: rows move (copy_row)
    engine = Engine(m, get_tokenizer(), max_batch=3, cache_length=cache_length).start()
    assert engine.context_length == engine.block_size == 60 and engine.capacity == min(60, cache_length)
    done = threading.Semaphore(0)
    try:
        reqs = [Request(p, n, SamplingConfig(0.0), eos_token_id=-1,
                        on_event=lambda ev: done.release() if ev.kind in ("done", "error") else None)
                for p, n in zip(prompts, lengths)]
        for r in reqs:
            engine.submit(r)
        for _ in reqs:
            assert done.acquire(timeout=60)
        with pytest.raises(ConfigError, match="context of 60 tokens"):
            engine.submit(Request(prompts[0], 58, SamplingConfig(0.0)))
    finally:
        engine.stop()
    assert moves                                       # a row moved into a freed one, prefix and all
    assert engine.capacity == (60 if cache_length > 60 else 32)   # grown to hold prompt + tokens (<= 23)
    for p, n, r in zip(prompts, lengths, reqs):
        assert r.tokens == generate(m, torch.tensor([p]), n)[0, len(p):].tolist()


def test_compiled_path_refills_the_prefix(base_dir, monkeypatch):
    """generate(compile=True) keeps its caches between calls: the virtual tokens are rewritten each
    call (here the step runs uncompiled: the same static-shape code path, without a compiler)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    m = CONFIGS["prompt"].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=12, std=0.5)
    rows = [ids(30, 1, 4)[0].tolist(), ids(31, 1, 7)[0].tolist()]
    idx = torch.tensor([[0] * 3 + rows[0], rows[1]])
    mask = torch.tensor([[0] * 3 + [1] * 4, [1] * 7])
    for seed in (12, 13):                              # new prefix values between the calls
        randomize(m.kv_prefix, seed=seed, std=0.5)
        assert torch.equal(generate(m, idx[1:], 8, compile=True), generate(m, idx[1:], 8))
        assert torch.equal(generate(m, idx, 8, attention_mask=mask, compile=True),
                           generate(m, idx, 8, attention_mask=mask))
    remove(m)                                          # no virtual tokens now: the caches are remade
    assert m.kv_prefix is None and torch.equal(generate(m, idx[1:], 8, compile=True), generate(m, idx[1:], 8))


def test_prepare_for_decoding_keeps_the_prefix(base_dir):
    m = CONFIGS["prefix-mlp"].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=14, std=0.3)
    x = ids(7, 1, 6)
    want = generate(m, x, 12)
    fast = prepare_for_decoding(copy.deepcopy(m), "fp32")
    assert isinstance(fast.kv_prefix.transform[0], torch.nn.Linear)        # left as it is
    assert torch.equal(generate(fast, x, 12), want)


def test_chat_session_context_counts_virtual_tokens(base_dir):
    from minigpt.inference.chat import ChatSession
    m = PromptConfig(24).apply(ours(base_dir))
    chat = ChatSession(m, template="alpaca", temperature=0.0, max_new_tokens=8)
    assert chat.context_length == chat.block_size == 40
    chat.reply("Hello " * 60)                           # cut to fit 40 - 8 prompt tokens
    assert chat.last_prompt.budget == 32 and len(chat.last_prompt.ids) <= 32 and chat.last_prompt.user_truncated


# --- training --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["prefix-mlp", "prompt"])
def test_only_the_virtual_tokens_train(base_dir, name):
    m = CONFIGS[name].apply(ours(base_dir)).train()
    m.gradient_checkpointing = True
    x = ids(8, 2, 10)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
    from minigpt import lm_loss
    losses = []
    for _ in range(8):
        loss = lm_loss(m(x[:, :-1]), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("kv_prefix."))


@pytest.mark.parametrize("name", ["prefix-mlp", "prompt"])
def test_gradients_equal_peft(base_dir, name):
    """Training sees what PEFT's training sees: the same loss and gradients for every trainable tensor."""
    from peft import get_peft_model
    peft_cfg = _peft_config(name)
    peft_cfg.num_virtual_tokens, peft_cfg.encoder_hidden_size = 4, 48
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf(base_dir), peft_cfg).train()
    m = CONFIGS[name].apply(ours(base_dir)).train()
    randomize(m.kv_prefix, seed=16, std=0.3)
    enc = pm.prompt_encoder["default"]
    theirs_of = {k: enc.get_parameter("embedding.weight" if k in ("embedding", "prompt_embeddings") else k)
                 for k, _ in m.kv_prefix.named_parameters()}
    with torch.no_grad():                              # PEFT's encoder := ours
        for k, p in m.kv_prefix.named_parameters():
            theirs_of[k].copy_(p)
    x = ids(17, 2, 8)
    w = torch.randn(2, 8, 50257, generator=torch.Generator().manual_seed(0))
    mine = (m(x) * w).sum()
    theirs = (pm(input_ids=x).logits[:, -8:] * w).sum()
    mine.backward()
    theirs.backward()
    assert abs(mine.item() - theirs.item()) < 1e-4 * abs(theirs.item())
    for k, p in m.kv_prefix.named_parameters():
        assert (p.grad - theirs_of[k].grad).norm() < 1e-4 * theirs_of[k].grad.norm(), k


def test_loading_into_the_same_method_copies_in_place(tmp_path, base_dir):
    m = CONFIGS["prefix-mlp"].apply(ours(base_dir))
    randomize(m.kv_prefix, seed=15)
    save_adapter(m, tmp_path / "ad")
    other = CONFIGS["prefix-mlp"].apply(ours(base_dir))
    params = list(other.kv_prefix.parameters())
    load_adapter(other, tmp_path / "ad")
    assert all(a is b for a, b in zip(params, other.kv_prefix.parameters()))     # the same Parameters
    assert all(torch.equal(a, b) for a, b in zip(params, m.kv_prefix.parameters()))
    with pytest.raises(AdapterError, match="differs"):
        load_adapter(PrefixConfig(4).apply(ours(base_dir)), tmp_path / "ad")


# --- errors ---------------------------------------------------------------------------------------

def test_too_long_prompts_name_the_virtual_tokens(base_dir):
    m = PrefixConfig(4).apply(ours(base_dir))
    with pytest.raises(ConfigError, match=r"prompt of 61 tokens is longer .*block_size=64 less 4 virtual tokens = 60"):
        generate(m, ids(0, 1, 61), 1)
    with pytest.raises(ConfigError, match=r"50 tokens \+ max_new_tokens=11 = 61 exceeds .*less 4 virtual .* to 10"):
        generate(m, ids(0, 1, 50), 11)
    with pytest.raises(ConfigError, match="less 4 virtual tokens"):
        stream(m, ids(0, 1, 50)[0].tolist(), 11)
    with pytest.raises(ConfigError, match=r"61 tokens exceeds the context length \(64 less 4 virtual tokens\)"):
        m(ids(0, 1, 61))
    assert generate(m, ids(0, 1, 50), 10).shape == (1, 60)


def test_no_room_and_bad_settings():
    m = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    with pytest.raises(ConfigError, match=r"8 virtual tokens leave no room .* context of 8"):
        PrefixConfig(8).apply(m)
    with pytest.raises(ConfigError, match=r"9 virtual tokens .* context of 8"):
        PromptConfig(9).apply(m)
    assert m.kv_prefix is None and all(p.requires_grad for p in m.parameters())
    for bad in (dict(num_virtual_tokens=0), dict(num_virtual_tokens=2.5), dict(projection="yes"),
                dict(encoder_hidden_size=32), dict(projection=True, encoder_hidden_size=0), dict(init_text="x")):
        with pytest.raises(ConfigError):
            method_config("prefix", **bad)
    for bad in (dict(init="vocab"), dict(init="text"), dict(init="text", init_text="  "), dict(init_text="x")):
        with pytest.raises(ConfigError):
            method_config("prompt", **bad)
    cfg = method_config("prompt", num_virtual_tokens=3, init="text", init_text="hi")
    assert method_config(cfg.method, **cfg.to_dict()) == cfg and "3 virtual" in cfg.describe()
    PrefixConfig(7).apply(m)
    with pytest.raises(ConfigError, match="already carries prefix-tuning"):
        PromptConfig(2).apply(m)
    with pytest.raises(CheckpointError):             # not silently saved as a plain GPT-2
        m.save_pretrained("/nonexistent/never-written")


def test_adapter_errors_name_what_differs(tmp_path, base_dir):
    m = PrefixConfig(4).apply(ours(base_dir))
    save_adapter(m, tmp_path / "ad")
    with pytest.raises(AdapterError, match=r"prefix-tuning adapter \(prefix\), not prompt-tuning \(prompt\)"):
        load_adapter(ours(base_dir), tmp_path / "ad", method="prompt")
    other = GPT(GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=64))
    with pytest.raises(AdapterError, match=r"num_layers=2, token_dim=64, num_attention_heads=4; the model has 3 lay"):
        load_adapter(other, tmp_path / "ad")
    small = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=4))
    with pytest.raises(AdapterError, match="4 virtual tokens leave no room"):
        load_adapter(small, tmp_path / "ad")
    assert other.kv_prefix is None and small.kv_prefix is None
    assert isinstance(remove(m), GPT) and m.kv_prefix is None and method_of(m) is None
    assert isinstance(PrefixTuning(2, 4, 64, 3), PrefixTuning) and isinstance(PromptTuning(64, 3), PromptTuning)
