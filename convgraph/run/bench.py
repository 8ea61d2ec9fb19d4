"""Latency with onnxruntime: session creation timed apart, warm-up, N timed runs, robust statistics.

Several models are timed interleaved (A B A B ...), each timed run of a model next to a run of the
first one, and their ratio is taken pair by pair so that machine noise common to both cancels. On
CUDA, inputs and outputs live on the device (IO binding), each run ends with an explicit
synchronization, and the warm-up runs pay for cuDNN's exhaustive algorithm search.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import runtime
from ..errors import ModelError, UsageError
from .inputs import input_specs, make_inputs
from ..progress import track



@dataclass
class ModelTiming:
    """Timings of one model; times in milliseconds."""

    name: str
    source: str
    session_s: float  # session creation (graph optimization included), timed once
    warmup: int
    runs: int
    batch: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    min_ms: float
    mean_ms: float
    throughput_per_s: float  # batch items per second at the median
    times_ms: list[float] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairRatio:
    """``baseline time / this model's time`` over the interleaved pairs: above 1, this model is faster."""

    name: str
    baseline: str
    pairs: int
    median: float
    q1: float
    q3: float
    min: float
    max: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BenchReport:
    """Outcome of :func:`bench`."""

    models: list[ModelTiming]
    ratios: list[PairRatio]
    provider: str
    threads: int | None
    opt_level: str
    io_binding: bool
    spinning: bool
    inputs: str
    environment: dict

    def summary(self) -> str:
        """One line: each model's median, and each ratio to the first model."""
        parts = [f"{m.name} {m.median_ms:.3f} ms" for m in self.models]
        by_name = {m.name: m for m in self.models}
        for r in self.ratios:
            text = f"{r.name} {r.median:.2f}× the speed of {r.baseline} (median of {r.pairs} pairs"
            base, this = by_name[r.baseline].median_ms, by_name[r.name].median_ms
            direct = base / this if this > 0 else math.inf
            if math.isfinite(direct) and direct > 0 and abs(math.log(direct / r.median)) > math.log(1.02):
                # the pairs cancel load common to both runs of a pair, the medians do not: say that they differ
                text += (f"; {direct:.2f}× by the medians above: the timings are noisy, more --runs or a quieter "
                         f"machine narrow the gap")
            parts.append(text + ")")
        return "; ".join(parts) + f" ({self.provider})"

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "models": [m.to_dict() for m in self.models],
                "ratios": [r.to_dict() for r in self.ratios],
                "provider": self.provider, "threads": self.threads, "opt_level": self.opt_level,
                "io_binding": self.io_binding, "spinning": self.spinning, "inputs": self.inputs,
                "environment": self.environment}


def _label(source, i: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(os.fspath(source)).stem
    return f"model{i + 1}"


def _is_single(models) -> bool:
    return isinstance(models, (str, os.PathLike, bytes, bytearray, memoryview, onnx.ModelProto)) or hasattr(models, "to_model")


def _runner(session, feeds: Mapping[str, np.ndarray], provider: str) -> Callable[[], None]:
    """A function doing one complete run: CPU ``run``; CUDA ``run_with_iobinding`` + explicit sync.

    onnxruntime's errors become one ModelError line (a try block costs nothing when nothing is raised).
    """
    errors = runtime.ort_errors()
    if provider == "cuda":
        rt = runtime.ort()
        io = session.io_binding()
        for name, arr in feeds.items():
            io.bind_ortvalue_input(name, rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), "cuda", 0))
        for out in session.get_outputs():
            io.bind_output(out.name, "cuda", 0)
        io.synchronize_inputs()

        def once() -> None:
            session.run_with_iobinding(io)
            io.synchronize_outputs()
    else:
        def once() -> None:
            session.run(None, feeds)

    def call() -> None:
        try:
            once()
        except errors as e:
            raise ModelError(f"onnxruntime failed to run the model: {runtime.first_line(e)}") from None

    return call


def _stats(times_ns: list[int]) -> dict[str, float]:
    t = np.asarray(times_ns, dtype=np.float64) / 1e6
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "iqr_ms": float(q3 - q1),
            "min_ms": float(t.min()), "mean_ms": float(t.mean())}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo), else what ``platform`` says."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu


