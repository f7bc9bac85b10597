"""The shape of the code: layers import one way, zfs and btrfs never import each other, sync and serve run no raw zfs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "snapferry"


def _module(path: Path) -> str:
    return ".".join(("snapferry", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {_module(p): p for p in sorted(SRC.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `import` and `from ... import` of a snapferry module, nested ones included."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("snapferry"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("snapferry")]
    return found


def _layer(module: str) -> str:
    """The layer a module is in: errors, core, interface, backends, <fs>.codec|engine|resume|plan|backend, transport, sync, cli, demo."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in ("zfs", "btrfs"):
        return f"fs.{parts[2] if len(parts) > 2 else 'package'}"
    return parts[1]


# What each layer may import (besides itself); `fs.*` means the same filesystem's package only.
ALLOWED = {
    "package": set(),
    "__main__": {"cli"},
    "errors": set(),
    "core": {"errors"},
    "fs.package": set(),
    "fs.codec": {"errors", "core"},
    "fs.engine": {"errors", "core", "fs.codec"},
    "fs.resume": {"errors", "core", "fs.codec", "fs.engine"},
    "fs.plan": {"errors", "core", "interface", "fs.codec", "fs.engine", "fs.resume"},
    "fs.backend": {"errors", "core", "interface", "fs.codec", "fs.engine", "fs.resume", "fs.plan"},
    "interface": {"errors", "core"},
    "backends": {"errors", "core", "interface", "fs.backend", "fs.engine"},
    "transport": {"errors", "core"},
    "sync": {"errors", "core", "interface", "backends", "transport"},
    "offsite": {"errors", "core", "interface", "backends", "transport"},
    "demo": {"errors", "core", "fs.engine"},
    "cli": {"errors", "core", "interface", "backends", "transport", "sync", "offsite", "demo", "cli"},
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module: str) -> None:
    layer = _layer(module)
    own_fs = module.split(".")[1] if layer.startswith("fs.") else None
    for imported, names in _imports(MODULES[module]):
        target = _layer(imported)
        if target.startswith("fs.") and own_fs is not None:
            assert imported.split(".")[1] == own_fs, f"{module} imports {imported}: zfs and btrfs never import each other"
        if target != layer:
            assert target in ALLOWED[layer], f"{module} ({layer}) imports {imported} ({target})"
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{module} imports private names {private} from {imported}"


def test_every_module_says_what_it_owns() -> None:
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if path.name == "__init__.py" and not tree.body:
            continue
        doc = ast.get_docstring(tree)
        assert doc, f"{module} has no docstring saying what it owns"


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


@pytest.mark.parametrize("path", [*sorted((SRC / "sync").glob("*.py")), SRC / "cli" / "serve.py"], ids=lambda p: p.name)
def test_sync_and_serve_run_no_raw_zfs(path: Path) -> None:
    """sync plans from `snapferry status` and acts through snapferry verbs; serve lets only those through."""
    assert not {"zfs", "zpool"} & _string_constants(path)
