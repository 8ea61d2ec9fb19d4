"""Loader fuzz: hypothesis mutations of real model bytes, each run through ``convgraph analyze`` (and
``rewrite`` for some).

Seeds: every committed ``models/*.onnx`` and PP-OCR cls from ``.cache/models`` when it was fetched.
Mutations: truncation, bit flips, byte splices, and protobuf field edits made through onnx and serialized
again (dims of tensors and inputs made huge, negative or zero; op types changed; node inputs dropped;
attributes edited or retyped; data types, opsets and names changed). Every case must end in exit 0, 1 or
2, print no traceback, at most one error line (``convgraph: error: ...``, last) and otherwise only
one-line warnings or progress lines, within a per-case deadline; a few cases also run as a subprocess under
a hard timeout, which a hang in C code cannot escape. Cases: FUZZ_CASES + REAL_CASES (the real model) +
REWRITE_CASES (protobuf edits; what analyze accepts is rewritten too) + SUBPROCESS_CASES.
"""

from __future__ import annotations

import contextlib
import functools
import io
import signal
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convgraph import zoo
from convgraph.cli import main

REPO = Path(__file__).resolve().parent.parent
SEEDS = sorted((REPO / "models").glob("*.onnx"))
REAL = zoo.cache_dir() / "ppocr-cls.onnx"  # where python -m convgraph.zoo put it ($CONVGRAPH_CACHE too)
BIN = Path(sys.executable).with_name("convgraph")

#: In-process cases over the committed models, cases over the real model, cases run as a subprocess.
FUZZ_CASES, REAL_CASES, REWRITE_CASES, SUBPROCESS_CASES = 1500, 150, 1000, 4
#: The rules the rewrite cases draw from.
RULES = ("separable", "spatial-separable", "low-rank", "dilated", "dense", "transpose-resize", "transpose-subpixel",
         "fold-bn")
#: Seconds one case may take (in-process: an alarm; subprocess: a hard timeout).
DEADLINE_S, SUBPROCESS_DEADLINE_S = 20, 60

_BYTES = {p: p.read_bytes() for p in SEEDS}
_DIMS = [-(2**62), -7, -1, 0, 1, 3, 2**31, 2**40, 2**62]
_OPS = ["Conv", "ConvTranspose", "QLinearConv", "ConvInteger", "Relu", "Reshape", "If", "Loop", "BatchNormalization",
        "NoSuchOp", "", "Resize", "Concat"]
_CONV_ATTRS = ["kernel_shape", "strides", "pads", "dilations", "group", "auto_pad", "output_padding",
               "output_shape", "axis", "to", "perm", "mode"]
_EDITS = ("tensor_dims", "input_dims", "op_type", "drop_input", "attribute", "attribute_value", "attribute_value",
          "retype_attribute", "opset", "drop_initializer", "dtype", "ir_version", "rename")


class Hang(BaseException):
    """A case ran past its deadline (a BaseException: the CLI's last-resort ``except Exception`` must not eat it)."""


@contextlib.contextmanager
def _deadline(seconds: float):
    def fire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check_outcome(code: int, err: str, what: str) -> None:
    lines = err.strip().splitlines()
    assert code in (0, 1, 2), f"{what}: exit {code}\n{err}"
    assert "Traceback" not in err, f"{what}: traceback\n{err}"
    errors = [i for i, line in enumerate(lines) if line.startswith("convgraph: error: ")]
    others = [line for line in lines if not line.startswith(("convgraph: ", "warning: "))]  # errors, progress, warnings
    assert not others, f"{what}: stray stderr lines\n{err}"
    assert len(errors) <= 1, f"{what}: several error lines\n{err}"
    if code != 0:
        assert errors == [len(lines) - 1], f"{what}: exit {code} without one final error line\n{err}"


