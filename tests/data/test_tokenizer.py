"""minigpt.get_tokenizer() against two independent GPT-2 BPE implementations.

The reference vocab.json / merges.txt are rebuilt from the shipped ranks (each multi-byte token is
the merge of two lower-ranked tokens), then fed to (a) transformers.GPT2Tokenizer and (b) a small
pure-Python BPE written here after OpenAI's original encoder (original regex, bytes_to_unicode).
"""
from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
from importlib import resources

import pytest
import regex

import minigpt
from minigpt import get_tokenizer

EOT = "<|endoftext|>"
ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TEXTS = [
    "hello world",
    "Hello, World! How's it going? I'm fine; we'll see, they've gone, you're right, he'd know.",
    "naïve café, résumé, Ångström, Straße, façade, coöperate — “quotes” ‘single’ …",
    "日本語のテキストと中文字符，还有한국어 문장도 있습니다。",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️‍🔥",
    "   leading spaces and trailing spaces   ",
    "multiple     spaces\tand\ttabs\t\t\tand\nnewlines\n\n\n  indented\r\nwindows",
    "numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-9 0x1F 1,000,000 2024-06-01",
    "def foo(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x != None: pass\n",
    "<html><body class=\"main\">&amp; &lt;tag&gt;</body></html>",
    "first document" + EOT + "second document" + EOT,
    " " + EOT + " spaced eot " + EOT + "\n",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी, ไทย",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth and \ufeffBOM",
    "''''' ''s 's 'S 'LL 'Ve don't DON'T",
    "a\n\nb \n c  \n\n  d\t\n\te",
    "",
    " ",
    "\n",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "😀" * 7 + "a" + "🎉" * 3,
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def shipped_ranks() -> dict[bytes, int]:
    text = resources.files("minigpt").joinpath("assets/gpt2.tiktoken").read_text(encoding="ascii")
    ranks = {}
    for line in text.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each multi-byte token (by rank), the pair of lower-ranked tokens BPE merges into it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            assert best is not None, token
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert len(parts) == 2 and max(ranks[parts[0]], ranks[parts[1]]) < rank, token
        merges.append((parts[0], parts[1]))
    return merges


class ReferenceBPE:
    """OpenAI's GPT-2 encoder algorithm, re-written: regex split, byte map, greedy lowest-rank merges."""

    def __init__(self, encoder: dict[str, int], merges: list[tuple[str, str]]):
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pat = regex.compile(ORIGINAL_PATTERN)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.merge_rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, _ = min(pairs)
            if rank == 1 << 30:
                break
            a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == rank)
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        chunks = text.split(EOT)
        for n, chunk in enumerate(chunks):
            for piece in self.pat.findall(chunk):
                mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[t] for t in self.bpe(mapped))
            if n < len(chunks) - 1:
                ids.append(self.encoder[EOT])
        return ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    ranks = shipped_ranks()
    b2u = bytes_to_unicode()
    u = lambda b: "".join(b2u[x] for x in b)  # noqa: E731
    encoder = {u(tok): rank for tok, rank in ranks.items()}
    encoder[EOT] = 50256
    merges = [(u(a), u(b)) for a, b in recover_merges(ranks)]
    d = tmp_path_factory.mktemp("gpt2_bpe")
    (d / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                  encoding="utf-8")
    return d, encoder, merges


@pytest.fixture(scope="module")
def reference_bpe(reference_files):
    _, encoder, merges = reference_files
    return ReferenceBPE(encoder, merges)


@pytest.fixture(scope="module")
def hf_tokenizer(reference_files):
    import transformers

    d, _, _ = reference_files
    return transformers.GPT2Tokenizer.from_pretrained(str(d), local_files_only=True)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789", " " * 6 + "\t\n\r",
             "'\".,;:!?-_()[]{}<>/\\|@#$%^&*+=~`", "éèêëàâäôöûüçñßøåÆŒ", "日本語中文字한국어",
             "😀🎉👍🏽🇫🇷❤️", "αβγδεжзийклмنشع"]
    out = []
    for _ in range(n):
        k = rng.randint(1, 80)
        out.append("".join(rng.choice(rng.choice(pools)) for _ in range(k)))
    return out


