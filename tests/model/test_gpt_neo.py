"""GPT-Neo as a configuration of minigpt's one GPT (config.arch "gpt_neo"), checked against transformers'
GPTNeoForCausalLM and peft: logits (tiny random models whose local window is shorter than the sequence, and
the 125M shape), KV-cache greedy decoding beyond the window, the serving engine, checkpoints both ways,
LoRA / DoRA / IA3 adapters both ways, QLoRA, GGUF refusal, and finetune.py -> chat's load path."""
from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch

from minigpt import GPT, GPTConfig, get_tokenizer
from minigpt.errors import ConfigError
from minigpt.methods import load_adapter, save_adapter
from minigpt.methods.ia3 import IA3Config, ia3_layers
from minigpt.methods.lora import LoRAConfig, add_lora, lora_layers
from minigpt.model.quant import QuantLinear, quantize_model
from minigpt.weights.checkpoint import _named, model_from_state_dict
from minigpt.weights.keymap import hf_to_minigpt

transformers = pytest.importorskip("transformers")

# a tiny GPT-Neo: GPT-2's vocabulary (for the tokenizer-driven tests), window 4 < the sequences used
TINY = dict(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_layers=4, num_heads=4,
            attention_types=[[["global", "local"], 2]], window_size=4)
X = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))      # (B, T), T > window


def hf_neo(seed: int = 0, std: float = 0.2, **kw):
    """A random GPTNeoForCausalLM, no dropout, weights N(0, std) (LayerNorm gains around 1)."""
    cfg = transformers.GPTNeoConfig(**{**TINY, **kw}, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    hf = transformers.GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, std)
    return hf


def minigpt_from(hf) -> GPT:
    cfg = GPTConfig.from_hf_dict(hf.config.to_dict())
    return model_from_state_dict(cfg, hf_to_minigpt(hf.state_dict()), model_cls=GPT)


def logits(model, x=X) -> torch.Tensor:
    """(B, T, V) logits of a minigpt GPT, a transformers model or a peft model."""
    with torch.no_grad():
        return model(x) if isinstance(model, GPT) else model(input_ids=x).logits


@pytest.fixture(scope="module")
def neo_dir(tmp_path_factory):
    """A tiny GPT-Neo folder written by transformers (config.json + model.safetensors)."""
    d = tmp_path_factory.mktemp("neo")
    hf_neo().save_pretrained(d)
    return d


# --- the model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},                                                                      # global, local, global, local
    dict(num_layers=3, num_heads=2, attention_types=[[["local"], 3]], window_size=3),
    dict(num_layers=2, attention_types=[[["global"], 2]]),
    dict(attention_types=[[["local", "global"], 1], [["local"], 2]], window_size=1),
])
def test_logits_match_transformers(kw):
    hf = hf_neo(**kw)
    m = minigpt_from(hf)
    assert m.config.arch == "gpt_neo" and list(m.config.attention_layers) == hf.config.attention_layers
    diff = (logits(m) - logits(hf)).abs().max().item()
    assert diff < 1e-4, diff
    # the window matters here: with every layer global the logits differ
    if "local" in hf.config.attention_layers:
        glob = GPT(GPTConfig(**{**m.config.to_dict(), "attention_layers": ["global"] * m.config.n_layer}))
        glob.load_state_dict(m.state_dict())
        assert (logits(glob.eval()) - logits(hf)).abs().max() > 1e-2


def test_names_layout_and_gpt2_untouched():
    m = minigpt_from(hf_neo())
    keys = set(m.state_dict())
    assert "transformer.h.0.attn.attention.q_proj.weight" in keys and "transformer.h.3.mlp.c_fc.bias" in keys
    assert not any(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in keys)
    assert "transformer.h.0.attn.attention.out_proj.bias" in keys and "lm_head.weight" in keys
    assert m.lm_head.weight is m.transformer.wte.weight
    # GPT-2's config and names are what they were
    g = GPTConfig()
    assert "arch" not in g.to_dict() and GPTConfig.from_dict(g.to_dict()) == g
    assert "transformer.h.0.attn.c_attn.weight" in GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8)).state_dict()
    neo = GPTConfig.from_name("gpt-neo-125m")
    assert GPTConfig.from_dict(json.loads(json.dumps(neo.to_dict()))) == neo


