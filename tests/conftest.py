"""Shared test fixtures (keep small and generic)."""
from __future__ import annotations

import socket

import pytest
import torch

# tests/reliability/bad_input.py holds the checks of the test_bad_input_* files: pytest rewrites its asserts too
pytest.register_assert_rewrite("bad_input")


def make_hf_gpt2(n_layer: int = 2, n_head: int = 4, n_embd: int = 64, vocab_size: int = 50257,
                 n_positions: int = 64, std: float = 0.2, seed: int = 0):
    """A random transformers.GPT2LMHeadModel in eval mode.

    With std set, every weight is redrawn from N(0, std) (LayerNorm gains from N(1, std)) so that
    the nonlinearities matter in parity tests; std=None keeps HF's own initialisation.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                                  n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    if std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".ln_" in name and name.endswith("weight"):
                    p.normal_(1.0, std)
                else:
                    p.normal_(0.0, std)
    return model


@pytest.fixture
def hf_gpt2_factory():
    """make_hf_gpt2 as a fixture: hf_gpt2_factory(n_layer=..., std=...) -> GPT2LMHeadModel."""
    return make_hf_gpt2


@pytest.fixture
def tiny_hf_gpt2():
    """2 layers, 4 heads, 64 dims, full GPT-2 vocabulary, 64 positions, weights at std 0.2."""
    return make_hf_gpt2()


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open an internet socket fail loudly (AF_UNIX stays allowed)."""
    real_socket = socket.socket

    class GuardedSocket(real_socket):
        def __init__(self, family=socket.AF_INET, *args, **kwargs):
            if family in (socket.AF_INET, socket.AF_INET6):
                raise OSError("network access is disabled in this test")
            super().__init__(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", GuardedSocket)
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("network access is disabled in this test")))
    yield
