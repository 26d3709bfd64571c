"""GGUF export and import (minigpt.weights.gguf, `minigpt export`), proved against independent references:
llama.cpp itself through llama-cpp-python (greedy continuations, logits, its tokenizer, LoRA
adapters, chat formatting with the embedded template), llama.cpp's own Python `gguf` package
(reading our files, its q8_0 quantizer), Hugging Face `tokenizers` and Jinja2.

llama-cpp-python is a test-only extra that CI does not install (it compiles llama.cpp, ~15 min on
2 cores); its tests skip with a one-line reason where it is missing.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny import gpt as tiny_gpt

from minigpt import GPT, get_tokenizer
from minigpt.commands import export as export_cmd
from minigpt.data.templates import TEMPLATE_NAMES, get_template
from minigpt.errors import CheckpointError, ConfigError
from minigpt.inference.chat import ChatSession
from minigpt.methods.lora import add_lora, lora_layers, merge_and_unload, save_adapter
from minigpt.weights.gguf import (
    chat_template_jinja,
    export_gguf,
    export_lora_gguf,
    gguf_name,
    gpt2_vocab,
    quantize_q8_0,
    read_gguf,
)

try:
    import llama_cpp
except ImportError:                                # pragma: no cover - depends on the machine
    llama_cpp = None
try:
    import gguf as gguf_pkg
except ImportError:                                # pragma: no cover
    gguf_pkg = None

needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python not installed (pip install "
                                 "llama-cpp-python; CI leaves it out)")
needs_gguf_pkg = pytest.mark.skipif(gguf_pkg is None, reason="the gguf package is not installed (pip install gguf)")

TOK = get_tokenizer()
PROMPTS = ["Hello there", "The quick brown fox", "1 2 3 4 5", "def main():\n    return",
           "Shall I compare thee", "naïve café 東京"]
TEXTS = ["Hello world", "  leading spaces   and   trailing   ", "123456789 3.14159 1,000,000 2024-05-01",
         "naïve café — 東京 🙂 Ωμέγα ελληνικά", "def f(x):\n    return x**2  # comment\n\n\tindented",
         "I'm can't they're we've you'll it'd", "<html><body>x</body></html>", "\n\n\n   \n", "a" * 300,
         "  \t mixed\r\nline endings\r\n", "العربية हिन्दी 한국어"]


def tiny(block_size: int = 256, seed: int = 0, std: float = 0.2, **shape) -> GPT:
    """2 layers, 64 dims, weights at std 0.2 (confident logits, no near-ties to flip)."""
    return tiny_gpt(block_size=block_size, seed=seed, std=std, **shape)


def with_lora(model: GPT, seed: int = 1) -> GPT:
    m = copy.deepcopy(model)
    add_lora(m, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_proj", "c_fc"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(m).values():
            layer.lora_B.normal_(0.0, 0.2)
    return m.eval()


def greedy(model: GPT, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model exported in every dtype."""
    d = tmp_path_factory.mktemp("gguf")
    model = tiny()
    return model, {dt: export_gguf(model, d / f"tiny-{dt}.gguf", dt) for dt in ("f32", "f16", "bf16", "q8_0")}


# --- the file itself --------------------------------------------------------------------------------

