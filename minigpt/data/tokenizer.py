"""GPT-2 byte-pair encoding through tiktoken, built offline from the ranks shipped in the package."""
from __future__ import annotations

import base64
import functools
from importlib import resources

import tiktoken

# The GPT-2 pre-tokenisation pattern (equivalent to the original release's, possessive form).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"


def load_ranks() -> dict[bytes, int]:
    """The 50,256 mergeable GPT-2 tokens and their ranks from the packaged gpt2.tiktoken."""
    text = resources.files("minigpt").joinpath("assets/gpt2.tiktoken").read_text(encoding="ascii")
    ranks = {}
    for line in text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken Encoding identical to OpenAI's "gpt2"; never touches the network."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(),
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )
