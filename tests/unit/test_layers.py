"""The app's layers: imports go one way (core <- models <- pipeline <- http <- entry points), and
no module imports itself back through others."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# Lower layers never import higher ones; the entry points (main, server, probe) sit on top.
# app.introspection (Fig. 7 at serve time) sits with the pipeline: it reads model versions and
# draws PNGs; the routes of app/http/introspection.py call it.
LAYERS = {"app.core": 0, "app.models": 1, "app.pipeline": 2, "app.introspection": 2, "app.http": 3}
ENTRY_POINTS = 4


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(APP.rglob("*.py"))}


def layer(module: str) -> int:
    for package, rank in LAYERS.items():
        if module == package or module.startswith(package + "."):
            return rank
    return ENTRY_POINTS


def imports_of(module: str) -> set[str]:
    """The app modules `module` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from app.core import records` names a module; `from app.core.x import y` a member.
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_walk_sees_the_app() -> None:
    # Guards the test itself: an empty graph would pass every check below.
    assert {"app.main", "app.core.settings", "app.pipeline.service"} <= GRAPH.keys()
    assert "app.pipeline.service" in GRAPH["app.main"]
    assert "app.models.table" in GRAPH["app.pipeline.service"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_up_a_layer(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


def test_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


# Modules a newcomer reads whole stay short; generated protocol stubs are not read.
MAX_LINES = 400


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "_pb2" not in m))
def test_every_module_is_at_most_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by concept"