def _rounded(model: GPT, dtype: str) -> GPT:
    """The model with its matrices passed through the dtype (the reference for each file): f16 and
    bf16 by torch's casts, q8_0 by the gguf package's quantizer (llama.cpp's own Python code)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() < 2 or dtype == "f32":
                continue
            if dtype == "q8_0":
                q = gguf_pkg.quants.quantize(p.numpy(), gguf_pkg.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf_pkg.quants.dequantize(q, gguf_pkg.GGMLQuantizationType.Q8_0)))
            else:
                p.copy_(p.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[dtype])).float())
    return m


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_import_gives_the_exported_weights_logits(files, dtype):
    if dtype == "q8_0" and gguf_pkg is None:
        pytest.skip("the gguf package (the q8_0 reference) is not installed (pip install gguf)")
    model, paths = files
    back = GPT.from_pretrained(paths[dtype])
    assert back.config.n_layer == 2 and back.config.n_embd == 64 and back.config.block_size == 256
    assert back.config.layer_norm_epsilon == 1e-5
    idx = torch.tensor([TOK.encode("The quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        got, ref, orig = back(idx), _rounded(model, dtype)(idx), model(idx)
    assert torch.equal(got, ref) if dtype == "f32" else torch.allclose(got, ref, atol=1e-5, rtol=0)
    # and how far the dtype moved the logits of the original (std ~ 10 here)
    assert (got - orig).abs().max() <= {"f32": 0, "f16": 0.05, "bf16": 0.3, "q8_0": 0.5}[dtype]


@needs_gguf_pkg
def test_gguf_package_reads_our_file(files):
    """llama.cpp's own Python reader: metadata, names, ggml shapes and types, values."""
    model, paths = files
    r = gguf_pkg.GGUFReader(paths["q8_0"])

    def val(key):
        f = r.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()
    assert val("general.architecture") == "gpt2" and val("general.type") == "model"
    assert [val(f"gpt2.{k}") for k in ("block_count", "context_length", "embedding_length", "feed_forward_length",
                                       "attention.head_count")] == [2, 256, 64, 256, 2]
    assert val("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert val("tokenizer.ggml.model") == "gpt2" and val("tokenizer.ggml.pre") == "gpt-2"
    assert val("tokenizer.ggml.bos_token_id") == val("tokenizer.ggml.eos_token_id") == 50256
    assert val("tokenizer.ggml.add_bos_token") is False
    assert len(val("tokenizer.ggml.tokens")) == 50257 and len(val("tokenizer.ggml.merges")) == 50000
    assert val("tokenizer.chat_template") == chat_template_jinja("alpaca")
    names = {t.name: t for t in r.tensors}
    expect = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"}
    for i in range(2):
        expect |= {f"blk.{i}.{p}.{wb}" for p in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up",
                                                  "ffn_down") for wb in ("weight", "bias")}
    assert set(names) == expect                                    # output.weight left out: tied
    assert list(names["blk.0.attn_qkv.weight"].shape) == [64, 192]   # ggml order [in, out]
    assert list(names["blk.1.ffn_down.weight"].shape) == [256, 64]
    assert names["blk.0.attn_qkv.weight"].tensor_type == gguf_pkg.GGMLQuantizationType.Q8_0
    assert names["blk.0.attn_qkv.bias"].tensor_type == gguf_pkg.GGMLQuantizationType.F32
    qkv = gguf_pkg.quants.dequantize(names["blk.0.attn_qkv.weight"].data, gguf_pkg.GGMLQuantizationType.Q8_0)
    ref = _rounded(model, "q8_0").transformer.h[0].attn.c_attn.weight.detach().numpy()
    assert np.array_equal(qkv.reshape(ref.shape), ref)
    f32 = {t.name: t for t in gguf_pkg.GGUFReader(paths["f32"]).tensors}
    assert np.array_equal(np.asarray(f32["token_embd.weight"].data), model.transformer.wte.weight.detach().numpy())


