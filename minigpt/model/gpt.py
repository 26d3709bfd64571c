"""GPT-2 and GPT-Neo in one readable file. Parameter names match Hugging Face's GPT2LMHeadModel
(config.arch "gpt2") and GPTNeoForCausalLM ("gpt_neo"): the two differ only in the attention module
of a block (CausalSelfAttention vs NeoAttention, see minigpt.model.config)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .config import GPTConfig
from .linear import Linear


def check_token_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """ConfigError (a ValueError) unless idx is a (B, T) integer tensor of ids in [0, vocab_size)."""
    if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32, torch.int16, torch.uint8):
        raise ConfigError(f"idx must be (B, T) integer token ids, got {idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx))                    # one pass, one sync
        if lo < 0 or hi >= vocab_size:
            raise ConfigError(f"token ids must be in [0, {vocab_size}), got {lo}..{hi}")


class KVCache(nn.Module):
    """Static, preallocated key/value cache for one attention layer.

    `offset` slots at the front hold a model's virtual-token keys/values (prefix or prompt tuning,
    minigpt.methods.prefix_tuning): filled once when the caches are made, never overwritten. Every `start`
    below counts real tokens; writes land `offset` slots further on and reads include the prefix.

    Holds (B, H, max_len, D) buffers; `update` writes new keys/values at `start` and returns
    views of everything up to the write's end, so decoding never re-allocates or concatenates.
    With `start` a 1-element LongTensor (compiled decoding) the write is an index_copy_ and the
    whole buffers are returned: every step then has the same shapes, and a mask hides the
    positions not yet written. With `start` a (B,) LongTensor each row writes its one new token at
    its own position (continuous batching: rows hold sequences of different lengths).
    """

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, offset: int = 0):
        super().__init__()
        self.offset = offset
        shape = (batch_size, n_head, offset + max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = start + self.offset if self.offset else start
        if isinstance(start, torch.Tensor) and start.numel() > 1:     # one position per row
            rows = torch.arange(k.size(0), device=start.device)
            self.k[rows, :, start] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, start] = v[:, :, 0].to(self.v.dtype)
            return self.k, self.v
        if isinstance(start, torch.Tensor):                            # static shapes
            where = start + torch.arange(k.size(2), device=start.device)
            self.k.index_copy_(2, where, k.to(self.k.dtype))
            self.v.index_copy_(2, where, v.to(self.v.dtype))
            return self.k, self.v                                      # (B, H, max_len, D)
        end = start + k.size(2)
        if end > self.k.size(2):
            raise ValueError(f"KV cache holds {self.k.size(2) - self.offset} positions, asked to write up to "
                             f"{end - self.offset}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def view(self, rows: slice, length: Optional[int] = None) -> "KVCache":
        """A cache over `rows` (and the first `length` positions) of this one: views, so writes
        through it land here."""
        out = KVCache.__new__(KVCache)
        nn.Module.__init__(out)
        out.offset = self.offset
        end = None if length is None else self.offset + length
        out.register_buffer("k", self.k[rows, :, :end], persistent=False)
        out.register_buffer("v", self.v[rows, :, :end], persistent=False)
        return out

    def fill_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write virtual-token keys/values (1 or B, H, offset, D) into the first `offset` slots."""
        self.k[:, :, :self.offset] = k.to(self.k.dtype)
        self.v[:, :, :self.offset] = v.to(self.v.dtype)

    def copy_row(self, dst: int, src: int, length: int) -> None:
        """Row `dst` := row `src` over the prefix and the first `length` real positions."""
        end = self.offset + length
        self.k[dst, :, :end] = self.k[src, :, :end]
        self.v[dst, :, :end] = self.v[src, :, :end]


def _with_prefix(mask: Optional[torch.Tensor], T: int, K: int, P: int, device=None) -> torch.Tensor:
    """The attention mask over P virtual-token keys followed by K - P real keys: every query may see
    the whole prefix. mask None means causal over the real keys (the last T of them are the queries)."""
    if mask is None:
        return torch.ones(T, K, dtype=torch.bool, device=device).tril_(K - T)   # (T, K)
    return torch.cat([mask.new_ones(*mask.shape[:-1], P), mask], dim=-1)                 # (..., T, K)


