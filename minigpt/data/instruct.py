"""Instruction tuning data path: masked tokenisation, collation, batching and exact-match scoring.

Records come from `minigpt.data.records.load_records`; templates from `minigpt.data.templates`.
`tokenize_example` renders a record with a template and encodes each segment separately with the
GPT-2 BPE (text that spells `<|endoftext|>` stays ordinary text); every response is followed by
the EOS token (50256), which is supervised, so the model learns to stop after each answer.
`Template.prompt_ids` builds chat prompts the same way, so training and chat see identical tokens.

Truncation policy (`tokenize_example`): keep the start, cut the end. Examples whose first prompt
(system + first user turn) leaves no room for a single response token within `max_length` are
dropped (None); `tokenize_records` counts them.

Collator convention: it returns next-token-aligned tensors, x = ids[:-1] and y = labels[1:], so
`lm_loss(model(batch["input_ids"]), batch["labels"])` is the masked loss directly. Sequences of
max_length tokens therefore feed the model max_length - 1 positions. Padding is by position, never
by token value: the pad id is EOS (GPT-2 has none of its own), and the EOS label after each response
stays trained. Packing (several examples per row): minigpt.data.packing.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .packing import PackedCollator, pack_rows
from .templates import DEFAULT_TEMPLATE, EOS_TEXT, Template, get_template

__all__ = ["EOS_ID", "IGNORE_INDEX", "Collator", "InstructionDataset", "exact_match_accuracy", "length_grouped_batches",
           "tokenize_example", "tokenize_records"]

EOS_ID = 50256
IGNORE_INDEX = -100


# --- tokenisation --------------------------------------------------------------------------

def _default_tokenizer():
    from .tokenizer import get_tokenizer
    return get_tokenizer()


def _encode(record, tokenizer, template, mask_prompt: bool) -> tuple[list[int], list[int], int]:
    """Full (untruncated) ids, labels and the index of the first response token."""
    tmpl = get_template(template)
    eos = tokenizer.eot_token
    ids: list[int] = []
    labels: list[int] = []
    first_resp = None
    for text, is_resp in tmpl.render(record):
        t = tokenizer.encode_ordinary(text)
        if is_resp:
            if first_resp is None:
                first_resp = len(ids)
            t = t + [eos]
        ids += t
        labels += t if (is_resp or not mask_prompt) else [IGNORE_INDEX] * len(t)
    if first_resp is None:
        raise ValueError("record has no assistant response")
    return ids, labels, first_resp


def tokenize_example(record: dict, tokenizer=None, template: str | Template = DEFAULT_TEMPLATE,
                     max_length: int = 256, mask_prompt: bool = True) -> dict | None:
    """{"input_ids": [...], "labels": [...]} (equal length, <= max_length) or None if dropped.

    labels are IGNORE_INDEX (-100) on prompt tokens when mask_prompt, and the token id on every
    response token and the EOS after it. Long examples keep their start and lose their end; one
    whose first prompt reaches max_length (no response token would fit) is dropped (None).
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    ids, labels, first_resp = _encode(record, tokenizer or _default_tokenizer(), template, mask_prompt)
    if first_resp >= max_length:
        return None
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_records(records: Iterable[dict], tokenizer=None, template: str | Template = DEFAULT_TEMPLATE,
                     max_length: int = 256, mask_prompt: bool = True) -> tuple[list[dict], dict]:
    """Tokenise many records; returns (examples, stats) with stats
    {"total", "kept", "dropped" (prompt too long), "truncated" (response cut)}."""
    tok = tokenizer or _default_tokenizer()
    out, stats = [], {"total": 0, "kept": 0, "dropped": 0, "truncated": 0}
    for rec in records:
        stats["total"] += 1
        ids, labels, first_resp = _encode(rec, tok, template, mask_prompt)
        if first_resp >= max_length:
            stats["dropped"] += 1
            continue
        if len(ids) > max_length:
            stats["truncated"] += 1
        out.append({"input_ids": ids[:max_length], "labels": labels[:max_length]})
        stats["kept"] += 1
    return out, stats


# --- collation and batching ----------------------------------------------------------------

