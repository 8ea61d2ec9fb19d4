"""The ``convgraph`` command: a click group; each subcommand lives in a module of this package.

Exit codes: 0 success, 1 a check that ran and failed, 2 unusable input or usage (and any unexpected
error: one line, the traceback only with ``--debug`` or ``CONVGRAPH_DEBUG=1``).
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import warnings

import click

from ..errors import ConvGraphError
from ..errors import ConvGraphWarning
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
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=lambda ctx, p, v: _set_debug(v),
              help="Show the traceback of an unexpected error (also: CONVGRAPH_DEBUG=1).")
def cli() -> None:
    """Analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""


#: Set by ``--debug`` (or CONVGRAPH_DEBUG=1): unexpected errors are raised with their traceback.
_DEBUG = False


def _set_debug(value: bool) -> None:
    global _DEBUG
    _DEBUG = _DEBUG or value


def _say(text: str) -> None:
    """One line on stderr, whatever line breaks a name in the message carries."""
    common.console("err").print(common.printable(" ".join(text.splitlines())), markup=False, highlight=False)


#: The (where, message) of the warnings already shown: numpy warns once per line of code, several times a run.
_SHOWN: set = set()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Any other warning (a plugin that failed to import, numpy's) as one line, not Python's two; numpy's
    floating-point warnings ("overflow encountered in exp") say where they arose."""
    text = " ".join(str(message).split())
    if issubclass(category, RuntimeWarning) and filename:
        path = str(filename).replace("\\", "/")
        if "/onnx/reference/" in path:
            where = f"onnx.reference's {path.rsplit('/onnx/reference/', 1)[1]} (verify --reference runs it)"
        elif "/convgraph/" in path:
            where = f"convgraph/{path.rsplit('/convgraph/', 1)[1]}:{lineno}"
        else:
            where = f"{path.rsplit('/', 1)[-1]}:{lineno}"
        if (where, text) in _SHOWN:
            return
        _SHOWN.add((where, text))
        text = f"numpy in {where}: {text}"
    common.warn(text)


def main(argv: "list[str] | None" = None) -> int:
    """Run the CLI; turn every failure into one line on stderr and an exit code (see the module doc); under
    ``--json``, a failure before the command printed its document prints ``{"error", "exit_code"}``."""
    global _DEBUG
    _DEBUG = os.environ.get("CONVGRAPH_DEBUG", "") not in ("", "0")
    args = list(sys.argv[1:] if argv is None else argv)
    common.JSON_WRITTEN["done"] = False

    def fail(message: str, code: int) -> int:
        _say(message)
        if "--json" in args and not common.JSON_WRITTEN["done"]:
            common.emit_json({"error": message.removeprefix("convgraph: error: "), "exit_code": code})
        return code

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvGraphWarning)  # commands print the graph's warnings themselves
            warnings.showwarning = _show_warning
            rv = cli.main(args=args, prog_name="convgraph", standalone_mode=False)
        return rv if isinstance(rv, int) else 0  # click returns ctx.exit()'s code here
    except ConvGraphError as e:
        return fail(f"convgraph: error: {e}", e.exit_code)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:  # one line, as every error (click's own show() takes three or four)
        ctx = getattr(e, "ctx", None)
        hint = f" ({ctx.command_path} -h for help)" if ctx is not None else ""
        return fail(f"convgraph: error: {e.format_message()}{hint}", 2)
    except click.exceptions.Abort:
        return fail("convgraph: aborted", 130)
    except MemoryError:
        return fail("convgraph: error: out of memory (are the input shapes sane?)", 2)
    except Exception as e:  # a bug or an input nothing above foresaw: still one line, never a traceback
        if _DEBUG:
            raise
        what = " ".join(str(e).split())[:300] or "no message"
        return fail(f"convgraph: error: unexpected {type(e).__name__}: {what}; run with --debug for the traceback", 2)


def entry() -> None:
    """The ``convgraph`` console script."""
    code = main()
    # The process ends here: skip the collector's final pass over every object the command built (a third
    # of a second after analyzing a 20k-node model); memory goes back to the OS when the process exits.
    gc.freeze()
    sys.exit(code)
