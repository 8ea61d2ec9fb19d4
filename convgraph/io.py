"""Safe model I/O: reading hostile files without tracebacks, atomic writes, external data inside the model's folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import ModelError, UsageError

#: Protobuf cannot serialize a single message above this; larger models go to external data.
PROTOBUF_LIMIT = 2**31 - 1
#: A tensor claiming more elements than this is refused (10^11 elements would be 400 GB of fp32).
MAX_ELEMENTS = 2**33

_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.COMPLEX64: 8, onnx.TensorProto.COMPLEX128: 16, onnx.TensorProto.BFLOAT16: 2,
}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def read_model(source, *, check: bool = True) -> tuple[onnx.ModelProto, Path | None]:
    """Parse a model from a path, bytes or ModelProto; validate it; load its external data safely.

    Returns the model and the folder it came from (None for bytes/protos). Any problem raises
    :class:`ModelError` with one clear line.
    """
    base_dir: Path | None = None
    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), "the given bytes"
        else:
            path = Path(os.fspath(source))
            what = str(path)
            if not path.exists():
                raise ModelError(f"{path}: no such file")
            if path.is_dir():
                raise ModelError(f"{path}: is a directory, not an ONNX model file")
            try:
                data = path.read_bytes()
            except OSError as e:
                raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
            base_dir = path.resolve().parent
        if not data:
            raise ModelError(f"{what}: empty file, not an ONNX model")
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            raise ModelError(f"{what}: not a valid ONNX model (truncated or corrupt protobuf: {e})") from None
        if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
            raise ModelError(f"{what}: parses as protobuf but is not an ONNX model (no graph, IR version or opset)")
        _load_external(model, base_dir, what)
    validate_tensors(model)
    if check:
        check_model(model)
    return model, base_dir


def check_model(model: onnx.ModelProto, full: bool = False) -> None:
    """onnx.checker, with its failure turned into one ModelError line."""
    try:
        if model.ByteSize() > PROTOBUF_LIMIT:
            return  # the checker needs a path for these; tensors were validated one by one
        onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"model fails onnx.checker: {first}") from None


def _all_tensors(model: onnx.ModelProto):
    return external_data_helper._get_all_tensors(model)  # initializers, Constant attrs, subgraphs


def _load_external(model: onnx.ModelProto, base_dir: Path | None, what: str) -> None:
    external = [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]
    if not external:
        return
    if base_dir is None:
        raise ModelError(f"{what}: the model uses external data; load it from its file path instead")
    root = base_dir.resolve()
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        p = Path(loc)
        if not loc or p.is_absolute() or ".." in p.parts:
            raise ModelError(f"{what}: tensor {t.name!r} has external data path {loc!r} outside the model's folder; refused")
        full = (root / p).resolve()
        if root != full and root not in full.parents:
            raise ModelError(f"{what}: tensor {t.name!r} external data {loc!r} resolves outside the model's folder; refused")
        if not full.is_file():
            raise ModelError(f"{what}: tensor {t.name!r} needs external data file {loc!r}, which is missing")
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        need = offset + (int(length) if length else _expected_bytes(t))
        if full.stat().st_size < need:
            raise ModelError(f"{what}: external data file {loc!r} is too short for tensor {t.name!r}")
    try:
        external_data_helper.load_external_data_for_model(model, str(root))
    except (OSError, ValueError) as e:
        raise ModelError(f"{what}: cannot load external data ({e})") from None


def _elements(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ModelError(f"tensor {t.name!r} has a negative dim {list(t.dims)}")
        n *= d
    return n


def _expected_bytes(t: onnx.TensorProto) -> int:
    return _elements(t) * _ITEMSIZE.get(t.data_type, 1)


def validate_tensors(model: onnx.ModelProto) -> None:
    """Refuse tensors whose dims are absurd or disagree with the data they hold (no allocation happens)."""
    for t in _all_tensors(model):
        n = _elements(t)
        if n > MAX_ELEMENTS:
            raise ModelError(f"tensor {t.name!r} claims {n:.3g} elements (dims {list(t.dims)}); refused as absurd")
        if external_data_helper.uses_external_data(t) or t.data_type == onnx.TensorProto.STRING:
            continue
        if t.HasField("raw_data") or t.raw_data:
            have = len(t.raw_data)
            itemsize = _ITEMSIZE.get(t.data_type)
            if itemsize and have != n * itemsize:
                raise ModelError(f"tensor {t.name!r}: dims {list(t.dims)} need {n * itemsize} bytes, raw data has {have}")
        elif n > 0 and not any(len(getattr(t, f)) for f in _TYPED_FIELDS):
            raise ModelError(f"tensor {t.name!r} claims {n} elements (dims {list(t.dims)}) but holds no data")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_model(model: onnx.ModelProto, path, *, input_path=None, in_place: bool = False) -> Path:
    """Save ``model`` atomically; models over 2 GB go to ``<name>.data`` beside it.

    Refuses (UsageError) to write over ``input_path`` unless ``in_place``.
    """
    path = Path(os.fspath(path))
    if input_path is not None and not in_place and _same_file(path, Path(os.fspath(input_path))):
        raise UsageError(f"{path} is the input model; refusing to overwrite it (pass --in-place to allow)")
    if not path.parent.exists():
        raise UsageError(f"{path.parent}: output folder does not exist")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory")
    if model.ByteSize() <= PROTOBUF_LIMIT and not any(
        external_data_helper.uses_external_data(t) for t in _all_tensors(model)
    ):
        atomic_write_bytes(path, model.SerializeToString())
        return path
    data_name = path.name + ".data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix=".convgraph-", dir=path.parent) as tmp:
        onnx.save_model(copy, os.path.join(tmp, path.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        os.replace(os.path.join(tmp, data_name), path.parent / data_name)
        os.replace(os.path.join(tmp, path.name), path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
