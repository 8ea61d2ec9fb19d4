"""The model-level check of rewrites inside If branches: every branch that holds one runs.

The check of a rewritten model runs it on the inputs it was given, and an If runs one branch per input: a
rewrite in the other branch would never reach the model outputs. So, per If of the main graph with a
rewritten branch that the inputs did not take, both models run again with that If's condition forced to the
branch (a Constant in place of the condition), and their outputs are compared as the model-level check
compares them. A branch that cannot be run so (forcing fails: the branch needs what its condition
guarantees; an If inside another body) is named, and so is every rewrite in it that nothing else checked.
Loop and Scan bodies run with their node (a Loop of zero trips aside).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import ConvGraphError
from .rewrite_report import Change


@dataclass
class Branch:
    """One If branch of the main graph that holds rewrites: where it is and whether the inputs took it."""

    path: str  # the body's graph path (Change.graph)
    if_output: str  # the If node's first output: the same tensor in the original and the rewritten model
    then: bool  # the then branch (else: the else branch)
    changes: list[int] = field(default_factory=list)  # indices into the report's changes
    taken: bool = False  # some input took it: the model-level check ran it
    forced: str | None = None  # after a forced run: "" when it ran, else why it could not


def branches(model: onnx.ModelProto, changes: Sequence[Change], input_shapes=None, values=None) -> tuple[
        list[Branch], dict[str, str]]:
    """The main-graph If branches that hold ``changes``, and per other body path holding some why the
    model-level check cannot be said to run it (an If nested in a body)."""
    from ..model.loader import load

    paths = {c.graph for c in changes if c.graph}
    if not paths:
        return [], {}
    cg = load(model, input_shapes, check=False, input_values=values)
    graphs = {g.path: g for g in cg.walk()}
    found: dict[str, Branch] = {}
    unreached: dict[str, str] = {}
    for path in sorted(paths):
        g = graphs.get(path)
        if g is None or g.parent is None:
            continue
        top = g
        while top.parent is not None and top.parent.parent is not None:
            top = top.parent
        assert top.parent is not None and top.owner is not None  # a body: it has its If/Loop/Scan
        owner = top.parent.node(top.owner)
        key = top.path.rsplit(":", 1)[1]
        if owner.op_type != "If":
            if top is not g:
                unreached[path] = f"inside {owner.op_type} {top.owner!r}, in a nested body"
            continue  # a Loop/Scan body runs with its node
        if top is not g:
            unreached[path] = f"in a body nested in If {top.owner!r}, whose condition cannot be forced there"
            continue
        found[path] = Branch(path, owner.output[0], key == "then_branch")
    for i, c in enumerate(changes):
        if c.graph in found:
            found[c.graph].changes.append(i)
    return list(found.values()), unreached


def taken(model: onnx.ModelProto, ifs: Sequence[Branch], feeds: Sequence[Mapping[str, np.ndarray]],
          provider: str = "cpu") -> None:
    """Mark each branch some feed takes: the If's condition, read on a run of ``model`` with it exposed."""
    from ..run.runtime import run_with_outputs

    nodes = {n.output[0]: n for n in model.graph.node if n.op_type == "If" and n.output}
    conds = {b.if_output: nodes[b.if_output].input[0] for b in ifs if b.if_output in nodes}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in conds.values()}
    produced = {o for n in model.graph.node for o in n.output}
    exposed = sorted({c for c in conds.values() if c in produced})
    got = run_with_outputs(model, exposed, list(feeds), provider=provider) if exposed else {}
    for b in ifs:
        cond = conds.get(b.if_output)
        if cond in got:
            seen = [bool(np.asarray(v).reshape(-1)[0]) for v in got[cond]]
        elif cond is not None and cond in inits:
            seen = [bool(np.asarray(inits[cond]).reshape(-1)[0])]
        elif cond is not None:
            seen = [bool(np.asarray(f[cond]).reshape(-1)[0]) for f in feeds if cond in f]
        else:
            seen = []
        b.taken = b.then in seen


def forced(model: onnx.ModelProto, if_output: str, then: bool) -> onnx.ModelProto:
    """A copy of ``model`` whose If making ``if_output`` always takes the then (or else) branch."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, n in enumerate(out.graph.node):
        if n.op_type == "If" and n.output and n.output[0] == if_output:
            name = f"{if_output}/convgraph_forced_condition"
            n.input[0] = name
            out.graph.node.insert(i, onnx.helper.make_node(
                "Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(then))))
            return out
    raise ConvGraphError(f"no If node makes {if_output!r}")


def check_forced(original: onnx.ModelProto, model: onnx.ModelProto, branch: Branch, feeds, input_shapes,
                 provider: str, verify):
    """Run ``original`` and ``model`` with the branch's condition forced and compare their outputs
    (``verify`` as :func:`convgraph.engine.verify.verify`); the report, or None with ``branch.forced`` saying
    why they could not run."""
    try:
        report = verify(forced(original, branch.if_output, branch.then), forced(model, branch.if_output, branch.then),
                        inputs=feeds, input_shapes=input_shapes, provider=provider)
    except ConvGraphError as e:
        branch.forced = f"forcing its condition, the model fails to run ({' '.join(str(e).split())[:200]})"
        return None
    branch.forced = ""
    return report
