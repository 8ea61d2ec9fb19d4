"""onnxruntime sessions: providers (CPU, CUDA: never a silent fall-back), threads, optimization level,
errors turned into one line, and models with intermediate tensors exposed as extra outputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from ..errors import ModelError, UsageError
from ..io import PROTOBUF_LIMIT, byte_size, copy_fields, first_line, has_refs, read_model, write_model

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPT_LEVELS = ("disable", "basic", "extended", "all")
CUDA_INSTALL = "pip install 'convgraph[cuda]' (onnxruntime-gpu, in place of onnxruntime)"


def ort():
    """The onnxruntime module, or a UsageError naming the install command."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError("onnxruntime is not installed: pip install 'convgraph[cpu]' "
                         "(or 'convgraph[cuda]' for onnxruntime-gpu)") from None
    return onnxruntime


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exception classes onnxruntime raises for bad models and inputs."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [o for o in vars(state).values() if isinstance(o, type) and issubclass(o, Exception)]
    return tuple(found) + (RuntimeError, ValueError, TypeError)


def providers(provider: str) -> list:
    """The provider list for ``cpu`` or ``cuda``; for CUDA, a UsageError when onnxruntime lacks it."""
    provider = provider.lower()
    if provider not in PROVIDERS:
        raise UsageError(f"--provider must be one of {', '.join(PROVIDERS)}, not {provider!r}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    rt = ort()
    available = rt.get_available_providers()
    if PROVIDERS["cuda"] not in available:
        raise UsageError(f"--provider cuda: this onnxruntime ({rt.__version__}) has no CUDAExecutionProvider "
                         f"(it has {', '.join(available)}); install it with {CUDA_INSTALL}")
    if hasattr(rt, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, where installed (ORT ≥ 1.21)
        rt.preload_dlls()
    # EXHAUSTIVE is onnxruntime's default; said explicitly because warm-up runs are there to pay for it.
    return [(PROVIDERS["cuda"], {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                 "use_tf32": 0}), "CPUExecutionProvider"]


def session_options(*, threads: int | None = None, opt_level: str = "all", config: Mapping[str, str] | None = None):
    """SessionOptions with intra-op ``threads`` (None: onnxruntime's default), an optimization level and
    session config entries (e.g. ``{"session.intra_op.allow_spinning": "0"}``)."""
    rt = ort()
    if opt_level not in OPT_LEVELS:
        raise UsageError(f"--opt-level must be one of {', '.join(OPT_LEVELS)}, not {opt_level!r}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    so = rt.SessionOptions()
    so.graph_optimization_level = {
        "disable": rt.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": rt.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": rt.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": rt.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 4  # fatal only: its errors come back as exceptions (one line each), its log would add more
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return so


def as_model(source) -> onnx.ModelProto:
    """A ModelProto from a path, bytes, ModelProto or ConvGraph (read safely, checked)."""
    if hasattr(source, "to_model") and not isinstance(source, onnx.ModelProto):
        return source.to_model()
    return read_model(source)[0]


def create_session(model, *, provider: str = "cpu", threads: int | None = None, opt_level: str = "all",
                   config: Mapping[str, str] | None = None, options: Mapping[str, object] | None = None,
                   quiet: bool = False):
    """An onnxruntime InferenceSession for a model (path, bytes, ModelProto or ConvGraph).

    ``options``: further SessionOptions attributes, e.g. ``{"enable_profiling": True}``.
    ``quiet``: onnxruntime logs nothing, not even its errors (they come back as one ModelError line).

    With ``provider="cuda"`` the session must really run on CUDA: onnxruntime-gpu falls back to CPU
    when the CUDA libraries fail to load, which raises a UsageError here instead.
    """
    rt = ort()
    provs = providers(provider)
    so = session_options(threads=threads, opt_level=opt_level, config=config)
    for k, v in (options or {}).items():
        setattr(so, k, v)
    if quiet:
        so.log_severity_level = 4
    proto = model if isinstance(model, onnx.ModelProto) else as_model(model)  # protos: onnxruntime validates
    errors = ort_errors()
    try:
        on_disk = _on_disk(proto)
        if on_disk is not None:  # its big weights stayed in their files: onnxruntime reads them from there
            folder, small = on_disk
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            sess = rt.InferenceSession(small.SerializeToString(), sess_options=so, providers=provs)
        elif byte_size(proto) <= PROTOBUF_LIMIT and not has_refs(proto):
            sess = rt.InferenceSession(proto.SerializeToString(), sess_options=so, providers=provs)
        else:  # protobuf cannot serialize it (or its weights lie in several folders): through a saved copy
            with tempfile.TemporaryDirectory(prefix="convgraph-ort-") as tmp:
                path = write_model(proto, Path(tmp) / "model.onnx")
                sess = rt.InferenceSession(os.fspath(path), sess_options=so, providers=provs)
    except errors as e:
        raise ModelError(f"onnxruntime cannot load the model: {first_line(e)}") from None
    if provider.lower() == "cuda" and sess.get_providers()[0] != PROVIDERS["cuda"]:
        raise UsageError(f"--provider cuda: onnxruntime could not start CUDA (session providers: "
                         f"{', '.join(sess.get_providers())}); check the CUDA/cuDNN libraries, or reinstall with {CUDA_INSTALL}")
    return sess


def _on_disk(model: onnx.ModelProto) -> "tuple[str, onnx.ModelProto] | None":
    """(folder, a copy of ``model`` whose initializers on disk (:func:`convgraph.io.read_external`) refer to
    their files relative to that folder) when they all lie in one folder and the copy is under 2 GB; else None."""
    if not has_refs(model):
        return None
    refs = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    folders = {os.path.dirname(e.value) for t in refs for e in t.external_data if e.key == "location"}
    if len(folders) != 1:
        return None
    (folder,) = folders
    m = onnx.ModelProto()
    copy_fields(model, m, skip=("graph",))
    copy_fields(model.graph, m.graph, skip=("initializer",))
    for t in model.graph.initializer:
        c = m.graph.initializer.add()
        c.CopyFrom(t)  # a reference holds no bytes: a small copy
        for e in c.external_data:
            if e.key == "location" and t.data_location == onnx.TensorProto.EXTERNAL:
                e.value = os.path.basename(e.value)
    return (folder, m) if byte_size(m) <= PROTOBUF_LIMIT else None


def run(session, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> list[np.ndarray]:
    """``session.run`` with onnxruntime's errors turned into one ModelError line."""
    try:
        return session.run(list(outputs) if outputs is not None else None, dict(feeds))
    except ort_errors() as e:
        raise ModelError(f"onnxruntime failed to run the model: {first_line(e)}") from None


def expose_tensors(model: onnx.ModelProto, tensors: Iterable[str], types: Mapping | None = None) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs ``tensors`` (intermediates of the main graph).

    ``types`` (tensor → TensorInfo with ``elem_type``, e.g. ``ConvGraph.shapes``) gives the outputs an
    element type where known; onnxruntime infers the rest. Tensors already outputs are not repeated.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in tensors:
        if t in have:
            continue
        have.add(t)
        vi = m.graph.output.add()
        vi.name = t
        info = types.get(t) if types is not None else None
        if info is not None and getattr(info, "elem_type", None):
            vi.type.tensor_type.elem_type = info.elem_type
    return m


def run_with_outputs(model, names: Sequence[str], feeds: Iterable[Mapping[str, np.ndarray]], *, provider: str = "cpu",
                     threads: int | None = None, opt_level: str = "all") -> dict[str, list[np.ndarray]]:
    """Run ``model`` on each feed with the tensors ``names`` exposed; tensor → one array per feed."""
    proto = as_model(model) if not isinstance(model, onnx.ModelProto) else model
    names = list(dict.fromkeys(names))
    sess = create_session(expose_tensors(proto, names), provider=provider, threads=threads, opt_level=opt_level)
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, run(sess, feed, names)):
            got[n].append(v)
    return got