def _cached_kv(k: torch.Tensor, v: torch.Tensor, cache: Optional[KVCache], start: int | torch.Tensor,
               prefix: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(keys, values, P): the step's k, v (B, H, T, D) written to the cache and read back whole, or
    put behind the virtual tokens `prefix`; P = how many virtual-token keys lead them."""
    if cache is not None:
        k, v = cache.update(start, k, v)                               # (B, H, P+start+T, D)
        return k, v, cache.offset
    if prefix is not None:
        B = k.size(0)
        k = torch.cat([prefix[0].to(k.dtype).expand(B, -1, -1, -1), k], dim=2)   # (B, H, P+T, D)
        v = torch.cat([prefix[1].to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        return k, v, prefix[0].size(2)
    return k, v, 0


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
          start: int | torch.Tensor, dropout_p: float, scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention (B, H, T, D); mask None: plain causal attention (no padding; a
    single new token may see every cached key)."""
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    T = q.size(2)
    is_causal = T > 1
    if (is_causal or isinstance(start, torch.Tensor)) and k.size(2) != T:
        raise ValueError("multi-token steps on a non-empty cache, and static-shape steps, "
                         "need an explicit mask")
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd)   # fused q, k, v
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start: int | torch.Tensor = 0,
                prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """prefix: virtual-token (keys, values), each (1 or B, H, P, D), for calls without a cache
        (a cache made by GPT.new_caches already holds them)."""
        B, T, C = x.shape                                              # (B, T, C)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, -1).transpose(1, 2)             # (B, H, T, D)
        k = k.view(B, T, self.n_head, -1).transpose(1, 2)
        v = v.view(B, T, self.n_head, -1).transpose(1, 2)
        k, v, P = _cached_kv(k, v, cache, start, prefix)              # (B, H, P+K, D)
        if P and (mask is not None or T > 1):
            mask = _with_prefix(mask, T, k.size(2), P, k.device)
        y = _sdpa(q, k, v, mask, start, self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                         # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NeoSelfAttention(nn.Module):
    """GPT-Neo's attention (HF: attn.attention): q_proj, k_proj, v_proj without bias, out_proj with
    bias; scores q.k unscaled (no 1/sqrt(head_dim)) and computed in float32; a local layer lets each
    query see only the last `window` keys (itself included), in the cache too.

    Windows count cache slots (HF's rule): a query at slot s sees keys at slots s - window < j <= s.
    Left padding and per-row positions keep every row's own slots consecutive, so this is also each
    row's window as if it were alone. Virtual tokens (prefix tuning) are not windowed."""

    def __init__(self, cfg: GPTConfig, local: bool):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout
        self.window: Optional[int] = cfg.window_size if local else None
        self.q_proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k_proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.v_proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.out_proj = Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def _window_mask(self, mask: Optional[torch.Tensor], T: int, K: int, start: int | torch.Tensor,
                     device) -> Optional[torch.Tensor]:
        """`mask` (None: causal) and the local window over K real keys, the queries being T tokens
        written at `start` (an int: the last T of the K keys; a (1,) or (B,) tensor: those slots)."""
        if isinstance(start, torch.Tensor):
            q = (start.view(-1, 1) + torch.arange(T, device=device))[:, None, :, None]   # (1 or B, 1, T, 1)
        elif start + T <= self.window:
            return mask                                                # no query reaches past the window
        else:
            q = torch.arange(K - T, K, device=device)[:, None]          # (T, 1)
        k = torch.arange(K, device=device)                              # (K,)
        local = (k <= q) & (q - k < self.window)                        # (..., T, K) causal and in the window
        return local if mask is None else mask & local

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start: int | torch.Tensor = 0,
                prefix: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """As CausalSelfAttention.forward."""
        B, T, C = x.shape                                              # (B, T, C)
        q = self.q_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)    # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, -1).transpose(1, 2)
        k, v, P = _cached_kv(k, v, cache, start, prefix)              # (B, H, P+K, D)
        if self.window is not None:
            mask = self._window_mask(mask, T, k.size(2) - P, start, k.device)
        if P and (mask is not None or T > 1):
            mask = _with_prefix(mask, T, k.size(2), P, k.device)
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()                     # scores and softmax in fp32, as HF
        y = _sdpa(q, k, v, mask, start, self.dropout if self.training else 0.0, scale=1.0)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)               # (B, T, C)
        return self.resid_dropout(self.out_proj(y))


