"""Decoding: KV-cache generation, sampling, eos/stop handling, streaming.

One prefill forward over the prompt fills a static, preallocated KV cache (`GPT.new_caches`);
then every step feeds a single token. Nothing is concatenated or re-allocated per token.

    generate(model, idx, 64, temperature=0.8, top_p=0.95)   # (B, T) -> (B, T + n) ids
    for tok in stream(model, idx, 64): ...                   # ids one by one, batch 1
    for piece in stream_text(model, tok, ids, 256): ...      # text pieces for a chat UI

Sampling order (as in Hugging Face): repetition penalty -> temperature -> top-k -> top-p.
temperature 0 means greedy (argmax after the repetition penalty; top-k/top-p are then moot).
"""
from __future__ import annotations

import codecs
import contextlib
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.templates import STOP_STRINGS as DEFAULT_STOP  # every template's turn markers
from ..errors import ConfigError
from ..model.gpt import check_token_ids
from .sampling import SamplingConfig

__all__ = ["generate", "stream", "stream_text", "TextStream", "sample_next", "apply_repetition_penalty",
           "prepare_for_decoding", "DecodeLinear", "quantize_int4", "dequantize_int4",
           "DEFAULT_STOP"]

EosArg = Union[int, Sequence[int], None]


# --- sampling -------------------------------------------------------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL / Hugging Face repetition penalty: for tokens already seen, divide positive logits
    by `penalty` and multiply negative ones by it.

    logits: (B, V). seen: (B, V) bool mask of seen tokens, or (B, N) token ids (duplicates fine).
    Returns a new (B, V) tensor.
    """
    if penalty == 1.0:
        return logits
    if seen.dtype == torch.bool:
        return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def _top_p_drop(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token (probabilities sorted descending) falls outside the nucleus. As in HF:
    a token is dropped when the mass of the tokens ranked above it is >= top_p; the top one
    always stays."""
    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
    drop[:, 0] = False
    return drop


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest top-k (k = 64, 256, ...) of `probs` (B, V) that holds mass >= top_p in every
    row, hence the whole nucleus: exact, and far cheaper than sorting 50k logits."""
    k, V = 64, probs.size(-1)
    while True:
        vals, ids = probs.topk(min(k, V), dim=-1)                         # (B, k), descending
        if k >= V or bool((vals.sum(dim=-1) >= top_p).all()):
            return vals, ids
        k *= 4


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, repetition_penalty: float = 1.0,
                seen: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Pick the next token for every row. logits (B, V) -> token ids (B,).

    seen: tokens to penalise when repetition_penalty != 1 (see apply_repetition_penalty).
    temperature <= 0 is greedy. top_k / top_p (nucleus) restrict sampling, in that order, as
    HF's warpers do; top_k=1 is greedy. generator: a torch.Generator for reproducible sampling.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    use_top_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, ids = logits.topk(top_k, dim=-1)                            # (B, k), descending
        probs = vals.softmax(dim=-1)
    elif use_top_p:
        probs, ids = _nucleus_candidates(logits.softmax(dim=-1), top_p)
    else:
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
    if use_top_p:
        probs = probs.masked_fill(_top_p_drop(probs, top_p), 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)             # (B, 1), index into ids
    return ids.gather(1, choice).squeeze(1)


# --- the decoding loop ------------------------------------------------------------------------

def _context(model) -> tuple[int, str]:
    """(real tokens a sequence may hold, how to name that limit in messages)."""
    block = model.config.block_size
    P = getattr(model, "num_virtual_tokens", 0)
    if not P:
        return block, f"block_size={block}"
    return block - P, f"block_size={block} less {P} virtual tokens = {block - P}"


def _check_lengths(model, T: int, max_new_tokens: int) -> None:
    ctx, what = _context(model)
    if T > ctx:
        raise ConfigError(f"prompt of {T} tokens is longer than the model's context length "
                         f"({what}); truncate the prompt")
    if T + max_new_tokens > ctx:
        raise ConfigError(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} = "
                         f"{T + max_new_tokens} exceeds the model's context length ({what}); "
                         f"shorten the prompt or lower max_new_tokens to {ctx - T}")


def _token_bytes(tokenizer, t: int) -> bytes:
    if hasattr(tokenizer, "decode_single_token_bytes"):               # tiktoken
        return tokenizer.decode_single_token_bytes(t)
    return tokenizer.decode([t]).encode("utf-8")


def _eos_list(eos_token_id: EosArg) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def _check_inputs(model, idx: torch.Tensor, max_new_tokens: int, stop, tokenizer,
                  attention_mask: Optional[torch.Tensor]) -> tuple[list[str], Optional[torch.Tensor]]:
    """Validate generate's inputs; returns the stop strings and the left-padding mask (bool, on the
    model's device) or None when there is no padding."""
    if idx.dim() != 2:
        raise ConfigError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    if B == 0 or T == 0:
        raise ConfigError(f"the batch must hold at least one prompt of at least one token, got shape {(B, T)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_token_ids(idx, model.config.vocab_size)
    _check_lengths(model, T, max_new_tokens)
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ConfigError(f"stop strings must be non-empty strings, got {stop!r}")
    if stops and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer (pass tokenizer=...)")
    if attention_mask is None or bool(attention_mask.all()):
        return stops, None
    am = attention_mask.to(model.device).bool()
    if am.shape != idx.shape:
        raise ConfigError(f"attention_mask shape {tuple(am.shape)} != idx shape {tuple(idx.shape)}")
    if not bool(am[:, -1].all()) or bool((am[:, :-1] & ~am[:, 1:]).any()):
        raise ConfigError("attention_mask must be left-padded: zeros (padding) first, then ones")
    return stops, am


def _seen(idx: torch.Tensor, am: Optional[torch.Tensor], V: int) -> torch.Tensor:
    """(B, V) bool mask of the prompt's tokens, padding left out (for the repetition penalty)."""
    real = torch.where(am, idx, V) if am is not None else idx                  # pads -> dummy column
    seen = torch.zeros(idx.size(0), V + 1, dtype=torch.bool, device=idx.device)
    seen.scatter_(1, real, True)
    return seen[:, :V]


def _track_stops(tokens: list[int], alive: list[bool], tails: list[bytes], stop_bytes: list[bytes],
                 tokenizer, unfinished: torch.Tensor) -> None:
    """Mark rows whose new bytes complete a stop string finished; keep each row's tail (the bytes a
    stop string split across tokens may still need)."""
    keep = max(len(s) for s in stop_bytes) - 1
    for b, t in enumerate(tokens):
        if alive[b]:
            buf = tails[b] + _token_bytes(tokenizer, t)
            if any(s in buf for s in stop_bytes):
                unfinished[b] = False
            tails[b] = buf[max(len(buf) - keep, 0):] if keep else b""


def _prefill(model, idx: torch.Tensor, am: Optional[torch.Tensor],
             caches) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the prompts into the caches: (last position's logits (B, 1, V) (or hidden states, with
    `model` a _Hidden), the position ids of the last prompt token (B, 1) for left-padded prompts,
    else None)."""
    if am is None:
        return model(idx, caches=caches, last_only=True), None
    T, device = idx.size(1), idx.device
    pos = (am.long().cumsum(-1) - 1).clamp_(min=0)                                # (B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    # pad queries attend to themselves only, so no row of the mask is empty (no NaN)
    prefill_mask = (causal & am[:, None, None, :]) | eye                         # (B, 1, T, T)
    logits = model(idx, pos=pos, mask=prefill_mask, caches=caches, last_only=True)
    return logits, pos[:, -1:].clone()


def _decode_steps(model, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None,
                  repetition_penalty: float = 1.0, eos_token_id: EosArg = None,
                  stop: Union[str, Sequence[str], None] = None, tokenizer=None,
                  attention_mask: Optional[torch.Tensor] = None, pad_token_id: Optional[int] = 50256,
                  generator: Optional[torch.Generator] = None,
                  compile: bool = False, pack: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) per step, until max_new_tokens or all rows finish.

    Rows that have finished (eos or stop string) get pad_token_id. Computation runs under
    torch.inference_mode(), entered per step, so nothing leaks to the caller between steps.
    """
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)     # validates them
    stops, am = _check_inputs(model, idx, max_new_tokens, stop, tokenizer, attention_mask)
    if max_new_tokens == 0:
        return
    B, T = idx.shape
    eos = _eos_list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    device = model.device
    idx = idx.to(device)
    padded = am is not None
    stop_bytes = [s.encode("utf-8") for s in stops]
    tails = [b""] * B
    eos_t = torch.tensor(eos, device=device) if eos else None

    greedy = _greedy_head(model, sampling, max_new_tokens, compile, pack)
    packs = _packed_linears(model, max_new_tokens, compile, skip_head=greedy is not None) if pack else None
    net = _Hidden(model) if greedy is not None else model      # greedy: hidden states, then the pick
    with torch.inference_mode(), _eval_mode(model), _swapped(packs):
        if compile:
            step_fn, caches = _compiled_step(model, B, T + max_new_tokens)
        else:
            caches = model.new_caches(B, T + max_new_tokens)
        logits, step_pos = _prefill(net, idx, am, caches)
        if padded or compile:                     # real keys that may ever be attended: not padding
            # (virtual tokens in front of the caches are always attended: the model adds them)
            key_mask = torch.ones(B, 1, 1, caches[0].k.size(2) - caches[0].offset, dtype=torch.bool, device=device)
            if padded:
                key_mask[:, 0, 0, :T] = am                                       # static, (B, 1, 1, L)
        seen = _seen(idx, am, logits.size(-1)) if sampling.repetition_penalty != 1.0 else None
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        sample_kw = dict(vars(sampling), generator=generator)

    nxt = idx[:, -1]                              # (B,) the token fed next: each sampled one in turn
    for step in range(max_new_tokens):
        with torch.inference_mode(), _eval_mode(model), _swapped(packs):
            if step > 0:
                start = T + step - 1
                if padded:
                    step_pos += 1
                if compile:
                    slot = torch.full((1,), start, dtype=torch.long, device=device)
                    logits = step_fn(model, nxt[:, None], step_pos if padded else slot, slot, key_mask, caches)
                elif padded:
                    logits = net(nxt[:, None], pos=step_pos, mask=key_mask[..., :start + 1],
                                 caches=caches, start=start)
                else:
                    logits = net(nxt[:, None], caches=caches, start=start)
            if greedy is not None:
                nxt = greedy(logits[:, -1])                                    # (B,) from (B, C)
            else:
                nxt = sample_next(logits[:, -1], seen=seen, **sample_kw)       # (B,)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            alive = unfinished.tolist() if stop_bytes else None
            out = torch.where(unfinished, nxt, pad_token_id)                    # finished rows: pad
            if eos_t is not None:
                unfinished &= ~torch.isin(nxt, eos_t)
            if stop_bytes:
                _track_stops(out.tolist(), alive, tails, stop_bytes, tokenizer, unfinished)
            # (no eos and no stop strings: nothing can finish early, and no device sync per step)
            done = (eos_t is not None or bool(stop_bytes)) and not bool(unfinished.any())
        yield out
        if done:
            return