def _q8_0_ggml(x: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q8_0_ref transcribed: per 32-value block, fp32 d = amax / 127, fp32
    id = 1 / d (0 when d = 0), q = roundf(x * id) (the fp32 product, halves away from zero: the
    exact float64 sum of the fp32 value and +-0.5, truncated), then the fp16 of d and the 32 int8."""
    b = np.asarray(x, dtype=np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    y = (b * inv).astype(np.float32).astype(np.float64)
    q = np.trunc(y + np.copysign(0.5, y)).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1).reshape(-1)


def _q8_0_edge_cases(n_blocks: int = 3000, seed: int = 0) -> np.ndarray:
    """Blocks whose scaled values x * (1/d) land exactly on k + 0.5 (ties, both signs) or on the fp32
    number just below it (0.5 - 2**-25 is where floor(|y| + 0.5) goes wrong), over scales 1e-3..1e2,
    plus an all-zero block."""
    rng = np.random.RandomState(seed)
    out = np.zeros((n_blocks, 32), np.float32)
    hits = 0
    for i in range(1, n_blocks):
        amax = np.float32(abs(rng.randn()) * 10.0 ** rng.uniform(-3, 2))
        inv = np.float32(1) / np.float32(amax / np.float32(127))
        row = [amax * rng.choice([-1, 1])]
        while len(row) < 32:
            target = np.float32(rng.choice([0, 0, 1, 2, 63, 126]) + rng.randint(0, 127) % 3 + 0.5)
            if rng.rand() < 0.5:
                target = np.nextafter(target, np.float32(0))
            v = np.float32(target / inv)
            for _ in range(8):                       # walk v until v * inv is the target, if it can be
                y = np.float32(v * inv)
                if y == target:
                    hits += 1
                    break
                v = np.nextafter(v, np.float32(np.inf if y < target else -np.inf))
            if abs(v) <= amax:
                row.append(v * rng.choice([-1, 1]))
        out[i] = row
    assert hits > 20 * n_blocks                       # most values really sit on a tie or just below one
    return out


def test_q8_0_bytes_equal_ggml_reference_on_ties():
    x = _q8_0_edge_cases()
    b = x[1:]                                                       # x[0]: the all-zero block
    y = np.abs(b * (np.float32(1) / (np.abs(b).max(1, keepdims=True) / np.float32(127))))
    assert (y == np.float32(0.5 - 2 ** -25)).sum() > 100 and (y == 0.5).sum() > 100
    want = _q8_0_ggml(x)
    assert np.array_equal(quantize_q8_0(torch.from_numpy(x)), want)
    if gguf_pkg is not None:                          # llama.cpp's Python quantizer agrees, byte for byte
        ref = gguf_pkg.quants.quantize(x, gguf_pkg.GGMLQuantizationType.Q8_0).reshape(-1)
        assert np.array_equal(ref, want)


def test_q8_0_bytes_equal_ggml_reference_large():
    """A GPT-2-sized token embedding (50257 x 768 at std 0.02) and wide-ranged blocks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50257, 768, generator=g) * 0.02
    x[7, :64] = 0                                                  # all-zero blocks: d = 0, q = 0
    x[8] *= torch.logspace(-6, 3, 768)                             # tiny to large scales in one row
    want = _q8_0_ggml(x.numpy())
    got = quantize_q8_0(x)
    assert got.shape == want.shape == (50257 * 768 // 32 * 34,) and np.array_equal(got, want)


@needs_gguf_pkg
def test_exported_q8_0_tensors_are_ggml_bytes(files):
    """Every q8_0 tensor of the exported tiny model (token embedding included) is byte-equal to
    ggml's quantizer run on the model's weights."""
    model, paths = files
    weights = {gguf_name(k): v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    checked = []
    for t in gguf_pkg.GGUFReader(paths["q8_0"]).tensors:
        if t.tensor_type == gguf_pkg.GGMLQuantizationType.Q8_0:
            assert np.array_equal(np.asarray(t.data).reshape(-1), _q8_0_ggml(weights[t.name].numpy())), t.name
            checked.append(t.name)
    assert len(checked) == 2 + 2 * 4 and "token_embd.weight" in checked


def test_tokenizer_metadata_equals_tiktoken(files):
    """The tokens and merges written to the file, run by Hugging Face's BPE, give tiktoken's ids."""
    tokenizers = pytest.importorskip("tokenizers")
    g = read_gguf(files[1]["f32"])
    tokens, merges = g.metadata["tokenizer.ggml.tokens"], g.metadata["tokenizer.ggml.merges"]
    assert (tuple(tokens), tuple(merges)) == gpt2_vocab()
    types = g.metadata["tokenizer.ggml.token_type"]
    assert types[50256] == 3 and set(types[:50256]) == {1}                    # control, normal
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                                     merges=[tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS:
        assert bpe.encode(text).ids == TOK.encode_ordinary(text), text


CONVERSATIONS = [
    ([{"role": "user", "content": "What is 2 + 2?"}], None),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Reverse the word: apple"}], "Be brief."),
    ([{"role": "user", "content": "Summarise", "input": "A long text."}, {"role": "assistant", "content": "Short."},
      {"role": "user", "content": "Again, in French\n(with 'quotes' and \\backslashes)"}], None),
]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_chat_template_renders_what_chat_py_builds(name):
    """Jinja2 as Hugging Face and llama-cpp-python configure it (and plain), each template."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = get_template(name)
    for trim in (True, False):
        env = ImmutableSandboxedEnvironment(trim_blocks=trim, lstrip_blocks=trim, loader=jinja2.BaseLoader())
        tpl = env.from_string(chat_template_jinja(name))
        for msgs, system in CONVERSATIONS:
            full = ([{"role": "system", "content": system}] if system else []) + msgs
            got = tpl.render(messages=full, eos_token="<|endoftext|>", add_generation_prompt=True)
            assert got == t.prompt_text(msgs, system)
            done = full + [{"role": "assistant", "content": "Done."}]
            got = tpl.render(messages=done, eos_token="<|endoftext|>", add_generation_prompt=False)
            assert got == t.render_text(msgs + [{"role": "assistant", "content": "Done."}], system)


def test_lora_adapter_gguf_is_the_merged_update(tmp_path):
    """W + alpha / r * B A from the adapter file (llama.cpp's formula, ggml shapes) is the merged weight."""
    lm = with_lora(tiny())
    path = export_lora_gguf(lm, tmp_path / "adapter.gguf")
    g = read_gguf(path)
    assert g.metadata["general.type"] == "adapter" and g.metadata["adapter.type"] == "lora"
    assert g.metadata["general.architecture"] == "gpt2" and g.metadata["adapter.lora.alpha"] == 8.0
    assert len(g.tensors) == 2 * 2 * 4           # a, b x 2 blocks x c_attn, attn.c_proj, c_fc, mlp.c_proj
    merged = merge_and_unload(copy.deepcopy(lm)).state_dict()
    for i, mod in ((0, "attn.c_attn"), (1, "mlp.c_fc"), (1, "mlp.c_proj")):
        gname = {"attn.c_attn": "attn_qkv", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}[mod]
        a, b = g.tensor(f"blk.{i}.{gname}.weight.lora_a"), g.tensor(f"blk.{i}.{gname}.weight.lora_b")
        base = lm.get_submodule(f"transformer.h.{i}.{mod}").weight.detach()
        assert a.shape == (4, base.shape[1]) and b.shape == (base.shape[0], 4)   # ggml [in, r], [r, out]
        rebuilt = base + 8.0 / a.shape[0] * (b @ a)
        torch.testing.assert_close(rebuilt, merged[f"transformer.h.{i}.{mod}.weight"], rtol=0, atol=1e-5)


def _finetune_folder(tmp_path, template="chat"):
    """A LoRA finetune output as finetune.py leaves it: base folder + adapter + minigpt_finetune.json."""
    base = tiny()
    base.save_pretrained(tmp_path / "base")
    lm = with_lora(base)
    ft = tmp_path / "ft"
    save_adapter(lm, ft, base_model_name_or_path=str(tmp_path / "base"))
    (ft / "minigpt_finetune.json").write_text(json.dumps({"kind": "finetune", "method": "lora", "template": template,
                                                         "base": str(tmp_path / "base")}))
    return base, lm, ft


def test_cli_exports_a_finetune_folder_merged_and_as_adapter(tmp_path, capsys):
    base, lm, ft = _finetune_folder(tmp_path)
    out = tmp_path / "model.gguf"
    assert export_cmd.main(["--gguf", str(out), "--model", str(ft), "--dtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    idx = torch.tensor([TOK.encode("Hello there, general")])
    with torch.no_grad():
        assert torch.allclose(GPT.from_pretrained(out)(idx), merge_and_unload(copy.deepcopy(lm))(idx), atol=1e-4)
    assert read_gguf(out).metadata["tokenizer.chat_template"] == chat_template_jinja("chat")
    # base + llama.cpp adapter in one call; the base file holds the unmerged weights
    b, a = tmp_path / "base.gguf", tmp_path / "adapter.gguf"
    assert export_cmd.main(["--gguf", str(b), "--lora-gguf", str(a), "--model", str(ft), "--dtype", "f32"]) == 0
    with torch.no_grad():
        assert torch.equal(GPT.from_pretrained(b)(idx), base(idx))
    assert read_gguf(a).metadata["adapter.type"] == "lora"


def _one_error_line(argv, capsys) -> str:
    rc = export_cmd.main(argv)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_bad_inputs_give_one_line(tmp_path, capsys, files):
    base, lm, ft = _finetune_folder(tmp_path)
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 8}))
    (prefix / "minigpt_finetune.json").write_text(json.dumps({"kind": "finetune", "method": "prefix"}))
    assert "prefix-tuning adapter" in _one_error_line(["--gguf", str(tmp_path / "x.gguf"), "--model", str(prefix)],
                                                      capsys)
    (prefix / "minigpt_finetune.json").write_text(json.dumps({"kind": "finetune", "method": "prompt"}))
    assert "prompt-tuning" in _one_error_line(["--gguf", str(tmp_path / "x.gguf"), "--adapter", str(prefix)], capsys)
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    assert "--overwrite" in _one_error_line(["--gguf", str(existing), "--model", str(ft)], capsys)
    assert existing.read_bytes() == b"keep"
    argv = ["--gguf", str(tmp_path / "y.gguf"), "--lora-gguf", str(tmp_path / "z.gguf"),
            "--model", str(tmp_path / "base")]
    assert "needs a LoRA adapter" in _one_error_line(argv, capsys)
    assert sorted(p.name for p in tmp_path.glob("*gguf*")) == ["exists.gguf"]   # nothing (half-)written

    # the importer: truncated, not GGUF, an adapter file, a GGUF without the GPT-2 keys
    data = files[1]["f16"].read_bytes()
    for cut, what in ((len(data) - 1000, "truncated GGUF file"), (2000, "truncated GGUF file"),
                      (12, "truncated GGUF file")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=what) as e:
            GPT.from_pretrained(bad)
        assert str(bad) in str(e.value) and len(str(e.value).splitlines()) == 1
    bad = tmp_path / "notgguf.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(CheckpointError, match=f"{bad}: not a GGUF file"):
        GPT.from_pretrained(bad)
    adapter = export_lora_gguf(lm, tmp_path / "a.gguf")
    with pytest.raises(CheckpointError, match="LoRA adapter, not a model"):
        GPT.from_pretrained(adapter)


def test_untied_head_and_non_gpt2_models(tmp_path):
    m = tiny()
    m.lm_head.weight = torch.nn.Parameter(m.transformer.wte.weight.detach().clone() * 0.5)   # untie
    path = export_gguf(m, tmp_path / "untied.gguf", "f32")
    g = read_gguf(path)
    assert torch.equal(g.tensor("output.weight"), m.lm_head.weight.detach())   # handled: written as output
    with pytest.raises(CheckpointError, match="untied head"):
        GPT.from_pretrained(path)
    lm = tiny()
    add_lora(lm, r=2, alpha=4, targets=("lm_head",))
    with pytest.raises(ConfigError, match="tied output head"):
        export_gguf(lm, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="smaller than GPT-2"):
        export_gguf(tiny(vocab_size=1000), tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        export_gguf(tiny(), tmp_path / "x.gguf", "q4_0")
    odd = tiny(n_embd=48, n_head=2)                                   # rows of 48: not whole q8_0 blocks
    g = read_gguf(export_gguf(odd, tmp_path / "odd.gguf", "q8_0"))
    assert g.tensors["blk.0.attn_qkv.weight"].type_name == "F16"
    padded = read_gguf(export_gguf(tiny(vocab_size=50304), tmp_path / "pad.gguf", "f32"))
    assert len(padded.metadata["tokenizer.ggml.tokens"]) == 50304
    assert padded.metadata["tokenizer.ggml.token_type"][-1] == 5                # unused padding rows
    assert GPT.from_pretrained(tmp_path / "pad.gguf").config.vocab_size == 50304
    assert not list(tmp_path.glob(".*.tmp"))


# --- llama.cpp --------------------------------------------------------------------------------------

def _llama(path, n_ctx=256, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=256, logits_all=True,
                           verbose=False, seed=0, **kw)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _llama_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)]))


