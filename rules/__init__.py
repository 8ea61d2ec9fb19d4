"""Built-in rewrite rules, one module a rule; each module defines ``RULE`` (a convgraph.rule.Rule)."""