@contextlib.contextmanager
def _eval_mode(model):
    """Run in eval mode (no dropout), restoring training mode afterwards."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


PACK_MIN_TOKENS = 16      # generate/stream repack fp32 CPU weights for calls of at least this many tokens


class _Hidden:
    """Calls `model` for its final hidden states instead of logits (same arguments)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, idx, last_only: bool = False, **kw) -> torch.Tensor:   # (B, T or 1, C)
        h = self.model.hidden_states(idx, **kw)
        return h[:, -1:] if last_only else h


def _packed_linears(model, max_new_tokens: int, compile: bool, skip_head: bool = False) -> Optional[list]:
    """[(parent, attribute, plain nn.Linear, packed DecodeLinear)] for the fp32 nn.Linear layers of a
    CPU model, or None where packing does not pay or does not apply.

    oneDNN's blocked fp32 layout reads weights ~1.8x faster than F.linear for one-row products (the
    same fp32 maths: prepare_for_decoding's "fp32" mode); the packed copies live for one call only,
    so the model and its weights stay as they are (trainable, saveable). Packing costs about one
    pass over the weights, so short calls, compiled steps and other devices or dtypes skip it.
    """
    if compile or max_new_tokens < PACK_MIN_TOKENS or not isinstance(model, nn.Module):
        return None
    found = [(parent, attr, mod) for _, parent, attr, mod in _linear_slots(model)
             if type(mod) is nn.Linear and mod.weight.device.type == "cpu" and mod.weight.dtype == torch.float32
             and not (skip_head and parent is model and attr == "lm_head")]        # (greedy: not called)
    if not found:
        return None
    with torch.no_grad():
        return [(parent, attr, mod, DecodeLinear(mod.weight, mod.bias, "fp32")) for parent, attr, mod in found]


