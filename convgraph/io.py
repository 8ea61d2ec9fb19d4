"""Safe model I/O: reading hostile files without tracebacks, atomic writes, external data inside the model's folder."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import external_data_helper, numpy_helper

from .errors import ModelError, UsageError

#: Protobuf cannot serialize a single message above this; larger models go to external data.
PROTOBUF_LIMIT = 2**31 - 1
#: A tensor claiming more elements than this is refused (10^11 elements would be 400 GB of fp32).
MAX_ELEMENTS = 2**33
#: Tensors at least this big go to the external data file when a model is saved above PROTOBUF_LIMIT, and are
#: left out of a model's :func:`skeleton`.
EXTERNAL_THRESHOLD = 1024
#: A model file at least this big is not read whole (:func:`_split_read`): its big tensors' bytes are left in
#: the file, as if they were external data there (:data:`LAZY_BYTES`); onnx's checker and shape inference see
#: its :func:`skeleton`, without them.
SPLIT_BYTES = 64 << 20
#: Main-graph initializers of at least this many bytes held as external data (or split from a big file) stay
#: on disk: the model refers to them (:func:`read_external` reads one when a rule needs its value, onnxruntime
#: reads them itself), so no copy of them is made in memory when the model is copied, checked, run or saved.
LAZY_BYTES = 64 << 10
#: Data files read_model validated and opened (resolved path → file descriptor, kept open): the only ones an
#: in-memory reference (an absolute location) may point into.
_OPEN: dict[str, int] = {}

_T = onnx.TensorProto
_ITEMSIZE: dict[int, int] = {
    _T.FLOAT: 4, _T.UINT8: 1, _T.INT8: 1, _T.UINT16: 2, _T.INT16: 2, _T.INT32: 4, _T.INT64: 8, _T.BOOL: 1,
    _T.FLOAT16: 2, _T.DOUBLE: 8, _T.UINT32: 4, _T.UINT64: 8, _T.COMPLEX64: 8, _T.COMPLEX128: 16, _T.BFLOAT16: 2,
    _T.FLOAT8E4M3FN: 1, _T.FLOAT8E4M3FNUZ: 1, _T.FLOAT8E5M2: 1, _T.FLOAT8E5M2FNUZ: 1,
}
#: The element types onnx defines (UNDEFINED, 0, is not one a tensor can hold).
_DTYPES = frozenset(_T.DataType.values()) - {_T.UNDEFINED}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
_A = onnx.AttributeProto


@dataclass
class Source:
    """Where a model came from and what loading it needs to know later.

    ``skeleton``, for a model with external data (or a file of :data:`SPLIT_BYTES` or more, read as if its
    big tensors were external data in the model file itself), is the model as parsed before the data was read
    in: small, it stands in for the whole model in onnx's checker and shape inference.
    """

    path: Path | None = None
    skeleton: onnx.ModelProto | None = None
    size: int = 0  #: serialized size of the model with its external data (what protobuf's limit applies to)
    data: bytes | None = None  #: the serialized model when it was read whole (saves serializing it again)

    @property
    def folder(self) -> Path | None:
        return self.path.parent if self.path is not None else None


def byte_size(model) -> int:
    """``model.ByteSize()``, or one byte over :data:`PROTOBUF_LIMIT` when it is too big for protobuf to size."""
    try:
        return model.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT + 1


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of ``model``: initializers, sparse initializers, Constant and other tensor
    attributes, in the main graph, all subgraphs and all model-local functions."""
    return iter(_walk(model))


