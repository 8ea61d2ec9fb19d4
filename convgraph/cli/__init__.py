"""The ``convgraph`` command: a click group; each subcommand lives in a module of this package.

Exit codes: 0 success, 1 a check that ran and failed, 2 unusable input or usage.
"""

from __future__ import annotations

import gc
import importlib
import sys
import warnings

import click

from ..errors import ConvGraphError
from ..graph import ConvGraphWarning
from . import common

#: The commands, each in the module ``convgraph.cli.<name>`` (imported when the command is first asked for).
COMMANDS = ("analyze", "rewrite", "rules", "verify", "bench", "optimize")


class _LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is asked for: ``convgraph
    analyze`` does not pay for importing what ``rewrite``, ``verify`` or ``optimize`` need."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, name: str) -> "click.Command | None":
        if name not in self.commands and name in COMMANDS:
            _load_command(name)
        return self.commands.get(name)


def _load_command(name: str) -> None:
    """Import ``convgraph.cli.<name>``, whose ``@cli.command()`` registers it on :data:`cli`."""
    try:
        importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:  # a command module not written yet: the others still work
        if e.name != f"{__name__}.{name}":
            raise


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="convgraph")
def cli() -> None:
    """Analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""


def main(argv: "list[str] | None" = None) -> int:
    """Run the CLI; turn every expected failure into one line on stderr and an exit code."""
    warnings.simplefilter("ignore", ConvGraphWarning)  # commands print the graph's warnings themselves
    try:
        rv = cli.main(args=argv, prog_name="convgraph", standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # click returns ctx.exit()'s code here
    except ConvGraphError as e:
        common.console("err").print(f"convgraph: error: {e}", markup=False, highlight=False)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Abort:
        common.console("err").print("convgraph: aborted", markup=False)
        return 130
    except MemoryError:
        common.console("err").print("convgraph: error: out of memory (are the input shapes sane?)", markup=False)
        return 2


def entry() -> None:
    """The ``convgraph`` console script."""
    code = main()
    # The process ends here: skip the collector's final pass over every object the command built (a third
    # of a second after analyzing a 20k-node model); memory goes back to the OS when the process exits.
    gc.freeze()
    sys.exit(code)
