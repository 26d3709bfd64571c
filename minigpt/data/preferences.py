"""Preference data: pairs of answers to one prompt, the better one first, for DPO, IPO and ORPO.

Containers as for instruction data (minigpt.data.readers: JSON, JSONL, CSV, TSV, Parquet; a file,
folder or glob; --columns renames columns first). Record shapes:

    explicit prompt   {"prompt": str, "chosen": str, "rejected": str}                  (trl's standard form;
                      an optional "input" str is Alpaca's input, rendered as SFT renders it)
    messages          {"prompt": [messages], "chosen": [assistant message], "rejected": [...]}
                      (trl's conversational form; the prompt may hold a history, a system message first)
    implicit prompt   {"chosen": [messages], "rejected": [messages]}: the prompt is their common start
    Chatbot Arena     {"conversation_a": [messages], "conversation_b": [...], "winner": "model_a" | "model_b"
                      | "tie" | "tie (bothbad)"}: ties are dropped (counted); the answers compared are the
                      first assistant turns where the two conversations part

Each becomes a pair {"messages": [user/assistant turns ending with a user turn], "system", "chosen",
"rejected", "source": "file:line"} (+ "split"). A pair whose chosen equals its rejected answer is
skipped and counted. Malformed records raise DataError, `file:line: ...`, one line.

Tokenisation: the prompt is rendered with the template as an SFT prompt (Template.prompt_ids) and each
answer is encoded on its own, followed by EOS: no BPE merge across the boundary. With the "none"
template texts are used as they are (the answer right after the prompt); otherwise answers are stripped.

Batches: collate_pairs puts each pair in two rows (prompt + chosen, prompt + rejected);
collate_shared_pairs in one (prompt + chosen + rejected, the rejected answer masked from the chosen
one and positioned right after the prompt: pair_layout), so the prompt goes through the model once.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import torch

from ..errors import DataError
from .formats import ROLES, json_kind, parse_columns, rename_columns
from .instruct import IGNORE_INDEX, length_grouped_batches
from .readers import container_of, data_files, delimited_rows, json_rows, jsonl_rows, parquet_rows, read_text

__all__ = ["PreferenceDataset", "collate_pairs", "collate_shared_pairs", "default_preferences_path", "load_preferences",
           "pair_from_row", "pair_layout", "tokenize_pairs"]

EXPECTED = ("expected preference records: 'prompt' with 'chosen' and 'rejected' (strings, or lists of messages), "
            "'chosen'/'rejected' conversations, or Chatbot Arena 'conversation_a', 'conversation_b', 'winner'")
_TIES = ("tie", "tie (bothbad)", "tie(bothbad)", "both_bad", "bothbad")


def _err(where: str, msg: str) -> DataError:
    return DataError(f"{where}: {msg}")


def _messages(v, where: str, field: str) -> list[dict]:
    """A list of {"role", "content"} messages (a JSON string in a CSV cell is decoded)."""
    if isinstance(v, str) and v.lstrip().startswith("["):
        import json
        try:
            v = json.loads(v)
        except ValueError as e:
            raise _err(where, f"field {field!r}: invalid JSON ({e})") from None
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not v:
        raise _err(where, f"field {field!r} must be a string or a non-empty list of messages, got {json_kind(v)}")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _err(where, f"field {field!r}, message {i + 1}: expected an object with 'role' and 'content' strings")
        role = m["role"].lower()
        role = {"human": "user", "gpt": "assistant"}.get(role, role)
        if role not in ROLES:
            raise _err(where, f"field {field!r}, message {i + 1}: unknown role {m['role']!r}")
        out.append({"role": role, "content": m["content"]})
    return out


def _split_system(msgs: list[dict], where: str) -> tuple[list[dict], str | None]:
    system = None
    if msgs and msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    for i, m in enumerate(msgs):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _err(where, f"prompt turn {i + 1} is {m['role']!r}, expected {want!r} (turns alternate "
                              "user/assistant, starting with user, a system message first)")
    if not msgs or msgs[-1]["role"] != "user":
        raise _err(where, "the prompt must end with a user turn")
    return msgs, system


def _answer(v, where: str, field: str) -> str:
    if isinstance(v, str):
        if not v.strip():
            raise _err(where, f"field {field!r} is empty")
        return v
    msgs = _messages(v, where, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _err(where, f"field {field!r} must be one assistant message")
    if not msgs[0]["content"].strip():
        raise _err(where, f"field {field!r} is empty")
    return msgs[0]["content"]


def _pair(row: dict, where: str, prompt: list[dict], system, chosen: str, rejected: str) -> dict:
    out = {"messages": prompt, "system": system, "chosen": chosen, "rejected": rejected, "source": where}
    if isinstance(row.get("split"), str) and row["split"]:
        out["split"] = row["split"]
    return out


def _from_explicit(row: dict, where: str) -> dict:
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            raise _err(where, f"missing field {field!r} (a preference record needs 'prompt', 'chosen' and "
                              "'rejected')")
    p = row.get("prompt")
    if p is None:
        return _from_implicit(row, where)
    if isinstance(p, str):
        if not p.strip():
            raise _err(where, "field 'prompt' is empty")
        inp = row.get("input")                  # Alpaca's optional input, in the template's input block
        if inp is not None and not isinstance(inp, str):
            raise _err(where, f"field 'input' must be a string, got {json_kind(inp)}")
        prompt, system = [{"role": "user", "content": p, **({"input": inp} if inp else {})}], (row.get("system")
                                                                                              or None)
    else:
        prompt, system = _split_system(_messages(p, where, "prompt"), where)
    return _pair(row, where, prompt, system, _answer(row["chosen"], where, "chosen"),
                 _answer(row["rejected"], where, "rejected"))


def _parting(a: list[dict], b: list[dict], where: str) -> tuple[list[dict], str, str]:
    """(common prompt, a's answer, b's answer): the first assistant turns where a and b differ."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    if i >= len(a) or i >= len(b):
        raise _err(where, "the two conversations do not part at an assistant turn (one is the other's start)")
    if a[i]["role"] != "assistant" or b[i]["role"] != "assistant":
        # they part at a user turn (an earlier answer differed only in a later turn?): compare the first answers
        i = next((j for j, m in enumerate(a) if m["role"] == "assistant"), len(a))
        if i >= len(b) or b[i]["role"] != "assistant" or a[:i] != b[:i]:
            raise _err(where, "the two conversations do not share the prompt of the answers they compare")
    return a[:i], a[i]["content"], b[i]["content"]


