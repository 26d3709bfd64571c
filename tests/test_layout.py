"""The package's shape: thin root scripts, short functions, no import cycles, a ruff-clean tree,
and --help texts that read well."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minigpt.commands import COMMANDS, run

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minigpt"


def test_root_scripts_are_thin_shims():
    for name in ("train.py", "finetune.py", "chat.py"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 60 and f"from minigpt.commands.{name[:-3]} import main" in text


def test_no_function_longer_than_80_lines():
    long = []
    for f in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long.append(f"{f.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def _module_imports(f: Path) -> set[str]:
    """Package modules a file imports at module level (relative imports), as dotted names."""
    pkg = ".".join(f.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for n in ast.parse(f.read_text(encoding="utf-8")).body:
        if isinstance(n, ast.ImportFrom) and n.level:
            base = pkg.rsplit(".", n.level - 1)[0] if n.level > 1 else pkg
            out.add(f"{base}.{n.module}" if n.module else base)
    return out


def test_no_import_cycles_between_modules():
    graph = {".".join(f.relative_to(ROOT).with_suffix("").parts): _module_imports(f) for f in PKG.rglob("*.py")}
    graph = {k.removesuffix(".__init__"): {d for d in v if d in graph or d + ".__init__" in graph}
             for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in graph.get(m, ()):
            visit(d, path + [m])
        state[m] = 2
    for m in graph:
        visit(m, [])
    assert "minigpt.model.gpt" not in graph["minigpt.weights.checkpoint"]


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run(
    [sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0, reason="ruff not installed")
def test_tree_is_ruff_clean():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


@pytest.mark.parametrize("name", [c for c in COMMANDS])
def test_help_reads_well(name, capsys):
    with pytest.raises(SystemExit) as e:
        run(name, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out and "repeatable) (repeatable" not in out
    assert out.startswith(f"usage: minigpt {name}")
    description = out.split("\n\n")[1]
    assert description.rstrip().endswith((".", ")")), description


def test_minigpt_lists_its_commands():
    r = subprocess.run([sys.executable, "-m", "minigpt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and all(f"  {c}" in r.stdout for c in COMMANDS)
    r = subprocess.run([sys.executable, "-m", "minigpt", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
