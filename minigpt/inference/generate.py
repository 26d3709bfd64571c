"""Decoding: the KV-cache loop, eos/stop handling, streaming.

One prefill forward over the prompt fills a static, preallocated KV cache (`GPT.new_caches`);
then every step feeds a single token. Nothing is concatenated or re-allocated per token.

    generate(model, idx, 64, temperature=0.8, top_p=0.95)   # (B, T) -> (B, T + n) ids
    for tok in stream(model, idx, 64): ...                   # ids one by one, batch 1
    for piece in stream_text(model, tok, ids, 256): ...      # text pieces for a chat UI

Each token is picked by minigpt.inference.sampling.sample_next (repetition penalty -> temperature
-> top-k -> top-p, as in Hugging Face; temperature 0 is greedy). The weights a call decodes with
(per-call fp32 packing, the certified greedy head, prepare_for_decoding's modes) live in
minigpt.inference.decode_weights; the per-token step of unpadded calls, leaner than the model's
forward with the same maths, in minigpt.inference.decode_step.
"""
from __future__ import annotations

import codecs
import contextlib
import warnings
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from ..data.templates import STOP_STRINGS as DEFAULT_STOP  # every template's turn markers
from ..errors import ConfigError
from ..model.gpt import check_token_ids
from .decode_step import lean_step
from .decode_weights import _greedy_head, _packed_linears, _swapped
from .sampling import SamplingConfig, sample_next

__all__ = ["generate", "stream", "stream_text", "TextStream", "DEFAULT_STOP"]

EosArg = Union[int, Sequence[int], None]


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
        # unpadded, uncompiled: the lean step (it holds the packed layers; no swapping per token)
        lean = _lean_net(model, caches, greedy) if pack and not (padded or compile) else None
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
        with _step_context(model, packs, lean is not None):
            if step > 0:
                start = T + step - 1
                if padded:
                    step_pos += 1
                if lean is not None:
                    logits = lean(nxt, start)
                elif compile:
                    slot = torch.full((1,), start, dtype=torch.long, device=device)
                    logits = step_fn(model, nxt[:, None], step_pos if padded else slot, slot, key_mask, caches)
                elif padded:
                    logits = net(nxt[:, None], pos=step_pos, mask=key_mask[..., :start + 1],
                                 caches=caches, start=start)
                else:
                    logits = net(nxt[:, None], caches=caches, start=start)
            # (B,) from the last hidden states (B, C) for a greedy head, else from the logits (B, V)
            nxt = greedy(logits[:, -1]) if greedy is not None else sample_next(logits[:, -1], seen=seen, **sample_kw)
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            alive = unfinished.tolist() if stop_bytes else None
            # finished rows: pad (without eos and stop strings no row ever finishes)
            out = torch.where(unfinished, nxt, pad_token_id) if eos_t is not None or stop_bytes else nxt
            if eos_t is not None:
                unfinished &= ~torch.isin(nxt, eos_t)
            if stop_bytes:
                _track_stops(out.tolist(), alive, tails, stop_bytes, tokenizer, unfinished)
            # (no eos and no stop strings: nothing can finish early, and no device sync per step)
            done = (eos_t is not None or bool(stop_bytes)) and not bool(unfinished.any())
        yield out
        if done:
            return


def _lean_net(model, caches, greedy) -> Optional[Callable[[torch.Tensor, int], torch.Tensor]]:
    """The lean step (minigpt.inference.decode_step) as the per-token net: (B,) ids, start -> final
    hidden states (B, 1, C) for a greedy head, else logits (B, 1, V); None where it does not apply."""
    step = lean_step(model, caches)
    if step is None or greedy is not None:
        return step
    head = model.lm_head                                     # as now in place (the packed head, if any)
    return lambda tok, start: head(step(tok, start))


@contextlib.contextmanager
def _step_context(model, packs, lean: bool):
    """What a decoding step runs under: inference mode and eval mode (no dropout: a no-op for a
    model in eval mode), and for the model's own forward the packed layers in place."""
    if lean:
        with torch.inference_mode(), _eval_mode(model):
            yield
        return
    with torch.inference_mode(), _eval_mode(model), _swapped(packs):
        yield


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


class _Hidden:
    """Calls `model` for its final hidden states instead of logits (same arguments)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, idx, last_only: bool = False, **kw) -> torch.Tensor:   # (B, T or 1, C)
        h = self.model.hidden_states(idx, **kw)
        return h[:, -1:] if last_only else h


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
        the few left decide (the fp32 argmax, reading half the head's bytes). Unpadded,
        uncompiled calls on a plain GPT-2 stack run each new token through the lean step
        (minigpt.inference.decode_step: the model's maths, bit for bit, with less overhead).
        pack=False decodes with the model's own layers, forward and full logits.

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