def _walk(model: onnx.ModelProto, strings: list | None = None) -> list[onnx.TensorProto]:
    """The TensorProtos :func:`iter_tensors` gives; with ``strings``, one pass also appends to it the values
    of the string fields convgraph reads (names, op types, domains, docs, metadata)."""
    tensors: list[onnx.TensorProto] = []
    keep = strings is not None
    strings = strings if strings is not None else []  # a list either way (typed so), appended to only if kept
    if keep:
        strings += (model.producer_name, model.domain, model.doc_string)
        strings += [x for p in model.metadata_props for x in (p.key, p.value)]
        strings += [o.domain for o in model.opset_import]
    stack: list = [model.graph, *model.functions]
    while stack:
        g = stack.pop()
        if isinstance(g, onnx.GraphProto):
            tensors += g.initializer
            for sp in g.sparse_initializer:
                tensors += (sp.values, sp.indices)
            if keep:
                strings += (g.name, g.doc_string)
                strings += [vi.name for vi in (*g.input, *g.output, *g.value_info)]
                strings += [t.name for t in g.initializer]
                strings += [sp.values.name for sp in g.sparse_initializer]
        elif keep:  # a model-local function
            strings += (g.name, g.domain, g.doc_string, *g.input, *g.output)
        for node in g.node:
            if keep:
                strings += (node.name, node.op_type, node.domain)
                strings += node.input
                strings += node.output
            for a in node.attribute:
                if keep:
                    strings.append(a.name)
                t = a.type
                if t == _A.TENSOR:
                    tensors.append(a.t)
                elif t == _A.GRAPH:
                    stack.append(a.g)
                elif t == _A.TENSORS:
                    tensors += a.tensors
                elif t == _A.GRAPHS:
                    stack += a.graphs
                elif t == _A.SPARSE_TENSOR:
                    tensors += (a.sparse_tensor.values, a.sparse_tensor.indices)
                elif t == _A.SPARSE_TENSORS:
                    for sp in a.sparse_tensors:
                        tensors += (sp.values, sp.indices)
    return tensors


def _check_strings(strings: list, what: str) -> None:
    """Refuse text that is not UTF-8: protobuf hands such proto2 strings back as bytes, not str."""
    if bytes in set(map(type, strings)):
        raise ModelError(f"{what}: a name or text field is not valid UTF-8; the file is corrupt")


def read_model(source, *, check: bool = True) -> tuple[onnx.ModelProto, Source]:
    """Parse a model from a path, bytes or ModelProto; validate it; load its external data safely.

    A ModelProto is copied, never modified. Returns the model and where it came from. Any problem
    raises :class:`ModelError` with one clear line.
    """
    origin = Source()
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)  # its weights on disk (read_external) are not copied: they are references
        what = "the given model"
        origin.size = byte_size(model)
    else:
        data: bytes | None
        if isinstance(source, (bytes, bytearray, memoryview)):
            data, what = bytes(source), "the given bytes"
        elif isinstance(source, (str, os.PathLike)):
            origin.path = Path(os.fspath(source))
            what = str(origin.path)
            data = _read_file(origin.path)
            origin.path = origin.path.resolve()
        else:
            raise UsageError(f"cannot load a model from a {type(source).__name__}; give a path, bytes or ModelProto")
        if data is None:  # a big file: parsed without its big tensors' bytes, which stay in the file
            assert origin.path is not None
            parts = _split_read(origin.path, what)
            model = _parse(parts, what)
            origin.size = len(parts)
        else:
            model = _parse(data, what)
            origin.size, origin.data = len(data), data
    strings: list = []
    tensors = _walk(model, strings)
    _check_strings(strings, what)
    counts = _check_sizes(tensors, what)  # before any data is read: absurd dims never reach an allocation
    external = [t for t in tensors if t.data_location == _T.EXTERNAL and not _is_ref(t)]
    refs = sum(1 for t in model.graph.initializer if _is_ref(t))
    if refs:  # a model convgraph read (a copy, an edit of one): its weights stay where they were found
        origin.skeleton = skeleton(model)
        origin.size = byte_size(origin.skeleton) + sum(_external_info(t, what)[2] or 0 for t in model.graph.initializer
                                                       if _is_ref(t))
    if external:
        if origin.path is None:
            raise ModelError(f"{what}: the model uses external data; load it from its file path instead")
        origin.skeleton = onnx.ModelProto()
        origin.skeleton.CopyFrom(model)
        main = [t for t in model.graph.initializer if t.data_location == _T.EXTERNAL]  # the big ones stay on disk
        origin.size += _load_external(main, origin.path.parent, what, origin.path, lazy=True)
        rest = [t for t in external if t.data_location == _T.EXTERNAL and not _is_ref(t)]
        origin.size += _load_external(rest, origin.path.parent, what, origin.path)
        origin.data = None  # the bytes lack the external data now read in
    _check_data(tensors, counts, what)
    if check:
        check_model(model, origin=origin)
    return model, origin