def _linear_slots(model) -> list:
    """[(name, parent module, attribute, module)] for every module of `model` outside kv_prefix
    (virtual tokens: computed once per call and kept exact), for swapping Linear layers in place."""
    out = []
    for name, mod in model.named_modules():
        if name == "kv_prefix" or name.startswith("kv_prefix."):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        out.append((name, parent, name.rpartition(".")[2], mod))
    return out


@contextlib.contextmanager
def _swapped(packs: Optional[list]):
    """The packed layers in place of the plain ones for the duration of one decoding step."""
    if not packs:
        yield
        return
    for parent, attr, _, packed in packs:
        setattr(parent, attr, packed)
    try:
        yield
    finally:
        for parent, attr, plain, _ in packs:
            setattr(parent, attr, plain)


def _static_step(model, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                 key_keep: torch.Tensor, caches) -> torch.Tensor:
    """One decoding step whose shapes depend only on the caches (what compile / CUDA graphs need).

    tok (B, 1) ids; pos (B, 1) or (1,) position ids; slot (1,) cache index to write;
    key_keep (B, 1, 1, L) keys that are not padding. Returns (B, 1, V) logits.
    """
    seen = torch.arange(key_keep.size(-1), device=tok.device) <= slot        # (L,) written so far
    return model(tok, pos=pos, mask=key_keep & seen, caches=caches, start=slot)


