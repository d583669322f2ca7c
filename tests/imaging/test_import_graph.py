"""The package's import graph (issue 24 item 9), read from the source's import statements (AST, not text), beside
`test_layering.py`: no import cycle inside `magicid/`, no `_private` name imported from another module, and the
library never imports orchestration or dashboards (`flows`, `prefect`, `streamlit`).

Every import counts, top level or inside a function (a lazy import is still an arrow between two modules);
imports under `if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "magicid"
ORCHESTRATION = ("flows", "prefect", "streamlit")


@dataclass(frozen=True)
class Import:
    """One imported module (and, for `from M import name`, the name) in one file, at one line."""

    module: str
    name: str | None
    line: int


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import in the file at `path` (a module under the package folder `root`), relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        _module_name(path, root)
        if path.name == "__init__.py"
        else _module_name(path, root).rpartition(".")[0]
    )
    found: list[Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, None, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.extend(Import(module, alias.name, node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_modules(root: Path) -> dict[str, Path]:
    """`magicid...` module name -> its file, for every module under the package folder `root`."""
    return {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (`from package import module` points at the module)."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for found in imports_of(path, root):
            submodule = f"{found.module}.{found.name}" if found.name else None
            target = submodule if submodule in modules else found.module
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def private_imports(root: Path) -> list[str]:
    """`from M import _name` where M is another module of the package (a dunder such as `__version__` is public)."""
    modules = package_modules(root)
    bad = []
    for name, path in modules.items():
        for found in imports_of(path, root):
            if found.module not in modules or found.module == name or found.name is None:
                continue
            if found.name.startswith("_") and not found.name.startswith("__"):
                bad.append(
                    f"{path.relative_to(root.parent)}:{found.line} imports {found.name} from {found.module}"
                )
    return bad


def orchestration_imports(root: Path) -> list[str]:
    """Imports of `flows`, `prefect` or `streamlit` (or their submodules) anywhere in the package."""
    bad = []
    for path in package_modules(root).values():
        for found in imports_of(path, root):
            if found.module.split(".")[0] in ORCHESTRATION:
                bad.append(f"{path.relative_to(root.parent)}:{found.line} imports {found.module}")
    return bad


def _area(module: str) -> str:
    """The subpackage or top-level module of `magicid` a module belongs to (`magicid.data.ledger` -> `data`)."""
    return module.split(".")[1] if module.count(".") else "magicid"


@functools.cache
def _package_cycles() -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(cycle) for cycle in cycles(import_graph(PACKAGE)))


AREAS = sorted({_area(name) for name in package_modules(PACKAGE)})


@pytest.mark.parametrize("area", AREAS)
def test_no_import_cycle_inside_the_package(area):
    """Per area (subpackage or top-level module), so a known cycle in one does not hide a new one elsewhere."""
    found = [cycle for cycle in _package_cycles() if any(_area(m) == area for m in cycle)]
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(cycle) for cycle in found)


def test_no_private_name_is_imported_from_another_module():
    found = private_imports(PACKAGE)
    assert found == [], "\n".join(found)


def test_the_library_never_imports_orchestration():
    found = orchestration_imports(PACKAGE)
    assert found == [], "\n".join(found)


def test_the_checks_see_planted_cycles_private_names_and_orchestration(tmp_path):
    """The checks can fail: a cycle through a lazy and a relative import, a private name, a flows import; an
    import under TYPE_CHECKING is no arrow."""
    root = tmp_path / "magicid"
    (root / "data").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("def f():\n    from magicid.data.b import _helper\n")
    (root / "data" / "b.py").write_text("from . import a\n\ndef _helper():\n    pass\n")
    (root / "data" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from magicid.data import d\n"
        "def g():\n    from flows.common import flow_params\n    import prefect\n"
    )
    (root / "data" / "d.py").write_text("from magicid.data import c\nfrom magicid.data.a import f\n")
    assert cycles(import_graph(root)) == [["magicid.data.a", "magicid.data.b"]]
    assert private_imports(root) == ["magicid/data/a.py:2 imports _helper from magicid.data.b"]
    assert orchestration_imports(root) == [
        "magicid/data/c.py:5 imports flows.common",
        "magicid/data/c.py:6 imports prefect",
    ]


if __name__ == "__main__":
    # `python tests/imaging/test_import_graph.py`: the structure figures these tests check, and the largest files.
    graph = import_graph(PACKAGE)
    found = cycles(graph)
    print(f"modules: {len(graph)}, import arrows: {sum(len(targets) for targets in graph.values())}")
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    private = private_imports(PACKAGE)
    print(f"_private names imported across modules: {len(private)}" + "".join(f"\n  {p}" for p in private))
    orchestration = orchestration_imports(PACKAGE)
    print(
        f"imports of {'/'.join(ORCHESTRATION)}: {len(orchestration)}"
        + "".join(f"\n  {o}" for o in orchestration)
    )
    sizes = sorted(((len(p.read_text().splitlines()), p) for p in PACKAGE.rglob("*.py")), reverse=True)[:8]
    print("largest files: " + ", ".join(f"{p.relative_to(PACKAGE.parent)} {n}" for n, p in sizes))