def _compare(model_path, n_new: int, n_ctx: int, prompts=PROMPTS) -> dict:
    """llama.cpp vs minigpt on the file's own weights (minigpt imports them back): greedy tokens of
    every prompt, and along minigpt's continuations the teacher-forced next-token agreement and the
    logit differences (relative to the logits' standard deviation). `tie_gaps`: where a greedy
    continuation first differs, minigpt's margin between its token and llama.cpp's (/ std)."""
    ref = GPT.from_pretrained(model_path)
    llm = _llama(model_path, n_ctx=n_ctx)
    same = forced = positions = 0
    identical, diffs, scale, tie_gaps = True, [], [], []
    for p in prompts:
        ids = TOK.encode(p)
        a, b = greedy(ref, ids, n_new), _llama_greedy(llm, ids, n_new)
        identical &= a == b
        same += sum(x == y for x, y in zip(a, b))
        seq = ids + a
        with torch.no_grad():
            mine = ref(torch.tensor([seq]))[0]
        theirs = _llama_logits(llm, seq)
        forced += int((theirs.argmax(-1) == mine.argmax(-1)).sum())
        positions += len(seq)
        diffs.append((theirs - mine).abs())
        scale.append(float(mine.std()))
        if a != b:
            i = next(j for j, (x, y) in enumerate(zip(a, b)) if x != y)
            row = mine[len(ids) + i - 1]
            tie_gaps.append(round(float(row[a[i]] - row[b[i]]) / scale[-1], 4))
    d, s = torch.cat(diffs), float(np.mean(scale))
    return {"identical": identical, "token_match": round(same / (n_new * len(prompts)), 4),
            "forced_match": round(forced / positions, 4), "max_diff": round(float(d.max()) / s, 4),
            "mean_diff": round(float(d.mean()) / s, 5), "tie_gaps": tie_gaps}


