"""Input sets for running models: random (seeded, dtype-aware), from ``.npz`` files, or from image folders.

An :class:`InputSet` is a lazy, indexable sequence of samples; each sample is a dict ``name → array``
that feeds one run of the model. Samples are made when asked for, so a folder of a thousand images or
many random samples never sit in memory all at once.
"""

from __future__ import annotations

import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from ..errors import ConvGraphWarning, ModelError, UsageError

#: One input array may take at most this many bytes; more is refused as absurd (a clear error, no MemoryError).
MAX_INPUT_BYTES = 2**31
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")

Sample = dict  # name -> np.ndarray


@dataclass(frozen=True)
class InputSpec:
    """A graph input of a model: name, ONNX element type and declared dims (ints, names or None)."""

    name: str
    elem_type: int
    shape: tuple | None

    @property
    def dtype(self) -> np.dtype:
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type))
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"input {self.name!r} has element type "
                             f"{onnx.TensorProto.DataType.Name(self.elem_type)}, which has no numpy equivalent") from None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ",".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of ``model`` (graph inputs that are not initializers), in order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"input {vi.name!r} is not a tensor ({vi.type.WhichOneof('value')}); only tensor inputs are supported")
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, tt.elem_type, shape))
    return specs


def _check_size(name: str, shape: Sequence[int], dtype: np.dtype) -> None:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > MAX_INPUT_BYTES:
        raise UsageError(f"input {name!r} of shape {list(shape)} ({np.dtype(dtype).name}) would take "
                         f"{nbytes / 2**30:.3g} GiB; refused (limit {MAX_INPUT_BYTES / 2**30:.0f} GiB per input)")


