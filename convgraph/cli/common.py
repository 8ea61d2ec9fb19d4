"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from ..model.shapes import parse_input_shape
from ..model.shapes import parse_input_value

if TYPE_CHECKING:
    from rich.console import Console

    out: Console
    err: Console

#: Human-facing output (tables, progress) goes to stdout unless --json; messages go to stderr.
_COLUMNS = os.environ.get("COLUMNS", "").strip()
_WIDTH = None if sys.stdout.isatty() else int(_COLUMNS) if _COLUMNS.isdigit() and int(_COLUMNS) > 0 else 160  # pipes, logs: wide
#: The rich Consoles ``out`` and ``err`` (messages stay one line), made on first use: importing rich costs
#: a tenth of a ``--json`` run's start-up, and such a run may never print through them.
_CONSOLES: dict[str, dict[str, Any]] = {"out": {"highlight": False, "soft_wrap": False, "width": _WIDTH},
             "err": {"stderr": True, "highlight": False, "soft_wrap": True}}


#: Characters a terminal may act on: C0/C1 controls (ESC starts title, clipboard and screen sequences) and the
#: bidi overrides that reorder what is shown. Text from a model (names) shows them escaped (``\x1b``).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, newlines: bool = False) -> str:
    """``text`` with the characters a terminal would act on written as escapes (``\x1b``, ``\u202e``);
    line breaks kept when ``newlines``."""
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return pattern.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def safe(obj):
    """A str or rich Text as :func:`printable` makes it (line breaks kept); anything else as it is."""
    if isinstance(obj, str):
        return printable(obj, newlines=True)
    plain = getattr(obj, "plain", None)
    if isinstance(plain, str) and _CONTROL_BUT_NEWLINE.search(plain):
        from rich.text import Text

        return Text(printable(plain, newlines=True), style=obj.style)
    return obj


def __getattr__(name: str):
    """``out`` / ``err`` (module attributes, as ``from .common import out`` reads them): made on first use."""
    if name not in _CONSOLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    class SafeConsole(Console):
        """A Console whose printed text never carries a terminal control sequence from a model (names)."""

        def print(self, *objects, **kwargs) -> None:
            super().print(*map(safe, objects), **kwargs)

    console = globals()[name] = SafeConsole(**_CONSOLES[name])
    return console


def console(name: str) -> "Console":
    """The Console ``out`` or ``err``, made if need be (inside this module a bare global name skips ``__getattr__``)."""
    made = globals().get(name)
    return made if made is not None else __getattr__(name)


def _parse_shapes(ctx, param, values) -> dict[str, list[int]]:
    shapes = {}
    for v in values:
        name, dims = parse_input_shape(v)
        shapes[name] = dims
    return shapes


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, callback=_parse_shapes, metavar="NAME=D0,D1,...",
    help="Fix a dynamic input shape, e.g. x=1,3,640,640 (repeatable).")
def _parse_values(ctx, param, values) -> dict[str, list]:
    return dict(parse_input_value(v) for v in values)


input_value_option = click.option(
    "--input-value", "input_values", multiple=True, callback=_parse_values, metavar="NAME=V[,V...]",
    help="Fix an input's value, e.g. sample_rate=16000 (repeatable): the analysis uses it (shapes, If conditions) "
         "and every input set fed to the model carries it.")
probe_option = click.option(
    "--probe", is_flag=True,
    help="Run the model once on generated inputs (onnxruntime) to measure the shapes onnx's shape inference cannot "
         "follow; every input shape must be known (--input-shape).")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")
provider_option = click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                               help="onnxruntime execution provider.")


def warn(message: str) -> None:
    from rich.markup import escape

    console("err").print(f"[yellow]warning:[/yellow] {escape(printable(message))}", markup=True,
                         highlight=False)  # [dims] are not markup


def note(message: str) -> None:
    """What a run did or chose, said on stderr beside the warnings (which say what it risks)."""
    from rich.markup import escape

    console("err").print(f"[dim]note:[/dim] {escape(printable(message))}", markup=True, highlight=False)


def _default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(o: Any):
    """NaN/inf are not JSON: they become null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


#: Whether this run has printed its JSON document (``main`` prints an error document only when not).
JSON_WRITTEN = {"done": False}


def emit_json(obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as one JSON document on stdout (``indent=None``: compact, several times faster when big)."""
    JSON_WRITTEN["done"] = True
    try:
        text = json.dumps(obj, default=_default, allow_nan=False, indent=indent)
    except ValueError:  # NaN/inf somewhere: take the slow path that nulls them
        text = json.dumps(_clean(json.loads(json.dumps(obj, default=_default))), indent=indent)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _number_list(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return [kind(v) for v in value.replace("x", ",").split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None
    return parse


def _stack(options):
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f
    return apply


#: ``--image-size/--mean/--std/--layout``: how a folder of images becomes input tensors.
image_options = _stack([
    click.option("--image-size", callback=_number_list(int), metavar="H,W", help="Resize images to H,W."),
    click.option("--mean", callback=_number_list(float), metavar="M[,M,M]",
                 help="Images: subtracted per channel after scaling pixels to [0,1]."),
    click.option("--std", callback=_number_list(float), metavar="S[,S,S]", help="Images: divisor per channel."),
    click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                 help="Images: tensor layout."),
])

#: ``--inputs/--samples/--seed`` and :data:`image_options`: what :func:`convgraph.run.inputs.make_inputs` takes.
input_data_options = _stack([
    click.option("--inputs", type=click.Path(), help="Inputs: an .npz (arrays named after the inputs, a leading "
                 "axis of samples allowed) or a folder of images. Default: generated (pictures for image inputs)."),
    click.option("--samples", type=int, help="Random input sets (default 1); with --inputs, use at most this many."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated inputs."),
    image_options,
    input_value_option,
])


def input_data_kwargs(kw: dict) -> dict:
    """Pop the :func:`input_data_options` values from a command's kwargs, named as make_inputs wants them."""
    out = {k: kw.pop(k) for k in ("inputs", "samples", "seed", "image_size", "mean", "std", "layout")}
    out["values"] = kw.pop("input_values", None) or None  # --input-value: make_inputs(values=)
    return out
