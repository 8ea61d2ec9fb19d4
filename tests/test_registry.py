"""Third-party rules (entry-point group ``convgraph.rules``): a broken plugin is named in one warning and
skipped, a plugin reusing a taken rule name is an error naming both."""

from __future__ import annotations

import dataclasses
import sys
import types
from importlib.metadata import EntryPoint

import pytest

from convgraph import registry
from convgraph.cli import main
from convgraph.errors import UsageError


@pytest.fixture
def plugins(monkeypatch):
    """Install fake entry points: ``plugins(name=value, ...)``; the rule cache is cleared before and after."""

    def install(**eps: str) -> None:
        found = [EntryPoint(name, value, "convgraph.rules") for name, value in eps.items()]
        monkeypatch.setattr(registry, "entry_points",
                            lambda group=None: [e for e in found if group is None or e.group == group])
        registry.all_rules.cache_clear()

    yield install
    registry.all_rules.cache_clear()


def _module(monkeypatch, name: str, rule_name: str) -> None:
    """A plugin module ``name`` whose RULE is the built-in fold-bn renamed ``rule_name``."""
    mod = types.ModuleType(name)
    monkeypatch.setattr(mod, "RULE", dataclasses.replace(registry.get_rule("fold-bn"), name=rule_name), raising=False)
    monkeypatch.setitem(sys.modules, name, mod)


def test_plugin_rule_is_listed(plugins, monkeypatch) -> None:
    _module(monkeypatch, "cg_plugin_ok", "my-rule")
    plugins(mine="cg_plugin_ok")
    assert registry.get_rule("my-rule").name == "my-rule"


def test_plugin_failing_to_import_is_skipped_with_one_warning(plugins, models_dir, capsys) -> None:
    plugins(broken="cg_plugin_that_does_not_exist:RULE")
    with pytest.warns(registry.PluginWarning, match=r"plugin 'broken' \(cg_plugin_that_does_not_exist:RULE\).*"
                      r"failed to import \(ModuleNotFoundError.*skipped"):
        rules = registry.all_rules()
    assert "separable" in rules
    registry.all_rules.cache_clear()
    code = main(["analyze", str(models_dir / "sample.onnx"), "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0
    assert len(err) == 1 and err[0].startswith("warning: plugin 'broken'") and "skipped" in err[0], err


def test_plugin_raising_anything_is_skipped(plugins, monkeypatch) -> None:
    def boom():
        raise RuntimeError("the plugin's own bug")

    mod = types.ModuleType("cg_plugin_boom")
    monkeypatch.setattr(mod, "__getattr__", lambda name: boom(), raising=False)
    monkeypatch.setitem(sys.modules, "cg_plugin_boom", mod)
    plugins(boom="cg_plugin_boom:RULE")
    with pytest.warns(registry.PluginWarning, match="RuntimeError: the plugin's own bug"):
        assert "fold-bn" in registry.all_rules()


def test_plugin_that_is_not_a_rule_is_skipped(plugins, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cg_plugin_empty", types.ModuleType("cg_plugin_empty"))
    plugins(empty="cg_plugin_empty")
    with pytest.warns(registry.PluginWarning, match="'empty'.*is not a convgraph Rule; skipped"):
        assert "fold-bn" in registry.all_rules()


def test_plugin_reusing_a_builtin_name_is_an_error(plugins, monkeypatch, models_dir, capsys) -> None:
    _module(monkeypatch, "cg_plugin_clash", "separable")
    plugins(clash="cg_plugin_clash")
    with pytest.raises(UsageError, match=r"rule name 'separable' of plugin 'clash' \(cg_plugin_clash\) is already "
                                         r"taken by the built-in module convgraph.rules.separable"):
        registry.all_rules()
    assert main(["rules"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'clash'" in err[0] and "convgraph.rules.separable" in err[0]


def test_two_plugins_with_one_name_is_an_error(plugins, monkeypatch) -> None:
    _module(monkeypatch, "cg_plugin_a", "twin")
    _module(monkeypatch, "cg_plugin_b", "twin")
    plugins(a="cg_plugin_a", b="cg_plugin_b")
    with pytest.raises(UsageError, match=r"'twin' of plugin 'b' \(cg_plugin_b\) is already taken by plugin 'a' "
                                         r"\(cg_plugin_a\)"):
        registry.all_rules()