def _run(argv: list[str], what: str) -> int:
    """``convgraph ARGV`` in-process under the deadline; checks the outcome, returns the exit code."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with _deadline(DEADLINE_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except Hang as e:
        pytest.fail(f"{what}: {e}")
    _check_outcome(code, err.getvalue(), what)
    return code


def _analyze(path: Path, what: str) -> int:
    return _run(["analyze", str(path), "--json"], what)


# ---- mutations -----------------------------------------------------------------------------------------
def _nodes(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    found, stack = [], [m.graph]
    while stack:
        g = stack.pop()
        for n in g.node:
            found.append(n)
            stack += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return found


def _edit(m: onnx.ModelProto, data: st.DataObject) -> str:
    """One protobuf field edit of ``m`` in place; returns what it did."""
    kind = data.draw(st.sampled_from(_EDITS))
    nodes, inits = _nodes(m), list(m.graph.initializer)
    pick = lambda seq: seq[data.draw(st.integers(0, len(seq) - 1))]  # noqa: E731
    if kind == "tensor_dims" and inits:
        t = pick(inits)
        dims = list(t.dims) or [1]
        dims[data.draw(st.integers(0, len(dims) - 1))] = data.draw(st.sampled_from(_DIMS))
        del t.dims[:]
        t.dims.extend(dims)
        return f"{kind} {t.name} {dims}"
    if kind == "input_dims" and m.graph.input:
        vi = pick(list(m.graph.input))
        shape = vi.type.tensor_type.shape
        if len(shape.dim):
            d = shape.dim[data.draw(st.integers(0, len(shape.dim) - 1))]
            d.dim_value = data.draw(st.sampled_from(_DIMS))
        return f"{kind} {vi.name}"
    if kind == "op_type" and nodes:
        n = pick(nodes)
        n.op_type = data.draw(st.sampled_from(_OPS))
        return f"{kind} {n.name} -> {n.op_type}"
    if kind == "drop_input" and nodes:
        n = pick(nodes)
        keep = data.draw(st.integers(0, max(len(n.input) - 1, 0)))
        del n.input[keep:]
        return f"{kind} {n.name} keeps {keep}"
    if kind == "attribute" and nodes:
        n = pick(nodes)
        name = data.draw(st.sampled_from(_CONV_ATTRS))
        for a in list(n.attribute):
            if a.name == name:
                n.attribute.remove(a)
        value = data.draw(st.one_of(st.sampled_from(_DIMS), st.lists(st.sampled_from(_DIMS), max_size=6),
                                    st.sampled_from(["SAME_UPPER", "VALID", "bogus", ""])))
        kind_of = onnx.AttributeProto.INTS if value == [] else None
        n.attribute.append(onnx.helper.make_attribute(name, value, attr_type=kind_of))
        return f"{kind} {n.name}.{name} = {value!r}"
    if kind == "attribute_value" and nodes:  # an existing int(s) attribute (kernel_shape, group...) given odd values
        n = pick(nodes)
        ints = [a for a in n.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS)]
        if ints:
            a = pick(ints)
            if a.type == onnx.AttributeProto.INT:
                a.i = data.draw(st.sampled_from(_DIMS))
            else:
                vals = list(a.ints) or [1]
                vals[data.draw(st.integers(0, len(vals) - 1))] = data.draw(st.sampled_from(_DIMS))
                del a.ints[:]
                a.ints.extend(vals)
            return f"{kind} {n.name}.{a.name}"
    if kind == "retype_attribute" and nodes:
        n = pick(nodes)
        if n.attribute:
            a = pick(list(n.attribute))
            a.type = data.draw(st.sampled_from(list(onnx.AttributeProto.AttributeType.values())))
            return f"{kind} {n.name}.{a.name} -> {a.type}"
    if kind == "opset":
        for o in m.opset_import:
            o.version = data.draw(st.sampled_from([0, 1, 7, 11, 99, 2**40]))
        return kind
    if kind == "drop_initializer" and inits:
        m.graph.initializer.remove(pick(inits))
        return kind
    if kind == "dtype" and inits:
        t = pick(inits)
        t.data_type = data.draw(st.sampled_from([0, 2, 7, 8, 9, 10, 11, 16, 99]))
        return f"{kind} {t.name} -> {t.data_type}"
    if kind == "rename" and nodes:  # names with line breaks and markup must not break the one-line messages
        n = pick(nodes)
        n.name = data.draw(st.sampled_from(["a\nb", "[red]x[/red]", "\r\n", "\x1b[2J", n.name + "\n"]))
        return f"{kind} {n.name!r}"
    if kind == "ir_version":
        m.ir_version = data.draw(st.sampled_from([0, 1, 3, 11, 99]))
        return kind
    return "no edit"


def _mutate(blob: bytes, data: st.DataObject, hows=("truncate", "bitflip", "splice", "proto", "proto", "proto")
            ) -> tuple[bytes, str]:
    how = data.draw(st.sampled_from(hows))
    if how == "truncate":
        cut = data.draw(st.integers(0, len(blob) - 1))
        return blob[:cut], f"truncated at {cut}"
    if how == "bitflip":
        flips = data.draw(st.lists(st.tuples(st.integers(0, len(blob) - 1), st.integers(0, 7)), min_size=1, max_size=8))
        b = bytearray(blob)
        for pos, bit in flips:
            b[pos] ^= 1 << bit
        return bytes(b), f"bit flips {flips}"
    if how == "splice":
        pos = data.draw(st.integers(0, len(blob)))
        chunk = data.draw(st.binary(min_size=1, max_size=32))
        drop = data.draw(st.integers(0, 32))
        return blob[:pos] + chunk + blob[pos + drop:], f"splice at {pos}: {chunk!r}, {drop} dropped"
    m = onnx.ModelProto()
    m.ParseFromString(blob)
    done = [_edit(m, data) for _ in range(data.draw(st.integers(1, 3)))]
    return m.SerializeToString(), "; ".join(done)


_SETTINGS = settings(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> Path:
    """The one file every case is written to in turn."""
    return tmp_path_factory.mktemp("fuzz") / "m.onnx"


def _case(path: Path, data: st.DataObject, seeds: "dict[Path, bytes]", **kw) -> str:
    """Draw a seed model, mutate it (``kw``: :func:`_mutate`'s), write it to ``path``; returns what was done."""
    seed = data.draw(st.sampled_from(sorted(seeds)), label="seed")
    blob, how = _mutate(seeds[seed], data, **kw)
    path.write_bytes(blob)
    return f"{seed.name}: {how}"


@settings(_SETTINGS, max_examples=FUZZ_CASES)
@given(data=st.data())
def test_mutated_models_end_cleanly(path, data) -> None:
    _analyze(path, _case(path, data, _BYTES))


@pytest.mark.real
@settings(_SETTINGS, max_examples=REAL_CASES)
@given(data=st.data())
def test_mutated_real_model_ends_cleanly(path, data) -> None:
    if not REAL.is_file():
        pytest.skip("PP-OCR cls not fetched (python3 tasks.py test fetches it)")
    _analyze(path, _case(path, data, _real()))


@settings(_SETTINGS, max_examples=REWRITE_CASES)
@given(data=st.data())
def test_mutated_models_rewrite_cleanly(path, data) -> None:
    """What analyze accepts, the rules must rewrite or refuse in one line (not verified: that is onnxruntime's)."""
    what = _case(path, data, _BYTES, hows=("proto",))  # the edits that leave a model analyze may accept
    if _analyze(path, what) == 0:
        rules = data.draw(st.lists(st.sampled_from(RULES), min_size=1, max_size=4, unique=True), label="rules")
        flags = [x for r in rules for x in ("--rule", r)]
        _run(["rewrite", str(path), *flags, "-o", str(path.with_suffix(".out.onnx")), "--no-verify", "--no-bench",
              "--json"], f"{what}; rewrite {' '.join(flags)}")


@functools.cache
def _real() -> "dict[Path, bytes]":
    return {REAL: REAL.read_bytes()}


@settings(_SETTINGS, max_examples=SUBPROCESS_CASES)
@given(data=st.data())
def test_mutated_models_end_cleanly_as_a_process(path, data) -> None:
    """The same through the console script, under a hard timeout that a hang in C code cannot escape."""
    what = _case(path, data, _BYTES)
    try:
        done = subprocess.run([str(BIN), "analyze", str(path), "--json"], capture_output=True, text=True,
                              timeout=SUBPROCESS_DEADLINE_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no result after {SUBPROCESS_DEADLINE_S} s")
    _check_outcome(done.returncode, done.stderr, what)


# ---- what the fuzz found --------------------------------------------------------------------------------
def _transposed_with(**attrs) -> bytes:
    m = onnx.load_from_string(_BYTES[REPO / "models" / "transposed.onnx"])
    node = next(n for n in m.graph.node if n.op_type == "ConvTranspose")
    for name, value in attrs.items():
        for a in node.attribute:
            if a.name == name:
                del a.ints[:]
                a.ints.extend(value)
                break
        else:
            node.attribute.append(onnx.helper.make_attribute(name, value))
    return m.SerializeToString()


def test_kernel_shape_disagreeing_with_the_weight(path, capsys) -> None:
    """kernel_shape [2^31, 2] on a 2×2 weight: sub-pixel planning looped over 2^31 taps (a hang)."""
    path.write_bytes(_transposed_with(kernel_shape=[2**31, 2]))
    _analyze(path, "kernel_shape [2^31, 2]")
    assert main(["analyze", str(path)]) == 2
    assert "kernel_shape [2147483648, 2] disagrees with its weight's shape" in capsys.readouterr().err


def test_huge_strides_are_not_planned(path) -> None:
    """Strides 2^31 of a ConvTranspose: 2^31 output phases for the sub-pixel rule to plan (a hang)."""
    path.write_bytes(_transposed_with(strides=[2**31, 2**31]))
    _analyze(path, "strides [2^31, 2^31]")
