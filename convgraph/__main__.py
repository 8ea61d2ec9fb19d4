"""``python -m convgraph``: the command line, as the ``convgraph`` script runs it."""

from .cli import entry

entry()
