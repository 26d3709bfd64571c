"""Quantized bases (minigpt.model.quant): the NF4 code and packing against independent references,
accuracy and memory on GPT-2 124M, QLoRA training through the frozen base, the CLI paths."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import gpt as tiny_gpt

from minigpt import GPT, GPTConfig
from minigpt.commands import chat as chat_cli
from minigpt.commands import finetune
from minigpt.errors import CheckpointError, ConfigError
from minigpt.methods.lora import add_lora, lora_parameters, save_adapter
from minigpt.model.quant import NF4_CODE, QuantLinear, nf4_dequantize, nf4_quantize, quant_bytes, quantize_model


def normal_float_code() -> torch.Tensor:
    """NF4 built as the QLoRA paper describes: quantiles of N(0, 1), 8 positive (incl. the top) and 7
    negative ones from an offset of 0.9677, an exact zero, normalised to [-1, 1]."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.abs().max()).float()


def fake_nf4(w: torch.Tensor) -> torch.Tensor:
    """Quantise-dequantise in fp32, written independently: nearest code per block of 64 of the
    flattened (zero-padded) weight, exact fp32 absmax (no double quantisation)."""
    flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % 64)).view(-1, 64)
    am = flat.abs().amax(1, keepdim=True)
    idx = ((flat / am)[..., None] - normal_float_code()).abs().argmin(-1)
    return (normal_float_code()[idx] * am).view(-1)[:w.numel()].view(w.shape)


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    s = w.abs().amax(1, keepdim=True) / 127
    return torch.round(w / s).clamp(-127, 127) * s


def test_codebook_is_the_normal_float_code():
    assert torch.allclose(NF4_CODE, normal_float_code(), atol=2e-7)
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1 and len(NF4_CODE) == 16


def test_packing_two_codes_per_byte_low_nibble_first():
    w = torch.zeros(2, 64)
    w[0, :16] = NF4_CODE                          # block 0: every code once, absmax 1
    w[1, :16] = NF4_CODE.flip(0) * 3.0            # block 1: reversed, absmax 3
    st = nf4_quantize(w)
    q = list(range(16)) + [7] * 48 + list(range(15, -1, -1)) + [7] * 48
    want = torch.tensor([q[i] | (q[i + 1] << 4) for i in range(0, 128, 2)], dtype=torch.uint8)
    assert torch.equal(st["codes"], want)
    assert torch.allclose(nf4_dequantize(st, w.shape), w, atol=1e-6)


@pytest.mark.parametrize("shape", [(77, 300), (3, 5), (1600, 48)])
def test_padding_and_double_quantisation(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    st = nf4_quantize(w)
    d = nf4_dequantize(st, shape)
    ref = fake_nf4(w)
    blocks = -(-w.numel() // 64)
    assert st["codes"].numel() == blocks * 32 and st["absmax_q"].dtype == torch.int8
    assert st["absmax_scale"].numel() == -(-blocks // 256)
    # the only difference to exact NF4 is the 8-bit absmax: a small fraction of a block's scale
    assert (d - ref).abs().max() <= 0.02 * w.abs().max()
    assert d.dtype == torch.float32 and nf4_dequantize(st, shape, torch.bfloat16).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("gpt2")).eval()


@pytest.mark.parametrize("mode, fake, ratio", [("nf4", fake_nf4, 0.45), ("int8", fake_int8, 0.55)])
def test_gpt2_accuracy_and_memory(gpt2, mode, fake, ratio):
    ids = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(1))
    ref_model = copy.deepcopy(gpt2)
    with torch.no_grad():
        for name, mod in ref_model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("transformer.h."):
                mod.weight.copy_(fake(mod.weight.float()))
        exact, ref = gpt2(ids), ref_model(ids)
        q = quantize_model(copy.deepcopy(gpt2), mode)
        got = q(ids)
    err, ref_err = (got - exact).pow(2).mean().sqrt(), (ref - exact).pow(2).mean().sqrt()
    assert ref_err > 0 and err <= 1.5 * ref_err, (float(err), float(ref_err))
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 48
    b, full = quant_bytes(q), quant_bytes(gpt2)
    assert b["total"] <= ratio * full["total"], b["total"] / full["total"]
    assert not any(p.requires_grad for p in q.parameters())
    with pytest.raises(CheckpointError, match="quantized"):
        q.save_pretrained("/nonexistent-never-written")


def tiny():
    """2 layers, 64 dims, weights at std 0.2, left in training mode."""
    return tiny_gpt(std=0.2, train=True)


@pytest.mark.parametrize("mode, checkpointing", [("nf4", False), ("int8", False), ("nf4", True)])
def test_qlora_gradients_equal_a_dense_model_with_the_same_numbers(mode, checkpointing):
    """Backward through the frozen quantized base (dequantised again, or kept from the checkpoint's
    recomputation) gives the LoRA factors the gradients of a dense fp32 model with the same numbers."""
    q = quantize_model(tiny(), mode)
    dense = tiny()
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, QuantLinear):
                dense.get_submodule(name).weight.copy_(mod.dense())
    for m in (q, dense):
        torch.manual_seed(5)
        add_lora(m, r=4, alpha=8, dropout=0.0, targets=("c_attn", "c_fc"))
        with torch.no_grad():
            for p in lora_parameters(m):
                p.normal_(0, 0.1)
    ids = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (q, dense):
        m.train()
        m.gradient_checkpointing = checkpointing
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    for a, b in zip(lora_parameters(q), lora_parameters(dense)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert all(not p.requires_grad for n, p in q.named_parameters() if "lora_" not in n)
    assert all(m.save_dense == checkpointing for m in q.modules() if isinstance(m, QuantLinear))


def test_bad_input():
    with pytest.raises(ConfigError, match="quantize must be one of nf4, int8"):
        GPT.from_pretrained("gpt2", quantize="fp4")
    m = add_lora(tiny(), r=2, targets=("c_attn",))
    with pytest.raises(ConfigError, match="before adding LoRA"):
        quantize_model(m, "nf4")


# --- the commands -----------------------------------------------------------------------------------

TUNE = ["--batch-size", "2", "--grad-accum", "1", "--max-length", "48", "--threads", "1", "--samples", "0",
        "--precision", "fp32", "--device", "cpu", "--exact-match", "0", "--eval-interval", "4", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    tiny().save_pretrained(root / "base")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n"
                            for w in "red green blue white black pink gold grey".split()))
    return root, data


