"""The package's shape: thin root scripts, short functions and modules, subpackages that name the parts,
the top-level package as the public surface, no import cycles, a ruff-clean tree, and --help texts that
read well."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import minigpt
from minigpt.commands import COMMANDS, run

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "minigpt"


def test_root_scripts_are_thin_shims():
    for name in ("train.py", "finetune.py", "chat.py", "serve.py"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 60 and f"from minigpt.commands.{name[:-3]} import main" in text


def test_no_function_longer_than_80_lines():
    long = []
    for f in sorted(PKG.rglob("*.py")):
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long.append(f"{f.relative_to(ROOT)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, long


def test_no_module_longer_than_600_lines():
    long = [f"{f.relative_to(ROOT)} ({n} lines)" for f in sorted(PKG.rglob("*.py"))
            if (n := len(f.read_text(encoding="utf-8").splitlines())) > 600]
    assert not long, long


SUBPACKAGES = ("model", "weights", "methods", "training", "data", "inference", "commands")


def test_subpackages_name_the_parts():
    missing = [name for name in SUBPACKAGES if not (PKG / name / "__init__.py").is_file()]
    assert not missing, missing


# what `from minigpt import ...` offers, and the subpackage each name is defined in
PUBLIC = {"GPT": "model", "GPTConfig": "model", "quantize_model": "model", "get_tokenizer": "data",
          "TokenDataset": "data", "InstructionDataset": "data", "add_lora": "methods", "merge_lora": "methods",
          "unmerge_lora": "methods", "save_adapter": "methods", "load_adapter": "methods",
          "export_gguf": "weights", "prepare_for_decoding": "inference"}


def test_top_level_package_is_the_public_surface():
    from minigpt import (  # noqa: F401  (the import itself is the first check)
        GPT,
        GPTConfig,
        InstructionDataset,
        TokenDataset,
        add_lora,
        export_gguf,
        get_tokenizer,
        load_adapter,
        merge_lora,
        prepare_for_decoding,
        quantize_model,
        save_adapter,
        unmerge_lora,
    )

    wrong = []
    for name, sub in PUBLIC.items():
        obj = getattr(minigpt, name)
        where = getattr(obj, "__module__", None) or "?"
        if not where.startswith(f"minigpt.{sub}.") and where != f"minigpt.{sub}":
            wrong.append(f"{name}: defined in {where}, expected under minigpt.{sub}")
        elif not any(getattr(mod, name, None) is obj for key, mod in list(sys.modules.items())
                     if key.startswith(f"minigpt.{sub}.") or key == f"minigpt.{sub}"):
            wrong.append(f"{name}: minigpt.{name} is not the {name} of any module under minigpt.{sub}")
        if name not in minigpt.__all__:
            wrong.append(f"{name}: missing from minigpt.__all__")
    assert not wrong, wrong


# The only package imports that may point upward: GPT's convenience methods (loading and saving
# checkpoints, generating), which import their implementations when called.
UPWARD_OK = {("minigpt.model.gpt", "GPT", m) for m in ("from_pretrained", "save_pretrained", "generate", "stream")}


def _relative_imports(node: ast.AST, scope: tuple = ()):
    """(ImportFrom node, enclosing class/function names) for every relative import, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ImportFrom) and child.level:
            yield child, scope
        named = isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        yield from _relative_imports(child, scope + (child.name,) if named else scope)


def _module_name(f: Path) -> str:
    return ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _module_imports(f: Path, modules: set[str]) -> set[str]:
    """Package modules a file imports (relative imports anywhere in the file, module level or inside
    functions), as dotted names: `from .a import b` counts a and, if b is a module, a.b; `from . import b`
    counts b if it is a module, else the package (whose attribute b it reads)."""
    name = _module_name(f)
    pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for n, scope in _relative_imports(ast.parse(f.read_text(encoding="utf-8"))):
        if (name, *scope[:2]) in UPWARD_OK:
            continue
        base = pkg.rsplit(".", n.level - 1)[0] if n.level > 1 else pkg
        target = f"{base}.{n.module}" if n.module else base
        subs = {f"{target}.{a.name}" for a in n.names} & modules
        out |= subs
        if n.module or len(subs) < len(n.names):     # `from . import sibling` needs only the sibling
            out.add(target)
    return out & modules


def _import_graph() -> dict[str, set[str]]:
    files = sorted(PKG.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _module_imports(f, modules) - {_module_name(f)} for f in files}


def test_no_import_cycles_between_modules():
    graph = _import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        if state.get(m) == 1:
            cycles.append(" -> ".join(path[path.index(m):] + [m]))
            return
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, path + [m])
        state[m] = 2
    for m in sorted(graph):
        visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
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
