"""Options and output helpers shared by the CLI commands."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import click
import numpy as np
from rich.console import Console

from ..graph import parse_input_shape

#: Human-facing output (tables, progress) goes to stdout unless --json; messages go to stderr.
out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def _parse_shapes(ctx, param, values) -> dict[str, list[int]]:
    shapes = {}
    for v in values:
        name, dims = parse_input_shape(v)
        shapes[name] = dims
    return shapes


input_shape_option = click.option(
    "--input-shape", "input_shapes", multiple=True, callback=_parse_shapes, metavar="NAME=D0,D1,...",
    help="Fix a dynamic input shape, e.g. x=1,3,640,640 (repeatable).")
json_option = click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout, nothing else.")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", markup=True, highlight=False)


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


def emit_json(obj: Any) -> None:
    """Write ``obj`` as one JSON document on stdout."""
    text = json.dumps(_clean(json.loads(json.dumps(obj, default=_default))), indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