def run(argv):
    try:
        return finetune.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_qlora_cli_adapter_loads_in_peft_and_merge_is_full_precision(setup, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    root, data = setup
    out = tmp_path / "ft"
    assert run(["--lora", "--quantize", "nf4", "--gradient-checkpointing", "--merge", "--base", root / "base",
                "--data", data, "--out-dir", out, "--max-steps", "4", *TUNE]) == 0
    meta = json.loads((out / "minigpt_finetune.json").read_text())
    assert meta["quantize"] == "nf4" and meta["merged"] == "merged"
    # the adapter is an ordinary PEFT LoRA: on the unquantized base it gives minigpt's own logits
    from minigpt.training.runs import load_finetuned
    ours, _ = load_finetuned(out)
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    ids = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, ours(ids), atol=1e-4)
        merged = GPT.from_pretrained(out / "merged")
        assert torch.allclose(merged(ids), ours(ids), atol=1e-4)
        on_nf4, _ = load_finetuned(out, quantize="nf4")                 # what training saw
        assert (on_nf4(ids) - ours(ids)).abs().max() > 0                # ... is not the merged model


def test_qlora_resume_is_exact(setup, tmp_path):
    from safetensors.torch import load_file

    root, data = setup
    common = ["--lora", "--quantize", "int8", "--base", root / "base", "--data", data, "--save-interval", "2",
              *TUNE]
    assert run([*common, "--out-dir", tmp_path / "a", "--max-steps", "4"]) == 0
    assert run([*common, "--out-dir", tmp_path / "b", "--max-steps", "2"]) == 0
    assert run([*common, "--out-dir", tmp_path / "b", "--max-steps", "4", "--resume"]) == 0
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_in_bf16_keeps_the_rest_of_the_base_in_bf16(setup, tmp_path):
    from safetensors.torch import load_file

    root, data = setup
    argv = ["--lora", "--quantize", "nf4", "--base", root / "base", "--data", data, "--out-dir", tmp_path / "o",
            "--max-steps", "2", *TUNE]
    argv[argv.index("--precision") + 1] = "bf16"
    assert run(argv) == 0
    adapter = load_file(tmp_path / "o" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())


def test_quantize_flags(setup, tmp_path, capsys):
    root, data = setup
    assert run(["--quantize", "nf4", "--base", root / "base", "--data", data, "--out-dir", tmp_path / "o"]) == 2
    assert "--quantize needs --method lora, ia3" in capsys.readouterr().err
    assert run(["--lora", "--quantize", "fp4", "--base", root / "base", "--out-dir", tmp_path / "o"]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_chat_on_a_quantized_base_with_an_adapter(setup, tmp_path, capsys, mode):
    root, _ = setup
    m = GPT.from_pretrained(root / "base")
    torch.manual_seed(0)
    add_lora(m, r=2, alpha=4, targets=("c_attn",))
    with torch.no_grad():
        for p in lora_parameters(m):
            p.normal_(0, 0.1)
    save_adapter(m, tmp_path / "ad", base_model_name_or_path=str(root / "base"))
    argv = ["--model", str(root / "base"), "--adapter", str(tmp_path / "ad"), "--quantize", mode, "--prompt", "Hi",
            "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"]
    assert chat_cli.main(argv) == 0
    reply = capsys.readouterr().out.strip()
    from minigpt.inference.chat import ChatSession
    from minigpt.training.runs import load_chat_model
    loaded = load_chat_model(str(root / "base"), str(tmp_path / "ad"), quantize=mode)
    from minigpt.inference.decode_weights import for_decoding
    from minigpt.methods.lora import lora_layers
    assert lora_layers(loaded.model) and all(m.quant is not None for m in lora_layers(loaded.model).values())
    for_decoding(loaded.model)                                   # what chat does on a CPU
    assert reply == ChatSession(loaded.model, template="alpaca", temperature=0.0, max_new_tokens=8).reply("Hi")
    assert chat_cli.main([*argv, "--weights", "int8"]) == 1
    assert "use either --quantize" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA path runs on a GPU only")
def test_quantized_forward_on_cuda():
    m = quantize_model(tiny(), "nf4").cuda()
    ids = torch.randint(0, 50257, (1, 8), device="cuda")
    with torch.no_grad():
        assert torch.allclose(m(ids).cpu(), quantize_model(tiny(), "nf4")(ids.cpu()), atol=1e-3)


def test_a_quantized_model_is_not_exported_to_gguf(tmp_path):
    from minigpt.weights.gguf import export_gguf

    with pytest.raises(CheckpointError, match="quantized .* cannot be exported"):
        export_gguf(quantize_model(tiny(), "int8"), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
