"""The docs name what the package has: docs/python-api.md every module and its public names (its
``__all__``), the README's layout tree every module; and docstrings cite docs/design.md by its path."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlora_export"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.endswith("__main__"):
            out[name] = path
    return out


def public_names(name: str, path: Path) -> list[str]:
    """A module's ``__all__`` (read from the source, or from the module where it is computed), else
    its public top-level functions and classes."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                return list(importlib.import_module(name).__all__)
        if isinstance(node, ast.ImportFrom) and any(a.name == "__all__" for a in node.names):
            return list(importlib.import_module(name).__all__)
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")]


def _api_rows() -> dict[str, str]:
    """docs/python-api.md's table rows, by the module they name first."""
    rows = {}
    for line in (ROOT / "docs" / "python-api.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `(mlora_export[\w.]*)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


@pytest.mark.parametrize("module", sorted(_modules()))
def test_python_api_names_every_module_and_its_public_names(module: str) -> None:
    rows = _api_rows()
    assert module in rows, f"docs/python-api.md has no row for {module}"
    missing = [n for n in public_names(module, _modules()[module]) if f"`{n}`" not in rows[module]]
    assert missing == [], f"docs/python-api.md's row of {module} does not name {missing}"


def test_python_api_names_no_module_that_is_gone() -> None:
    assert sorted(set(_api_rows()) - set(_modules())) == []


def test_readme_layout_names_every_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = readme[readme.index("```\nmlora_export/"):]
    tree = tree[: tree.index("```", 4)]
    missing = [m for m in _modules() if m != "mlora_export" and not re.search(rf"(?<![\w.]){re.escape(m.rsplit('.', 1)[1])}(?![\w])", tree)]
    assert missing == [], f"the README's layout tree does not name {missing}"


def test_docstrings_cite_the_design_by_its_path() -> None:
    bare = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py")] if p.name != "test_docs.py"
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(r"(?<![/\w])DESIGN\.md", line)]
    assert bare == [], f"cite docs/design.md, not DESIGN.md: {bare}"
