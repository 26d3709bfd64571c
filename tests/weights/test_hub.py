"""Hub names ("ORG/NAME", presets) against a fake Hub on 127.0.0.1 (tests/fakehub.py): the Hugging Face cache
layout shared with huggingface_hub / transformers both ways, revisions, tokens, offline mode, redirects,
sharded and .bin repos, resume, corruption, two processes, bad input in one line, and the commands' --revision."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakehub import FakeHub
from safetensors.torch import save
from tiny import gpt

from minigpt import GPT
from minigpt.errors import CheckpointError
from minigpt.weights import hub as hubmod
from minigpt.weights.hf_cache import repo_folder

ROOT = Path(__file__).resolve().parents[2]
V = 256                                             # a small vocabulary keeps the blobs ~150 KB


def _files(model, d: Path) -> dict[str, bytes]:
    model.save_pretrained(d)
    return {p.name: p.read_bytes() for p in d.iterdir()}


def _sharded(files: dict[str, bytes]) -> dict[str, bytes]:
    sd = load_file_bytes(files["model.safetensors"])
    keys = sorted(sd)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = {names[0]: keys[: len(keys) // 2], names[1]: keys[len(keys) // 2:]}
    out = {"config.json": files["config.json"]}
    for name, ks in parts.items():
        out[name] = save({k: sd[k] for k in ks})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())},
             "weight_map": {k: name for name, ks in parts.items() for k in ks}}
    out["model.safetensors.index.json"] = json.dumps(index).encode()
    return out


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load
    return load(data)


def _bin_only(files: dict[str, bytes]) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save(load_file_bytes(files["model.safetensors"]), buf)      # HF key layout, Conv1D weights
    return {"config.json": files["config.json"], "pytorch_model.bin": buf.getvalue()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubsrc")
    a, b = gpt(vocab_size=V, n_embd=32, std=0.2, seed=1), gpt(vocab_size=V, n_embd=32, std=0.2, seed=2)
    full = gpt(n_embd=16, n_head=2, std=0.2, seed=3)                   # GPT-2's vocabulary: for the commands
    neo = gpt(vocab_size=V, n_embd=32, std=0.2, seed=4, arch="gpt_neo", window_size=4)
    A, B = _files(a, tmp / "a"), _files(b, tmp / "b")
    hub = FakeHub().start()
    c = SimpleNamespace(main=hub.add("org/tiny", A))
    c.v1 = hub.add("org/tiny", B, revision="dev", tags=["v1"])
    hub.add("openai-community/gpt2", A)
    hub.add("gpt2", A)                                                 # transformers' older name for it
    hub.add("org/private", A, private=True)
    hub.add("org/gated", A, gated=True)
    hub.add("org/sharded", _sharded(A))
    hub.add("org/bin", _bin_only(A))
    hub.add("org/llama", {"config.json": json.dumps({"model_type": "llama", "hidden_size": 32}),
                          "model.safetensors": A["model.safetensors"]})
    hub.add("org/noweights", {"config.json": A["config.json"]})
    hub.add("org/noconfig", {"model.safetensors": A["model.safetensors"]})
    hub.add("org/neo", _files(neo, tmp / "neo"))
    hub.add("org/full", _files(full, tmp / "full"), tags=["v1"])
    hub.renames["old/tiny"] = "org/tiny"
    yield SimpleNamespace(hub=hub, a=a, b=b, neo=neo, full=full, A=A, B=B, c=c,
                          sha=hashlib.sha256(A["model.safetensors"]).hexdigest())
    hub.stop()


@pytest.fixture
def hub(world, tmp_path, monkeypatch):
    """The fake Hub as HF_ENDPOINT, an empty cache in tmp_path, no token, online; faults cleared."""
    for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "MINIGPT_OFFLINE", "MINIGPT_HUB_URL", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "minigpt"))
    monkeypatch.setenv("HF_ENDPOINT", world.hub.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MINIGPT_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "10")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    h = world.hub
    h.log.clear()
    h.truncate.clear()
    h.corrupt.clear()
    h.hold.clear()
    h.ignore_range = h.no_length = False
    return h


def _ids(vocab: int = V) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))


def _same(m1, m2, vocab: int = V) -> bool:
    x = _ids(vocab)
    with torch.no_grad():
        return torch.equal(m1(x), m2(x))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


def _repo(tmp_path: Path, repo_id: str) -> Path:
    return repo_folder(repo_id, tmp_path / "hf")


# ------------------------------------------------------------------------------------------------
# Downloading into huggingface_hub's layout, once
# ------------------------------------------------------------------------------------------------
def test_download_layout_and_no_second_download(world, hub, tmp_path):
    m = GPT.from_pretrained("org/tiny")
    assert _same(m, world.a)
    # config.json first, then the weights of the commit it named, from the CDN (another origin)
    assert [(s, meth, p.split("?")[0]) for s, meth, p, _ in hub.log] == [
        ("hub", "HEAD", "/org/tiny/resolve/main/config.json"),
        ("hub", "GET", f"/org/tiny/resolve/{world.c.main}/config.json"),
        ("hub", "HEAD", f"/org/tiny/resolve/{world.c.main}/model.safetensors"),
        ("cdn", "GET", f"/blobs/{world.sha}")]
    r = _repo(tmp_path, "org/tiny")
    assert (r / "refs" / "main").read_text() == world.c.main
    snap = r / "snapshots" / world.c.main
    for name, etag in (("config.json", None), ("model.safetensors", world.sha)):
        link = snap / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        target = os.readlink(link)
        assert target.startswith("../../blobs/")
        assert (snap / name).read_bytes() == world.A[name]
        if etag:
            assert target == f"../../blobs/{etag}"
    assert not list(r.rglob("*.incomplete"))
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/tiny"), world.a)            # cached: no request at all
    assert hub.log == []


def test_progress_bar_on_stderr(world, hub, monkeypatch, capsys):
    monkeypatch.delenv("MINIGPT_NO_PROGRESS")
    GPT.from_pretrained("org/tiny")
    err = capsys.readouterr().err
    assert "org/tiny/model.safetensors" in err and "100%" in err


def test_revisions_branch_tag_commit(world, hub, tmp_path, monkeypatch):
    assert _same(GPT.from_pretrained("org/tiny", revision="v1"), world.b)
    assert _same(GPT.from_pretrained("org/tiny", revision="dev"), world.b)
    assert _same(GPT.from_pretrained("org/tiny", revision=world.c.main), world.a)
    r = _repo(tmp_path, "org/tiny")
    assert (r / "refs" / "v1").read_text() == world.c.v1 == (r / "refs" / "dev").read_text()
    assert sorted(p.name for p in (r / "refs").iterdir()) == ["dev", "v1"]     # a sha needs no ref
    assert sorted(p.name for p in (r / "snapshots").iterdir()) == sorted([world.c.main, world.c.v1])
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny", revision="nope")
    assert "no revision 'nope'" in _one_line(e)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                            # all three from the cache
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/tiny", revision="v1"), world.b)
    assert _same(GPT.from_pretrained("org/tiny", revision=world.c.main), world.a)
    assert hub.log == []
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")                                  # main was never fetched
    assert str(tmp_path / "hf") in _one_line(e) and "HF_HUB_OFFLINE" in str(e.value)


def test_renamed_repo_redirect_followed(world, hub):
    assert _same(GPT.from_pretrained("old/tiny"), world.a)
    assert any(p.startswith("/org/tiny/resolve/") for p in hub.requests("HEAD", "hub"))


def test_preset_names_are_hub_repos(world, hub, tmp_path, monkeypatch):
    assert not hubmod.is_preset_cached("gpt2")
    assert _same(GPT.from_pretrained("gpt2"), world.a)
    assert hub.requests("HEAD", "hub")[0] == "/openai-community/gpt2/resolve/main/config.json"
    assert (_repo(tmp_path, "openai-community/gpt2") / "refs" / "main").is_file()
    assert hubmod.is_preset_cached("gpt2")
    hub.log.clear()
    assert _same(GPT.from_pretrained("openai-community/gpt2"), world.a) and hub.log == []
    # the old minigpt cache ($MINIGPT_HOME/gpt2) still loads, before the Hub
    old = tmp_path / "minigpt" / "gpt2"
    world.b.save_pretrained(old)
    assert _same(GPT.from_pretrained("gpt2"), world.b) and hub.log == []
    # a cache where transformers downloaded "gpt2" under its older name (models--gpt2) serves it offline
    import huggingface_hub

    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf2"))
    for f in ("config.json", "model.safetensors"):
        huggingface_hub.hf_hub_download("gpt2", f, cache_dir=tmp_path / "hf2", endpoint=hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _same(GPT.from_pretrained("gpt2"), world.a)


def test_sharded_safetensors(world, hub, tmp_path):
    assert _same(GPT.from_pretrained("org/sharded"), world.a)
    snap = next((_repo(tmp_path, "org/sharded") / "snapshots").iterdir())
    assert sorted(p.name for p in snap.iterdir()) == ["config.json", "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors",
                                                     "model.safetensors.index.json"]


def test_bin_only_repo(world, hub, tmp_path):
    assert _same(GPT.from_pretrained("org/bin"), world.a)
    r = _repo(tmp_path, "org/bin")
    commit = (r / "refs" / "main").read_text()
    assert (r / ".no_exist" / commit / "model.safetensors").is_file()     # huggingface_hub's marker
    assert (r / "snapshots" / commit / "pytorch_model.bin").is_file()


def test_gpt_neo_repo(world, hub):
    m = GPT.from_pretrained("org/neo")
    assert m.config.arch == "gpt_neo" and _same(m, world.neo)


# ------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing broken left in the cache
# ------------------------------------------------------------------------------------------------
def test_other_architecture_refused_before_any_weights(world, hub, tmp_path):
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/llama")
    msg = _one_line(e)
    assert "'llama'" in msg and "gpt2" in msg and "gpt_neo" in msg
    assert all(p.endswith("/config.json") for p in hub.requests(server="hub")) and not hub.requests(server="cdn")
    assert not (_repo(tmp_path, "org/llama") / "blobs" / world.sha).exists()


def test_missing_repo_revision_files(world, hub, monkeypatch):
    cases = {"org/nothing": "HF_TOKEN", "org/noweights": "has no weights", "org/noconfig": "has no config.json"}
    for name, want in cases.items():
        with pytest.raises(CheckpointError) as e:
            GPT.from_pretrained(name)
        assert want in _one_line(e), (name, str(e.value))
    monkeypatch.setenv("HF_TOKEN", "hf_secret")                        # with a token the Hub says 404
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/nothing")
    assert "no Hub repo 'org/nothing'" in _one_line(e)


def test_names_that_are_not_hub_repos_keep_their_errors(hub, tmp_path):
    assert hubmod.hub_repo_id("gpt2") == "openai-community/gpt2"
    assert hubmod.hub_repo_id("distilgpt2") == "distilbert/distilgpt2"
    assert hubmod.hub_repo_id("microsoft/DialoGPT-small") == "microsoft/DialoGPT-small"
    for src in ("foo", "a/b/c", "./a/b", "/a/b", "out/model.safetensors", "a--b/c", "a/../b"):
        assert hubmod.hub_repo_id(src) is None, src
    with pytest.raises(CheckpointError, match="unknown checkpoint source 'foo'"):
        GPT.from_pretrained("foo")
    with pytest.raises(CheckpointError, match="checkpoint path not found"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="checkpoint path not found"):
        GPT.from_pretrained("out/model.safetensors")
    assert hub.log == []
    world_dir = tmp_path / "local"
    gpt(vocab_size=V, n_embd=32).save_pretrained(world_dir)
    with pytest.raises(CheckpointError, match="applies to Hub names"):
        GPT.from_pretrained(world_dir, revision="v1")


def test_private_repo_needs_a_token(world, hub, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/private")
    assert "HTTP 401" in _one_line(e) and "set HF_TOKEN" in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/private")
    assert "no Hub repo 'org/private'" in _one_line(e) and "HF_TOKEN can read it" in str(e.value)   # as the Hub
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/private"), world.a)
    # the token goes to the Hub only: the CDN (another origin) refuses requests that carry it
    assert all(h.get("Authorization") == "Bearer hf_secret" for s, _, _, h in hub.log if s == "hub")
    assert hub.requests("GET", "cdn") and not any("Authorization" in h for s, _, _, h in hub.log if s == "cdn")
    # the token file of `hf auth login` ($HF_HOME/token) also works
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf2"))
    (tmp_path / "hfhome").mkdir()
    (tmp_path / "hfhome" / "token").write_text("hf_secret\n")
    assert _same(GPT.from_pretrained("org/private"), world.a)


def test_gated_repo(hub):
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/gated")
    assert "gated" in _one_line(e) and "accept its terms" in str(e.value) and "HF_TOKEN" in str(e.value)


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_and_not_cached(hub, tmp_path, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")
    msg = _one_line(e)
    assert str(tmp_path / "hf") in msg and var in msg and "org/tiny" in msg
    assert hub.log == [] and not (tmp_path / "hf").exists()


def test_unreachable_hub(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")                # nothing listens on port 9
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")
    msg = _one_line(e)
    assert "127.0.0.1:9/org/tiny/resolve/main/config.json" in msg and "HF_HUB_OFFLINE" in msg


def test_truncated_download_resumes(world, hub, tmp_path):
    hub.truncate[world.sha] = 40_000                                     # the connection drops at 40 KB
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")
    size = len(world.A["model.safetensors"])
    assert f"stopped after 40000 of {size} bytes" in _one_line(e)
    r = _repo(tmp_path, "org/tiny")
    assert not (r / "blobs" / world.sha).exists() and not (r / "refs" / "main").exists()
    assert not (r / "snapshots" / world.c.main / "model.safetensors").exists()
    assert (r / "blobs" / f"{world.sha}.incomplete").stat().st_size == 40_000
    hub.truncate.clear()
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/tiny"), world.a)
    ranges = [h.get("Range") for s, m, _, h in hub.log if s == "cdn" and m == "GET"]
    assert ranges == ["bytes=40000-"]                                     # resumed, not restarted
    assert hashlib.sha256((r / "blobs" / world.sha).read_bytes()).hexdigest() == world.sha
    assert not list(r.rglob("*.incomplete"))


def test_restart_when_the_server_ignores_range(world, hub, tmp_path):
    hub.truncate[world.sha] = 40_000
    with pytest.raises(CheckpointError):
        GPT.from_pretrained("org/tiny")
    hub.truncate.clear()
    hub.ignore_range = True                                              # 200 with the whole file
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/tiny"), world.a)
    blob = _repo(tmp_path, "org/tiny") / "blobs" / world.sha
    assert blob.read_bytes() == world.A["model.safetensors"]
    assert [h.get("Range") for s, m, _, h in hub.log if s == "cdn" and m == "GET"] == ["bytes=40000-"]


def test_download_without_a_size(world, hub, tmp_path, monkeypatch):
    hub.no_length = True                  # no X-Linked-Size, no Content-Length: the sha256 still checks it
    assert _same(GPT.from_pretrained("org/tiny"), world.a)
    assert len(hub.requests("GET", "cdn")) == 1
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf2"))
    hub.corrupt.add(world.sha)
    with pytest.raises(CheckpointError, match="corrupted"):
        GPT.from_pretrained("org/tiny")


def test_corrupted_download_is_not_cached(world, hub, tmp_path):
    hub.corrupt.add(world.sha)
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")
    assert "sha256" in _one_line(e) and "corrupted" in str(e.value)
    r = _repo(tmp_path, "org/tiny")
    assert not (r / "blobs" / world.sha).exists() and not list(r.rglob("*.incomplete"))
    hub.corrupt.clear()
    assert _same(GPT.from_pretrained("org/tiny"), world.a)


def test_cache_not_writable(hub, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    real = Path.mkdir

    def deny(self, *a, **k):
        if str(self).startswith(str(cache)):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "mkdir", deny)
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained("org/tiny")
    msg = _one_line(e)
    assert f"cannot write the Hugging Face cache {cache}" in msg and "Permission denied" in msg
    assert "HF_HUB_CACHE" in msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores file permissions")
def test_cache_read_only_folder(hub, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf").chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="cannot write the Hugging Face cache"):
            GPT.from_pretrained("org/tiny")
    finally:
        (tmp_path / "hf").chmod(0o700)


_SCRIPT = "import sys; from minigpt.weights.hub import snapshot_download; print(snapshot_download(sys.argv[1]))"


def test_two_processes_download_one_blob_once(world, hub, tmp_path):
    # the first GET of the weights waits until both processes have asked for them: they overlap for sure
    hub.hold[world.sha] = 2
    procs = [subprocess.Popen([sys.executable, "-c", _SCRIPT, "org/tiny"], cwd=ROOT, env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    snap = _repo(tmp_path, "org/tiny") / "snapshots" / world.c.main
    assert {o.strip() for o, _ in outs} == {str(snap)}
    assert len(hub.requests("HEAD", "hub")) >= 4                        # both asked for both files
    assert len([p for p in hub.requests("GET", "cdn") if world.sha in p]) == 1     # one download, one waited
    assert (snap / "model.safetensors").read_bytes() == world.A["model.safetensors"]
    assert not list(_repo(tmp_path, "org/tiny").rglob("*.incomplete"))


# ------------------------------------------------------------------------------------------------
# The cache shared with huggingface_hub and transformers, both ways
# ------------------------------------------------------------------------------------------------
def test_minigpt_downloads_load_in_huggingface_hub_and_transformers(world, hub, tmp_path):
    import huggingface_hub
    import transformers

    GPT.from_pretrained("org/tiny", revision="v1")
    m = GPT.from_pretrained("org/sharded")
    cache = tmp_path / "hf"
    snap = huggingface_hub.snapshot_download("org/tiny", revision="v1", cache_dir=cache, local_files_only=True)
    assert Path(snap) == _repo(tmp_path, "org/tiny") / "snapshots" / world.c.v1
    f = huggingface_hub.hf_hub_download("org/tiny", "model.safetensors", revision=world.c.v1, cache_dir=cache,
                                        local_files_only=True)
    assert Path(f).read_bytes() == world.B["model.safetensors"]
    transformers.logging.set_verbosity_error()
    for repo, rev, ref in (("org/tiny", "v1", world.b), ("org/sharded", "main", m)):
        hf = transformers.GPT2LMHeadModel.from_pretrained(repo, revision=rev, cache_dir=cache,
                                                          local_files_only=True).eval()
        x = _ids()
        with torch.no_grad():
            assert (hf(x).logits - ref(x)).abs().max() < 1e-4


def test_huggingface_hub_downloads_load_offline_without_a_copy(world, hub, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hf"
    for f in ("config.json", "model.safetensors"):
        huggingface_hub.hf_hub_download("org/tiny", f, revision="v1", cache_dir=cache, endpoint=hub.url)
    for f in ("config.json", "pytorch_model.bin"):
        huggingface_hub.hf_hub_download("org/bin", f, cache_dir=cache, endpoint=hub.url)
    before = sorted(str(p) for p in cache.rglob("*"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    assert _same(GPT.from_pretrained("org/tiny", revision="v1"), world.b)
    assert _same(GPT.from_pretrained("org/bin"), world.a)
    assert hub.log == [] and sorted(str(p) for p in cache.rglob("*")) == before
    # online, a partly cached revision (huggingface_hub fetched config.json only) is completed in place
    monkeypatch.delenv("HF_HUB_OFFLINE")
    huggingface_hub.hf_hub_download("org/tiny", "config.json", cache_dir=cache, endpoint=hub.url)
    assert _same(GPT.from_pretrained("org/tiny"), world.a)
    assert len(list((_repo(tmp_path, "org/tiny") / "blobs").iterdir())) == 3     # one config, two weights


# ------------------------------------------------------------------------------------------------
# The commands: --revision, and Hub errors as one line
# ------------------------------------------------------------------------------------------------
def test_chat_and_export_with_hub_names(world, hub, tmp_path, capsys):
    from minigpt.commands import chat, export

    assert chat.main(["--model", "org/full", "--revision", "v1", "--prompt", "hi", "--max-new-tokens", "2",
                      "--temperature", "0", "--device", "cpu"]) == 0
    assert export.main(["--gguf", str(tmp_path / "m.gguf"), "--model", "org/full", "--revision", "v1",
                        "--dtype", "f32"]) == 0
    assert _same(GPT.from_pretrained(str(tmp_path / "m.gguf")), world.full, vocab=50257)
    capsys.readouterr()
    assert chat.main(["--model", "org/llama", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: org/llama: model_type 'llama' is not supported") and len(err.splitlines()) == 1
    assert chat.main(["--model", "org/full", "--revision", "nope", "--prompt", "hi"]) == 1
    assert "no revision 'nope'" in capsys.readouterr().err


def test_finetune_base_revision_recorded_and_reused(world, hub, tmp_path, monkeypatch):
    from minigpt.commands import finetune as ft
    from minigpt.commands.args import parse_args
    from minigpt.commands.serve import ServeArgs
    from minigpt.training.runs import FINETUNE_META, load_finetuned

    out = tmp_path / "ft"
    ft.finetune(parse_args(ft.FinetuneArgs, ["--base", "org/full", "--revision", "v1", "--lora", "--max-steps", "1",
                                             "--batch-size", "2", "--max-length", "32", "--threads", "1",
                                             "--eval-batches", "0", "--samples", "0", "--exact-match", "0",
                                             "--precision", "fp32", "--device", "cpu", "--out-dir", str(out)]))
    meta = json.loads((out / FINETUNE_META).read_text())
    assert meta["base"] == "org/full" and meta["base_revision"] == "v1"
    assert (_repo(tmp_path, "org/full") / "refs" / "v1").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                            # the base comes from the cache
    model, _ = load_finetuned(out)
    assert model.config.n_embd == 16
    assert parse_args(ServeArgs, ["--model", "org/full", "--revision", "v1"]).revision == "v1"


def test_info_shows_the_hub_cache(world, hub, tmp_path, capsys):
    from minigpt.commands import info

    GPT.from_pretrained("gpt2")
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert f"hub cache {tmp_path / 'hf'} (HF_HUB_CACHE" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("gpt2 "))
    assert str(_repo(tmp_path, "openai-community/gpt2") / "snapshots") in line
    assert "not cached (openai-community/gpt2-xl)" in out
