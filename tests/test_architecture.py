"""The import graph of convgraph: acyclic, and every module and package imports only its own layer or the ones below.

The imports are read with ``ast``: function-level ones included (a lazy import upward is still an upward
dependency) and type-only ones under ``if TYPE_CHECKING:`` too (a type that lives above is a dependency on
that layer all the same). A layer holds the entries of ``convgraph/``: packages (``model/``: the package and
every module in it) and top-level modules (``errors``). The top-level ``rules/`` folder is installed as
``convgraph.rules`` and read as that.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: The layer order, bottom-up: the one place it is declared (README's Development section shows it). Each
#: member is an entry of ``convgraph/`` (a package or a top-level module; ``""`` is ``convgraph/__init__``).
#: A module may import modules of its own layer or of a layer below, never one above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "progress", "io")),
    ("running models", ("run",)),
    ("the model", ("model",)),
    ("rule interface", ("rule", "fit")),
    ("rules", ("rules", "registry")),
    ("analysis", ("analysis",)),
    ("engine", ("engine",)),
    ("optimizer", ("optimize",)),
    ("interface", ("", "__main__", "cli", "zoo")),
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
    """The convgraph modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``), type-only ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
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


def _entry(name: str) -> str:
    """The entry of ``convgraph/`` a module belongs to: ``convgraph.model.graph`` → ``model``; ``convgraph`` → ``""``."""
    return name.removeprefix("convgraph").removeprefix(".").partition(".")[0]


def _layer(name: str) -> int:
    entry = _entry(name)
    for i, (_, members) in enumerate(LAYERS):
        if entry in members:
            return i
    raise AssertionError(f"{name} is in no layer: add {entry!r} to LAYERS in {__file__}")


GRAPH = nx.DiGraph((name, dep) for name, path in MODULES.items() for dep in _imports(name, path))
GRAPH.add_nodes_from(MODULES)
#: The same imports between entries of ``convgraph/`` (packages and top-level modules).
PACKAGES = nx.DiGraph((_entry(a), _entry(b)) for a, b in GRAPH.edges if _entry(a) != _entry(b))
PACKAGES.add_nodes_from(_entry(m) for m in MODULES)


def test_the_modules_are_read():
    assert {"convgraph.model.graph", "convgraph.analysis.analyze", "convgraph.rules.separable",
            "convgraph.cli.common"} <= set(MODULES)
    assert ("convgraph.rules.separable", "convgraph.fit") in GRAPH.edges  # `from convgraph import fit`
    assert ("convgraph.engine.rewrite_check", "convgraph.engine.verify") in GRAPH.edges  # a function-level import
    assert ("convgraph.model.probe", "convgraph.model.graph") in GRAPH.edges  # a type-only import
    assert ("rules", "fit") in PACKAGES.edges and ("model", "run") in PACKAGES.edges


def test_the_layers_are_the_folder():
    """``ls convgraph`` reads as the architecture: every package and top-level module is in exactly one layer,
    and every member of a layer is there (``rules`` is the top-level ``rules/`` folder)."""
    entries = {p.stem for p in (ROOT / "convgraph").glob("*.py")} | {
        p.name for p in (ROOT / "convgraph").iterdir() if (p / "__init__.py").is_file()}
    entries = {"" if e == "__init__" else e for e in entries} | {"rules"}
    declared = [m for _, members in LAYERS for m in members]
    assert len(declared) == len(set(declared)), "an entry is in two layers"
    assert set(declared) == entries, (f"in no layer: {sorted(entries - set(declared))}; "
                                      f"declared but missing: {sorted(set(declared) - entries)}")


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_import_cycle():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c + c[:1]) for c in cycles[:5])


def test_no_package_cycle():
    cycles = list(nx.simple_cycles(PACKAGES))
    assert not cycles, "cycles between packages: " + "; ".join(" → ".join(c + c[:1]) for c in cycles[:5])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_layer_above(name):
    upward = [f"{dep} ({LAYERS[_layer(dep)][0]})" for dep in sorted(GRAPH.successors(name))
              if _layer(dep) > _layer(name)]
    assert not upward, f"{name} ({LAYERS[_layer(name)][0]}) imports from above: {', '.join(upward)}"


@pytest.mark.parametrize("entry", sorted(e for e in PACKAGES if e))
def test_no_package_imports_from_a_layer_above(entry):
    layer = _layer(f"convgraph.{entry}")
    upward = [e for e in sorted(PACKAGES.successors(entry)) if _layer(f"convgraph.{e}" if e else "convgraph") > layer]
    assert not upward, f"{entry} ({LAYERS[layer][0]}) imports from above: {', '.join(upward)}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The reading of imports finds a lazy import and a type-only import of a higher layer (the checks above
    cannot pass vacuously)."""
    fake = tmp_path / "io.py"
    fake.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .engine.rewrite import Selection\n\n"
                    "def f():\n    from .cli.common import err\n")
    found = _imports("convgraph.io", fake)
    assert {"convgraph.cli.common", "convgraph.engine.rewrite"} <= found
    assert _layer("convgraph.cli.common") > _layer("convgraph.io") and _layer("convgraph.engine.rewrite") > _layer("convgraph.io")


def _spelled(member: str) -> str:
    if member == "":
        return "`convgraph/__init__`"
    if member == "rules" or (ROOT / "convgraph" / member).is_dir():
        return f"`{member}/`"
    return f"`{member}`"


def test_the_readme_shows_the_declared_layers():
    """README's Development section shows LAYERS as a table; it must not drift from the declaration."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| layer | packages and modules |"):].split("\n\n")[0].splitlines()[2:]
    shown = [(row.split("|")[1].strip(), row.split("|")[2].split()) for row in table]
    assert shown == [(name, [_spelled(m) for m in members]) for name, members in LAYERS]


def test_the_readme_names_each_package_s_modules():
    """The table's last column names the modules of each package: all of them, or the named ones of a package
    said to hold one module per rule or command."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| layer | packages and modules |"):].split("\n\n")[0].splitlines()[2:]
    checked = 0
    for row in table:
        members, holds = row.split("|")[2], row.split("|")[3]
        if not holds.strip():
            continue
        packages = [m.strip("`/") for m in members.split() if m.endswith("/`")]
        package = holds.split(":")[0].strip().rstrip("/") if ":" in holds else packages[0]
        folder = ROOT / ("rules" if package == "rules" else f"convgraph/{package}")
        have = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
        named = {w.strip("`,") for w in holds.split() if w.startswith("`")}
        if "one module per" in holds:
            assert named <= have, f"{package}/ has no {sorted(named - have)}"
        else:
            assert named == have, f"{package}/: README names {sorted(named)}, the folder holds {sorted(have)}"
        checked += 1
    assert checked >= 7
