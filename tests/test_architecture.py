"""The dependency rules of docs/architecture.md, read from the source with ``ast``.

- The engine (``ctdbench/``) never imports ``methods``; only the composition root (the modules that
  assemble a run from a config) may, and only the registry and the interface (``methods``,
  ``methods.base``), never a method file.
- A method file never imports another method file: what several methods share is an engine
  module (``ctdbench.kernels``, ``ctdbench.align``, ...).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The composition root: reads the registry to build and validate methods by name.
COMPOSITION_ROOT = {"cli.py", "bench.py", "config.py", "specs.py", "recipe.py"}
INTERFACE = {"methods", "methods.base"}


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, anywhere in the file (inside
    functions too), as absolute names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, up level - 1 packages
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            # ``from methods import kd`` imports the module methods.kd
            found.update(f"{base}.{alias.name}" for alias in node.names if _is_method_file(f"{base}.{alias.name}"))
    return found


def _is_method_file(module: str) -> bool:
    parts = module.split(".")
    return len(parts) == 2 and parts[0] == "methods" and (REPO / "methods" / f"{parts[1]}.py").exists()


def _methods_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path, path.parent.name) if m == "methods" or m.startswith("methods.")}


@pytest.mark.parametrize("path", sorted((REPO / "ctdbench").glob("*.py")), ids=lambda p: p.name)
def test_engine_does_not_import_methods(path):
    used = _methods_imports(path)
    if path.name in COMPOSITION_ROOT:
        assert used <= INTERFACE, f"ctdbench/{path.name} imports method files {sorted(used - INTERFACE)}"
    else:
        assert not used, f"the engine module ctdbench/{path.name} imports {sorted(used)}"


@pytest.mark.parametrize("path", sorted((REPO / "methods").glob("*.py")), ids=lambda p: p.name)
def test_a_method_imports_no_other_method(path):
    own = f"methods.{path.stem}"
    others = {m for m in _methods_imports(path) if _is_method_file(m) and m not in (own, "methods.base")}
    assert not others, f"methods/{path.name} imports other method files {sorted(others)}"


def test_the_rules_see_every_kind_of_import(tmp_path):
    """The parser finds top-level, function-local, relative and ``from methods import x`` imports."""
    path = tmp_path / "probe.py"
    path.write_text("import methods.kd\ndef f():\n    from methods import uld\n    from .dskd import dskd_loss\n"
                    "from . import mined\nfrom methods.base import MethodContext\n")
    assert imported_modules(path, "methods") == {"methods", "methods.kd", "methods.uld", "methods.dskd",
                                                 "methods.mined", "methods.base"}
