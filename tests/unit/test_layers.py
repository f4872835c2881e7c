"""The app's layers: imports go one way (core <- models <- runtime <- engine <- pipeline <- http
<- grpc, transport <- entry points), no module imports itself back through others, and above the
engine only its public module (`app.engine`) is imported: the seam a process boundary can cross."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[2] / "app"

# Lower layers never import higher ones; the entry points (main, server, probe) sit on top.
LAYERS = {
    "app.core": 0,
    "app.models": 1,  # the model contract and repository
    "app.runtime": 2,  # ONNX Runtime sessions and placement
    "app.engine": 3,  # what is served
    "app.pipeline": 4,  # a front end's request path
    "app.http": 5,  # the HTTP front doors
    "app.grpc": 6,  # the gRPC front door
    "app.transport": 6,  # the HTTP server's own parts
}
ENTRY_POINTS = 7
ENGINE = "app.engine"


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
    assert ENGINE in GRAPH["app.pipeline.service"]
    assert "app.engine.table" in GRAPH["app.engine.engine"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_goes_up_a_layer(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not upward, f"{module} (layer {layer(module)}) imports higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(ENGINE)))
def test_outside_the_engine_only_its_public_module_is_imported(module: str) -> None:
    inside = sorted(m for m in GRAPH[module] if m.startswith(ENGINE + "."))
    assert not inside, f"{module} imports the engine's inside {inside}: import from {ENGINE}"


def test_the_engine_check_sees_a_reach_inside() -> None:
    # Guards the check above: it must see `from app.engine.table import X` as inside.
    assert "app.engine.table" in GRAPH["app.engine"]
    assert all(m.startswith(ENGINE) for m in GRAPH["app.engine"] if m.startswith("app.engine."))


FRONT_DOOR = "app.http.frontdoor"


def private_names_in(source: str) -> list[str]:
    """`from app.x import _y` in `source`: another module's internals."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


@pytest.mark.parametrize("module", sorted(m for m in MODULES if "_pb2" not in m))
def test_no_module_imports_the_internals_of_another(module: str) -> None:
    # The front-door module (app.http.frontdoor) and the engine are used through their public
    # names only; so is every other module.
    private = private_names_in(MODULES[module].read_text())
    assert not private, f"{module} imports internals: {private}"
    assert FRONT_DOOR in MODULES and FRONT_DOOR in GRAPH["app.http.routes"]


def test_the_internals_check_sees_a_private_import() -> None:
    source = "from app.http.frontdoor import _PLACES, shown\nfrom typing import _Final\n"
    assert private_names_in(source) == ["app.http.frontdoor._PLACES"]


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


def test_module_lengths_are_reported() -> None:
    """A module is cut by concept, not by length: the longest are printed as a figure to watch
    (pytest -s), not held to a limit."""
    lengths = sorted(
        ((len(MODULES[m].read_text().splitlines()), m) for m in MODULES if "_pb2" not in m),
        reverse=True,
    )
    print("\nlongest app modules (lines):", ", ".join(f"{m} {n}" for n, m in lengths[:8]))
    assert lengths[0][0] > 0, "the walk found no module with any lines"


def test_every_error_kind_has_an_http_status_and_a_grpc_code() -> None:
    # One error root, mapped by two tables: a kind added without its codes fails here.
    from app.core.errors import ErrorKind
    from app.grpc.server import GRPC_CODE
    from app.http.frontdoor import HTTP_STATUS

    assert set(HTTP_STATUS) == set(ErrorKind) == set(GRPC_CODE)
