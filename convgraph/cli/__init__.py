"""The ``convgraph`` command: a click group; each subcommand lives in a module of this package.

Exit codes: 0 success, 1 a check that ran and failed, 2 unusable input or usage.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from ..errors import ConvGraphError
from ..graph import ConvGraphWarning
from .common import err

COMMANDS = ("analyze", "rewrite", "rules", "verify", "bench", "optimize")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="convgraph")
def cli() -> None:
    """Analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""


for _name in COMMANDS:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a command module not written yet: the others still work
        if e.name != f"{__name__}.{_name}":
            raise


def main(argv: "list[str] | None" = None) -> int:
    """Run the CLI; turn every expected failure into one line on stderr and an exit code."""
    warnings.simplefilter("ignore", ConvGraphWarning)  # commands print the graph's warnings themselves
    try:
        rv = cli.main(args=argv, prog_name="convgraph", standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # click returns ctx.exit()'s code here
    except ConvGraphError as e:
        err.print(f"convgraph: error: {e}", markup=False, highlight=False)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return 2
    except click.exceptions.Abort:
        err.print("convgraph: aborted", markup=False)
        return 130
    except MemoryError:
        err.print("convgraph: error: out of memory (are the input shapes sane?)", markup=False)
        return 2


def entry() -> None:
    sys.exit(main())