def _meta_pair(preset: str):
    c = GPTConfig.from_name(preset)
    hc = transformers.GPTNeoConfig(hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
                                   attention_types=[[["global", "local"], c.n_layer // 2]])
    with torch.device("meta"):
        return GPT(c), transformers.GPTNeoForCausalLM(hc)


@pytest.mark.parametrize("preset", ["gpt-neo-125m", "gpt-neo-1.3B", "gpt-neo-2.7B"])
def test_full_size_shapes_and_parameter_counts(preset):
    ours, hf = _meta_pair(preset)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters())    # both count the tied head once
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}    # (tied: equal to wte)
    want = {k: tuple(v.shape) for k, v in hf_to_minigpt(sd).items()}
    have = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    assert have == want
    cfg = _named(GPTConfig.from_hf_dict(hf.config.to_dict()))
    assert (cfg.block_size, cfg.window_size, cfg.attention_layers) == (2048, 256, ours.config.attention_layers)
    assert cfg.name == preset and _named(GPTConfig()).name == "gpt2"


def test_125m_forward_past_the_window_matches_transformers():
    torch.manual_seed(0)
    hf = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(
        hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]])).eval()
    m = minigpt_from(hf)
    x = torch.randint(0, 50257, (1, 300), generator=torch.Generator().manual_seed(1))   # 300 > window 256
    diff = (logits(m, x) - logits(hf, x)).abs().max().item()
    assert diff < 1e-3, diff