def _from_implicit(row: dict, where: str) -> dict:
    a, b = _messages(row["chosen"], where, "chosen"), _messages(row["rejected"], where, "rejected")
    common, chosen, rejected = _parting(a, b, where)
    prompt, system = _split_system(common, where)
    return _pair(row, where, prompt, system, chosen, rejected)


def _from_arena(row: dict, where: str) -> dict | None:
    """The pair of an Arena row, or None for a tie."""
    for field in ("conversation_a", "conversation_b", "winner"):
        if row.get(field) is None:
            raise _err(where, f"missing field {field!r} (a Chatbot Arena record needs conversation_a, "
                              "conversation_b and winner)")
    winner = str(row["winner"]).strip().lower()
    if winner in _TIES:
        return None
    if winner not in ("model_a", "model_b"):
        raise _err(where, f"field 'winner' must be model_a, model_b or tie, got {row['winner']!r}")
    a, b = _messages(row["conversation_a"], where, "conversation_a"), _messages(row["conversation_b"], where,
                                                                               "conversation_b")
    common, ans_a, ans_b = _parting(a, b, where)
    prompt, system = _split_system(common, where)
    chosen, rejected = (ans_a, ans_b) if winner == "model_a" else (ans_b, ans_a)
    return _pair(row, where, prompt, system, chosen, rejected)


def pair_from_row(row, where: str, columns: Mapping[str, str] | None = None) -> dict | None:
    """One preference pair from a row (None: an Arena tie); DataError names `where`."""
    if not isinstance(row, dict):
        raise _err(where, f"expected a JSON object, got {json_kind(row)}")
    obj = rename_columns(row, columns)
    keys = {k for k, v in obj.items() if v is not None}
    if keys & {"conversation_a", "conversation_b"}:
        return _from_arena(obj, where)
    if keys & {"chosen", "rejected"}:
        return _from_explicit(obj, where)
    held = ", ".join(repr(k) for k in row) or "no keys"
    raise _err(where, f"{EXPECTED}; the record holds {held} (instruction data? train on it without "
                      "--objective, or map other names with --columns chosen=...,rejected=...)")


def _rows(p) -> list:
    container = container_of(p)
    if container == "parquet":
        return parquet_rows(p)
    text = read_text(p)
    if not text.strip():
        raise DataError(f"{p}:1: empty dataset")
    if container in ("csv", "tsv"):
        return delimited_rows(text, str(p), "\t" if container == "tsv" else ",")
    if container_of(p, text) != "json":
        raise DataError(f"{p}:1: preference data must be JSON, JSON lines, CSV, TSV or Parquet records "
                        "('### Human:' text holds one answer per prompt)")
    return json_rows(text, str(p)) if text.lstrip().startswith("[") else jsonl_rows(text, str(p)) \
        if "\n" in text.strip() else json_rows(text, str(p))


