"""Packing: several tokenised examples per row, none attending to another.

Each example of L tokens contributes its L - 1 next-token pairs (ids[:-1] -> labels[1:], as the
Collator's rows); a row concatenates the pairs of a few examples. Every example keeps its own
positions (0, 1, ... again: GPT-2's learned position embeddings see what they see unpacked) and a
block-diagonal causal mask keeps its attention inside itself, so the loss and the gradients of a
packed batch are those of the same examples unpacked. Prompt masking and the EOS label after each
response come with the examples' labels; no position ever predicts the next example's first token.

    rows = pack_rows([len(e["input_ids"]) - 1 for e in examples], capacity=255)
    batch = PackedCollator()([[examples[i] for i in row] for row in rows[:8]])
    model(batch["input_ids"], pos=batch["pos"], mask=batch["mask"])
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["PackedCollator", "pack_rows"]


def pack_rows(sizes: Sequence[int], capacity: int, order: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Best-fit decreasing: the indices of `sizes` (each <= capacity) in rows whose sizes sum to at
    most `capacity`. Longest first (ties keep `order`, default 0..n-1), each into the row with the
    least room that still holds it, else a new row."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []                       # sorted (room left, row)
    for i in sorted(range(len(sizes)) if order is None else order, key=lambda i: -sizes[i]):
        n = sizes[i]
        if not 0 < n <= capacity:
            raise ValueError(f"an example of {n} positions does not fit rows of {capacity}")
        j = bisect.bisect_left(free, (n, -1))
        if j == len(free):
            rows.append([i])
            room, r = capacity - n, len(rows) - 1
        else:
            room, r = free.pop(j)
            rows[r].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


@dataclass
class PackedCollator:
    """Collates rows (each a list of tokenised examples) into a packed batch (T = longest row):
      input_ids (B, T)        the examples' ids[:-1] one after the other, then pad_id
      labels    (B, T)        their labels[1:], then ignore_index
      pos       (B, T)        0.. for each example again (0 on padding)
      mask      (B, 1, T, T)  bool, True = may attend: causal within each example only (padding
                              sees padding, so no row of the attention is empty)
      n_tokens                the real (non-padding) positions
    """

    pad_id: int = 50256
    ignore_index: int = -100

    def __call__(self, rows: Sequence[Sequence[dict]]) -> dict:
        if not rows or not all(rows):
            raise ValueError("empty packed batch or row")
        widths = [sum(len(ex["input_ids"]) - 1 for ex in row) for row in rows]
        B, T = len(rows), max(widths)
        x = torch.full((B, T), self.pad_id, dtype=torch.long)
        y = torch.full((B, T), self.ignore_index, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        doc = torch.full((B, T), -1, dtype=torch.long)                 # example number; -1 padding
        for b, row in enumerate(rows):
            s = 0
            for k, ex in enumerate(row):
                n = len(ex["input_ids"]) - 1
                if n < 1 or len(ex["labels"]) != n + 1:
                    raise ValueError("examples need at least 2 tokens and as many labels as ids")
                x[b, s:s + n] = torch.as_tensor(ex["input_ids"][:-1], dtype=torch.long)
                y[b, s:s + n] = torch.as_tensor(ex["labels"][1:], dtype=torch.long)
                pos[b, s:s + n] = torch.arange(n)
                doc[b, s:s + n] = k
                s += n
        causal = torch.ones(T, T, dtype=torch.bool).tril_()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal                # (B, T, T)
        return {"input_ids": x, "labels": y, "pos": pos, "mask": mask[:, None], "n_tokens": sum(widths)}