# --- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [True, False])
def test_greedy_kv_cache_beyond_the_window_equals_transformers(pack):
    hf = hf_neo()
    m = minigpt_from(hf)
    prompt = X[:1, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert m.generate(prompt, 40, pack=pack).tolist() == want.tolist()


def test_left_padded_batch_and_static_steps_equal_each_row_alone():
    from minigpt.inference.generate import _static_step

    m = minigpt_from(hf_neo())
    a, b = X[0, :7].tolist(), X[1, :3].tolist()
    alone = [m.generate(torch.tensor([p]), 20)[0, len(p):].tolist() for p in (a, b)]
    idx = torch.tensor([a, [0] * 4 + b])
    am = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    out = m.generate(idx, 20, attention_mask=am)
    assert out[:, 7:].tolist() == alone
    # the compiled decoding step's eager form: whole-cache masks, a (1,) tensor start
    L, toks = 32, []
    caches = m.new_caches(1, L)
    with torch.no_grad():
        nxt = m(torch.tensor([a]), caches=caches, last_only=True)[:, -1].argmax(-1)
        for t in range(20):
            toks.append(int(nxt))
            slot = torch.tensor([len(a) + t])
            keep = torch.ones(1, 1, 1, L, dtype=torch.bool)
            nxt = _static_step(m, nxt[:, None], slot, slot, keep, caches)[:, -1].argmax(-1)
    assert toks == alone[0]


def test_engine_batch_equals_each_reply_alone():
    from minigpt.inference.engine import Engine, Request
    from minigpt.inference.sampling import SamplingConfig

    tok = get_tokenizer()
    m = minigpt_from(hf_neo())
    prompts = [tok.encode(p) for p in ("Hello there", "The quick brown fox jumps", "a", "One two three four")]
    done = threading.Semaphore(0)
    engine = Engine(m, tok, max_batch=3).start()                  # 4 requests: one joins as another leaves
    try:
        reqs = [Request(p, 10 + 3 * i, SamplingConfig(0.0), eos_token_id=-1,
                        on_event=lambda e: done.release() if e.kind in ("done", "error") else None)
                for i, p in enumerate(prompts)]
        for r in reqs:
            engine.submit(r)
        for _ in reqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    for p, r in zip(prompts, reqs):
        assert r.tokens == m.generate(torch.tensor([p]), r.max_new_tokens)[0, len(p):].tolist()


# --- checkpoints --------------------------------------------------------------------------------

def test_save_pretrained_loads_in_transformers(tmp_path):
    m = minigpt_from(hf_neo())
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt_neo" and cfg["architectures"] == ["GPTNeoForCausalLM"]
    assert cfg["attention_types"] == [[["global", "local"], 2]] and cfg["window_size"] == 4
    assert (cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"], cfg["max_position_embeddings"]) == (32, 4, 4, 64)
    assert cfg["activation_function"] == "gelu_new" and cfg["intermediate_size"] is None
    hf = transformers.GPTNeoForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(hf), logits(m), atol=1e-5)
    again = GPT.from_pretrained(tmp_path)
    assert again.config == m.config and torch.equal(logits(again), logits(m))


def test_transformers_folders_load(neo_dir, tmp_path):
    hf = transformers.GPTNeoForCausalLM.from_pretrained(neo_dir).eval()
    m = GPT.from_pretrained(neo_dir)
    assert torch.allclose(logits(m), logits(hf), atol=1e-4)
    # an older pytorch_model.bin: the attention-mask buffers and a (tied) lm_head are in the file
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((neo_dir / "config.json").read_text())
    sd = dict(hf.state_dict())
    for i in range(4):
        sd[f"transformer.h.{i}.attn.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        sd[f"transformer.h.{i}.attn.attention.masked_bias"] = torch.tensor(-1e9)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    torch.save(sd, d / "pytorch_model.bin")
    assert torch.equal(logits(GPT.from_pretrained(d)), logits(m))


def test_gguf_export_is_refused(tmp_path):
    from minigpt.weights.gguf.export import export_gguf

    with pytest.raises(ConfigError, match="llama.cpp has no gpt_neo") as e:
        export_gguf(minigpt_from(hf_neo()), tmp_path / "m.gguf")
    assert "\n" not in str(e.value)


# --- adapters -----------------------------------------------------------------------------------

def _randomize(model, seed: int = 1, std: float = 0.1) -> None:
    """Redraw the trainable (adapter) parameters: LoRA factors N(0, std); IA3 vectors and DoRA magnitudes
    keep their values plus N(0, std) noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g) * std
                p.copy_(p + noise if "ia3" in name or "magnitude" in name else noise)


def _peft_load(hf, d):
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(hf, str(d)).eval()


@pytest.mark.parametrize("method,kw,targets", [
    ("lora", {}, ["q_proj", "v_proj"]),                                            # PEFT's default for gpt_neo
    ("lora", dict(targets=("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")),
     ["c_fc", "c_proj", "k_proj", "out_proj", "q_proj", "v_proj"]),
    ("dora", dict(targets=("q_proj", "out_proj", "c_fc")), ["c_fc", "out_proj", "q_proj"]),
    ("ia3", {}, ["q_proj", "v_proj", "mlp.c_proj"]),
])
def test_minigpt_adapters_load_in_peft(tmp_path, method, kw, targets):
    m = minigpt_from(hf_neo())
    if method == "ia3":
        cfg = IA3Config(**kw)
    else:
        cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, use_dora=method == "dora", **kw)
    cfg.apply(m)
    _randomize(m)
    if not kw:
        assert list(cfg.targets) == targets                                       # the model's defaults
    save_adapter(m, tmp_path / "ad")
    acfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert acfg["fan_in_fan_out"] is False
    assert sorted(acfg["target_modules"]) == sorted(t.removeprefix("mlp.") for t in targets)
    if method == "ia3":
        assert acfg["feedforward_modules"] == ["c_proj"]
    pm = _peft_load(hf_neo(), tmp_path / "ad")
    diff = (logits(pm) - logits(m)).abs().max().item()
    assert diff < 1e-4, diff
    assert (logits(m) - logits(hf_neo())).abs().max() > 1e-2                       # the adapter did something


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_peft_adapters_load_in_minigpt(tmp_path, method):
    from peft import IA3Config as PeftIA3
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "ia3":
            pcfg = PeftIA3(task_type="CAUSAL_LM", target_modules=["k_proj", "out_proj", "c_fc", "c_proj"],
                           feedforward_modules=["c_proj"])
        else:
            pcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "c_fc"],
                              use_dora=method == "dora", task_type="CAUSAL_LM")
        pm = get_peft_model(hf_neo(), pcfg)
    _randomize(pm)
    pm.save_pretrained(str(tmp_path / "peft"))
    m = load_adapter(minigpt_from(hf_neo()), tmp_path / "peft")
    layers = ia3_layers(m) if method == "ia3" else lora_layers(m)
    assert len(layers) == (4 if method == "ia3" else 3) * 4
    diff = (logits(m) - logits(pm.eval())).abs().max().item()
    assert diff < 1e-4, diff


def test_gpt2_targets_on_gpt_neo_are_refused_in_one_line():
    for make in (lambda m: add_lora(m, targets=("c_attn",)), lambda m: LoRAConfig(targets=("q", "v")).apply(m),
                 lambda m: IA3Config(targets=("c_attn", "mlp.c_proj")).apply(m),
                 lambda m: add_lora(m, targets=("attn.c_proj",))):
        with pytest.raises(ConfigError, match="q_proj, k_proj, v_proj, out_proj") as e:
            make(minigpt_from(hf_neo()))
        assert "\n" not in str(e.value)
    from minigpt.methods import method_config
    with pytest.raises(ConfigError, match="GPT-2 only"):
        method_config("prefix", num_virtual_tokens=2).apply(minigpt_from(hf_neo()))
    # the defaults follow the model
    cfg = LoRAConfig()
    cfg.apply(minigpt_from(hf_neo()))
    assert cfg.targets == ("q_proj", "v_proj") and cfg.describe() == "LoRA r=8 alpha=16 on q_proj, v_proj"
    assert LoRAConfig().targets == ("c_attn",)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_qlora_on_gpt_neo_trains(neo_dir, mode):
    m = GPT.from_pretrained(neo_dir, quantize=mode)
    quant = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert len(quant) == 6 * 4 and "transformer.h.0.attn.attention.k_proj" in quant
    full = GPT.from_pretrained(neo_dir)
    assert torch.nn.functional.cosine_similarity(logits(m).flatten(), logits(full).flatten(), dim=0) > 0.9
    add_lora(m, r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "c_fc"))
    m.train()
    out = m(X)
    loss = torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.size(-1)), X[:, 1:].reshape(-1))
    loss.backward()
    grads = [lay.lora_B.grad for lay in lora_layers(m).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in m.named_parameters() if "lora_" not in n)
    assert quantize_model(minigpt_from(hf_neo()), mode) is not None


# --- the command line -----------------------------------------------------------------------------

def test_finetune_lora_then_chat_load_path(neo_dir, tmp_path):
    from minigpt.commands import finetune as ft
    from minigpt.commands.args import parse_args
    from minigpt.training.runs import load_chat_model

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in ("red", "blue", "green", "white", "black", "yellow", "dark", "hot")))
    out = tmp_path / "ft"
    ft.finetune(parse_args(ft.FinetuneArgs, [str(a) for a in (
        "--base", neo_dir, "--data", data, "--out-dir", out, "--lora", "--max-steps", 3, "--batch-size", 2,
        "--max-length", 32, "--threads", 1, "--samples", 1, "--sample-tokens", 2, "--precision", "fp32",
        "--device", "cpu", "--eval-interval", 3)]))
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["target_modules"] == ["q_proj", "v_proj"] and acfg["fan_in_fan_out"] is False
    loaded = load_chat_model(str(out))
    assert loaded.model.config.arch == "gpt_neo" and not lora_layers(loaded.model)        # merged
    assert loaded.model.generate(X[:1, :3], 8).shape == (1, 11)
