"""Memory cost of a conv and this machine's roofline: which bound a conv is likely to hit, and how far from it it runs.

Bytes moved by a conv: its weights (and bias) as stored, its input and its output activations, each counted
once (the compulsory traffic; dtype-aware, 4-bit types half a byte). Arithmetic intensity = MACs per byte
moved. The roofline (Williams, Waterman & Patterson 2009) has two numbers, measured once per machine,
provider and thread count with onnxruntime and cached in ``$XDG_CACHE_HOME/convgraph/roofline.json``
(``~/.cache`` by default): the peak MAC/s of a large 3×3 conv and the memory bandwidth of a large
element-wise Add. A conv whose intensity is below the ridge (peak / bandwidth) is memory-bound; its least
possible time is max(MACs / peak, bytes / bandwidth).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..model.record import ConvRecord
from ..model.weights import elem_type

#: Element types stored in 4 bits (two per byte).
_HALF_BYTE = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


@functools.lru_cache(maxsize=None)  # a few element types, asked four times per conv
def dtype_bytes(t: int | None) -> float | None:
    """Bytes per element of ONNX element type ``t`` (0.5 for 4-bit types); None when unknown or not numeric."""
    if not t:
        return None
    if t in _HALF_BYTE:
        return 0.5
    try:
        return float(np.dtype(helper.tensor_dtype_to_np_dtype(t)).itemsize)
    except (KeyError, TypeError, ValueError):
        return None


def _tensor_bytes(cg, tensor: str | None, elements: int | None) -> int | None:
    size = dtype_bytes(elem_type(cg, tensor)) if tensor else None
    return None if size is None or elements is None else int(round(elements * size))


def _elements(shape) -> int | None:
    if shape is None or not all(type(d) is int for d in shape):
        return None
    return math.prod(shape)  # exact: absurd dims must not overflow


def memory_cost(cg, r: ConvRecord) -> None:
    """Fill ``weight_bytes``, ``activation_bytes`` and ``intensity`` of record ``r`` (conv of graph ``cg``)."""
    weights = r.params
    if r.has_bias and r.in_channels is not None and r.out_channels is not None:
        weights = r.in_channels * r.out_channels // r.group * math.prod(r.kernel)
    w = _tensor_bytes(cg, r.weight, weights)
    b = _tensor_bytes(cg, r.bias, r.params - weights) if r.has_bias else 0
    r.weight_bytes = None if w is None or b is None else w + b
    x = _tensor_bytes(cg, r.input, _elements(r.input_shape))
    y = _tensor_bytes(cg, r.output, _elements(r.output_shape))
    r.activation_bytes = None if x is None or y is None else x + y
    moved = None if r.weight_bytes is None or r.activation_bytes is None else r.weight_bytes + r.activation_bytes
    r.intensity = r.macs / moved if r.macs is not None and moved else None


@dataclass
class Roofline:
    """Peak MAC/s and memory bandwidth of one machine, provider and thread count, as measured."""

    peak_macs: float  # MAC/s of a large 3×3 conv
    bandwidth: float  # bytes/s of a large element-wise Add (read + write)
    provider: str
    threads: int | None  # intra-op threads (None: onnxruntime's default)
    machine: str
    measured: str  # ISO date and time of the measurement
    onnxruntime: str

    @property
    def ridge(self) -> float:
        """MACs per byte where the two roofs meet: below it a conv is memory-bound."""
        return self.peak_macs / self.bandwidth

    def bound(self, intensity: float | None) -> str | None:
        """``"compute"`` or ``"memory"`` for a conv of that arithmetic intensity; None when unknown."""
        if intensity is None:
            return None
        return "compute" if intensity >= self.ridge else "memory"

    def least_ms(self, macs: int | None, moved: int | None) -> float | None:
        """The roofline's least time for that work: max(MACs / peak, bytes / bandwidth), in ms."""
        if macs is None or moved is None:
            return None
        return 1e3 * max(macs / self.peak_macs, moved / self.bandwidth)

    def summary(self) -> str:
        threads = "default threads" if self.threads is None else f"{self.threads} thread{'s' * (self.threads != 1)}"
        return (f"roofline ({self.provider}, {threads}): peak {self.peak_macs / 1e9:.1f} GMAC/s, memory "
                f"{self.bandwidth / 1e9:.1f} GB/s, ridge {self.ridge:.1f} MAC/B (measured {self.measured})")

    def to_dict(self) -> dict:
        return {**asdict(self), "ridge": self.ridge}