def _read_file(path: Path) -> bytes | None:
    """The file's bytes; None when it is :data:`SPLIT_BYTES` or more (read by :func:`_split_read`)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelError(f"{path}: is a directory, not an ONNX model file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{path}: not a regular file")
    if st.st_size > PROTOBUF_LIMIT:
        raise ModelError(f"{path}: {st.st_size} bytes is over protobuf's 2 GB limit; models this big must "
                         f"keep their weights in external data files")
    if st.st_size >= SPLIT_BYTES:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None


# ---- big model files: the weights left in the file at first -------------------------------------------
def _varint(buf, i: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it (ModelError past ``end`` or past 10 bytes)."""
    value = shift = 0
    while i < end and shift < 70:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7
    raise ModelError("truncated or corrupt protobuf (a varint runs past its message)")


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field's key, start of its value, end of it) of each field of
    the message ``buf[start:end]``; the value of a length-delimited field is ``buf[value:end]``."""
    i = start
    while i < end:
        key, j = _varint(buf, i, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, k = _varint(buf, j, end)
        elif wire == 1:
            k = j + 8
        elif wire == 2:
            n, j = _varint(buf, j, end)
            k = j + n
        elif wire == 5:
            k = j + 4
        else:  # groups (3, 4) are not in onnx.proto
            raise ModelError(f"truncated or corrupt protobuf (wire type {wire} in field {number})")
        if k > end:
            raise ModelError("truncated or corrupt protobuf (a field runs past its message)")
        yield number, wire, i, j, k
        i = k


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b, v = v & 0x7F, v >> 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


# field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data/external_data/data_location
_MODEL_GRAPH, _GRAPH_INITIALIZER, _RAW_DATA, _EXTERNAL_DATA, _DATA_LOCATION = 7, 5, 9, 13, 14


def _split_read(path: Path, what: str) -> bytes:
    """The model file ``path`` as bytes in which each main-graph initializer of :data:`LAZY_BYTES` raw bytes or
    more refers to those bytes in the model file itself, as external data (location, offset, length), instead
    of holding them: :func:`read_model` then treats them as any external data (they stay on disk), so the
    weights are never in memory as the file's bytes."""
    import mmap

    location = path.name
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            parts = []
            for number, wire, key, value, end in _fields(buf, 0, len(buf)):
                if number == _MODEL_GRAPH and wire == 2:
                    parts.append(_delimited(number, _split_graph(buf, value, end, location)))
                else:
                    parts.append(buf[key:end])
            return b"".join(parts)
    except OSError as e:
        raise ModelError(f"{what}: cannot read ({e.strerror or e})") from None


def _split_graph(buf, start: int, end: int, location: str) -> bytes:
    parts = []
    for number, wire, key, value, stop in _fields(buf, start, end):
        if number == _GRAPH_INITIALIZER and wire == 2 and stop - value >= LAZY_BYTES:
            parts.append(_delimited(number, _split_tensor(buf, value, stop, location)))
        else:
            parts.append(buf[key:stop])
    return b"".join(parts)


