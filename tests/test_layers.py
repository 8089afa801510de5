"""The house rules for imports: no module imports from a layer above its own, and no
import cycle between modules (README, "Layers")."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What each part of chatterd may import (besides itself and the standard library and
# third-party packages).  Bottom to top: leaves, runtime/, the back-end packages, the turn
# contract and SSE framing, handlers/, the wiring.
LEAVES = {"jsonfmt", "metrics", "settings"}
ALLOWED = {
    "jsonfmt": set(),
    "metrics": set(),
    "settings": set(),
    "runtime": LEAVES,
    "upstreams": LEAVES | {"runtime"},
    "db": LEAVES,
    "tools": LEAVES,
    "accounts": LEAVES,
    "turns": LEAVES | {"db"},
    "sse": LEAVES | {"runtime"},
    "resume": LEAVES | {"runtime", "db", "sse"},
    "handlers": LEAVES | {"runtime", "upstreams", "db", "tools", "accounts", "turns", "sse",
                          "resume"},
    "chatterd": LEAVES | {"runtime", "upstreams", "db", "tools", "accounts", "turns", "sse",
                          "resume", "handlers"},
}
PARTS = set(ALLOWED)


def product_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of chatterd itself (not tests, bench, scripts)."""
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in PARTS and rel.stem not in PARTS:
            continue
        if rel.parts[0] in ("tests", "bench", "scripts") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """chatterd modules *path* imports at any depth of its code (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def test_every_part_is_known():
    parts = {name.split(".")[0] for name in product_modules()}
    assert parts <= PARTS
    assert {"chatterd", "handlers", "upstreams", "db", "runtime"} <= parts


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for name, deps in graph().items():
        part = name.split(".")[0]
        for dep in deps:
            dep_part = dep.split(".")[0]
            if dep_part != part and dep_part not in ALLOWED[part]:
                wrong.append(f"{name} imports {dep}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_cycle():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