def resolve_shape(spec: InputSpec, input_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[int, ...]:
    """The concrete shape of ``spec``: its static dims, with dynamic ones taken from ``input_shapes``."""
    given = (input_shapes or {}).get(spec.name)
    if given is not None:
        named = [str(d) for d in given if isinstance(d, str)]
        if named:  # dims named on purpose (x=1,3,H,W) are symbols for the static analysis; a run needs numbers
            example = ",".join(str(d) if not isinstance(d, str) else "?" for d in given)
            raise UsageError(f"running the model needs concrete dims, but --input-shape {spec.name}="
                             f"{','.join(map(str, given))} names {', '.join(named)}; give integers: --input-shape "
                             f"{spec.name}={example} with each ? an integer (input_shapes= in Python)")
        given = tuple(int(d) for d in given)
        if spec.shape is not None:
            if len(given) != len(spec.shape):
                raise UsageError(f"--input-shape for {spec.name!r} has {len(given)} dims, the model's input has {len(spec.shape)}")
            for j, (d, g) in enumerate(zip(spec.shape, given)):
                if isinstance(d, int) and d > 0 and d != g:
                    raise UsageError(f"--input-shape for {spec.name!r}: dim {j} is fixed to {d} in the model, not {g}")
        if any(g <= 0 for g in given):
            raise UsageError(f"--input-shape for {spec.name!r}: dims must be positive, got {list(given)}")
        shape = given
    elif spec.shape is None or any(not isinstance(d, int) or d <= 0 for d in spec.shape):
        example = ",".join(str(d) if isinstance(d, int) and d > 0 else ("1" if j == 0 else f"D{j}")
                           for j, d in enumerate(spec.shape or ())) or "D0,D1,..."
        raise UsageError(f"input {spec.describe()} has dynamic dims; fix them with --input-shape {spec.name}={example} "
                         f"(input_shapes={{{spec.name!r}: [...]}} in Python)")
    else:
        shape = tuple(spec.shape)
    _check_size(spec.name, shape, spec.dtype)
    return shape


def random_array(rng: np.random.Generator, shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """Random values typical of the dtype: floats uniform in [0, 1) (image-like), ints in their range
    (8-bit) or in [0, 10) (wider ints: indices and counts), bools fair coin flips."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.random(shape, dtype=np.float32).astype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d comparison is a numpy scalar, which onnxruntime refuses
    if dtype.kind in "iu":
        if dtype.itemsize == 1:
            info = np.iinfo(dtype)
            return rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
        return rng.integers(0, 10, size=shape, dtype=dtype)
    if dtype.kind == "c":
        return (rng.random(shape) + 1j * rng.random(shape)).astype(dtype)
    raise ModelError(f"cannot make random values of type {dtype.name}")


class InputSet(Sequence):
    """A lazy sequence of samples (dicts name → array); ``describe`` says where they come from, ``names``
    what to call each sample in a report (its image files, else its index)."""

    def __init__(self, count: int, make: Callable[[int], Sample], describe: str, specs: list[InputSpec],
                 names: Sequence[str] | None = None):
        self._count, self._make, self.describe, self.specs = count, make, describe, specs
        self.names = list(names) if names is not None else [f"sample {i}" for i in range(count)]

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        if not -self._count <= i < self._count:
            raise IndexError(i)
        return self._make(i % self._count)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the first sample's arrays."""
        return {k: tuple(v.shape) for k, v in self[0].items()} if self._count else {}


def image_layout(shape: Sequence[int], dtype: np.dtype) -> str | None:
    """``"nchw"`` or ``"nhwc"`` when an input of this concrete shape and dtype looks like a batch of images
    (4 dims, 1–4 channels, at least 8×8, float or uint8), else None."""
    if len(shape) != 4 or not (np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.uint8):
        return None
    if shape[1] <= 4 and min(shape[2], shape[3]) >= 8:
        return "nchw"
    if shape[3] <= 4 and min(shape[1], shape[2]) >= 8:
        return "nhwc"
    return None


def random_inputs(specs: list[InputSpec], *, samples: int = 1, seed: int = 0,
                  input_shapes: Mapping[str, Sequence[int]] | None = None, mean=None, std=None) -> InputSet:
    """``samples`` generated input sets; sample ``i`` depends only on ``(seed, i)``. Inputs that look like
    images (:func:`image_layout`) get image-like pictures (:mod:`convgraph.run.synthetic`) in [0, 1] (uint8:
    0–255), then ``(x - mean) / std`` per channel when given; others random values of their dtype."""
    from .synthetic import natural_image

    shapes = {s.name: resolve_shape(s, input_shapes) for s in specs}
    layouts = {s.name: image_layout(shapes[s.name], s.dtype) for s in specs}
    for s in specs:
        s.dtype  # noqa: B018 - fail early on types numpy cannot hold
    norm = {}
    for s in specs:
        if layouts[s.name] and s.dtype.kind == "f":
            c = shapes[s.name][1 if layouts[s.name] == "nchw" else 3]
            norm[s.name] = (_floats(mean, "mean", c), _floats(std, "std", c))

    def images(rng: np.random.Generator, s: InputSpec) -> np.ndarray:
        n, *dims = shapes[s.name]
        c, h, w = dims if layouts[s.name] == "nchw" else (dims[2], dims[0], dims[1])
        batch = np.stack([natural_image(rng, c, h, w) for _ in range(n)])  # N C H W in [0, 1]
        if s.dtype == np.uint8:
            batch = np.round(batch * 255)
        else:
            m, d = norm[s.name]
            batch = (batch - m[:, None, None]) / d[:, None, None]
        if layouts[s.name] == "nhwc":
            batch = batch.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(batch, dtype=s.dtype)

    def make(i: int) -> Sample:
        rng = np.random.default_rng([seed, i])
        return {s.name: images(rng, s) if layouts[s.name] else random_array(rng, shapes[s.name], s.dtype)
                for s in specs}

    kind = "image-like" if any(layouts.values()) else "random"
    return InputSet(samples, make, f"{samples} generated {kind} sample{'s' * (samples != 1)} (seed {seed})", specs)


# ---- .npz -----------------------------------------------------------------------------------------
def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an .npz, read from the headers (nothing is loaded)."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = reader(f)
                headers[member[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ModelError(f"{path}: not a readable .npz file ({e})") from None
    return headers


def _split_samples(spec: InputSpec, shape: tuple[int, ...], where: str) -> tuple[int, bool]:
    """(number of samples, has an extra leading axis) for an array of ``shape`` fed to ``spec``."""
    dims = spec.shape

    def fits(s: tuple[int, ...]) -> bool:
        return dims is None or (len(s) == len(dims) and all(not isinstance(d, int) or d <= 0 or d == g for d, g in zip(dims, s)))

    if fits(shape):
        return 1, False
    if dims is not None and len(shape) == len(dims) + 1 and fits(shape[1:]):
        return shape[0], True
    # one axis holding several batches of a fixed batch dim, e.g. [100,3,H,W] for a [1,3,H,W] input
    if (dims is not None and len(shape) == len(dims) and len(dims) >= 1 and isinstance(dims[0], int) and dims[0] > 0
            and shape[0] % dims[0] == 0 and fits((dims[0],) + shape[1:])):
        return shape[0] // dims[0], False
    want = "?" if dims is None else "[" + ",".join("?" if not isinstance(d, int) or d <= 0 else str(d) for d in dims) + "]"
    raise ModelError(f"{where}: array {spec.name!r} has shape {list(shape)}, which does not fit the model's input {want} "
                     f"(a leading axis of samples is allowed)")


def _check_cast(name: str, have: np.dtype, want: np.dtype, where: str) -> None:
    """Floats to any float width, bools/ints to floats, ints to ints; nothing else (no silent truncation)."""
    if have == want or have.kind == want.kind or (have.kind in "iub" and want.kind == "f") or {have.kind, want.kind} <= set("iu"):
        return
    raise ModelError(f"{where}: array {name!r} is {have.name}, the model's input is {want.name}")


def arrays_inputs(arrays: Mapping[str, np.ndarray] | Callable[[str], np.ndarray],
                  meta: Mapping[str, tuple[tuple, np.dtype]], specs: list[InputSpec], *, samples: int | None,
                  where: str) -> InputSet:
    """Samples from named arrays (an .npz or a dict), each with an optional leading axis of samples;
    ``meta``: name → (shape, dtype) of each array, known before loading it."""
    names = [s.name for s in specs]
    shapes = {k: v[0] for k, v in meta.items()}
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ModelError(f"{where} has no array for input{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))} "
                         f"(it has: {', '.join(map(repr, shapes)) or 'nothing'})")
    extra = [k for k in shapes if k not in names]
    if extra:
        warnings.warn(f"{where}: arrays {', '.join(map(repr, extra))} are not inputs of the model; ignored", ConvGraphWarning, stacklevel=3)
    layout = {s.name: _split_samples(s, tuple(shapes[s.name]), where) for s in specs}
    for s in specs:
        _check_cast(s.name, np.dtype(meta[s.name][1]), s.dtype, where)
    counts = {n for n, _ in layout.values()}
    if len(counts) > 1:
        raise ModelError(f"{where}: arrays hold different numbers of samples: "
                         + ", ".join(f"{k}: {n}" for k, (n, _) in layout.items()))
    count = counts.pop() if counts else 1
    if count == 0:
        raise ModelError(f"{where}: arrays hold no samples")
    if samples is not None:
        count = min(count, samples)
    cache: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = arrays(name) if callable(arrays) else np.asarray(arrays[name])
        return cache[name]

    def make(i: int) -> Sample:
        sample = {}
        for s in specs:
            arr, (n, leading) = get(s.name), layout[s.name]
            if leading:
                arr = arr[i]
            elif n > 1:
                b = arr.shape[0] // n
                arr = arr[i * b:(i + 1) * b]
            _check_size(s.name, arr.shape, s.dtype)
            sample[s.name] = np.ascontiguousarray(arr, dtype=s.dtype)
        return sample

    return InputSet(count, make, f"{count} sample{'s' * (count != 1)} from {where}", specs)


def npz_inputs(path, specs: list[InputSpec], *, samples: int | None = None) -> InputSet:
    """Samples from an ``.npz`` of arrays named after the inputs (a leading axis of samples allowed)."""
    path = Path(os.fspath(path))
    headers = _npz_headers(path)
    for name, (shape, dtype) in headers.items():
        if dtype.hasobject:
            raise ModelError(f"{path}: array {name!r} holds Python objects; refused (only numeric arrays)")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > MAX_INPUT_BYTES:  # an array is loaded whole when first used
            raise ModelError(f"{path}: array {name!r} of shape {list(shape)} takes {nbytes / 2**30:.3g} GiB; refused "
                             f"(limit {MAX_INPUT_BYTES / 2**30:.0f} GiB per array: use fewer samples per file)")

    def load(name: str) -> np.ndarray:
        try:
            with np.load(path, allow_pickle=False) as z:
                return z[name]
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise ModelError(f"{path}: cannot read array {name!r} ({e})") from None

    return arrays_inputs(load, headers, specs, samples=samples, where=str(path))


# ---- image folders --------------------------------------------------------------------------------
def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading an image folder needs Pillow: pip install 'convgraph[images]'") from None
    return Image


def _floats(values, what: str, channels: int) -> np.ndarray:
    v = np.asarray([1.0 if values is None and what == "std" else 0.0] if values is None else list(values), dtype=np.float32)
    if v.size not in (1, channels):
        raise UsageError(f"--{what} takes 1 or {channels} values (one per channel), got {v.size}")
    if what == "std" and np.any(v == 0):
        raise UsageError("--std values must not be 0")
    return v


def image_inputs(folder, specs: list[InputSpec], *, image_size: Sequence[int] | None = None, mean=None, std=None,
                 layout: str = "nchw", samples: int | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> InputSet:
    """Samples from the images of ``folder`` (sorted by name): resized to ``image_size`` (H, W) with
    bilinear filtering, scaled to [0, 1], then ``(x - mean) / std`` per channel, in ``layout``.
    A model input with a fixed batch dim B takes B images per sample."""
    folder = Path(os.fspath(folder))
    layout = layout.lower()
    if layout not in ("nchw", "nhwc"):
        raise UsageError(f"--layout must be nchw or nhwc, not {layout!r}")
    if len(specs) != 1:
        raise UsageError(f"an image folder feeds a model with one input; this one has {len(specs)}: "
                         f"{', '.join(s.name for s in specs)} (use an .npz instead)")
    spec = specs[0]
    dims = list((input_shapes or {}).get(spec.name) or spec.shape or [None] * 4)
    if len(dims) != 4:
        raise UsageError(f"an image folder feeds a 4-D input ({layout}); {spec.describe()} has {len(dims)} dims")
    if spec.dtype.kind != "f" and spec.dtype != np.uint8:
        raise UsageError(f"input {spec.describe()} is {spec.dtype.name}; images feed float or uint8 inputs")
    static = [d if isinstance(d, int) and d > 0 else None for d in dims]
    batch, (c, h, w) = static[0] or 1, (static[1:] if layout == "nchw" else (static[3], static[1], static[2]))
    channels = c or 3
    if channels not in (1, 3):
        raise UsageError(f"input {spec.describe()} has {channels} channels in layout {layout}; images have 1 or 3 "
                         f"(is --layout right?)")
    if image_size is not None:
        size = [int(v) for v in image_size]
        if len(size) == 1:
            size = size * 2
        if len(size) != 2 or min(size) <= 0:
            raise UsageError(f"--image-size takes H,W (or one size for both), got {list(image_size)}")
        if (h and h != size[0]) or (w and w != size[1]):
            raise UsageError(f"--image-size {size[0]},{size[1]} disagrees with the model's input {spec.describe()}")
        h, w = size
    if not h or not w:
        raise UsageError(f"input {spec.describe()} has dynamic height/width: give --image-size H,W")
    _check_size(spec.name, (batch, channels, h, w), spec.dtype)
    mean_v, std_v = _floats(mean, "mean", channels), _floats(std, "std", channels)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < batch:
        raise ModelError(f"{folder}: {len(files)} image file{'s' * (len(files) != 1)} ({', '.join(IMAGE_SUFFIXES)}); "
                         f"at least {batch} needed")
    count = len(files) // batch
    if len(files) % batch:
        warnings.warn(f"{folder}: {len(files) % batch} image(s) left over after batches of {batch}; unused",
                      ConvGraphWarning, stacklevel=2)
    if samples is not None:
        count = min(count, samples)
    Image = _pillow()

    def read(p: Path) -> np.ndarray:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB" if channels == 3 else "L").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ModelError(f"{p}: cannot read image ({e})") from None
        if a.ndim == 2:
            a = a[:, :, None]
        if spec.dtype == np.uint8:
            return a.astype(np.uint8)
        return ((a / 255.0 - mean_v) / std_v).astype(np.float32)

    def make(i: int) -> Sample:
        batch_arr = np.stack([read(p) for p in files[i * batch:(i + 1) * batch]])  # N H W C
        if layout == "nchw":
            batch_arr = batch_arr.transpose(0, 3, 1, 2)
        return {spec.name: np.ascontiguousarray(batch_arr.astype(spec.dtype))}

    return InputSet(count, make, f"{count} sample{'s' * (count != 1)} of {batch} image{'s' * (batch != 1)} from {folder}",
                    specs, ["+".join(p.name for p in files[i * batch:(i + 1) * batch]) for i in range(count)])


# ---- one entry point ------------------------------------------------------------------------------
def _check_names(specs: list[InputSpec], input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    """Every name given a shape must be an input of the model (a typo is named, not taken for a missing shape)."""
    names = [s.name for s in specs]
    unknown = [k for k in (input_shapes or {}) if k not in names]
    if unknown:
        raise UsageError(f"--input-shape {unknown[0]}: the model has no input {unknown[0]!r}; its inputs: "
                         f"{', '.join(names) or 'none'}")


def make_inputs(model_or_specs, inputs=None, *, samples: int | None = None, seed: int = 0,
                input_shapes: Mapping[str, Sequence[int]] | None = None, image_size: Sequence[int] | None = None,
                mean=None, std=None, layout: str = "nchw", values: Mapping | None = None) -> InputSet:
    """Input samples for a model (ModelProto or list of :class:`InputSpec`).

    ``inputs``: None (random: ``samples`` sets, default 1), a path to an ``.npz`` or a folder of images,
    a dict name → array (a leading axis of samples allowed), a list of such dicts, or an InputSet.
    For given inputs, ``samples`` caps how many are used (default: all).
    ``values``: input name → fixed value (``--input-value``), that input's value in every sample.
    """
    specs = input_specs(model_or_specs) if isinstance(model_or_specs, onnx.ModelProto) else list(model_or_specs)
    if values:
        by_name = {s.name: s for s in specs}
        fixed = {k: np.asarray(v, by_name[k].dtype if k in by_name else None) for k, v in values.items()}
        fixed = {k: v.reshape(()) if k in by_name and by_name[k].shape == () else v for k, v in fixed.items()}
        base = make_inputs(specs, inputs, samples=samples, seed=seed, image_size=image_size, mean=mean, std=std,
                           layout=layout, input_shapes={**{k: v.shape for k, v in fixed.items()}, **(input_shapes or {})})
        return InputSet(len(base), lambda i: {**base[i], **fixed},
                        f"{base.describe}; {', '.join(fixed)} fixed by --input-value", specs, base.names)
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be at least 1, got {samples}")
    _check_names(specs, input_shapes)
    if inputs is None:
        return random_inputs(specs, samples=samples or 1, seed=seed, input_shapes=input_shapes, mean=mean, std=std)
    if isinstance(inputs, InputSet):
        return inputs
    # arrays are split into samples by the shapes the user fixed (a [32,3,H,W] array is 32 samples for an input
    # fixed at [1,3,H,W], one for an input of dynamic batch left so)
    arr_specs = [replace(sp, shape=tuple(input_shapes[sp.name])) if input_shapes and sp.name in input_shapes else sp
                 for sp in specs]
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(os.fspath(inputs))
        if path.is_dir():
            return image_inputs(path, specs, image_size=image_size, mean=mean, std=std, layout=layout,
                                samples=samples, input_shapes=input_shapes)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if path.suffix.lower() != ".npz":
            raise UsageError(f"{path}: --inputs takes an .npz file or a folder of images")
        return npz_inputs(path, arr_specs, samples=samples)
    if isinstance(inputs, Mapping):
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
        return arrays_inputs(arrays, {k: (v.shape, v.dtype) for k, v in arrays.items()}, arr_specs, samples=samples,
                             where="the given inputs")
    if isinstance(inputs, Sequence) and all(isinstance(x, Mapping) for x in inputs):
        given = list(inputs)[:samples] if samples else list(inputs)
        if not given:
            raise UsageError("the given list of input samples is empty")
        samples_arrays = [{k: np.asarray(v) for k, v in x.items()} for x in given]
        sets = [arrays_inputs(a, {k: (v.shape, v.dtype) for k, v in a.items()}, specs, samples=1, where=f"input sample {i}")
                for i, a in enumerate(samples_arrays)]
        return InputSet(len(sets), lambda i: sets[i][0], f"{len(sets)} given sample{'s' * (len(sets) != 1)}", specs)
    raise UsageError(f"inputs must be a path, a dict of arrays or a list of dicts, not {type(inputs).__name__}")
