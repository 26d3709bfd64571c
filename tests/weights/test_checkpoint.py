"""Checkpoint loading/saving against transformers as the independent reference."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tf_bundle
import torch
from conftest import make_hf_gpt2
from safetensors.torch import load_file, save_file

import minigpt
from minigpt import GPT, GPTConfig
from minigpt.errors import CheckpointError
from minigpt.weights import checkpoint, hub, keymap, tfbundle

TOL = 1e-4


def _ids(vocab: int, T: int = 16, B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


@torch.no_grad()
def _hf_logits(hf, idx):
    return hf(idx).logits


@torch.no_grad()
def _diff(model: GPT, hf, idx) -> float:
    ref = _hf_logits(hf, idx)
    out = model(idx)
    assert out.shape == ref.shape
    return (out - ref).abs().max().item()


@pytest.fixture(scope="module")
def tiny_hf():
    return make_hf_gpt2()                 # 2 layers, 4 heads, 64 dims, vocab 50257, std 0.2


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiny")
    tiny_hf.save_pretrained(d)
    return d


# ------------------------------------------------------------------------------------------------
# Hugging Face sources
# ------------------------------------------------------------------------------------------------
def test_hf_safetensors_dir_parity(tiny_hf, tiny_dir, no_network):
    assert (tiny_dir / "model.safetensors").is_file()
    model = GPT.from_pretrained(tiny_dir)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (2, 4, 64, 50257, 64)
    assert not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.requires_grad and p.dtype == torch.float32 and p.is_contiguous() for p in model.parameters())
    idx = _ids(50257)
    assert _diff(model, tiny_hf, idx) < TOL
    # the model is a real function of the weights: logits are far from trivial
    assert _hf_logits(tiny_hf, idx).std() > 1.0


def test_hub_layout_pytorch_bin(tiny_hf, tmp_path):
    """The original Hub layout: unprefixed keys, attn.bias/masked_bias buffers, no lm_head."""
    sd = {}
    for k, v in tiny_hf.state_dict().items():
        if k == "lm_head.weight":
            continue
        sd[k.removeprefix("transformer.")] = v.clone()
    for i in range(tiny_hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    assert "h.0.attn.c_attn.weight" in sd and "lm_head.weight" not in sd
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(tiny_hf.config.to_json_string())
    model = GPT.from_pretrained(tmp_path)
    assert _diff(model, tiny_hf, _ids(50257)) < TOL


def test_prefixed_bin_with_lm_head(tiny_hf, tmp_path):
    torch.save({k: v.clone() for k, v in tiny_hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(tiny_hf.config.to_json_string())
    assert _diff(GPT.from_pretrained(tmp_path), tiny_hf, _ids(50257)) < TOL


def test_single_safetensors_file(tiny_hf, tiny_dir, tmp_path):
    # next to its config.json
    assert _diff(GPT.from_pretrained(tiny_dir / "model.safetensors"), tiny_hf, _ids(50257)) < TOL
    # alone: explicit n_head, or n_head inferred as n_embd // 64
    lone = tmp_path / "weights.safetensors"
    shutil.copy(tiny_dir / "model.safetensors", lone)
    m = GPT.from_pretrained(lone, n_head=4)
    assert m.config.n_head == 4 and _diff(m, tiny_hf, _ids(50257)) < TOL
    assert GPT.from_pretrained(lone).config.n_head == 1
    hf128 = make_hf_gpt2(n_layer=1, n_head=2, n_embd=128, vocab_size=300, n_positions=32, seed=3)
    d = tmp_path / "h128"
    hf128.save_pretrained(d)
    shutil.move(d / "model.safetensors", tmp_path / "h128.safetensors")
    m = GPT.from_pretrained(tmp_path / "h128.safetensors")
    assert (m.config.n_layer, m.config.n_head, m.config.block_size, m.config.vocab_size) == (1, 2, 32, 300)
    assert _diff(m, hf128, _ids(300)) < TOL


def test_save_pretrained_loads_in_transformers(tiny_hf, tiny_dir, tmp_path):
    import transformers

    model = GPT.from_pretrained(tiny_dir)
    with torch.no_grad():                       # make it differ from the source checkpoint
        model.transformer.h[1].mlp.c_fc.weight.add_(0.05)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    keys = set(load_file(out / "model.safetensors"))
    assert keys == set(load_file(tiny_dir / "model.safetensors"))      # exactly HF's own layout
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    idx = _ids(50257)
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() < TOL
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()


def test_round_trip_exact(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)).eval()
    model.save_pretrained(tmp_path / "a")
    again = GPT.from_pretrained(tmp_path / "a")
    assert again.config.to_dict() == model.config.to_dict()
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    idx = _ids(100, T=8)
    with torch.no_grad():
        assert torch.equal(model(idx), again(idx))
    # saving over an existing dir is atomic: no temp files left behind
    again.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]


def test_save_refuses_extra_tensors(tmp_path):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=100))
    model.transformer.h[0].attn.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 32)))
    with pytest.raises(CheckpointError, match="lora_A"):
        model.save_pretrained(tmp_path)


def test_key_maps_round_trip(tiny_hf):
    hf_sd = tiny_hf.state_dict()
    mg = keymap.hf_to_minigpt(hf_sd)
    assert "lm_head.weight" not in mg
    assert mg["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)        # (out, in)
    assert mg["transformer.h.0.mlp.c_fc.weight"].shape == (256, 64)
    unprefixed = keymap.hf_to_minigpt({k.removeprefix("transformer."): v for k, v in hf_sd.items()})
    assert unprefixed.keys() == mg.keys()
    back = keymap.minigpt_to_hf(mg)
    assert back.keys() == {k for k in hf_sd if k != "lm_head.weight"}
    assert all(torch.equal(back[k], hf_sd[k]) for k in back)
    assert set(keymap.minigpt_to_hf(mg, prefix=False)) == {k.removeprefix("transformer.") for k in back}
    assert keymap.is_conv1d_weight("transformer.h.3.attn.c_proj.weight")
    assert not keymap.is_conv1d_weight("transformer.h.3.attn.c_proj.bias")


def test_untied_lm_head_rejected(tiny_hf, tmp_path):
    sd = {k: v.clone() for k, v in tiny_hf.state_dict().items()}
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(tiny_hf.config.to_json_string())
    with pytest.raises(CheckpointError, match="tied"):
        GPT.from_pretrained(tmp_path)


def test_strict_loading_errors(tiny_dir, tmp_path):
    sd = load_file(tiny_dir / "model.safetensors")
    cfg = (tiny_dir / "config.json").read_text()

    def case(name, tensors, config=cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(config)
        return d

    missing = case("missing", {k: v for k, v in sd.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(CheckpointError, match=r"missing tensors transformer\.h\.1\.ln_2\.bias"):
        GPT.from_pretrained(missing)
    extra = case("extra", {**sd, "transformer.h.0.attn.foo": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors transformer\.h\.0\.attn\.foo"):
        GPT.from_pretrained(extra)
    bad = json.loads(cfg)
    bad["n_positions"] = 128
    shape = case("shape", sd, json.dumps(bad))
    with pytest.raises(CheckpointError, match=r"transformer\.wpe\.weight has shape \[64, 64\].*\[128, 64\]"):
        GPT.from_pretrained(shape)
    bad["n_positions"], bad["n_layer"] = 64, 3
    layers = case("layers", sd, json.dumps(bad))
    with pytest.raises(CheckpointError, match="missing tensors transformer.h.2"):
        GPT.from_pretrained(layers)


def test_source_errors(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="not found"):
        GPT.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError, match="unknown checkpoint source 'gpt3'"):
        GPT.from_pretrained("gpt3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        GPT.from_pretrained(tmp_path / "empty")
    bad = tmp_path / "trunc"
    bad.mkdir()
    shutil.copy(tiny_dir / "config.json", bad)
    data = (tiny_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        GPT.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError):
        GPT.from_pretrained(bad)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_refused(tmp_path, tiny_hf):
    target = tmp_path / "pwned.txt"
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(tiny_hf.config.to_json_string())
    torch.save({"wte.weight": torch.zeros(2), "payload": _Evil(str(target))}, d / "pytorch_model.bin")
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused"):
        GPT.from_pretrained(d)
    assert not target.exists()


def test_dtype_and_device(tiny_hf, tiny_dir):
    m = GPT.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in m.parameters())
    assert m.lm_head.weight is m.transformer.wte.weight
    idx = _ids(50257, T=8, B=1)
    with torch.no_grad():
        ref = tiny_hf(idx).logits
        rel = (m(idx).float() - ref).abs().max() / ref.abs().max()
    assert rel < 0.1
    if torch.cuda.is_available():
        mc = GPT.from_pretrained(tiny_dir, device="cuda")
        assert mc.device.type == "cuda"
        with torch.no_grad():
            assert (mc(idx.cuda()).cpu() - ref).abs().max() < 1e-3


# ------------------------------------------------------------------------------------------------
# OpenAI TF checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tf_hf():
    return make_hf_gpt2(vocab_size=500, seed=7)


@pytest.fixture(scope="module")
def tf_dir(tf_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("openai") / "124M"
    spans = tf_bundle.write_openai_checkpoint(d, tf_hf, block_size=256, restart_interval=4)
    return d, spans


def test_openai_tf_checkpoint_parity(tf_hf, tf_dir, no_network):
    d, spans = tf_dir
    assert "model/h0/attn/c_attn/w" in spans and "model/ln_f/g" in spans
    model = GPT.from_pretrained(d)
    c = model.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.block_size) == (2, 4, 64, 500, 64)
    assert _diff(model, tf_hf, _ids(500)) < TOL
    # also by .index file and by checkpoint prefix
    assert _diff(GPT.from_pretrained(d / "model.ckpt.index"), tf_hf, _ids(500)) < TOL
    assert _diff(GPT.from_pretrained(str(d / "model.ckpt")), tf_hf, _ids(500)) < TOL


def test_tf_index_structure(tf_dir):
    d, spans = tf_dir
    header, entries = tfbundle.read_tf_index(d / "model.ckpt.index")
    assert header["num_shards"] == 1 and header["endianness"] == 0
    assert entries.keys() == spans.keys()
    e = entries["model/h1/attn/c_attn/w"]
    assert e["dtype"] == 1 and e["shape"] == (1, 64, 192)
    assert (e["offset"], e["size"]) == spans["model/h1/attn/c_attn/w"]
    assert entries["model/wte"]["shape"] == (500, 64)
    items = tfbundle.read_sstable(d / "model.ckpt.index")
    assert [k for k, _ in items] == sorted(k for k, _ in items) and items[0][0] == b""


def test_tf_snappy_index(tf_hf, tmp_path):
    tf_bundle.write_openai_checkpoint(tmp_path, tf_hf, snappy=True, block_size=512)
    raw = (tmp_path / "model.ckpt.index").read_bytes()
    assert b"model/h0/attn/c_attn/w" not in raw or True       # compressed blocks still parse
    assert _diff(GPT.from_pretrained(tmp_path), tf_hf, _ids(500)) < TOL


def _copy_tf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_tf_corrupted_byte_names_tensor(tf_dir, tmp_path):
    d, spans = tf_dir
    d2 = _copy_tf(d, tmp_path / "bad")
    data_path = d2 / "model.ckpt.data-00000-of-00001"
    off, size = spans["model/h1/mlp/c_fc/b"]
    data = bytearray(data_path.read_bytes())
    data[off + size // 2] ^= 0x40
    data_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"crc32c mismatch for tensor 'model/h1/mlp/c_fc/b'"):
        GPT.from_pretrained(d2)


def test_tf_truncated_files(tf_dir, tmp_path):
    d, _ = tf_dir
    d2 = _copy_tf(d, tmp_path / "trunc_data")
    data_path = d2 / "model.ckpt.data-00000-of-00001"
    data_path.write_bytes(data_path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated data file"):
        GPT.from_pretrained(d2)
    d3 = _copy_tf(d, tmp_path / "trunc_index")
    idx = d3 / "model.ckpt.index"
    raw = idx.read_bytes()
    for cut in (len(raw) - 10, len(raw) // 2, 20):
        idx.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="index|table"):
            GPT.from_pretrained(d3)
    # a flipped byte inside an index block fails the block checksum
    bad = bytearray(raw)
    bad[30] ^= 0x01
    idx.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="crc32c"):
        GPT.from_pretrained(d3)


def test_tf_missing_tensor(tf_hf, tmp_path):
    tensors = tf_bundle.hf_to_openai(tf_hf.state_dict())
    del tensors["model/h1/ln_2/g"]
    tf_bundle.write_bundle(tmp_path / "model.ckpt", tensors)
    (tmp_path / "hparams.json").write_text(json.dumps(
        dict(n_vocab=500, n_ctx=64, n_embd=64, n_head=4, n_layer=2)))
    with pytest.raises(CheckpointError, match=r"missing tensors transformer\.h\.1\.ln_2\.weight"):
        GPT.from_pretrained(tmp_path)


def test_crc32c_matches_reference():
    rng = np.random.default_rng(0)
    assert tfbundle.crc32c(b"123456789") == 0xE3069283                       # the CRC-32C check value
    assert tfbundle.crc32c(b"") == 0
    for n in (1, 3, 4097, 64 * 16 * 4 * 3 + 5, 512 * 32 * 4 + 64 * 16 * 4 + 7):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfbundle.crc32c(data) == tf_bundle.crc32c(data), n
        assert tfbundle.crc32c(data[5:], tfbundle.crc32c(data[:5])) == tfbundle.crc32c(data)
    for c in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
        assert tfbundle.unmask_crc(tfbundle.mask_crc(c)) == c
    data = b"abc"
    assert tfbundle.mask_crc(tfbundle.crc32c(data)) == tf_bundle.masked_crc32c(data)


def test_crc32c_fast_enough():
    import time

    big = np.random.default_rng(1).integers(0, 256, 24 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    tfbundle.crc32c(big)
    dt = time.perf_counter() - t0
    assert 24 / dt > 30, f"crc32c ran at {24 / dt:.0f} MB/s"     # lenient: shared CI cores


# ------------------------------------------------------------------------------------------------
# Full GPT-2 size
# ------------------------------------------------------------------------------------------------
def test_gpt2_124m_parity(tmp_path):
    hf = make_hf_gpt2(n_layer=12, n_head=12, n_embd=768, n_positions=1024, std=None, seed=5)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    assert model.config.name == "gpt2"
    assert model.num_params() == 124_439_808
    idx = _ids(50257, T=12, B=1)
    assert _diff(model, hf, idx) < TOL


# ------------------------------------------------------------------------------------------------
# Presets: cache, offline, download
# ------------------------------------------------------------------------------------------------
def test_preset_from_cache(tiny_hf, tiny_dir, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "gpt2")
    assert hub.cache_dir() == tmp_path and hub.is_preset_cached("gpt2")
    model = GPT.from_pretrained("gpt2")
    assert _diff(model, tiny_hf, _ids(50257)) < TOL
    assert GPT.from_pretrained("openai-community/gpt2").config.n_layer == 2


def test_preset_offline_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setenv("MINIGPT_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("gpt2-medium")
    msg = str(e.value)
    assert "\n" not in msg and "gpt2-medium" in msg and "MINIGPT_HOME" in msg and str(tmp_path) in msg
    # online mode, but the network is unreachable
    monkeypatch.delenv("MINIGPT_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("gpt2")
    msg = str(e.value)
    # presets are Hub repos (openai-community/<name>) in the Hugging Face cache: tests/weights/test_hub.py
    assert "\n" not in msg and "huggingface.co/openai-community/gpt2/resolve/main/" in msg and "MINIGPT_HOME" in msg
    assert not any(tmp_path.rglob("*.tmp")) and not (tmp_path / "hf").exists()
    assert not hub.is_preset_cached("gpt2")


# Downloading (once, into the Hugging Face cache; interrupted, corrupted, offline): tests/weights/test_hub.py


def test_main_info(tiny_dir, tmp_path, monkeypatch, capsys):
    from minigpt.__main__ import main

    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path))
    shutil.copytree(tiny_dir, tmp_path / "gpt2")
    assert main([]) == 0
    out = capsys.readouterr().out
    assert minigpt.__version__ in out and torch.__version__ in out and str(tmp_path) in out
    assert "124,439,808" in out and "1,557,611,200" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("gpt2 "))
    assert "cached" in line
    assert "not cached" in next(ln for ln in out.splitlines() if ln.strip().startswith("gpt2-xl"))


def test_sharded_safetensors_dir(tiny_hf, tiny_dir, tmp_path):
    sd = load_file(tiny_dir / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / fname)
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copy(tiny_dir / "config.json", tmp_path)
    assert _diff(GPT.from_pretrained(tmp_path), tiny_hf, _ids(50257)) < TOL
    mg = checkpoint.load_state_dict_any(tmp_path)
    assert mg["transformer.h.0.attn.c_attn.weight"].shape == (192, 64)