def apply(records: list[ConvRecord], roofline: Roofline | None) -> None:
    """Set each record's ``bound`` from ``roofline`` (None: left unknown)."""
    for r in records:
        r.bound = roofline.bound(r.intensity) if roofline is not None else None


# ---- measuring --------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "roofline", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _conv_model(channels: int, size: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [channels, channels, 3, 3],
                           rng.standard_normal((channels, channels, 3, 3)).astype(np.float32).ravel())
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [x], [y], [w])


def _add_model(elements: int) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [elements])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [elements])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    return _model([helper.make_node("Add", ["x", "one"], ["y"])], [x], [y], [one])


#: Microbenchmark sizes: (C, H=W) of the 3×3 convs (about 1 ms each on one CPU core: short runs dodge the
#: time slices other processes take), elements of the Add (128 MiB in, 128 MiB out on CPU: beyond caches).
CONV_SIZES = {"cpu": ((128, 28), (256, 14)), "cuda": ((256, 128), (512, 64))}
ADD_ELEMENTS = {"cpu": 2**25, "cuda": 2**27}


def measure(provider: str = "cpu", threads: int | None = None, runs: int = 20) -> Roofline:
    """Measure peak MAC/s (the faster of two 3×3 convs) and memory bandwidth (a large Add) with onnxruntime:
    the fastest of ``runs`` runs each, about a second on CPU."""
    from ..run import runtime
    from ..run.bench import bench

    provider = provider.lower()
    peak = 0.0
    for channels, size in CONV_SIZES.get(provider, CONV_SIZES["cpu"]):
        conv = bench(_conv_model(channels, size), runs=runs, warmup=2, provider=provider, threads=threads,
                     progress=False)
        peak = max(peak, channels * channels * 9 * size * size / (conv.models[0].min_ms / 1e3))
    elements = ADD_ELEMENTS.get(provider, ADD_ELEMENTS["cpu"])
    add = bench(_add_model(elements), runs=max(runs // 2, 1), warmup=1, provider=provider, threads=threads,
                progress=False)
    return Roofline(peak_macs=peak, bandwidth=2 * 4 * elements / (add.models[0].min_ms / 1e3),
                    provider=provider, threads=threads, machine=machine_id(),
                    measured=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    onnxruntime=runtime.ort().__version__)


def machine_id() -> str:
    """Host name and CPU model: the roofline cache's key for this machine."""
    from ..run.bench import cpu_name

    return f"{socket.gethostname()} / {cpu_name()} / {os.cpu_count()} cpus"


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/convgraph/roofline.json``, by default ``~/.cache/convgraph/roofline.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convgraph" / "roofline.json"


def _key(provider: str, threads: int | None) -> str:
    return f"{machine_id()} | {provider} | threads {threads or 'default'}"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def cached_roofline(provider: str = "cpu", threads: int | None = None) -> Roofline | None:
    """The cached roofline of this machine, ``provider`` and ``threads``; None when none was measured (nothing runs)."""
    entry = _read_cache(cache_path()).get(_key(provider.lower(), threads))
    if not isinstance(entry, dict):
        return None
    try:
        return Roofline(**{k: entry[k] for k in Roofline.__dataclass_fields__})
    except (KeyError, TypeError):
        return None


def machine_roofline(provider: str = "cpu", threads: int | None = None, *, refresh: bool = False,
                     on_measure=None) -> Roofline:
    """This machine's roofline for ``provider`` and ``threads``: from the cache, else measured once and cached.

    ``on_measure(path)`` is called before a measurement (e.g. to say so). The cache is one JSON file keyed
    by machine, provider and threads; an unreadable cache is measured over, a read-only one left as it is.
    """
    from ..io import atomic_write_bytes

    provider = provider.lower()
    roof = None if refresh else cached_roofline(provider, threads)
    if roof is not None:
        return roof
    path = cache_path()
    if on_measure is not None:
        on_measure(path)
    roof = measure(provider, threads)
    cache = _read_cache(path)
    cache[_key(provider, threads)] = asdict(roof)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(cache, indent=1, sort_keys=True) + "\n").encode())
    except OSError:
        pass  # a read-only cache folder: measured, just not kept
    return roof
