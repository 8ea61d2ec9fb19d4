"""The import graph of convgraph: acyclic, and every module imports only its own layer or the ones below.

The imports are read with ``ast`` (function-level ones included: a lazy import upward is still an upward
dependency). Imports under ``if TYPE_CHECKING:`` only name a type and run nothing; they are left out.
The top-level ``rules/`` folder is installed as ``convgraph.rules`` and read as that.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The layer order, bottom-up: the one place it is declared (README's Development section explains it).
#: A module may import modules of its own layer or of a layer below, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "expr", "record", "progress", "io", "weights", "synthetic", "zoo", "arithmetic",
                    "convops", "metrics", "tolerance")),
    ("runtime", ("runtime", "inputs", "bench")),
    ("model", ("shapes", "propagate", "graph")),
    ("analysis", ("patterns", "receptive", "roofline", "regions")),
    ("rules", ("rule", "fit", "fit.*", "rules", "rules.*", "registry")),
    ("analyzer", ("analyze", "report")),
    ("engine and verification", ("localize", "verify", "calibrate", "quantize", "rewrite_check", "rewrite", "profile")),
    ("optimizer", ("optimize", "optimize.*")),
    ("interface", ("", "__main__", "cli", "cli.*")),
]


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "rules":
        parts = ["convgraph", *parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_name(p): p for p in [*ROOT.glob("convgraph/**/*.py"), *ROOT.glob("rules/**/*.py")]}


def _type_only(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """The convgraph modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod == "rules" or mod.startswith("rules."):
                mod = "convgraph." + mod
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in MODULES and m != name}


def _layer(name: str) -> int:
    short = name.removeprefix("convgraph").removeprefix(".")
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if short == m or (m.endswith(".*") and short.startswith(m[:-1])):
                return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {__file__}")


GRAPH = nx.DiGraph((name, dep) for name, path in MODULES.items() for dep in _imports(name, path))
GRAPH.add_nodes_from(MODULES)


def test_the_modules_are_read():
    assert {"convgraph.graph", "convgraph.analyze", "convgraph.rules.separable", "convgraph.cli.common"} <= set(MODULES)
    assert ("convgraph.rules.separable", "convgraph.fit") in GRAPH.edges  # `from convgraph import fit`
    assert ("convgraph.rewrite_check", "convgraph.verify") in GRAPH.edges  # a function-level import


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + c[:1]) for c in cycles[:5])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_layer_above(name):
    upward = [f"{dep} ({LAYERS[_layer(dep)][0]})" for dep in sorted(GRAPH.successors(name))
              if _layer(dep) > _layer(name)]
    assert not upward, f"{name} ({LAYERS[_layer(name)][0]}) imports from above: {', '.join(upward)}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The reading of imports finds a lazy import of a higher layer (the check above cannot pass vacuously)."""
    fake = tmp_path / "io.py"
    fake.write_text("def f():\n    from .cli.common import err\n")
    assert "convgraph.cli.common" in _imports("convgraph.io", fake)
    assert _layer("convgraph.cli.common") > _layer("convgraph.io")


def test_the_readme_shows_the_declared_layers():
    """README's Development section shows LAYERS as a table; it must not drift from the declaration."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| layer | modules |"):].split("\n\n")[0].splitlines()[2:]
    shown = [(row.split("|")[1].strip(), row.split("|")[2].split()) for row in table]
    spelled = {"": "convgraph/__init__", "rules": "rules/*", "rules.*": None, "fit": "fit/", "fit.*": None,
               "optimize": "optimize/", "optimize.*": None, "cli": "cli/", "cli.*": None}
    declared = [(name, [f"`{spelled.get(m, m)}`" for m in members if spelled.get(m, m) is not None])
                for name, members in LAYERS]
    assert shown == declared