class NeoAttention(nn.Module):
    """The `attn` of a GPT-Neo block: holds the attention as `attention` (HF's names:
    attn.attention.q_proj, ...)."""

    def __init__(self, cfg: GPTConfig, local: bool):
        super().__init__()
        self.attention = NeoSelfAttention(cfg, local)

    def forward(self, x, mask=None, cache=None, start=0, prefix=None):
        return self.attention(x, mask, cache, start, prefix)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block. attn_adapter / mlp_adapter: optional modules applied to
    each sublayer's output before the residual sum (bottleneck adapters, minigpt.methods.adapter)."""

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg) if cfg.arch == "gpt2" else NeoAttention(cfg, cfg.local_layer(layer))
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)
        self.attn_adapter: Optional[nn.Module] = None
        self.mlp_adapter: Optional[nn.Module] = None

    def forward(self, x, mask=None, cache=None, start=0, prefix=None):
        h = self.attn(self.ln_1(x), mask, cache, start, prefix)
        if self.attn_adapter is not None:
            h = self.attn_adapter(h)
        x = x + h
        h = self.mlp(self.ln_2(x))
        if self.mlp_adapter is not None:
            h = self.mlp_adapter(h)
        return x + h


class GPT(nn.Module):
    """GPT-2 (or GPT-Neo, cfg.arch) language model. `model(idx)` maps token ids (B, T) to logits
    (B, T, vocab_size)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight               # tied
        self.kv_prefix: Optional[nn.Module] = None   # virtual tokens: prefix/prompt tuning (minigpt.methods)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (GPT-Neo: N(0, 0.02) everywhere, as HF)
        for name, p in self.named_parameters():
            if cfg.arch == "gpt2" and name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute each block's activations in backward (less memory). Quantized layers
        (minigpt.model.quant) then keep their dense weight from the recomputation to the backward."""
        return self.__dict__.get("_gradient_checkpointing", False)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.__dict__["_gradient_checkpointing"] = bool(on)
        for m in self.modules():
            if hasattr(m, "save_dense"):
                m.save_dense = bool(on)

    def __getstate__(self):
        # generate(compile=True) keeps its compiled step and KV caches on the model: not part of
        # the model's state (rebuilt on demand), and not picklable
        state = self.__dict__.copy()
        state.pop("_compiled_decoding", None)
        return state

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count with the tied head counted once (optionally without wpe/wte)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel() + self.transformer.wte.weight.numel()
        return n

    @property
    def num_virtual_tokens(self) -> int:
        """Virtual tokens in front of every sequence (prefix / prompt tuning; 0 for a plain model)."""
        return 0 if self.kv_prefix is None else self.kv_prefix.num_virtual_tokens

    @property
    def context_length(self) -> int:
        """Real tokens a sequence may hold: block_size less the virtual tokens."""
        return self.config.block_size - self.num_virtual_tokens

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def forward(self, idx: torch.Tensor, *, pos: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, caches: Optional[list[KVCache]] = None,
                start: int | torch.Tensor = 0, last_only: bool = False) -> torch.Tensor:
        """Logits for every position.

        idx:    (B, T) token ids.
        pos:    (B, T) or (T,) position ids; default start..start+T-1.
        mask:   boolean attention mask broadcastable to (B, H, T, start+T), True = may attend;
                default causal. Used for left-padded batches.
        caches: one KVCache per layer for incremental decoding; `start` is the write offset
                (an int, or a 1-element LongTensor for static shapes: then `mask` must cover
                the caches' whole length, see KVCache).
        last_only: compute logits for the last position only (what decoding needs).
        returns (B, T, vocab_size), or (B, 1, vocab_size) with last_only
        """
        x = self.hidden_states(idx, pos=pos, mask=mask, caches=caches, start=start)  # (B, T, C)
        if last_only:
            x = x[:, -1:]                                                # (B, 1, C)
        return self.lm_head(x)                                           # (B, T, V)

    def hidden_states(self, idx: torch.Tensor, *, pos: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, caches: Optional[list[KVCache]] = None,
                      start: int | torch.Tensor = 0) -> torch.Tensor:
        """Final-LayerNorm outputs (B, T, n_embd): everything but the head (see forward).
        Token ids are checked on calls without caches (decoding checks its prompt once).

        With virtual tokens (kv_prefix, P of them) positions and `start` still count real tokens:
        the model puts them after the prefix (position ids + P), as PEFT's prefix/prompt tuning do."""
        if caches is None and not torch.compiler.is_compiling():
            check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        P = self.num_virtual_tokens
        if pos is None and isinstance(start, torch.Tensor):
            pos = start + torch.arange(T, device=idx.device)                 # (T,)
        elif pos is None:
            if start + T > self.context_length:
                virtual = f" less {P} virtual tokens" if P else ""
                raise ConfigError(f"sequence of {start + T} tokens exceeds the context length "
                                  f"({self.config.block_size}{virtual})")
            pos = torch.arange(start, start + T, device=idx.device)         # (T,)
        prefix = [None] * self.config.n_layer
        if P:
            pos = pos + P
            if caches is None:
                prefix = self.kv_prefix.layer_kv(self)                   # per layer (1, H, P, D) keys, values
            elif caches[0].offset != P:
                raise ConfigError(f"KV caches hold {caches[0].offset} virtual tokens, the model {P}: "
                                  "make them with model.new_caches")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            cache = caches[i] if caches is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cache, start, prefix[i], use_reentrant=False)
            else:
                x = block(x, mask, cache, start, prefix[i])
        return self.transformer.ln_f(x)

    def new_caches(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> list[KVCache]:
        """Preallocated KV caches for `generate`-style decoding (one per layer), max_len real tokens
        each; a model with virtual tokens gets them written in front (see KVCache)."""
        c, P = self.config, self.num_virtual_tokens
        caches = [KVCache(batch_size, c.n_head, max_len, c.head_dim, dtype or self.dtype, self.device, offset=P)
                  for _ in range(c.n_layer)]
        if P:
            self.fill_prefix(caches)
        return caches

    @torch.no_grad()
    def fill_prefix(self, caches: list[KVCache]) -> None:
        """(Re)write the virtual tokens' keys/values into caches made by new_caches."""
        if self.num_virtual_tokens:
            for cache, (k, v) in zip(caches, self.kv_prefix.layer_kv(self)):
                cache.fill_prefix(k, v)

    # --- checkpoints and generation live in their own modules; thin methods here -------------
    @classmethod
    def from_pretrained(cls, src, *, dtype: Optional[torch.dtype] = None, device=None,
                        quantize: Optional[str] = None, revision: Optional[str] = None, **kw) -> "GPT":
        """Load from a Hub name ("ORG/NAME", a preset name), an HF directory/file, an OpenAI TF checkpoint,
        or our own dir. revision: of a Hub name, a branch, tag or commit sha (default main); Hub models
        live in the Hugging Face cache shared with transformers (minigpt.weights.hub).
        quantize="nf4" | "int8": the blocks' Linear weights become frozen quantized layers
        (minigpt.model.quant; the base of QLoRA / 8-bit inference)."""
        from ..weights.checkpoint import load_model
        from .quant import QUANT_MODES, quantize_model

        if quantize is not None and quantize not in QUANT_MODES:
            raise ConfigError(f"quantize must be one of {', '.join(QUANT_MODES)}, got {quantize!r}")
        model = load_model(src, model_cls=cls, dtype=dtype, device=device, revision=revision, **kw)
        return quantize_model(model, quantize) if quantize else model

    def save_pretrained(self, out_dir) -> None:
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel (GPT-Neo:
        GPTNeoForCausalLM) loads."""
        from ..weights.checkpoint import save_model
        save_model(self, out_dir)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int = 64, **kw) -> torch.Tensor:
        """(B, T) prompt ids -> (B, T + n) ids. See minigpt.inference.generate.generate for options."""
        from ..inference.generate import generate
        return generate(self, idx, max_new_tokens=max_new_tokens, **kw)

    def stream(self, idx: torch.Tensor, max_new_tokens: int = 64, **kw):
        """Yield new token ids one by one for a single prompt (1, T). See minigpt.inference.generate.stream."""
        from ..inference.generate import stream
        return stream(self, idx, max_new_tokens=max_new_tokens, **kw)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy. logits (B, T, V), targets (B, T) already shifted."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=ignore_index)