def _split_tensor(buf, start: int, end: int, location: str) -> bytes:
    fields = list(_fields(buf, start, end))
    raw = [(v, e) for n, w, _, v, e in fields if n == _RAW_DATA and w == 2]
    if len(raw) != 1 or raw[0][1] - raw[0][0] < LAZY_BYTES or any(
            n in (_EXTERNAL_DATA, _DATA_LOCATION) for n, *_ in fields):
        return bytes(buf[start:end])  # no raw data, or already external: as it is
    (offset, stop), = raw
    parts = [buf[k:e] for n, w, k, _, e in fields if not (n == _RAW_DATA and w == 2)]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(stop - offset))):
        parts.append(_delimited(_EXTERNAL_DATA, _delimited(1, k.encode()) + _delimited(2, v.encode())))
    parts.append(_key(_DATA_LOCATION, 0) + _encode_varint(_T.EXTERNAL))
    return b"".join(parts)


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{what}: empty file, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelError(f"{what}: not a valid ONNX model (truncated or corrupt protobuf: {e})") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise ModelError(f"{what}: parses as protobuf but is not an ONNX model (no graph, IR version or opset)")
    return model


def check_model(model: onnx.ModelProto, full: bool = False, *, origin: Source | None = None) -> None:
    """onnx.checker, with its failure turned into one ModelError line.

    A big model (external data, or :data:`SPLIT_BYTES` or more) is checked as its :func:`skeleton`: the
    structure, without serializing its weights (its tensors' data is validated by :func:`read_model`).
    """
    size = origin.size if origin is not None and origin.size else byte_size(model)
    try:
        if origin is not None and origin.skeleton is not None:  # its weights were read apart: checked without them
            onnx.checker.check_model(skeleton(origin.skeleton, inputs=True), full_check=full)
        elif size > SPLIT_BYTES or has_refs(model):  # checked without its big tensors' bytes, never serialized whole
            onnx.checker.check_model(skeleton(model, inputs=True), full_check=full)
        else:
            data = origin.data if origin is not None and origin.data is not None else model
            onnx.checker.check_model(data, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError, RuntimeError,
            OSError) as e:
        where = f"{origin.path}: " if origin is not None and origin.path is not None else ""
        raise ModelError(f"{where}model fails onnx.checker: {first_line(e)}") from None