def _environment(provider: str) -> dict:
    rt = runtime.ort()
    return {"onnxruntime": rt.__version__, "provider": provider, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def checked_runs(runs: int, warmup: int, provider: str) -> int:
    """Refuse (UsageError) fewer than one timed run or negative warm-up; the warm-up runs to do (on CUDA at
    least one: the first run does cuDNN's algorithm search, never timed). ``provider`` must be available."""
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    if warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {warmup}")
    runtime.providers(provider)
    return max(warmup, 1) if provider == "cuda" else warmup


def bench(models, *, inputs=None, input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
          runs: int = 100, warmup: int = 10, provider: str = "cpu", threads: int | None = None,
          opt_level: str = "all", names: Sequence[str] | None = None, progress: bool | None = None,
          spinning: bool | None = None, image_size=None, mean=None, std=None, layout: str = "nchw",
          values=None) -> BenchReport:
    """Time one model or several (paths, bytes, ModelProtos or ConvGraphs) with onnxruntime.

    Each model gets the first input sample made from its own input specs (``inputs``/``input_shapes``/
    ``seed`` as in :func:`convgraph.run.inputs.make_inputs`). ``warmup`` untimed runs, then ``runs`` timed
    ones, interleaved across models; ratios are against the first model. The runs are reported as stages
    (:mod:`convgraph.progress`) unless ``progress`` is False.
    ``spinning``: onnxruntime's intra-op threads busy-wait between runs (its default). None: off when
    several models are timed, since one session's spinning threads then steal the cores of the next
    (measured: YOLOv8n, 2 threads on 2 busy cores, 121 ms interleaved with spinning, 83 ms alone; 42 ms
    and 39 ms without).
    """
    provider = provider.lower()
    warmup = checked_runs(runs, warmup, provider)
    sources = [models] if _is_single(models) else list(models)
    if not sources:
        raise UsageError("no model to benchmark")
    spin = len(sources) == 1 if spinning is None else bool(spinning)
    config = {"session.intra_op.allow_spinning": "1" if spin else "0"}
    labels = list(names) if names is not None else [_label(s, i) for i, s in enumerate(sources)]
    if len(labels) != len(sources):
        raise UsageError(f"{len(labels)} names for {len(sources)} models")
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # unique labels: "a", "a#2", ...
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab}#{seen[lab]}"

    protos = [runtime.as_model(s) for s in sources]
    _start_environment(provider)
    calls, session_s, batches, described = [], [], [], ""
    for proto in protos:
        data = make_inputs(input_specs(proto), inputs, samples=1, seed=seed, input_shapes=input_shapes,
                           image_size=image_size, mean=mean, std=std, layout=layout, values=values)
        described = described or data.describe
        feeds = data[0]
        first = next(iter(feeds.values()), None)
        batches.append(int(first.shape[0]) if first is not None and first.ndim >= 1 else 1)
        t0 = time.perf_counter()
        sess = runtime.create_session(proto, provider=provider, threads=threads, opt_level=opt_level, config=config)
        session_s.append(time.perf_counter() - t0)
        calls.append(_runner(sess, feeds, provider))

    n = len(calls)

    def rounds(count: int, name: str):
        return range(count) if progress is False else track(range(count), f"benchmarking: {name}")

    for _ in rounds(warmup, f"{warmup} warm-up runs"):
        for call in calls:
            call()
    times: list[list[int]] = [[] for _ in range(n)]
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in rounds(runs, f"{runs} timed runs"):
            for j, call in enumerate(calls):
                t0 = time.perf_counter_ns()
                call()
                times[j].append(time.perf_counter_ns() - t0)
    finally:
        if gc_was:
            gc.enable()

    timings = []
    for j in range(n):
        st = _stats(times[j])
        timings.append(ModelTiming(
            name=labels[j], source=str(sources[j]) if isinstance(sources[j], (str, os.PathLike)) else labels[j],
            session_s=session_s[j], warmup=warmup, runs=runs, batch=batches[j], **st,
            throughput_per_s=batches[j] / (st["median_ms"] / 1e3) if st["median_ms"] > 0 else math.inf,
            times_ms=[t / 1e6 for t in times[j]]))
    ratios = []
    base = np.asarray(times[0], dtype=np.float64)
    for j in range(1, n):
        r = base / np.maximum(np.asarray(times[j], dtype=np.float64), 1.0)
        q1, med, q3 = np.percentile(r, [25, 50, 75])
        ratios.append(PairRatio(name=labels[j], baseline=labels[0], pairs=len(r), median=float(med), q1=float(q1),
                                q3=float(q3), min=float(r.min()), max=float(r.max())))
    return BenchReport(models=timings, ratios=ratios, provider=provider, threads=threads, opt_level=opt_level,
                       io_binding=provider == "cuda", spinning=spin, inputs=described,
                       environment=_environment(provider))


def _start_environment(provider: str) -> None:
    """Create (and drop) a one-node session, so that onnxruntime's one-time set-up (environment, thread
    pools, CUDA context) is not charged to the first model's session time."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "warm", [x], [y])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=8)
    runtime.create_session(m, provider=provider)