def _same_up_to_ties(r: dict) -> bool:
    """All greedy tokens equal, or each continuation that differs first does so where minigpt's two
    candidates were within llama.cpp's observed logit error (a tie that rounding decides)."""
    return r["identical"] or all(g <= r["max_diff"] for g in r["tie_gaps"])


@needs_llama
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_greedy_equals_minigpt_tiny(files, dtype):
    r = _compare(files[1][dtype], 40, 256)
    print(f"tiny {dtype}: {r}")
    if dtype == "q8_0":          # llama.cpp also rounds the activations to 8 bits: near-ties flip
        assert r["forced_match"] >= 0.95 and r["mean_diff"] < 0.03, r
    else:
        assert r["identical"] and r["forced_match"] == 1.0 and r["max_diff"] < 0.02, r


@needs_llama
def test_llama_cpp_greedy_equals_minigpt_gpt2_sized(tmp_path):
    """GPT-2 124M's shape (random weights): where sizes matter (n_embd 768, 12 layers, 1024 positions).
    std 0.2 * sqrt(64 / 768) keeps each layer's activations at the tiny model's scale (at std 0.2 a
    768-wide, 12-layer stack saturates every softmax and turns rounding noise into other tokens)."""
    model = tiny(block_size=1024, n_layer=12, n_head=12, n_embd=768, std=0.2 * (64 / 768) ** 0.5)
    results = {}
    for dtype in ("f32", "f16", "q8_0"):
        path = export_gguf(model, tmp_path / f"gpt2-{dtype}.gguf", dtype)
        results[dtype] = _compare(path, 12, 64, PROMPTS[:2])
        path.unlink()
    print(f"gpt2-sized: {results}")
    for dtype in ("f32", "f16"):
        r = results[dtype]
        assert _same_up_to_ties(r) and r["forced_match"] >= 0.98 and r["max_diff"] < 0.02, results
    assert results["q8_0"]["forced_match"] >= 0.9 and results["q8_0"]["mean_diff"] < 0.05, results


