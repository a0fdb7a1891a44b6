"""The package's rooms: imports run down the layers only, with no cycle, and modules stay small."""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "cometbatch"

# Each room (a subpackage, or a module at the top level) and its layer: a module may import
# from its own room and from rooms of a lower layer, never from a higher one. So nothing in
# net/, store/, ledger/ or engine/ reaches the CLI, the views or the simulator.
LAYERS: Mapping[str, int] = {
    "_version": 0,
    "errors": 0,
    "paths": 0,
    "settings": 0,
    "streams": 0,
    "textsafe": 0,
    "validation": 0,
    "models": 1,
    "manifest": 2,
    "plan": 3,
    "net": 4,
    "results": 5,
    "store": 6,
    "ledger": 7,
    "costs": 8,
    "layouts": 8,
    "engine": 9,
    "views": 10,
    "simulator": 10,
    "cluster": 10,
    "cli": 11,
    "__init__": 12,
    "__main__": 12,
}
MAX_TOP_LEVEL = 16
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: Mapping[str, Path]) -> Iterator[str]:
    """Every cometbatch module `path` imports: at the top, under TYPE_CHECKING or in a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "cometbatch")
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            if target.split(".")[0] != "cometbatch":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def room(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_room_has_a_layer() -> None:
    """A new subpackage or top-level module is given its place in the layers on purpose."""
    assert {room(name) for name in modules()} <= set(LAYERS)


def test_imports_run_down_the_layers() -> None:
    """No module imports from a room of a higher layer."""
    upward = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if room(source) != room(target) and LAYERS[room(target)] > LAYERS[room(source)]
    )
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    """No module reaches itself through imports, type-checking and in-function ones included."""
    edges = graph()
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycles.append([*path[path.index(name) :], name])
            return
        if name in done:
            return
        for target in sorted(edges.get(name, ())):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])
    assert cycles == []


def test_the_top_level_holds_only_the_vocabulary() -> None:
    """At most sixteen modules sit at the top of the package; the rest live in their rooms."""
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL, top


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_a_module_holds_one_concept(path: Path) -> None:
    """No module grows past 400 lines: past that it holds more than one concept."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The import reader finds relative, type-checking and in-function imports."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..cli import main\n"
        "if TYPE_CHECKING:\n"
        "    from ..views.status import x\n"
        "def f():\n"
        "    from ..simulator.server import y\n",
        encoding="utf-8",
    )
    known = {"cometbatch.cli.main": source, "cometbatch.views.status": source}
    found = set(imported("cometbatch.engine.probe", source, known))
    assert found == {
        "cometbatch.cli.main",
        "cometbatch.views.status",
        "cometbatch.simulator.server",
    }