def _compiled_step(model, batch_size: int, length: int):
    """(compiled _static_step, KV caches) for `model`, kept on the model and reused across calls.

    Cache lengths are rounded up to a power of two (>= 64, <= the context length) so that a handful of
    compiled graphs serve every prompt length. On CUDA the caches get fixed addresses and the step
    runs as a CUDA graph ("reduce-overhead").
    """
    if any(getattr(m, "kind", None) in ("mkldnn", "w8a8") for m in model.modules()):
        raise ConfigError("compile=True cannot trace oneDNN- or fbgemm-packed weights (prepare_for_decoding "
                         "'fp32'/'bf16'/'w8a8' on CPU); use an unprepared model or 'fp16'/'int8'/'int4'")
    store = model.__dict__.setdefault("_compiled_decoding", {})
    L = min(max(64, 1 << (length - 1).bit_length()), _context(model)[0])
    device, dtype = model.device, model.dtype
    cuda = device.type == "cuda"
    if "step" not in store:
        store["step"] = torch.compile(_static_step, fullgraph=True, dynamic=False,
                                      mode="reduce-overhead" if cuda else None)
    P = getattr(model, "num_virtual_tokens", 0)
    key = (batch_size, L, device, dtype)
    if key not in store or store[key][0].offset != P:              # (virtual tokens added or removed)
        caches = model.new_caches(batch_size, L)
        if cuda:
            for c in caches:
                torch._dynamo.mark_static_address(c.k)
                torch._dynamo.mark_static_address(c.v)
        store[key] = caches
    elif P:
        model.fill_prefix(store[key])                # virtual tokens may have been trained since

    def run(*args):
        if store.get("failed"):                      # compilation failed once: stay eager
            return _static_step(*args)
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return store["step"](*args)
        except Exception as e:                       # no C++ compiler, unsupported op, ...
            store["failed"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(f"generate(compile=True) could not compile the decoding step "
                          f"({store['failed']}); decoding without compilation", RuntimeWarning, stacklevel=2)
            return _static_step(*args)
    return run, store[key]


# --- public entry points ----------------------------------------------------------------------

def generate(model, idx: torch.Tensor, max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             repetition_penalty: float = 1.0, eos_token_id: EosArg = None,
             stop: Union[str, Sequence[str], None] = None, tokenizer=None,
             attention_mask: Optional[torch.Tensor] = None, pad_token_id: Optional[int] = 50256,
             generator: Optional[torch.Generator] = None, compile: bool = False,
             pack: bool = True) -> torch.Tensor:
    """Continue prompts. idx (B, T) LongTensor -> (B, T + n) LongTensor, n <= max_new_tokens.

    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k, top_p: keep the k most likely tokens / the nucleus of mass top_p before sampling.
    repetition_penalty: CTRL/HF penalty (> 1 discourages tokens already in prompt + output;
        padding is not counted).
    eos_token_id: int or list; a row that emits it is finished: the eos token is kept, and the
        row gets pad_token_id for the remaining steps (as in Hugging Face). pad_token_id=None uses
        the first eos id (or 0).
    stop: string(s); needs `tokenizer` (tiktoken or anything with decode). A row is finished once
        its decoded new text contains a stop string; the token completing it is kept (callers
        that want clean text can cut at the string, or use stream_text, which never shows it).
    attention_mask: (B, T) with 1 = real token, 0 = padding. Padding must be on the LEFT.
        Positions are counted from each row's first real token and padding is never attended
        to, so every row comes out as if its prompt were decoded alone.
    generator: torch.Generator for reproducible sampling.
    compile: run each single-token step through torch.compile with static shapes (CUDA graphs
        on a GPU, mode "reduce-overhead"): the KV caches are kept on the model between calls and
        every step attends over their whole length under a mask. The first call per batch size
        and length bucket (64, 128, ... block_size) compiles (seconds to a minute); later calls
        reuse it. Same tokens as compile=False up to float rounding.
    pack: on a CPU model with fp32 nn.Linear layers, decode calls of 16 tokens or more with those
        weights copied into oneDNN's blocked layout for the call (exact fp32, 1.4-1.5x faster;
        the copies need as much memory as the Linear weights while the call runs). Greedy calls
        of 32 tokens or more (temperature 0, no repetition penalty) with an fp32 head pick each
        token through CertifiedArgmax: an fp16 copy of the head rules rows out, the fp32 rows of
        the few left decide (the fp32 argmax, reading half the head's bytes). pack=False decodes
        with the model's own layers and full logits.

    Length: generation stops early when every row is finished, so n < max_new_tokens is possible
    only if all rows hit eos or a stop string; otherwise n == max_new_tokens.
    Raises ValueError if T + max_new_tokens exceeds model.context_length (block_size less any
    virtual tokens of prefix/prompt tuning; no silent truncation or sliding window), including a
    prompt that alone is longer than the context.
    """
    if idx.dim() != 2:
        raise ConfigError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
    B, T = idx.shape
    out = torch.empty(B, T + max(max_new_tokens, 0), dtype=torch.long, device=idx.device)
    n = 0
    for tok in _decode_steps(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, repetition_penalty=repetition_penalty,
                             eos_token_id=eos_token_id, stop=stop, tokenizer=tokenizer,
                             attention_mask=attention_mask, pad_token_id=pad_token_id,
                             generator=generator, compile=compile, pack=pack):
        out[:, T + n] = tok
        n += 1
    out[:, :T] = idx
    return out[:, :T + n]


def stream(model, idx: Union[torch.Tensor, Sequence[int]], max_new_tokens: int = 64,
           **kw) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt: idx (1, T), (T,) or a list of ids.

    Takes the keyword arguments of `generate` (except attention_mask) and yields exactly the new
    tokens `generate` would append: an eos token is yielded, then the stream ends; likewise after
    the token that completes a stop string. Closing the iterator early is fine.
    """
    if not isinstance(idx, torch.Tensor):
        idx = torch.tensor(list(idx), dtype=torch.long)
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.size(0) != 1:
        raise ConfigError(f"stream decodes one prompt (1, T) at a time, got shape {tuple(idx.shape)}")
    _check_lengths(model, idx.size(1), max_new_tokens)                # raise now, not at first next()
    return (int(tok) for tok in _decode_steps(model, idx, max_new_tokens, **kw))


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stream_text(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256, *,
                stop: Union[str, Sequence[str], None] = DEFAULT_STOP, eos_token_id: EosArg = 50256,
                **sampling) -> Iterator[str]:
    """Yield the continuation of `prompt_ids` as text pieces, as soon as they are safe to show.

    - multi-byte UTF-8 characters split across tokens are held until complete (no U+FFFD
      halves; genuinely invalid bytes still decode to U+FFFD);
    - text that could be the beginning of a stop string is held back until it is clearly not;
      when a stop string appears, the text before it is yielded and the stream ends, so the
      stop marker itself is never yielded (default: the template turn markers, DEFAULT_STOP);
    - ends at eos (default 50256, not shown) or after max_new_tokens.
    Sampling keywords are those of `generate`. Closing the generator (e.g. on Ctrl-C) stops
    decoding cleanly.
    """
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
    tokens = stream(model, prompt_ids, max_new_tokens, eos_token_id=eos_token_id, **sampling)
    return _text_pieces(tokens, tokenizer, stops, set(_eos_list(eos_token_id)))


class TextStream:
    """Token ids in, text safe to show out: multi-byte UTF-8 characters split across tokens are held
    until complete (genuinely invalid bytes decode to U+FFFD), and text that could begin a stop
    string is held back until it clearly does not. feed(token) returns the new safe text; once a
    stop string appears it returns the text before it and `stopped` is True (the marker itself is
    never returned). finish() returns what is still held at the end."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer, self.stops, self.stopped = tokenizer, [s for s in stops if s], False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def _cut(self) -> int:
        return min((i for i in (self._pending.find(s) for s in self.stops) if i >= 0), default=-1)

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(_token_bytes(self.tokenizer, token))
        cut = self._cut()
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        ready = len(self._pending) - _held_back(self._pending, self.stops)
        out, self._pending = self._pending[:ready], self._pending[ready:]
        return out

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        cut = self._cut()
        out, self._pending = (self._pending[:cut] if cut >= 0 else self._pending), ""
        return out


def _text_pieces(tokens: Iterator[int], tokenizer, stops: Sequence[str], eos: set) -> Iterator[str]:
    text = TextStream(tokenizer, stops)
    with contextlib.closing(tokens):
        for t in tokens:
            if t in eos:
                break
            piece = text.feed(t)
            if piece:
                yield piece
            if text.stopped:
                return
    tail = text.finish()
    if tail:
        yield tail


# --- fast decoding weights ----------------------------------------------------------------------
#
# Decoding one token reads every weight once, so on a CPU the time per token is the weights' bytes
# divided by the memory bandwidth that the matmul kernel achieves for a (1, in) x (in, out) product.
# Measured on 2 AVX-512 cores, idle (GPT-2 124M, all Linear layers + tied head, one token;
# streaming memory itself runs at ~45 GB/s):
#   fp32 F.linear 28 ms | fp32 (in, out) addmm 22 ms | fp32 oneDNN-prepacked 14 ms
#   bf16 F.linear 9.3 ms | bf16 oneDNN-prepacked 5.9 ms | fp16 F.linear 5.6 ms (44 GB/s)
#   int8 _weight_int8pack_mm 4.1 ms (compute-bound) | int4 _weight_int4pack_mm_for_cpu 2.25 ms
# The rest of a decode step (LayerNorms, attention over the cache, casts, Python) adds ~1.3-1.9 ms.
# torch.compile of the step (generate(compile=True)) saves only ~4% on CPU after 5-20 s of
# compiling, so it is opt-in (it is what gives CUDA graphs on a GPU).
# Bytes read per token for GPT-2 124M: 123.5M Linear + head weights (the head is 38.6M of them):
#   fp32 494 MB, fp16/bf16 247 MB, int8 124 MB, int4 62 MB + 15 MB of scales and zeros
#   (+ the KV cache: 74 KB per cached position in fp32).

DECODE_MODES = ("fp32", "fp16", "bf16", "int8", "w8a8", "int4")
_COMPUTE_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                  "int8": torch.bfloat16, "w8a8": torch.float32, "int4": torch.bfloat16}
INT4_GROUP = 32                                                       # weights per int4 scale/zero


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit quantisation of `weight` (N, K) in groups of `group_size` along K.

    Returns (q, scales_and_zeros): q (N, K) int32 in [0, 15] and (K / group_size, N, 2) float32
    holding each group's scale and zero, such that w ~= (q - 8) * scale + zero (the layout of
    torch's int4 matmul kernels). Round to nearest: |w - dequant| <= scale / 2.
    """
    N, K = weight.shape
    if K % group_size:
        raise ConfigError(f"int4 needs in_features divisible by {group_size}, got {K}")
    w = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)                              # (N, K/g, 1)
    q = torch.round((w - lo) / scale).clamp_(0, 15).to(torch.int32).reshape(N, K)
    zero = lo + 8 * scale                                                 # value of q = 8
    sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous()        # (K/g, N, 2)
    return q, sz


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor,
                    group_size: int = INT4_GROUP) -> torch.Tensor:
    """Inverse of quantize_int4: (N, K) float32 weights (bf16-rounded scales and zeros as stored)."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)                          # (N, K/g, 2)
    w = (q.reshape(N, K // group_size, group_size).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.reshape(N, K)


def _int8_scale(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 scale of a (out, in) weight: max |w| of the row / 127."""
    return weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0


GREEDY_HEAD_MIN_TOKENS = 32   # greedy calls this long pick tokens through CertifiedArgmax (fp32 heads, CPU)


class CertifiedArgmax:
    """Greedy picks of an fp32 head that read half its bytes and return the fp32 head's pick.

    The head is the largest single read of a decoding step (GPT-2 124M: 154 MB of its 494 MB in
    fp32). Greedy decoding needs only the argmax, and a row can be ruled out without its exact
    logit: with w~ = fp16(w) and h~ = fp16(h), |h.w_i - h~.w~_i| <= |h| |w_i - w~_i| + (|h - h~| +
    g |h|) |w~_i| (Cauchy-Schwarz; g bounds fp32 accumulation over n_embd terms). Rows whose upper
    bound is below the best lower bound cannot be the argmax; the rest (a handful) get their fp32
    logits and the first maximum among them is the pick, as argmax over the full fp32 logits.
    """

    def __init__(self, weight: torch.Tensor):                       # (V, C) fp32 head
        with torch.no_grad():
            self.weight = weight.detach()
            self.half = self.weight.half()                          # (V, C), fp16 GEMV on CPU
            widened = self.half.float()
            self.row_err = (self.weight - widened).norm(dim=1)       # (V,) |w_i - w~_i|
            self.row_norm = widened.norm(dim=1) * (1 + 1e-3)        # (V,) |w~_i|, rounded up
        self.gamma = 4 * self.weight.size(1) * 2.0 ** -24

    def __call__(self, h: torch.Tensor) -> torch.Tensor:             # (B, C) fp32 -> (B,) ids
        h16 = h.half()
        approx = F.linear(h16, self.half).float()                    # (B, V)
        if not bool(torch.isfinite(approx).all()):                  # fp16 overflow, or NaN states
            return F.linear(h, self.weight).argmax(dim=1)
        norm = h.norm(dim=1, keepdim=True)
        slack = (norm * (1 + 1e-3)) * self.row_err + ((h - h16.float()).norm(dim=1, keepdim=True)
                                                      + self.gamma * norm) * self.row_norm
        floor = (approx - slack).amax(dim=1, keepdim=True)            # the best row's lower bound
        picks = []
        for b, alive in enumerate(approx + slack >= floor):          # rows that may be the argmax
            ids = alive.nonzero().squeeze(1)                        # ascending: ties go to the first
            picks.append(ids[(self.weight[ids] @ h[b]).argmax()])
        return torch.stack(picks)


def _greedy_head(model, sampling: SamplingConfig, max_new_tokens: int, compile: bool,
                 pack: bool) -> Optional[CertifiedArgmax]:
    """The certified greedy head for a plain greedy call on a CPU model whose head is fp32 (an
    nn.Linear, or prepare_for_decoding's "fp32" head, which keeps its rows); None otherwise."""
    if (not pack or compile or max_new_tokens < GREEDY_HEAD_MIN_TOKENS or sampling.temperature > 0
            or sampling.repetition_penalty != 1.0):
        return None
    head = getattr(model, "lm_head", None)
    if isinstance(head, DecodeLinear):
        rows = getattr(head, "rows", None)
        if rows is None:
            return None
        if getattr(head, "greedy", None) is None:                  # prepared models keep theirs
            head.greedy = CertifiedArgmax(rows)
        return head.greedy
    if type(head) is nn.Linear and head.bias is None and head.weight.dtype == torch.float32 \
            and head.weight.device.type == "cpu":
        return CertifiedArgmax(head.weight)
    return None


class DecodeLinear(nn.Module):
    """Inference-only stand-in for nn.Linear that stores its weight in the form decoding reads
    fastest. Activations stay fp32 (the residual stream, LayerNorms, attention and KV cache are
    untouched); only the weights change, and each product is cast back to the input's dtype.

    fp32: oneDNN-prepacked weight (exact fp32 maths, ~1.8x the bandwidth of F.linear);
          falls back to an (in, out) copy and addmm where oneDNN packing is unavailable.
    bf16: oneDNN-prepacked bf16 weight (plain (out, in) F.linear as the fallback), bf16 inputs.
    fp16: weight in fp16 (out, in), F.linear on fp16 inputs (torch's fp16 GEMV, fp32 accumulation).
    int8: symmetric per-output-channel int8 weight with bf16 scales (round to nearest),
          torch._weight_int8pack_mm on bf16 inputs.
    w8a8: the same int8 weights, and the activations quantised to 8 bits at every call (per
          tensor, dynamic): torch's dynamic quantized linear (fbgemm/oneDNN integer dot products),
          the like-for-like kernel of llama.cpp's q8_0. CPU only.
    int4: asymmetric 4-bit weight in groups of 32 input features, bf16 scale and zero per group
          (see quantize_int4), packed for torch._weight_int4pack_mm_for_cpu, bf16 inputs; rows
          are padded to a multiple of 16 as the kernel needs (the padding is sliced off).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str):
        super().__init__()
        if mode not in DECODE_MODES:
            raise ConfigError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
        self.mode, self.out_features, self.in_features = mode, weight.size(0), weight.size(1)
        weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float().clone()
        self.kind = mode
        if mode in ("fp32", "bf16"):
            dt = torch.float32 if mode == "fp32" else torch.bfloat16
            self.bias = None if bias is None else self.bias.to(dt)
            try:                                                           # oneDNN's blocked layout
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(dt).contiguous(), 1)
                self.kind = "mkldnn"
            except (RuntimeError, AttributeError):
                if mode == "fp32":
                    self.weight, self.kind = weight.t().contiguous(), "addmm"      # (in, out)
                else:
                    self.weight = weight.to(dt).contiguous()                        # (out, in)
        elif mode == "fp16":
            self.weight = weight.half().contiguous()                       # (out, in)
            self.bias = None if bias is None else self.bias.half()
        elif mode == "int8":
            scale = _int8_scale(weight)                                    # (out,)
            self.weight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scale = scale.to(torch.bfloat16)
        elif mode == "w8a8":
            if weight.device.type != "cpu" or not torch.backends.quantized.supported_engines:
                raise ConfigError("w8a8 decoding weights need a CPU model and a torch quantized engine")
            scale = _int8_scale(weight).double()                           # (out,), as int8's
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():          # torch marks its quantized tensors deprecated
                warnings.simplefilter("ignore", UserWarning)
                q = torch.quantize_per_channel(weight, scale, zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, self.bias)     # engine-packed int8
            self.weight = None
        else:
            if weight.device.type != "cpu" or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
                raise ConfigError("int4 decoding weights need a CPU model and torch >= 2.6")
            pad = -self.out_features % 16                                   # kernel: rows % 16 == 0
            q, sz = quantize_int4(F.pad(weight, (0, 0, 0, pad)))
            self.weight = torch._convert_weight_to_int4pack_for_cpu(q, 1)   # packed (out+pad, in/2)
            self.scale = sz.to(torch.bfloat16)                              # (in/32, out+pad, 2)
        self.dtype = _COMPUTE_DTYPE[mode]                                  # what inputs are cast to

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (..., in) -> (..., out)
        kind = self.kind
        if kind == "mkldnn":
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")
            return y.to(x.dtype)
        if kind == "addmm":
            y = x.reshape(-1, self.in_features) @ self.weight
            return (y if self.bias is None else y.add_(self.bias)).view(*x.shape[:-1], -1)
        if kind == "int8":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                          self.weight, self.scale).view(*x.shape[:-1], -1)
            return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)  # fp32 + bf16
        if kind == "w8a8":
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, True)
            return y.view(*x.shape[:-1], -1).to(x.dtype)
        if kind == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                  self.weight, INT4_GROUP, self.scale)
            y = y[:, :self.out_features].view(*x.shape[:-1], -1)
            return y.to(x.dtype) if self.bias is None else torch.add(self.bias, y)
        if kind == "fp16" and x.numel() > 8 * self.in_features:
            # many rows (prefill): fp16 GEMMs cost about one GEMV per row on CPUs without native
            # fp16 units; fp16 -> fp32 is exact, so widen the weight and use the fp32 GEMM
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        return F.linear(x.to(self.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def prepare_for_decoding(model, mode: str = "fp16"):
    """Swap every nn.Linear of `model` (and the tied head) for a DecodeLinear, in place.

    mode: "fp32" (same maths and tokens, prepacked), "fp16", "bf16", "int8" (weight-only,
    per-output-channel scales), "w8a8" (the int8 weights with 8-bit dynamic activations, as
    llama.cpp's q8_0; CPU) or "int4" (weight-only, groups of 32; CPU). Measured by
    benchmarks/decode.py (GPT-2 124M, batch 1, 2 threads, AVX-512) vs transformers' fp32 generate
    in the same run: fp32 1.8x, fp16 3.5x, bf16 3.5x, int8 4.5x, int4 6.5x (fp32 to int8 gave
    transformers' greedy tokens exactly; int4 costs +0.003 bits/byte on held-out text for a
    trained model). generate/stream on a plain fp32 CPU model use the "fp32" packing on their own,
    for the length of each call (see _packed_linears); the modes here are for keeping it.
    Returns the model, which is now for inference only: generate/stream/model(idx) work, but it
    has no trainable Linear weights and should not be saved (keep the original or reload it).
    Embeddings, LayerNorms, attention and the KV cache stay in fp32, and so do virtual tokens
    (model.kv_prefix: prefix/prompt tuning, computed once per call). Call it after moving the
    model to its device, and after merge_lora if it has LoRA adapters.
    """
    if mode not in DECODE_MODES:
        raise ConfigError(f"mode must be one of {DECODE_MODES}, got {mode!r}")
    targets = []
    for name, parent, attr, mod in _linear_slots(model):
        if hasattr(mod, "lora_A"):                                       # minigpt.methods.lora.LoRALinear
            if not getattr(mod, "merged", False):
                raise ConfigError(f"{name} carries an unmerged LoRA adapter: call "
                                 f"minigpt.methods.lora.merge_lora(model) before prepare_for_decoding")
            targets.append((parent, attr, mod))
        elif isinstance(mod, nn.Linear):
            targets.append((parent, attr, mod))
    for parent, attr, lin in targets:
        packed = DecodeLinear(lin.weight, lin.bias, mode)
        if mode == "fp32" and parent is model and attr == "lm_head" and lin.bias is None:
            packed.rows = lin.weight.detach()           # (tied to wte: no copy) for greedy picks
        setattr(parent, attr, packed)
    model.eval()
    model.requires_grad_(False)
    return model
