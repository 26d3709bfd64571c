"""TokenDataset's training windows: shuffled epochs of non-overlapping windows, a pure function of
(step, micro), the same rows for any split of a step into micro-batches."""
import numpy as np
import pytest
import torch

from minigpt.data.corpus import TokenDataset


def _tokens(tmp_path, n: int):
    path = tmp_path / "train.bin"
    np.arange(n, dtype=np.uint16).tofile(path)            # token value = its position
    return path


def _starts(ds: TokenDataset, steps: range) -> list[int]:
    return [int(x[0]) for s in steps for m in range(ds.grad_accum) for x in ds.batch(s, m)[0]]


@pytest.mark.parametrize("n", [1000, 1001, 1015, 20])
def test_an_epoch_covers_every_window_once(tmp_path, n):
    T = 16
    ds = TokenDataset(_tokens(tmp_path, n), T, batch_size=3, seed=5, grad_accum=2)
    W = ds.windows
    assert W == max(1, (n - T) // T)
    starts = _starts(ds, range(4 * W // 6 + 2))           # four epochs and a bit (6 rows a step)
    for e in range(4):
        ep = starts[e * W:(e + 1) * W]
        offset = ep[0] % T
        assert 0 <= offset <= min(T - 1, n - 1 - W * T)
        # one offset per epoch, every window once: T + 1 tokens at stride T, all inside the file
        assert sorted(ep) == [offset + k * T for k in range(W)]
        assert max(ep) + T + 1 <= n
    epochs = [tuple(starts[e * W:(e + 1) * W]) for e in range(4)]
    if W > 2:
        assert len(set(epochs)) == 4                          # each epoch its own order / offset
    x, y, count = ds.batch(2, 1)
    assert count == x.numel() == 3 * T and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)             # windows are consecutive tokens


def test_batches_are_a_pure_function_of_step_and_micro(tmp_path):
    path = _tokens(tmp_path, 5000)
    a = TokenDataset(path, 32, batch_size=4, seed=1, grad_accum=2)
    b = TokenDataset(path, 32, batch_size=4, seed=1, grad_accum=2)
    assert torch.equal(a.batch(40, 1)[0], b.batch(40, 1)[0])          # any order of calls, any process
    b.batch(3, 0)
    assert torch.equal(a.batch(2, 0)[0], b.batch(2, 0)[0])
    assert not torch.equal(a.batch(40, 0)[0], a.batch(40, 1)[0])
    other_seed = TokenDataset(path, 32, batch_size=4, seed=2, grad_accum=2)
    assert not torch.equal(a.batch(40, 0)[0], other_seed.batch(40, 0)[0])
    # micro-batch m of B x A rows is rows m*B..(m+1)*B-1 of one micro-batch of B*A rows (DDP, accumulation)
    whole = TokenDataset(path, 32, batch_size=8, seed=1).batch(40)[0]
    assert torch.equal(torch.cat([a.batch(40, 0)[0], a.batch(40, 1)[0]]), whole)
    with pytest.raises(ValueError, match="grad_accum 2"):
        a.batch(0, 2)
