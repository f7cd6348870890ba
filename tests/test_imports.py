"""The engine package's imports flow one way: no module of reranker/ imports, even for type checking, one that
imports it back; and reranker/ knows nothing of the layers above it (web/, deploy/, Ray)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "reranker"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module's imports of other reranker modules, `from X import module` resolved to the module."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = found
    return graph


def test_reranker_has_no_import_cycles() -> None:
    graph = imports()
    ours = {name: {m for m in deps if m in graph and m != "reranker"} for name, deps in graph.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(ours[name]):
            if dep in path:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            else:
                visit(dep, [*path, dep])

    for name in ours:
        if name != "reranker":  # the package's __init__ re-exports; nothing inside imports it
            visit(name, [name])
    assert not cycles, sorted(set(cycles))
    assert all("reranker" not in deps for name, deps in graph.items() if name != "reranker"), \
        "import the module, not the package: reranker/__init__ imports the engine"


def test_reranker_does_not_import_the_layers_above_it() -> None:
    for name, deps in imports().items():
        above = {dep for dep in deps if dep.split(".")[0] in ("web", "deploy", "ray", "gradio", "app")}
        assert not above, f"{name} imports {sorted(above)}"


def test_no_module_defines_a_gradio_component_class() -> None:
    """Gradio writes a .pyi stub beside the module of every component class defined: a subclass in web/ made
    web/ui.pyi at import (which mypy then read instead of ui.py), and would fail where the code is read-only."""
    import gradio as gr

    root = PACKAGE.parent
    for path in [*root.glob("web/*.py"), *root.glob("deploy/**/*.py"), root / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for base in node.bases:
                    name = ast.unparse(base)
                    if name.startswith("gr."):
                        component = getattr(gr, name.removeprefix("gr."), None)
                        assert not (isinstance(component, type) and issubclass(component, gr.components.Component)), \
                            f"{path.name}: class {node.name}({name})"
    assert not [*root.glob("web/*.pyi"), *root.glob("deploy/**/*.pyi")]