def default_preferences_path() -> Path:
    """The preference set shipped with minigpt (minigpt/assets/preferences.jsonl, built from the embedded
    instruction set by scripts/make_preferences.py)."""
    return Path(str(resources.files("minigpt").joinpath("assets/preferences.jsonl")))


def load_preferences(path, columns: str | Mapping[str, str] | None = None) -> tuple[list[dict], dict]:
    """(pairs, stats) of a preference dataset; stats {"ties": Arena ties dropped, "identical": pairs
    whose answers are equal, skipped}. DataError on malformed input; FileNotFoundError if missing."""
    mapping = parse_columns(columns)
    pairs, stats = [], {"ties": 0, "identical": 0}
    for p in data_files(path):
        rows = _rows(p)
        if not rows:
            raise DataError(f"{p}:1: empty dataset (no records)")
        for where, row in rows:
            pair = pair_from_row(row, where, mapping)
            if pair is None:
                stats["ties"] += 1
            elif pair["chosen"].strip() == pair["rejected"].strip():
                stats["identical"] += 1
            else:
                pairs.append(pair)
    return pairs, stats


# --- tokenisation and batches ---------------------------------------------------------------------

def tokenize_pairs(pairs, tokenizer, template, max_length: int) -> tuple[list[dict], dict]:
    """[{"prompt": ids, "chosen": ids, "rejected": ids}] (answers end with EOS; prompt + answer <=
    max_length: answers cut at the end; a pair whose prompt leaves no room is dropped) and stats
    {"truncated", "dropped"}."""
    from .templates import get_template

    template = get_template(template)
    raw = template.name == "none"
    out, stats = [], {"truncated": 0, "dropped": 0}
    for p in pairs:
        msgs = p["messages"] if raw else [{**m, "content": m["content"].strip()} for m in p["messages"]]
        prompt = template.prompt_ids(msgs, tokenizer, p.get("system"))
        room = max_length - len(prompt)
        if room < 1:
            stats["dropped"] += 1
            continue
        ex = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            text = p[side] if raw else template.response_fmt.format(content=p[side].strip())
            ids = tokenizer.encode_ordinary(text) + [tokenizer.eot_token]
            if len(ids) > room:
                ids, stats["truncated"] = ids[:room], stats["truncated"] + 1
            ex[side] = ids
        out.append(ex)
    return out, stats


def collate_pairs(examples: Sequence[dict], pad_id: int = 50256) -> tuple[torch.Tensor, ...]:
    """(x, y, targets) of 2B rows, the chosen then the rejected sequences, right-padded, shifted by one:
    y holds the answer tokens (EOS included), -100 elsewhere; targets every real next token."""
    seqs = [e["prompt"] + e[side] for side in ("chosen", "rejected") for e in examples]
    starts = [len(e["prompt"]) for _ in range(2) for e in examples]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, starts)):
        t = torch.tensor(s)
        ids[i, :len(s)] = t
        targets[i, :len(s)] = t
        labels[i, p:len(s)] = t[p:]
    return ids[:, :-1], labels[:, 1:], targets[:, 1:]


PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3          # collate_shared_pairs' segment ids


def collate_shared_pairs(examples: Sequence[dict], pad_id: int = 50256) -> tuple[torch.Tensor, ...]:
    """(x, y, targets, segments): each pair in ONE row, prompt + chosen + rejected (its last token, which
    predicts nothing, left out), right-padded. x, segments (B, T); y, targets (2B, T) label x's rows as
    collate_pairs' label its own: row b the chosen answer of pair b, row B + b the rejected one, the
    last prompt token predicting the first token of both. segments: PROMPT, CHOSEN, REJECTED or PAD per
    slot; pair_layout(segments) gives the positions and the attention mask that make every label's
    log-prob that of collate_pairs (the rejected answer sees the prompt, not the chosen answer)."""
    B = len(examples)
    T = max(len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples) - 1
    x = torch.full((B, T), pad_id, dtype=torch.long)
    segments = torch.full((B, T), PAD, dtype=torch.int8)
    y = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    targets = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        p, c, r = (torch.tensor(e[k], dtype=torch.long) for k in ("prompt", "chosen", "rejected"))
        P, C, R = len(p), len(c), len(r)
        row = torch.cat([p, c, r])[:-1]
        x[b, :len(row)] = row
        segments[b, :P], segments[b, P:P + C], segments[b, P + C:P + C + R - 1] = PROMPT, CHOSEN, REJECTED
        targets[b, :P + C - 1] = torch.cat([p, c])[1:]                 # prompt + chosen, shifted
        if P:                                                          # the prompt, then the rejected
            targets[b + B, :P] = torch.cat([p[1:], r[:1]])             # answer's first token ...
        targets[b + B, P + C:P + C + R - 1] = r[1:]                     # ... and the rest
        lo = max(P - 1, 0)
        y[b, lo:P + C - 1] = targets[b, lo:P + C - 1]                   # the chosen answer's tokens
        y[b + B, lo:P] = targets[b + B, lo:P]                           # the rejected answer's
        y[b + B, P + C:P + C + R - 1] = r[1:]
    return x, y, targets, segments


