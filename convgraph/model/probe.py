"""Shapes measured with onnxruntime, where onnx's shape inference gives up.

:func:`probe_shapes` (``load(..., probe=True)``, ``convgraph analyze --probe``) runs the model once on
generated inputs with the tensors whose shapes are unknown exposed as outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError, UsageError
from .shapes import DATA_DEPENDENT_OPS, TensorInfo, _dims_text, _elem_type, _fix_hint

if TYPE_CHECKING:
    from .graph import ConvGraph

def unknown_tensors(cg: "ConvGraph") -> list[str]:
    """Tensors made by the ops of ``cg`` whose shapes are not all ints (unknown, or symbolic dims), in op order."""
    out, nodes, info = [], cg.graph._node, cg.shape_info
    for nid in cg.topological_order():
        for t in nodes[nid]["proto"].output:
            if t:
                i = info(t)
                if i is None or not i.static:
                    out.append(t)
    return out


def probe_shapes(cg: "ConvGraph", tensors: "list[str] | None" = None, *, seed: int = 0,
                 provider: str = "cpu") -> dict[str, tuple[int, ...]]:
    """Measure tensor shapes by running the model once on generated inputs with onnxruntime; fill ``cg.shapes``.

    ``tensors``: the main-graph tensors to measure; default every tensor made by a main-graph op whose
    shape onnx's inference left unknown or symbolic. With nothing to measure it returns ``{}`` at once
    (no onnxruntime session). Otherwise every input of the model needs a concrete shape (static, or
    fixed by ``input_shapes`` at load). Inputs are random (seeded, of each input's dtype, see
    :func:`convgraph.run.inputs.random_inputs`); the measured shapes go into ``cg.shapes`` and the edges'
    ``info``, their names into ``cg.measured``, and one warning (``cg.warnings``) says what was measured
    on which inputs. Only main-graph tensors can be exposed as outputs: tensors inside If/Loop/Scan
    bodies keep their unknown shapes (counted in the warning). A shape computed from the input's values
    rather than its shape (after NonZero, NonMaxSuppression...) holds for that generated input only. The
    exposed tensors are all held at once after the run: memory up to the sum of their sizes.

    Returns tensor → measured shape. UsageError (one line) when onnxruntime is missing, an input shape
    is not concrete, or a name is not a main-graph tensor.
    """
    if cg.parent is not None:
        raise UsageError("probe_shapes() takes the main graph: onnxruntime cannot expose a subgraph's tensors")
    default = tensors is None
    names = unknown_tensors(cg) if default else _checked_tensors(cg, tensors)
    inner = sum(len(unknown_tensors(g)) for g in cg.walk() if g is not cg) if default else 0
    if not names:
        if inner:
            cg.warnings.append(_probe_warning(cg, {}, [], inner, {}, seed))
        return {}
    from ..run.inputs import input_specs, random_inputs
    from ..run.runtime import create_session, expose_tensors, ort, run

    try:
        ort()
    except UsageError as e:
        raise UsageError(f"--probe: {e}") from None
    model = cg.to_model() if cg.dirty else cg.model
    specs = input_specs(model)
    specs = [s for s in specs if s.name not in cg.input_values]  # the fixed values are fed as they are
    given = {s.name: cg.shape(s.name) for s in specs}
    dynamic = [(n, s) for n, s in given.items() if s is None or not all(type(d) is int for d in s)]
    if dynamic:
        listed = "; ".join(f"{n} {_dims_text(s)}" for n, s in dynamic)
        raise UsageError(f"--probe runs the model, so every input needs a concrete shape; dynamic: {listed}. "
                         f"Set {'them' if len(dynamic) > 1 else 'it'} with {_fix_hint(dynamic)}")
    concrete = {n: s for n, s in given.items() if s is not None}  # all of them: dynamic ones were refused
    feeds = {**random_inputs(specs, seed=seed, input_shapes=concrete)[0], **cg.input_values}
    try:
        # one run: graph optimizations would cost more session time than they save; onnxruntime's own error
        # log stays silent (its error comes back as one line)
        session = create_session(expose_tensors(model, names, cg.shapes), provider=provider, opt_level="disable",
                                 quiet=True)
        values = run(session, feeds, names)
    except ModelError as e:
        steering = sorted({t for _, _, ts, _ in cg.undecided for t in ts} - set(cg.input_values))
        hint = (f"; the model branches on input {', '.join(map(repr, steering))}: a random value may take the wrong "
                f"branch, --input-value {steering[0]}=V fixes it" if steering else "")
        raise ModelError(f"--probe: {e}{hint}") from None
    measured: dict[str, TensorInfo] = {}
    conflicts: dict[str, tuple] = {}
    found: dict[str, tuple[int, ...]] = {}
    for t, v in zip(names, values):
        if not isinstance(v, np.ndarray):  # a sequence, map or optional: no tensor shape to record
            continue
        found[t] = shape = tuple(int(d) for d in v.shape)
        old = cg.shapes.get(t)
        if old is not None and old.shape is not None and (
                len(old.shape) != len(shape) or any(isinstance(a, int) and a != b for a, b in zip(old.shape, shape))):
            conflicts[t] = old.shape
        measured[t] = TensorInfo(old.elem_type if old is not None and old.elem_type else _elem_type(v.dtype), shape)
    _store(cg, measured)
    note = _probe_warning(cg, measured, [s.name for s in specs] + list(cg.input_values), inner, conflicts, seed)
    if note:
        cg.warnings.append(note)
    return found


def _checked_tensors(cg: "ConvGraph", tensors) -> list[str]:
    """The names asked for, deduplicated; UsageError for one that is not a tensor made in the main graph."""
    names = list(dict.fromkeys(str(t) for t in tensors))
    bad = [t for t in names if cg.producer(t) is None]
    if bad:
        inside = next((g.path for g in cg.walk() if g is not cg and g.producer(bad[0]) is not None
                       and bad[0] not in g.outer_refs()), None)
        where = (f"it is inside the subgraph {inside}: onnxruntime can only expose main-graph tensors" if inside
                 else "no such tensor in the main graph")
        raise UsageError(f"probe_shapes(): cannot measure {bad[0]!r}: {where}")
    return names


def _store(cg: "ConvGraph", measured: dict[str, TensorInfo]) -> None:
    """Put measured shapes into ``cg.shapes``, ``cg.measured`` and the info of every edge carrying them."""
    cg.shapes.update(measured)
    cg.measured.update(measured)
    for t, info in measured.items():
        src = cg.producer(t)
        for keys in cg.graph._succ[src].values():  # networkx's adjacency: {reader: {(tensor, slot): data}}
            for key, d in keys.items():
                if key[0] == t:
                    d["info"] = info
    for g in cg.walk():  # bodies reading a measured tensor see it through their "outer:" node
        if g is cg:
            continue
        for t in g._outer.keys() & measured.keys():
            for keys in g.graph._succ[g._outer[t]].values():
                for d in keys.values():
                    d["info"] = measured[t]


def _probe_warning(cg: "ConvGraph", measured: dict[str, TensorInfo], inputs: list[str], inner: int,
                   conflicts: dict[str, tuple], seed: int) -> str:
    parts = []
    if measured:
        fed = ", ".join(f"{n} {_dims_text(cg.shape(n))}" for n in inputs)
        ops = sorted({d["op_type"] for g in cg.walk() for d in g.graph._node.values()
                      if d["kind"] == "op" and d["op_type"] in DATA_DEPENDENT_OPS})
        parts.append(f"--probe ran the model once on generated inputs ({fed}; seed {seed}) and measured the shapes of "
                     f"{len(measured)} tensor{'s' * (len(measured) != 1)} onnx's shape inference could not follow: they "
                     f"hold for inputs of these shapes, but a shape computed from the input's values rather than its "
                     f"shape holds for this generated input only"
                     + (f" (this model has {', '.join(ops)})" if ops else ""))
    if conflicts:
        t, old = next(iter(conflicts.items()))
        parts.append(f"{len(conflicts)} measured shape{'s' * (len(conflicts) != 1)} disagree with onnx's inference "
                     f"(e.g. {t!r}: inferred {_dims_text(old)}, measured {_dims_text(measured[t].shape)}); "
                     f"the measured ones are used")
    if inner:
        parts.append(f"{inner} tensor{'s' * (inner != 1)} inside If/Loop/Scan bodies keep unknown shapes: onnxruntime "
                     f"can only expose main-graph tensors")
    return "; ".join(parts)