@dataclass
class Collator:
    """Pads a list of tokenised examples to the batch's longest (right padding).

    Returns next-token-aligned LongTensors (T = longest length - 1):
      input_ids      (B, T)  ids[:-1], padded with pad_id
      labels         (B, T)  labels[1:], padded with ignore_index
      attention_mask (B, T)  1 on real tokens, 0 on padding
    so that lm_loss(model(input_ids), labels) is the masked next-token loss. With right padding
    and causal attention, real tokens never attend to padding; no mask is needed in the forward.
    """

    pad_id: int = EOS_ID
    ignore_index: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("empty batch")
        for ex in batch:
            if len(ex["input_ids"]) != len(ex["labels"]):
                raise ValueError("input_ids and labels differ in length")
            if len(ex["input_ids"]) < 2:
                raise ValueError("examples need at least 2 tokens")
        T = max(len(ex["input_ids"]) for ex in batch) - 1
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            T = (T + m - 1) // m * m
        B = len(batch)
        x = torch.full((B, T), self.pad_id, dtype=torch.long)
        y = torch.full((B, T), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex["input_ids"]) - 1
            x[i, :n] = torch.as_tensor(ex["input_ids"][:-1], dtype=torch.long)
            y[i, :n] = torch.as_tensor(ex["labels"][1:], dtype=torch.long)
            mask[i, :n] = 1
        return {"input_ids": x, "labels": y, "attention_mask": mask}


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int = 0,
                           mega_batch_mult: int = 50, drop_last: bool = False) -> list[list[int]]:
    """Batches of similar-length examples with little padding, still randomised.

    Shuffle all indices (seeded), cut them into mega-chunks of batch_size * mega_batch_mult,
    sort each chunk by length (longest first), cut into batches, shuffle the batch order and put
    the batch holding the longest example first (memory trouble then shows at step 1). Every
    index appears exactly once (unless drop_last drops short batches).
    """
    if batch_size <= 0 or mega_batch_mult <= 0:
        raise ValueError("batch_size and mega_batch_mult must be positive")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * mega_batch_mult
    batches = []
    for s in range(0, len(order), mega):
        chunk = sorted(order[s:s + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
        batches.insert(0, batches.pop(longest))
    return batches


# --- evaluation ----------------------------------------------------------------------------

def _cut_at_stops(text: str, stops: Iterable[str]) -> str:
    cut = len(text)
    for s in list(stops) + [EOS_TEXT]:
        j = text.find(s)
        if j != -1:
            cut = min(cut, j)
    return text[:cut]


def exact_match_accuracy(records: Sequence[dict], generate_fn: Callable[[str], str],
                         template: str | Template = DEFAULT_TEMPLATE,
                         normalize: Callable[[str], str] | None = None) -> dict:
    """Exact-match accuracy of `generate_fn(prompt) -> completion` on the records' last answer.

    The prompt is template.prompt_text(messages[:-1], system); the completion is cut at the
    template's stop strings and `<|endoftext|>`, then normalize(completion) is compared with
    normalize(expected) (default: strip whitespace). Returns {"accuracy", "correct", "total",
    "results": [{"prompt", "expected", "got", "correct"}, ...]}.
    """
    tmpl = get_template(template)
    norm = normalize or (lambda s: s.strip())
    results = []
    for rec in records:
        msgs = rec["messages"]
        prompt = tmpl.prompt_text(msgs[:-1], rec.get("system"))
        expected = msgs[-1]["content"]
        got = _cut_at_stops(generate_fn(prompt), tmpl.stop_strings)
        results.append({"prompt": prompt, "expected": expected, "got": got,
                        "correct": norm(got) == norm(expected)})
    correct = sum(r["correct"] for r in results)
    return {"accuracy": correct / len(results) if results else 0.0, "correct": correct,
            "total": len(results), "results": results}


# --- the dataset the Trainer reads ---------------------------------------------------------------

class InstructionDataset:
    """Tokenised examples in length-grouped batches with TokenDataset's contract: `batch(step,
    micro)` is a pure function of its arguments (exact resume, any number of processes).

    An optimizer step trains on one step batch of batch_size * grad_accum examples (grad_accum
    counts the micro-batches of all processes), whatever the split: epoch e's step batches are
    length_grouped_batches(lengths, batch_size * grad_accum) seeded by (seed, e), and micro-batch
    m is the m-th of grad_accum consecutive slices of its step batch (B x A holds the same
    examples, in the same order, as A*B x 1; a short last step batch is shared out evenly).

    pack: a row width in positions (e.g. max_length - 1): examples are packed into such rows
    (minigpt.data.packing; best-fit decreasing over the epoch's shuffled examples, then the rows
    shuffled), batch_size counts rows, and `batch` returns a 4th item, the model's keyword
    arguments {"pos", "mask"}. The token count returned is the batch's real (non-padding) input
    tokens."""

    def __init__(self, examples: Sequence[dict], batch_size: int, seed: int = 0, grad_accum: int = 1,
                 collator: Collator | None = None, pack: int | None = None):
        if not examples:
            raise ValueError("InstructionDataset needs at least one example")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be positive")
        self.examples, self.batch_size, self.seed, self.grad_accum = list(examples), batch_size, seed, grad_accum
        self.collate = collator or Collator()
        self.pack = pack
        self.packer = PackedCollator(self.collate.pad_id, self.collate.ignore_index) if pack else None
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.step_size = batch_size * grad_accum
        self._orders: dict[int, list[list]] = {}
        units = len(self._packed_rows(0)) if pack else len(self.examples)   # (the same count every epoch)
        self.per_epoch = math.ceil(units / self.step_size)

    def __len__(self) -> int:
        return len(self.examples)

    def steps_for(self, epochs: float) -> int:
        """Optimizer steps that make `epochs` passes over the examples (at least 1)."""
        return max(1, math.ceil(epochs * self.per_epoch))

    def _packed_rows(self, epoch: int) -> list[list[int]]:
        rng, order = random.Random(self.seed * 100_003 + epoch), list(range(len(self.examples)))
        rng.shuffle(order)
        rows = pack_rows([n - 1 for n in self.lengths], self.pack, order)
        rng.shuffle(rows)
        return rows

    def _epoch(self, epoch: int) -> list[list]:
        """The epoch's step batches: lists of example indices (with pack: of rows of them)."""
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            if self.pack:
                rows = self._packed_rows(epoch)
                steps = [rows[s:s + self.step_size] for s in range(0, len(rows), self.step_size)]
            else:
                steps = length_grouped_batches(self.lengths, self.step_size, seed=self.seed * 100_003 + epoch)
            self._orders[epoch] = steps
        return self._orders[epoch]

    def indices(self, step: int, micro: int = 0) -> list:
        """The example indices (with pack: rows of them) of micro-batch `micro` of step `step`."""
        if not 0 <= micro < self.grad_accum:
            raise IndexError(f"micro-batch {micro} of a dataset made for grad_accum {self.grad_accum}")
        batch = self._epoch(step // self.per_epoch)[step % self.per_epoch]
        q, r = divmod(len(batch), self.grad_accum)
        start = micro * q + min(micro, r)
        return batch[start:start + q + (micro < r)]

    def _collated(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        b = self.collate([self.examples[i] for i in indices])
        return b["input_ids"], b["labels"], int(b["attention_mask"].sum())

    def batch(self, step: int, micro: int = 0) -> tuple:
        """Micro-batch `micro` of optimizer step `step`: input_ids, labels (B, T) and the token count
        (with pack, then {"pos", "mask"} for the model). A micro-batch left empty by a short step
        batch is one padding position without a label."""
        part = self.indices(step, micro)
        if not part:
            x = torch.full((1, 1), self.collate.pad_id, dtype=torch.long)
            return (x, torch.full_like(x, self.collate.ignore_index), 0) + (({},) if self.pack else ())
        if self.pack:
            b = self.packer([[self.examples[i] for i in row] for row in part])
            return b["input_ids"], b["labels"], b["n_tokens"], {"pos": b["pos"], "mask": b["mask"]}
        return self._collated(part)

    def sequential(self, batch_size: int, max_batches: int | None = None):
        """Every example once, shortest first, in batches (for evaluation): yields (input_ids, labels)."""
        order = sorted(range(len(self.examples)), key=lambda i: self.lengths[i])
        for n, s in enumerate(range(0, len(order), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            yield self._collated(order[s:s + batch_size])[:2]
