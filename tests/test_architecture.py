"""The package's import graph against docs/design.md §3: no circle, no upward arrow, and every
sideways import one the design lists.

The imports are read from the source (AST), all of them: at module level, inside functions (the
lazy ones) and under ``if TYPE_CHECKING:``, since each is a dependency of the importing module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlora_export"
DESIGN = ROOT / "docs" / "design.md"

#: The layers, top to bottom (docs/design.md §3): a unit may import the units of lower layers, and
#: those of its own layer only as the design lists them. A unit is a top-level module or package
#: of ``mlora_export``, or one converter (``converters.<name>``). The package root is the facade
#: above everything: it names the public API (lazily) and nothing imports it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),
    ("cli",),
    ("demo",),
    ("converters", "converters.slice", "converters.renest", "converters.merge", "converters.merge_kernels", "converters.gguf",
     "converters.onnx", "converters.hub", "training", "evaluation"),
    ("adapter", "base", "data"),
    ("method", "fs", "threads", "provenance", "safetensors_io", "direct_io"),
    ("io",),
    ("errors", "validate", "params", "metric_names", "progress", "units", "urls", "hubio", "_version"),
)
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "(root)"
    if parts[0] == "converters" and len(parts) > 1:
        return f"converters.{parts[1]}"
    return parts[0]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the package that ``name`` imports (``from x import y`` counts as ``x.y`` when that is a module)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mlora_export"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                folder = ROOT.joinpath(*target.split("."))
                if sub not in modules and any(p.suffix != ".py" for p in folder.glob(f"{alias.name}.*")):
                    continue  # a compiled extension of the package (converters/_merge_ext): no module of ours
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mlora_export"))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for t in _imports(name, path, modules) if t in modules} for name, path in modules.items()}


def allowed_sideways() -> set[tuple[str, str]]:
    """The sideways imports docs/design.md §3 allows: its lines ``- `a → b`: why``."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("## 3."):text.index("## 4.")]
    return {(a, b) for a, b in re.findall(r"^- `([\w.]+) → ([\w.]+)`", section, flags=re.M)}


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _modules()} - {"(root)"}
    assert units <= set(LAYER), f"units without a layer (add them to LAYERS and docs/design.md §3): {sorted(units - set(LAYER))}"


def test_no_circle() -> None:
    """No module imports itself through others (Tarjan's strongly connected components)."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_no_upward_or_unlisted_sideways_import() -> None:
    allowed = allowed_sideways()
    bad = []
    for module, targets in _graph().items():
        a = _unit(module)
        for target in targets:
            b = _unit(target)
            if a == b or a == "(root)":
                continue
            if b == "(root)":
                bad.append(f"{module} → {target}: nothing imports the package root (take __version__ from _version)")
            elif LAYER[b] < LAYER[a] or (LAYER[b] == LAYER[a] and (a, b) not in allowed):
                kind = "upward" if LAYER[b] < LAYER[a] else "sideways, not in docs/design.md §3"
                bad.append(f"{module} → {target} ({a} → {b}: {kind})")
    assert bad == [], "\n".join(bad)


def test_listed_sideways_imports_exist() -> None:
    """The design lists no sideways import the code no longer has (the list stays exact)."""
    used = {(_unit(m), _unit(t)) for m, ts in _graph().items() for t in ts}
    stale = allowed_sideways() - used
    assert stale == set(), f"docs/design.md §3 lists imports nothing makes: {sorted(stale)}"
