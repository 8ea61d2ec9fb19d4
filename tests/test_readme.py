"""README.md stays true: every Python block runs verbatim, and its rule table lists every rule.

A block whose first line is ``# rules/NAME.py`` is a rule module (the how-to-add-a-rule example): it is
installed for the test as ``convgraph.rules.NAME``; one whose first line is ``# tests/NAME.py`` is a test
module: its tests run against it. Any other block is a script, run in a folder holding what it names:
``model.onnx`` (the sample model with dynamic dims, ``models/dynamic.onnx``), ``calib_images/`` and
``heldout_images/`` (scikit-image's photos).
"""

from __future__ import annotations

import inspect
import re
import shutil
import textwrap
from pathlib import Path

import pytest

import convgraph.rules
from convgraph import registry

README = Path(__file__).resolve().parent.parent / "README.md"
FILE = re.compile(r"# (rules|tests)/(\w+)\.py\n")


def _blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block, list-item indentation removed."""
    lines = README.read_text(encoding="utf-8").split("\n")
    out, start = [], None
    for i, line in enumerate(lines):
        fence = line.strip()
        if start is None and fence == "```python":
            start = i + 1
        elif start is not None and fence == "```":
            out.append((start + 1, textwrap.dedent("\n".join(lines[start:i])) + "\n"))
            start = None
    return out


def _run(code: str, line: int, name: str) -> dict:
    namespace = {"__name__": name}
    exec(compile(code, f"{README}:{line}", "exec"), namespace)
    return namespace


BLOCKS = _blocks()
FILES = [(line, m.group(1), m.group(2), code) for line, code in BLOCKS if (m := FILE.match(code))]  # folder, name
SCRIPTS = [(line, code) for line, code in BLOCKS if not FILE.match(code)]


def test_the_readme_has_its_examples() -> None:
    assert SCRIPTS and {folder for _, folder, _, _ in FILES} == {"rules", "tests"}


@pytest.mark.parametrize("line, code", SCRIPTS, ids=[f"line {line}" for line, _ in SCRIPTS])
def test_script_block_runs(line: int, code: str, models_dir, tmp_path, monkeypatch) -> None:
    import skimage

    photos = Path(skimage.__file__).parent / "data"
    shutil.copy(models_dir / "dynamic.onnx", tmp_path / "model.onnx")
    for folder, names in (("calib_images", ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")),
                          ("heldout_images", ("camera.png", "motorcycle_right.png"))):
        (tmp_path / folder).mkdir()
        for n in names:
            shutil.copy(photos / n, tmp_path / folder / n)
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    _run(code, line, "__main__")
    assert (tmp_path / "model.onnx").read_bytes() == (models_dir / "dynamic.onnx").read_bytes()  # never written
    assert {p.name for p in set(tmp_path.iterdir()) - before} >= {"model.separable.onnx", "front.png"}


def test_rule_example_works(models_dir, tmp_path, monkeypatch) -> None:
    """The how-to's rule, installed from its block, passes the how-to's test, run from its block."""
    (tmp_path / "rules").mkdir()
    tests = []
    for line, folder, name, code in FILES:
        if folder == "rules":
            (tmp_path / "rules" / f"{name}.py").write_text(code, encoding="utf-8")
        else:
            tests.append((line, name, code))
    monkeypatch.setattr(convgraph.rules, "__path__", [*convgraph.rules.__path__, str(tmp_path / "rules")])
    registry.all_rules.cache_clear()
    try:
        added = set(registry.all_rules()) - set(_table_rules())
        assert len(added) == 1, added  # the example, and no built-in rule of that name
        ran = 0
        for line, name, code in tests:
            for test_name, fn in _run(code, line, name).items():
                if test_name.startswith("test_") and callable(fn):
                    given = {"models_dir": models_dir, "tmp_path": tmp_path}
                    fn(**{p: given[p] for p in inspect.signature(fn).parameters})
                    ran += 1
        assert ran >= 1
    finally:
        registry.all_rules.cache_clear()


def _table_rules() -> list[str]:
    """The rule names in the first column of the README's rule table."""
    text = README.read_text(encoding="utf-8")
    table = text[text.index("\n## Rules\n"):]
    table = table[:table.index("\n\n", table.index("| rule |"))]
    return re.findall(r"^\| `([\w-]+)` \|", table, flags=re.M)


def test_rule_table_lists_every_rule() -> None:
    names = _table_rules()
    assert len(names) == len(set(names)) and set(names) == set(registry.all_rules())
