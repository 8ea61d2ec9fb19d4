"""``convgraph rules``: the available rewrite rules."""

from __future__ import annotations

from rich.table import Table

from ..registry import all_rules
from . import cli
from .common import emit_json, json_option, out


def _exactness(rule) -> str:
    if callable(rule.exact):
        return "depends on params"
    return "exact" if rule.exact else "approximate"


@cli.command("rules")
@json_option
def rules_command(as_json: bool) -> None:
    """List the rewrite rules: summary, parameters and exactness."""
    rules = all_rules()
    if as_json:
        emit_json([{"name": r.name, "summary": r.summary, "exact": _exactness(r), "prepass": r.prepass,
                    "params": [{"name": p.name, "default": p.default, "help": p.help} for p in r.params]}
                   for r in rules.values()])
        return
    table = Table(title="convgraph rules")
    for col in ("rule", "exact", "summary", "params (default)"):
        table.add_column(col)
    for r in rules.values():
        params = "\n".join(f"{p.name}={p.default}: {p.help}" for p in r.params) or "-"
        table.add_row(r.name, _exactness(r), r.summary, params)
    out.print(table)