def skeleton(model: onnx.ModelProto, *, inputs: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` without the bytes of its big tensors: the main graph's initializers held as
    external data or of :data:`EXTERNAL_THRESHOLD` bytes or more. For shape inference they stay initializers
    marked external (their type and shape are what it reads); with ``inputs``, for onnx's checker (which
    would look for their files), they become graph inputs of their type and shape. Small: nothing of the
    weights is copied or serialized."""
    m = onnx.ModelProto()
    copy_fields(model, m, skip=("graph",))
    g, src = m.graph, model.graph
    copy_fields(src, g, skip=("initializer",))
    have = {vi.name for vi in g.input}
    for t in src.initializer:
        if t.data_location != _T.EXTERNAL and t.ByteSize() < EXTERNAL_THRESHOLD:
            g.initializer.append(t)
        elif inputs:
            if t.name not in have:
                g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:
            s = g.initializer.add()
            s.name, s.data_type, s.data_location = t.name, t.data_type, _T.EXTERNAL
            s.dims.extend(t.dims)
            if t.data_location == _T.EXTERNAL:
                s.external_data.extend(t.external_data)
            else:
                s.external_data.add(key="location", value="(in memory)")
    return m


def copy_fields(src, dst, skip: tuple[str, ...]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` but those named in ``skip`` (not even read)."""
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (onnx's messages run over many lines)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _external_info(t: onnx.TensorProto, what: str) -> tuple[str, int, int | None]:
    info = {e.key: e.value for e in t.external_data}
    try:
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise ModelError(f"{what}: tensor {t.name!r} has a non-integer external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{what}: tensor {t.name!r} has a negative external data offset or length")
    return info.get("location", ""), offset, length


def _load_external(tensors: list[onnx.TensorProto], root: Path, what: str, own: Path | None = None,
                   lazy: bool = False) -> int:
    """Read external data into ``tensors``, only from files inside ``root`` (the model's folder); returns
    the number of bytes read. With ``lazy``, a tensor of :data:`LAZY_BYTES` or more is not read: it refers
    to its bytes by the data file's resolved path, the file kept open (:func:`read_external`).

    A symlink is followed only when where it leads is inside ``root`` too; the data is read from that
    resolved path, so nothing outside can be swapped in between the check and the read. A file with more
    than one hard link is refused: its other name may be anywhere (onnx ≥ 1.21 refuses it too,
    CVE-2026-34446). The link count is checked on the file as opened, the one that is read; the model file
    ``own`` itself (a big file read by :func:`_split_read`) is the file the caller named, whatever its links.
    """
    total = 0
    for t in tensors:
        loc, offset, length = _external_info(t, what)
        p = Path(loc)
        if not loc or "\0" in loc or p.is_absolute() or p.drive or ".." in p.parts:
            raise ModelError(f"{what}: tensor {t.name!r} has external data path {loc!r} outside the model's folder; refused")
        full = (root / p).resolve()
        if full != root and root not in full.parents:
            raise ModelError(f"{what}: tensor {t.name!r} external data {loc!r} resolves outside the model's folder; refused")
        if not full.exists():
            raise ModelError(f"{what}: tensor {t.name!r} needs external data file {loc!r}, which is missing")
        if not full.is_file():
            raise ModelError(f"{what}: tensor {t.name!r} external data {loc!r} is not a regular file")
        size = length if length is not None else _expected_bytes(t)
        if lazy and size >= LAZY_BYTES and t.data_type != _T.STRING:
            if size != _expected_bytes(t):
                raise ModelError(f"{what}: tensor {t.name!r} dims {list(t.dims)} need {_expected_bytes(t)} bytes, "
                                 f"its external data has {size}")
            fd = _open_data(full, loc, t.name, what, own)
            if os.fstat(fd).st_size < offset + size:
                raise ModelError(f"{what}: external data file {loc!r} is too short for tensor {t.name!r} "
                                 f"(needs {offset + size} bytes, has {os.fstat(fd).st_size})")
            del t.external_data[:]
            for key, value in (("location", str(full)), ("offset", str(offset)), ("length", str(size))):
                t.external_data.add(key=key, value=value)
            total += size
            continue
        try:
            with open(full, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_nlink > 1 and full != own:
                    raise ModelError(f"{what}: tensor {t.name!r} external data {loc!r} has {st.st_nlink} hard "
                                     f"links (another name may lie outside the model's folder); refused")
                if st.st_size < offset + size:
                    raise ModelError(f"{what}: external data file {loc!r} is too short for tensor {t.name!r} "
                                     f"(needs {offset + size} bytes, has {st.st_size})")
                f.seek(offset)
                t.raw_data = f.read(size)
        except OSError as e:
            raise ModelError(f"{what}: cannot read external data {loc!r} ({e.strerror or e})") from None
        if full == own:  # bytes of the model file itself (:func:`_split_read`): the tensor as the file has it
            t.ClearField("data_location")
        else:
            t.data_location = _T.DEFAULT  # as onnx.load leaves it: the data is in the tensor now
        del t.external_data[:]
        total += size
    return total


def _open_data(full: Path, loc: str, name: str, what: str, own: Path | None) -> int:
    """The descriptor of data file ``full`` (opened once, kept open: what it validated is what is read later;
    opened anew when another file has taken its name since, e.g. a model saved over in place)."""
    key = str(full)
    if key in _OPEN:
        fd = _OPEN[key]
        now, was = os.stat(full), os.fstat(fd)
        if (now.st_ino, now.st_dev) == (was.st_ino, was.st_dev):
            return fd
    try:
        fd = os.open(full, os.O_RDONLY)
    except OSError as e:
        raise ModelError(f"{what}: cannot read external data {loc!r} ({e.strerror or e})") from None
    st = os.fstat(fd)
    if st.st_nlink > 1 and full != own:
        os.close(fd)
        raise ModelError(f"{what}: tensor {name!r} external data {loc!r} has {st.st_nlink} hard links (another name "
                         f"may lie outside the model's folder); refused")
    _OPEN[key] = fd
    return fd


def _is_ref(t: onnx.TensorProto) -> bool:
    """Whether ``t`` refers to its bytes in a data file :func:`read_model` validated and keeps open."""
    if t.data_location != _T.EXTERNAL:
        return False
    return any(e.key == "location" and e.value in _OPEN for e in t.external_data)


def read_external(t: onnx.TensorProto) -> bytes:
    """The bytes of a tensor whose data stayed on disk (:data:`LAZY_BYTES`), read from the file read_model
    validated; ModelError for a reference to any other file."""
    info = {e.key: e.value for e in t.external_data}
    fd = _OPEN.get(info.get("location", ""))
    if fd is None:
        raise ModelError(f"tensor {t.name!r} refers to external data convgraph did not load; load the model with "
                         "convgraph.load from its file")
    offset, length = int(info.get("offset") or 0), int(info["length"])
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise ModelError(f"tensor {t.name!r}: its external data file is shorter than when it was loaded")
    return data


def tensor_value(t: onnx.TensorProto):
    """``numpy_helper.to_array(t)``, also for a tensor whose bytes stayed on disk (:func:`read_external`)."""
    if not _is_ref(t):
        return numpy_helper.to_array(t)
    return numpy_helper.to_array(_inlined(t))


def _inlined(t: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of tensor ``t`` with its bytes read in from disk."""
    c = onnx.TensorProto()
    copy_fields(t, c, skip=("external_data", "data_location"))
    c.raw_data = read_external(t)
    return c


def has_refs(model: onnx.ModelProto) -> bool:
    """Whether some main-graph initializer of ``model`` still has its bytes on disk (:data:`LAZY_BYTES`)."""
    return any(_is_ref(t) for t in model.graph.initializer)


def inlined(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself, or a copy with the bytes of its initializers on disk read in (what onnx's own tools
    and other libraries expect)."""
    if not has_refs(model):
        return model
    m = onnx.ModelProto()
    copy_fields(model, m, skip=("graph",))
    copy_fields(model.graph, m.graph, skip=("initializer",))
    for t in model.graph.initializer:
        m.graph.initializer.append(_inlined(t) if _is_ref(t) else t)
    return m


def _elements(t: onnx.TensorProto, what: str) -> int:
    dims = t.dims
    if dims and min(dims) < 0:
        raise ModelError(f"{what}: tensor {t.name!r} has a negative dim {list(dims)}")
    return math.prod(dims)


def _expected_bytes(t: onnx.TensorProto) -> int:
    return _elements(t, "") * _ITEMSIZE.get(t.data_type, 1)


def _check_sizes(tensors: list[onnx.TensorProto], what: str) -> list[int]:
    """Refuse absurd element counts (before any data is read); returns each tensor's element count."""
    counts = [_elements(t, what) for t in tensors]
    if counts and max(counts) > MAX_ELEMENTS:
        t, n = next((t, n) for t, n in zip(tensors, counts) if n > MAX_ELEMENTS)
        raise ModelError(f"{what}: tensor {t.name!r} claims {n:.3g} elements (dims {list(t.dims)}); refused as absurd")
    return counts


def _check_data(tensors: list[onnx.TensorProto], counts: list[int], what: str) -> None:
    """Refuse tensors whose data disagrees with their dims (nothing is allocated for the check)."""
    for t, n in zip(tensors, counts):
        if t.data_type not in _DTYPES:
            raise ModelError(f"{what}: tensor {t.name!r} has data type {t.data_type}, which onnx does not define")
        if t.data_type == _T.STRING or t.data_location == _T.EXTERNAL:
            continue
        if t.HasField("raw_data"):
            itemsize, have = _ITEMSIZE.get(t.data_type), len(t.raw_data)
            if itemsize and have != n * itemsize:
                raise ModelError(f"{what}: tensor {t.name!r} dims {list(t.dims)} need {n * itemsize} bytes, "
                                 f"its raw data has {have}")
        elif n > 0 and not any(len(getattr(t, f)) for f in _TYPED_FIELDS):
            raise ModelError(f"{what}: tensor {t.name!r} claims {n} elements (dims {list(t.dims)}) but holds no data")


def validate_tensors(model: onnx.ModelProto) -> None:
    """Refuse tensors whose dims are absurd or disagree with the data they hold (no allocation happens)."""
    tensors = list(iter_tensors(model))
    _check_data(tensors, _check_sizes(tensors, "model"), "model")


def _new_file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the existing file's, else 0o666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: "bytes | Callable[[BinaryIO], object]") -> None:
    """Write ``data`` (bytes, or a function writing to the open file) to ``path`` through a temp file in the
    same folder and a rename.

    A failure at any point leaves an existing ``path`` as it was, and no temp file behind.
    """
    path = Path(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path, input_path=None, in_place: bool = False, *, flag: str = "") -> Path:
    """Refuse (UsageError) an output path that names an input (``input_path``: one path, or several with the
    model first, e.g. ``[model, -o output]`` for ``--plot``; allowed with ``in_place``), a folder, or a file in
    a folder that does not exist; call it before long work so a bad ``-o`` fails at once. ``flag`` (``--dot``)
    starts the message."""
    path = Path(os.fspath(path))
    where = f"{flag}: " if flag else ""
    inputs = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path or ())
    same = next((i for i in inputs if _same_file(path, Path(os.fspath(i)))), None) if not in_place else None
    if same is not None:
        what = "the input model" if same is inputs[0] else f"the same file as {os.fspath(same)}"
        again = " (pass --in-place to allow)" if not flag else ""
        raise UsageError(f"{where}{path} is {what}; refusing to overwrite it{again}")
    if path.is_dir():
        raise UsageError(f"{where}{path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"{where}{path.parent}: output folder does not exist")
    return path


def write_output(path, data: "str | bytes", input_path=None, *, flag: str = "") -> Path:
    """Write an auxiliary output (``--dot``, ``--plot``: text or bytes) atomically to ``path``, after the same
    checks as :func:`check_output_path` (never over an input; check early too, before the long work)."""
    path = check_output_path(path, input_path, flag=flag)
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else bytes(data))
    return path


def write_model(model: onnx.ModelProto, path, *, input_path=None, in_place: bool = False) -> Path:
    """Save ``model`` atomically; a model over 2 GB goes with its tensors in ``<name>.<digest>.data`` beside it.

    The data file is named after its content, so writing it never touches the file an existing model at
    ``path`` reads: the switch is the one rename of the model file, and a reader sees the old model with
    its data or the new one with its data, never a mix. A data file of that same naming pattern which
    the replaced model referred to is removed afterwards; any other file is left alone.
    Refuses (UsageError) to write over ``input_path`` unless ``in_place``.
    """
    path = check_output_path(path, input_path, in_place)
    external = any(external_data_helper.uses_external_data(t) and not _is_ref(t) for t in iter_tensors(model))
    if external:
        raise UsageError("the model still refers to external data files; load it with convgraph.load first")
    refs = [t for t in model.graph.initializer if _is_ref(t)]
    size = byte_size(skeleton(model)) + sum(int(e.value) for t in refs for e in t.external_data if e.key == "length") \
        if refs else byte_size(model)
    if size <= PROTOBUF_LIMIT:
        atomic_write_bytes(path, (lambda f: _stream(model, f)) if refs else model.SerializeToString())
        return path
    staging = path.name + ".data"
    old = _own_data_files(path)
    with tempfile.TemporaryDirectory(prefix=".convgraph-", dir=path.parent) as tmp:
        copy = _write_data(model, os.path.join(tmp, staging), staging)
        if byte_size(copy) > PROTOBUF_LIMIT:
            raise ModelError(f"{path}: the model is over 2 GB even without its tensors; cannot save it")
        written = os.path.join(tmp, staging)
        if os.path.exists(written):
            name = f"{path.name}.{_digest(written)}.data"
            for t in iter_tensors(copy):
                for entry in t.external_data:
                    if entry.key == "location":
                        entry.value = name
            os.chmod(written, _new_file_mode(path.parent / name))
            os.replace(written, path.parent / name)
            old.discard(name)
        atomic_write_bytes(path, copy.SerializeToString())
    for stale in old:
        with contextlib.suppress(OSError):
            os.unlink(path.parent / stale)
    return path


def _stream(model: onnx.ModelProto, f: BinaryIO) -> None:
    """Write ``model``, whose big weights stayed on disk, as one protobuf message to ``f`` without ever holding
    it whole: the model without its graph, the graph without its initializers, then each initializer in
    order, each in a graph field of its own (protobuf merges repeated occurrences of a field, so the file
    parses as the model with every initializer inline), the bytes on disk copied over in blocks."""
    head = onnx.ModelProto()
    copy_fields(model, head, skip=("graph",))
    f.write(head.SerializeToString())
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip=("initializer",))
    f.write(_delimited(_MODEL_GRAPH, graph.SerializeToString()))
    for t in model.graph.initializer:
        if not _is_ref(t):
            f.write(_delimited(_MODEL_GRAPH, _delimited(_GRAPH_INITIALIZER, t.SerializeToString())))
            continue
        meta = onnx.TensorProto()
        copy_fields(t, meta, skip=("external_data", "data_location"))
        info = {e.key: e.value for e in t.external_data}
        fd, offset, n = _OPEN[info["location"]], int(info.get("offset") or 0), int(info["length"])
        tensor = meta.SerializeToString() + _key(_RAW_DATA, 2) + _encode_varint(n)
        part = _key(_GRAPH_INITIALIZER, 2) + _encode_varint(len(tensor) + n) + tensor
        f.write(_key(_MODEL_GRAPH, 2) + _encode_varint(len(part) + n) + part)
        while n:
            block = os.pread(fd, min(n, 16 << 20), offset)
            if not block:
                raise ModelError(f"tensor {t.name!r}: its external data file is shorter than when it was loaded")
            f.write(block)
            offset, n = offset + len(block), n - len(block)


def _write_data(model: onnx.ModelProto, file: str, location: str) -> onnx.ModelProto:
    """Write the bytes of ``model``'s tensors of :data:`EXTERNAL_THRESHOLD` bytes or more to ``file``, one tensor
    at a time; returns the model without them, its tensors referring to ``location`` at their offsets. The
    model itself is neither copied whole nor serialized (protobuf cannot above 2 GB)."""
    copy = skeleton(model)  # the main graph's big initializers left out: their bytes come from ``model``
    source = {t.name: t for t in model.graph.initializer}
    offset = 0
    with open(file, "wb") as f:
        for t in iter_tensors(copy):
            if t.data_location == _T.EXTERNAL:
                src = source[t.name]
                if src.data_type == _T.STRING:  # strings cannot be external data: back in the model
                    t.CopyFrom(src)
                    continue
                data = read_external(src) if _is_ref(src) else src.raw_data if src.HasField("raw_data") else \
                    numpy_helper.to_array(src).tobytes()
            elif t.data_type != _T.STRING and t.ByteSize() >= EXTERNAL_THRESHOLD:  # in a node or a body
                data = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
                for name in _TYPED_FIELDS + ("raw_data",):
                    t.ClearField(name)
                t.data_location = _T.EXTERNAL
            else:
                continue
            f.write(data)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=key, value=value)
            offset += len(data)
    return copy


def _digest(file: str) -> str:
    """The first 16 hex digits of a file's SHA-256 (read in 16 MiB blocks)."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _own_data_files(path: Path) -> set[str]:
    """The ``<name>.<digest>.data`` files that the model now at ``path`` (if any) refers to."""
    if not path.is_file():
        return set()
    try:
        old = onnx.load(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError):  # not a model we can read: nothing of ours to remove
        return set()
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{16}\.data")
    return {e.value for t in iter_tensors(old) for e in t.external_data
            if e.key == "location" and pattern.fullmatch(e.value)}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()
