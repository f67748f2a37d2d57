"""The package's structure, read from its source (docs/architecture.md): layers that import only
downward, no import circles, no private name crossing files, no function a reader cannot hold
in their head in the estimator, the trainer and the evaluation."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latentdist"
# low to high; a module may import its own layer and the layers below it
LAYERS = (
    ("errors", "_io", "_progress", "_shapes", "device", "versions", "outdir", "stats"),
    ("parallel", "report", "checkpoint"),
    ("data",),
    ("discrepancy",),
    ("generators",),
    ("proxies",),
    ("estimator",),
    ("dae",),
    ("evaluation",),
    ("cli",),
)
ENTRY_POINTS = ("latentdist.__main__", "latentdist.dae.__main__")  # may import the CLI
MAX_LINES = 80
SHORT_FUNCTIONS_IN = ("estimator", "dae", "evaluation")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(importer, imported module, imported name or None) for every latentdist import."""
    out = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [
                    (f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, a.name)
                    for a in node.names
                ]
            else:
                continue
            for target, name in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("latentdist") and target != mod:
                    out.append((mod, target, name))
    return out


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package's face
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_structure.py::LAYERS")


def test_layers_import_only_downward():
    upward = []
    for mod, target, _ in _imports(_modules()):
        if mod in ENTRY_POINTS:
            continue
        low, high = _layer(mod), _layer(target)
        if target == "latentdist" or (low is not None and high is not None and high > low):
            upward.append(f"{mod} -> {target}")
    assert not upward, "imports that run up a layer: " + "; ".join(sorted(set(upward)))


def test_no_import_circles():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for mod, target, _ in _imports(modules):
        if not (modules[mod].name == "__init__.py" and target.startswith(mod + ".")):
            edges.setdefault(mod, set()).add(target)
    seen: dict[str, int] = {}  # 1: on the current path, 2: finished
    circles = []

    def visit(v: str, path: list[str]) -> None:
        seen[v] = 1
        for w in sorted(edges.get(v, ())):
            if seen.get(w) == 1:
                circles.append(" -> ".join(path[path.index(w) :] + [w]))
            elif w not in seen:
                visit(w, path + [w])
        seen[v] = 2

    for v in sorted(modules):
        if v not in seen:
            visit(v, [v])
    assert not circles, "import circles: " + "; ".join(circles)


def test_no_private_name_crosses_files():
    crossing = [
        f"{mod} imports {name} from {target}"
        for mod, target, name in _imports(_modules())
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert not crossing, "; ".join(crossing)


def test_functions_fit_in_a_head():
    long = []
    for sub in SHORT_FUNCTIONS_IN:
        for path in (PACKAGE / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_LINES} lines: " + "; ".join(long)
