"""The package's layers, read from its source: the core imports nothing above it, launchers never
import commands, and no module imports itself back through others. Every import counts,
those inside functions too (a circle hidden in a function is still a circle). In-process, no
module is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# layer -> the layers it must never import (fine_tune/__init__.py, the constants, is open to all)
FORBIDDEN = {
    "core": {"commands", "launchers", "main"},
    "launchers": {"commands", "main"},
    "commands": {"main"},
}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    base = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's own modules that ``module`` imports anywhere in its source."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package upwards
                anchor = module.split(".")[:len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import module` imports the module; `from module import name` the module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    names = module_names(package_dir)
    known = set(names)
    return {name: imported(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", known)
            for name, path in names.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] == "__main__":
        return "main"
    return parts[1] if parts[1] in FORBIDDEN else "root"


def wrong_directions(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if layer(b) in FORBIDDEN.get(layer(a), ()))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import one another (Tarjan's strongly connected components
    of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_module_imports_a_layer_above_it():
    graph = import_graph(ROOT / "fine_tune")
    assert {"fine_tune.core.loop", "fine_tune.commands.compare", "fine_tune.launchers.slurm"} <= set(graph)
    assert not wrong_directions(graph), "imports against the layers (core < launchers < commands):\n" + "\n".join(
        wrong_directions(graph))


def test_no_circle_of_imports():
    graph = import_graph(ROOT / "fine_tune")
    assert not circles(graph), "modules that import one another:\n" + "\n".join(
        " <-> ".join(group) for group in circles(graph))


def test_the_walk_sees_hidden_circles_and_wrong_directions(tmp_path):
    pkg = tmp_path / "fine_tune"
    for folder in ("core", "commands", "launchers"):
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from fine_tune.commands import show\n")
    (pkg / "commands" / "show.py").write_text("from fine_tune.core.a import f\nimport fine_tune.launchers.run\n")
    (pkg / "launchers" / "run.py").write_text("from . import job\n")
    (pkg / "launchers" / "job.py").write_text("import os\n\ndef g():\n    from .run import main\n")
    graph = import_graph(pkg)
    assert graph["fine_tune.launchers.run"] == {"fine_tune.launchers.job"}
    assert wrong_directions(graph) == ["fine_tune.core.a -> fine_tune.commands.show"]
    assert circles(graph) == [["fine_tune.commands.show", "fine_tune.core.a"],
                              ["fine_tune.launchers.job", "fine_tune.launchers.run"]]