@needs_llama
def test_llama_cpp_tokenizer_equals_tiktoken(files):
    llm = llama_cpp.Llama(model_path=str(files[1]["f32"]), vocab_only=True, verbose=False)
    for text in TEXTS + PROMPTS:
        ids = TOK.encode_ordinary(text)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids, text
        assert llm.detokenize(ids) == text.encode("utf-8"), text
    assert llm.tokenize(b"a<|endoftext|>b", add_bos=False, special=True) == TOK.encode(
        "a<|endoftext|>b", allowed_special="all")
    assert llm.tokenize(b"hello", add_bos=True, special=False) == [31373]   # add_bos_token false
    assert llm.token_eos() == llm.token_bos() == 50256


@needs_llama
def test_llama_cpp_lora_adapter_equals_merged_model(tmp_path):
    lm = with_lora(tiny())
    base = export_gguf(lm, tmp_path / "base.gguf", "f32", merge=False)
    adapter = export_lora_gguf(lm, tmp_path / "adapter.gguf")
    merged = merge_and_unload(copy.deepcopy(lm))
    llm = _llama(base, lora_path=str(adapter))
    plain = _llama(base)
    for p in PROMPTS[:4]:
        ids = TOK.encode(p)
        assert _llama_greedy(llm, ids, 24) == greedy(merged, ids, 24) != _llama_greedy(plain, ids, 24)
        with torch.no_grad():
            ref = merged(torch.tensor([ids]))[0]
        assert (_llama_logits(llm, ids) - ref).abs().max() < 1e-2 * ref.abs().max()


