"""Built-in rewrite rules, one module a rule; each module defines ``RULE`` (a convgraph.rule.Rule).

This folder sits at the top of the repository but is installed as ``convgraph.rules`` (``package-dir`` in
pyproject.toml): import it as that. Rules use the library as ``convgraph.*`` and their shared pieces from
``_common`` (and ``_lsq``); :mod:`convgraph.registry` loads them.
"""