def test_shipped_ranks_file():
    raw = resources.files("minigpt").joinpath("assets/gpt2.tiktoken").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    ranks = shipped_ranks()
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert sum(len(t) == 1 for t in ranks) == 256


def test_known_ids(monkeypatch):
    def no_socket(*a, **k):
        raise OSError("network access is disabled in this test")
    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    get_tokenizer.cache_clear()                     # build it from scratch with the network off
    tok = get_tokenizer()
    assert tok is minigpt.get_tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.eot_token == 50256 and tok.n_vocab == 50257
    assert tok.encode(EOT, allowed_special={EOT}) == [50256]
    assert tok.decode([31373, 995]) == "hello world"


def test_merges_recovered(reference_files):
    _, encoder, merges = reference_files
    assert len(merges) == 50000 and len(encoder) == 50257
    assert merges[0] == ("Ġ", "t")                  # GPT-2's first merge: " t"


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_matches_references(text, reference_bpe, hf_tokenizer):
    tok = get_tokenizer()
    ids = tok.encode(text, allowed_special={EOT})
    assert ids == reference_bpe.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    assert tok.decode(ids) == reference_bpe.decode(ids)


def test_random_texts(reference_bpe, hf_tokenizer):
    tok = get_tokenizer()
    for text in _random_texts(300):
        ids = tok.encode_ordinary(text)
        assert ids == reference_bpe.encode(text), repr(text)
        assert ids == hf_tokenizer.encode(text), repr(text)
        assert tok.decode(ids) == text


def test_special_token_is_not_split_by_default():
    tok = get_tokenizer()
    with pytest.raises(ValueError):
        tok.encode("a " + EOT)                          # tiktoken refuses unless allowed
    assert 50256 not in tok.encode_ordinary("a " + EOT)
    # partial-token decoding is lossless at the byte level
    ids = tok.encode("😀")
    assert b"".join(tok.decode_single_token_bytes(i) for i in ids) == "😀".encode()


def test_pretraining_tokens_are_the_whole_texts(tmp_path, monkeypatch):
    """prepare_data cuts large texts into pieces; the tokens must be those of the whole text, with
    GPT-2's splits at paragraph breaks ("a.\\n\\nB" -> '.', '\\n', '\\n', 'B', never '\\n\\n' before a
    word) and around every kind of whitespace next to the cuts."""
    import numpy as np

    from minigpt.data import corpus

    tok = get_tokenizer()
    rng = random.Random(7)
    atoms = ["word", " word", "Word", "'s", " 12", ".", ",", " ", "  ", "\t", "\n", "\n\n", "\n\n\n", "\r\n\r\n",
             " \n\n", "\xa0", "\x1c", "\u3000", "é", "—", "!!"]
    texts = ["ROMEO.\n\nJULIET.\nAy me.\n\n\nEnd  \n\n  Next"] + [
        "".join(rng.choice(atoms) for _ in range(rng.randrange(50, 400))) for _ in range(40)]
    monkeypatch.setattr(corpus, "PIECE_CHARS", 16)                     # small pieces: many cuts
    for i, text in enumerate(texts):
        pieces = list(corpus._pieces(text))
        assert "".join(pieces) == text and len(pieces) > 1
        assert [t for p in pieces for t in tok.encode_ordinary(p)] == tok.encode_ordinary(text), repr(text)
        path = tmp_path / f"{i}.txt"
        path.write_text(text, encoding="utf-8")
        got = np.fromfile(corpus.prepare_data(str(path), tmp_path / "cache", 0.4) / "train.bin", dtype=np.uint16)
        whole = tok.encode_ordinary(path.read_text(encoding="utf-8")) + [tok.eot_token]  # as read: \r\n -> \n
        assert got.tolist() == whole[: len(got)], repr(text)
    assert [tok.decode([t]) for t in tok.encode_ordinary("a.\n\nB")] == ["a", ".", "\n", "\n", "B"]
