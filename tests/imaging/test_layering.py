"""The package's import layering (DESIGN §1), read from the source's import statements (AST, not text)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "magicid"

# subpackage -> the magicid subpackages it must not import
FORBIDDEN = {
    "imaging": {"data", "faces", "models", "restore", "training"},
    "faces": {"data", "models", "restore", "training"},
    "models": {"data", "restore", "training"},
    "restore": {"data", "training"},
}


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every `magicid...` module a file under `root` (the package folder) imports: top level or inside
    functions, absolute or relative."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "magicid" or m.startswith("magicid.")}


def violations(subpackage: str, root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted((root / subpackage).rglob("*.py")):
        for module in imported_modules(path, root):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] in FORBIDDEN[subpackage]:
                bad.append(f"{path.relative_to(root.parent)} imports {module}")
    return bad


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_layering(subpackage):
    assert violations(subpackage) == [], "\n".join(violations(subpackage))


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
    """The check can fail: a planted lazy import and a relative one are both reported."""
    fake = tmp_path / "magicid" / "restore"
    fake.mkdir(parents=True)
    (fake / "planted.py").write_text(
        "def f():\n    from magicid.data.crops import zoom_crop\n\nfrom ..data import builder\n"
    )
    found = violations("restore", tmp_path / "magicid")
    assert any(v.endswith("imports magicid.data.crops") for v in found)
    assert any(v.endswith("imports magicid.data.builder") for v in found)
