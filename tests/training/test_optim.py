"""minigpt.training.optim: which parameters each optimizer steps, Muon's update against a reference written
from its description, the learning-rate scale, resume and bad flags."""
import json
import math

import pytest
import tiny
import torch

from minigpt.commands import train
from minigpt.training.config import TrainConfig, lr_at
from minigpt.training.optim import MUON_LR_SCALE, Muon, MuonAdamW, make_optimizer, newton_schulz_dtype

TINY = tiny.train_flags(precision="fp32")


def _model():
    return tiny.gpt(block_size=32, vocab_size=96, train=True)


def _reference_muon(w, g, buf, lr, wd, mu=0.95):
    """One Muon step in fp32 from the method's description: EMA momentum, Nesterov look-ahead,
    quintic Newton-Schulz on the Frobenius-normalised update (on the wide orientation), decoupled
    decay, step lr * 0.2 * sqrt(max(rows, cols)) (RMS matched to AdamW)."""
    buf = mu * buf + (1 - mu) * g
    u = (1 - mu) * g + mu * buf
    x = u.T if u.size(0) > u.size(1) else u
    x = x / (x.norm() + 1e-7)
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    o = x.T if u.size(0) > u.size(1) else x
    return w * (1 - lr * wd) - lr * 0.2 * math.sqrt(max(w.shape)) * o, buf


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest():
    model, ref = _model(), _model()
    opt = make_optimizer(model, "muon", 2e-3, 0.1, (0.9, 0.95))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    rest = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert "transformer.wte.weight" in rest and "transformer.h.0.ln_1.weight" in rest
    assert len(rest) + len(muon) == len(names)            # every parameter once (the head is tied to wte)
    cfg = TrainConfig(lr=2e-3, warmup_steps=2, max_steps=10, optimizer="muon")
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n in rest], lr=1.0, betas=(0.9, 0.95))
    decays = {n: (0.0 if p.dim() < 2 or n.endswith(("wte.weight", "wpe.weight")) else 0.1)
              for n, p in ref.named_parameters()}
    ref_opt.param_groups[0]["weight_decay"] = 0.0          # the embeddings, biases and gains: no decay
    bufs = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in muon}
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:                          # as Trainer.train_step sets them
            g["lr"] = lr * (g.get("lr_scale") or 1.0)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if n in muon:
                    new, bufs[n] = _reference_muon(p, grads[n], bufs[n], lr * MUON_LR_SCALE, decays[n])
                    p.copy_(new)
                else:
                    p.grad = grads[n].clone()
            for g in ref_opt.param_groups:
                g["lr"] = lr
            ref_opt.step()
        moved = dict(_model().named_parameters())
        for n, p in model.named_parameters():
            r = dict(ref.named_parameters())[n]
            delta, ref_delta = p.detach() - moved[n], r.detach() - moved[n]
            assert ref_delta.norm() > 0
            # Muon orthogonalises in bf16 on this CPU if it has native bf16: a few roundings of the update
            tol = (3e-2 if opt.muon.ns_dtype == torch.bfloat16 else 1e-5) if n in muon else 1e-5
            assert (delta - ref_delta).norm() <= tol * ref_delta.norm(), (n, step)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_muon_matches_torch_muon_and_the_fp32_reference(shape):
    """Muon against torch.optim.Muon (adjust_lr_fn="match_rms_adamw", which orthogonalises in
    bf16): same steps within bf16 rounding; in fp32, the reference above to float rounding."""
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    params = {k: w0.clone().requires_grad_() for k in ("bf16", "torch", "fp32")}
    opts = {"bf16": Muon([params["bf16"]], lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16),
            "torch": torch.optim.Muon([params["torch"]], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
            "fp32": Muon([params["fp32"]], lr=0.02, weight_decay=0.1, ns_dtype=torch.float32)}
    ref, buf = w0.clone(), torch.zeros(shape)
    for g in grads:
        for k, opt in opts.items():
            params[k].grad = g.clone()
            opt.step()
        ref, buf = _reference_muon(ref, g, buf, 0.02, 0.1)
    moved = (ref - w0).norm()
    assert (params["bf16"].detach() - params["torch"].detach()).norm() <= 3e-2 * moved
    assert (params["fp32"].detach() - ref).norm() <= 1e-5 * moved
    assert (params["bf16"].detach() - ref).norm() <= 3e-2 * moved


def test_newton_schulz_runs_in_fp32_without_native_bf16(monkeypatch):
    """Emulated bf16 matmuls crawl (AVX2): there Muon orthogonalises in fp32."""
    import minigpt.training.optim as optim
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: False)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.float32
    assert Muon([torch.zeros(4, 8, requires_grad=True)]).ns_dtype == torch.float32
    monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: True)
    assert newton_schulz_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(Exception, match="2-D weight matrices"):
        Muon([torch.zeros(4, requires_grad=True)])


def test_the_muon_learning_rate_is_its_own_or_a_multiple_of_lr():
    opt = make_optimizer(_model(), "muon", 1e-3, 0.1, (0.9, 0.95), muon_lr=5e-3)
    assert opt.muon.param_groups[0]["lr_scale"] == pytest.approx(5.0)
    assert "lr_scale" not in opt.adamw.param_groups[0]
    assert make_optimizer(_model(), "muon", 1e-3, 0.1, (0.9, 0.95)).param_groups[0]["lr_scale"] == MUON_LR_SCALE
    loaded = make_optimizer(_model(), "muon", 1e-3, 0.1, (0.9, 0.95), muon_lr=5e-3)
    loaded.load_state_dict(opt.state_dict())               # replaces the groups' dicts: still the live ones
    assert loaded.param_groups[0] is loaded.muon.param_groups[0] and loaded.param_groups[0]["lr_scale"] == 5.0
    adamw = make_optimizer(_model(), "adamw", 1e-3, 0.1, (0.9, 0.95))
    assert isinstance(adamw, torch.optim.AdamW) and all(not g.get("lr_scale") for g in adamw.param_groups)


def test_muon_run_resumes_only_with_muon(tmp_path, capsys):
    data = tmp_path / "c.txt"
    data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(800)))
    out = tmp_path / "run"
    assert train.main(["--data", str(data), "--out-dir", str(out), "--max-steps", "4", *TINY]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["train"]["optimizer"] == "muon"             # train.py's default
    capsys.readouterr()
    assert train.main(["--data", str(data), "--out-dir", str(out), "--max-steps", "4", "--resume",
                       "--optimizer", "adamw", *TINY]) == 1
    err = capsys.readouterr().err.strip()
    assert "trained with --optimizer muon" in err and len(err.splitlines()) == 1


def test_muon_needs_hidden_matrices_to_train():
    """A LoRA model trains adapters only (plain parameters, not Linear weights): Muon has nothing."""
    from minigpt.errors import ConfigError
    from minigpt.methods.lora import add_lora
    model = add_lora(_model(), r=4)
    with pytest.raises(ConfigError, match="no trainable hidden weight matrices"):
        make_optimizer(model, "muon", 1e-3, 0.0, (0.9, 0.95))