def pair_layout(segments: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's `pos` (B, T) and `mask` (B, 1, T, T) for collate_shared_pairs' rows: positions count
    on through prompt and chosen answer and restart after the prompt for the rejected one; causal
    attention in which the rejected answer does not see the chosen one (padding sees what precedes it)."""
    seg = segments.long()
    rejected = seg == REJECTED
    prompt_len = (seg == PROMPT).sum(1, keepdim=True)
    pos = torch.where(rejected, prompt_len + rejected.cumsum(1) - 1, (seg <= CHOSEN).cumsum(1) - 1).clamp(min=0)
    T = seg.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    mask = causal & ((k == PROMPT) | (k == q) | (q == PAD))              # (B, T, T)
    return {"pos": pos, "mask": mask[:, None]}


class PreferenceDataset:
    """Tokenised pairs in length-grouped step batches, with InstructionDataset's contract: `batch(step,
    micro)` -> (x, y, real tokens, {"targets"}) is a pure function of its arguments (exact resume, DDP);
    batch_size counts pairs (2 x batch_size rows). With `ref_logps` set ((N, 2): each pair's reference
    log-probs, chosen and rejected, precomputed) batches also bring their rows' {"ref_logps"} (2B,).
    share_prompt: one row per pair (collate_shared_pairs; batches also bring {"segments"}), for models
    whose attention does not count slots (GPT-2; not GPT-Neo's local windows)."""

    ref_logps: "torch.Tensor | None" = None

    def __init__(self, examples: Sequence[dict], batch_size: int, seed: int = 0, grad_accum: int = 1,
                 pad_id: int = 50256, share_prompt: bool = False):
        if not examples:
            raise ValueError("PreferenceDataset needs at least one pair")
        self.examples, self.batch_size, self.seed, self.grad_accum = list(examples), batch_size, seed, grad_accum
        self.pad_id, self.share_prompt = pad_id, share_prompt
        self.lengths = [len(e["prompt"]) + (len(e["chosen"]) + len(e["rejected"]) if share_prompt else
                                            max(len(e["chosen"]), len(e["rejected"]))) for e in self.examples]
        self.step_size = batch_size * grad_accum
        self.per_epoch = math.ceil(len(self.examples) / self.step_size)
        self._orders: dict[int, list[list[int]]] = {}

    def __len__(self) -> int:
        return len(self.examples)

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.per_epoch))

    def indices(self, step: int, micro: int = 0) -> list[int]:
        epoch = step // self.per_epoch
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[epoch] = length_grouped_batches(self.lengths, self.step_size,
                                                         seed=self.seed * 100_003 + epoch)
        batch = self._orders[epoch][step % self.per_epoch]
        q, r = divmod(len(batch), self.grad_accum)
        start = micro * q + min(micro, r)
        return batch[start:start + q + (micro < r)]

    def batch(self, step: int, micro: int = 0) -> tuple:
        part = self.indices(step, micro)
        if not part:          # a short last step batch: an empty micro-batch, one pair without labels
            x, y, kw = self._collate(self.indices(step, 0)[:1])
            kw.pop("ref_logps", None)
            return x, y.fill_(IGNORE_INDEX), 0, {**kw, "targets": kw["targets"].fill_(IGNORE_INDEX)}
        x, y, kw = self._collate(part)
        return x, y, int((kw["targets"] != IGNORE_INDEX).sum()) + len(part) * 2, kw

    def _collate(self, part: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(x, y, {"targets"[, "segments"][, "ref_logps"]}) of these pairs."""
        examples = [self.examples[i] for i in part]
        if self.share_prompt:
            x, y, t, seg = collate_shared_pairs(examples, self.pad_id)
            return x, y, {"targets": t, "segments": seg, **self._ref(part)}
        x, y, t = collate_pairs(examples, self.pad_id)
        return x, y, {"targets": t, **self._ref(part)}

    def _ref(self, part: Sequence[int]) -> dict:
        if self.ref_logps is None:
            return {}
        return {"ref_logps": torch.cat([self.ref_logps[part, 0], self.ref_logps[part, 1]])}

    def sequential(self, batch_size: int, max_batches: int | None = None):
        """Every pair once, shortest first, in batches of (x, y, {"targets", ...}) as `batch` (evaluation)."""
        order = sorted(range(len(self.examples)), key=lambda i: self.lengths[i])
        for n, s in enumerate(range(0, len(order), batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            yield self._collate(order[s:s + batch_size])
