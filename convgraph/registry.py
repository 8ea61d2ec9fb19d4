"""Where rules come from: the built-in modules of ``convgraph.rules`` and the ``convgraph.rules`` entry points."""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from importlib.metadata import entry_points

from .errors import UsageError
from .rule import Rule


@lru_cache(maxsize=1)
def all_rules() -> dict[str, Rule]:
    """Name → Rule for every built-in and third-party rule (a module's ``RULE`` attribute)."""
    from . import rules as builtin

    found: dict[str, Rule] = {}
    for info in sorted(pkgutil.iter_modules(builtin.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{builtin.__name__}.{info.name}")
        rule = getattr(mod, "RULE", None)
        if isinstance(rule, Rule):
            found[rule.name] = rule
    for ep in entry_points(group="convgraph.rules"):
        obj = ep.load()
        rule = getattr(obj, "RULE", obj)
        if not isinstance(rule, Rule):
            raise UsageError(f"entry point {ep.name!r} in group convgraph.rules is not a convgraph Rule")
        found.setdefault(rule.name, rule)
    return found


def get_rule(name: str) -> Rule:
    rules = all_rules()
    if name not in rules:
        raise UsageError(f"unknown rule {name!r}; known rules: {', '.join(sorted(rules))}")
    return rules[name]