@needs_llama
@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_llama_cpp_chat_formatting_equals_chat_py(tmp_path, name):
    """llama-cpp-python's chat completion, formatting with the embedded template: its prompt token
    ids equal ChatSession's prompt (system prompt, history, new message)."""
    model = tiny()
    path = export_gguf(model, tmp_path / f"{name}.gguf", "f32", template=name)
    llm = _llama(path)
    captured = []

    class Captured(Exception):
        pass

    def capture(prompt, **kw):
        captured.append(list(prompt))
        raise Captured
    llm.create_completion = capture
    chat = ChatSession(model, template=name, system="You are brief.", max_new_tokens=16)
    chat.turns = [{"user": "Hi there", "assistant": "Hello! How can I help?"},
                  {"user": "What is 2 + 2?", "assistant": "4"}]
    msgs = [{"role": "system", "content": "You are brief."}, *chat.messages(),
            {"role": "user", "content": "Reverse the word: apple"}]
    with pytest.raises(Captured):
        llm.create_chat_completion(messages=msgs, max_tokens=16, temperature=0)
    ids, info, _ = chat.build_prompt("Reverse the word: apple")
    assert info.turns_used == 2 and captured == [ids]


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_export_merged(tmp_path, method):
    """A DoRA or IA3 model exports with its update folded in (the file's model = the adapter model,
    unmerged, and the model is left unchanged); the base alone (merge=False) is the plain base;
    DoRA cannot go into a llama.cpp LoRA GGUF; prefix tuning cannot be exported at all."""
    from minigpt.methods import method_config

    base = tiny()
    m = copy.deepcopy(base)
    cfg = method_config(method, **({"r": 4, "alpha": 8, "dropout": 0.0, "targets": ("c_attn", "c_fc")}
                                   if method == "dora" else {}))
    cfg.apply(m)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    m.eval()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        want = m(x)
        assert (want - base(x)).abs().max() > 1e-2
        got = GPT.from_pretrained(export_gguf(m, tmp_path / "m.gguf", "f32")).eval()(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(x), want)                                      # unchanged
        plain = GPT.from_pretrained(export_gguf(m, tmp_path / "b.gguf", "f32", merge=False)).eval()(x)
        torch.testing.assert_close(plain, base(x), rtol=1e-5, atol=1e-5)
    if method == "dora":
        with pytest.raises(ConfigError, match="DoRA"):
            export_lora_gguf(m, tmp_path / "a.gguf")
    p = copy.deepcopy(base)
    method_config("prefix", num_virtual_tokens=4).apply(p)
    with pytest.raises(ConfigError, match="prefix-tuning model adds virtual tokens"):
        export_gguf(p, tmp_path / "p.gguf")
