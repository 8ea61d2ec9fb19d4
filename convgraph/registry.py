"""Where rules come from: the built-in modules of ``convgraph.rules`` and the ``convgraph.rules`` entry points."""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from functools import lru_cache
from importlib.metadata import entry_points

from .errors import UsageError
from .rule import Rule

#: The entry-point group third-party rules register in.
GROUP = "convgraph.rules"


class PluginWarning(UserWarning):
    """A third-party rule that could not be loaded (it is skipped)."""


@lru_cache(maxsize=1)
def all_rules() -> dict[str, Rule]:
    """Name → Rule for every built-in and third-party rule (a module's ``RULE`` attribute).

    A plugin that fails to import, or gives no Rule, is named in one :class:`PluginWarning` and skipped;
    a plugin whose rule takes a name already taken (built-in or another plugin's) is a UsageError naming both.
    """
    from . import rules as builtin

    found: dict[str, Rule] = {}
    origin: dict[str, str] = {}
    for info in sorted(pkgutil.iter_modules(builtin.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{builtin.__name__}.{info.name}")
        rule = getattr(mod, "RULE", None)
        if isinstance(rule, Rule):
            found[rule.name], origin[rule.name] = rule, f"the built-in module {mod.__name__}"
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        where = f"plugin {ep.name!r} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - whatever a third-party import raises, the other rules still work
            text = " ".join(str(e).split()) or "no message"
            warnings.warn(f"{where} in entry-point group {GROUP} failed to import ({type(e).__name__}: {text}); "
                          "skipped", PluginWarning, stacklevel=2)
            continue
        rule = getattr(obj, "RULE", obj)
        if not isinstance(rule, Rule):
            warnings.warn(f"{where} in entry-point group {GROUP} is not a convgraph Rule; skipped", PluginWarning,
                          stacklevel=2)
            continue
        if rule.name in found:
            raise UsageError(f"rule name {rule.name!r} of {where} is already taken by {origin[rule.name]}; "
                             "rename the plugin's rule or uninstall one of them")
        found[rule.name], origin[rule.name] = rule, where
    return found


def get_rule(name: str) -> Rule:
    rules = all_rules()
    if name not in rules:
        raise UsageError(f"unknown rule {name!r}; known rules: {', '.join(sorted(rules))}")
    return rules[name]
