"""The modules of nanochat/, tasks/ and scripts/ import each other as a DAG: no circle, not even through an
import inside a function (Python tolerates that one, a reader and the next refactor do not)."""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("nanochat", "tasks", "scripts")


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, known: set[str]) -> set[str]:
    """Every known module `path` imports, at the top or anywhere below it, relative imports resolved."""
    package = module_name(path, root) if path.name == "__init__.py" else module_name(path, root).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    paths = {module_name(path, root): path for package in packages for path in (root / package).rglob("*.py")}
    return {name: imported_modules(path, root, set(paths)) - {name, *packages} for name, path in paths.items()}


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_imports_form_a_dag():
    graph = import_graph(REPO, PACKAGES)
    assert {"nanochat.dataset", "nanochat.tokenizer", "tasks.common", "scripts.base_train"} <= set(graph)
    circle = import_circle(graph)
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_a_circle_through_a_relative_and_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def later():\n    from pkg.c import f\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert sorted(set(import_circle(import_graph(tmp_path, ("pkg",))))) == ["pkg.a", "pkg.b", "pkg.c"]
    (package / "c.py").write_text("import pkg\n")
    assert import_circle(import_graph(tmp_path, ("pkg",))) is None
