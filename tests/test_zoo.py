"""convgraph.zoo: fetching real models from PyPI wheels, caching, errors (offline with a fake pip)."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from convgraph import zoo
from convgraph.errors import ModelError

WHEEL_DIRS = {"rapidocr-onnxruntime==1.4.4": "rapidocr_onnxruntime/models", "nudenet==3.4.2": "nudenet"}
REAL_INPUTS = {
    "ppocr-det": [1, 3, 640, 640],
    "ppocr-rec": [1, 3, 48, 320],
    "ppocr-cls": [1, 3, 48, 192],
    "yolov8n": [1, 3, 320, 320],
    "orientation": [1, 3, 224, 224],
}


class FakePip:
    """Stands in for ``subprocess.run``: writes a wheel holding fake members for the requirement."""

    def __init__(self, *, returncode: int = 0, stderr: str = "", skip: str | None = None, delay: float = 0.0):
        self.calls: list[str] = []
        self.returncode, self.stderr, self.skip, self.delay = returncode, stderr, skip, delay

    @staticmethod
    def content(suffix: str) -> bytes:
        return f"fake onnx {suffix}".encode()

    def __call__(self, cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        requirement = cmd[-1]
        self.calls.append(requirement)
        time.sleep(self.delay)
        if self.returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            with zipfile.ZipFile(dest / "pkg-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr("pkg/__init__.py", "")
                for req, suffix in zoo.REAL_MODELS.values():
                    if req == requirement and suffix != self.skip:
                        zf.writestr(f"{WHEEL_DIRS[req]}/{suffix}", self.content(suffix))
        return subprocess.CompletedProcess(cmd, self.returncode, "", self.stderr)


@pytest.fixture
def fake_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, with hashes that match :class:`FakePip`'s members."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVGRAPH_CACHE", str(cache))
    hashes = {n: hashlib.sha256(FakePip.content(s)).hexdigest() for n, (_, s) in zoo.REAL_MODELS.items()}
    monkeypatch.setattr(zoo, "SHA256", hashes)
    return cache


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the model is cached")


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVGRAPH_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CONVGRAPH_CACHE")
    repo = Path(zoo.__file__).resolve().parent.parent
    assert zoo.cache_dir() == repo / ".cache" / "models"  # tests run from a checkout


def test_unknown_name() -> None:
    with pytest.raises(ModelError, match="unknown real model"):
        zoo.fetch("resnet-9000")
    assert zoo.main(["resnet-9000"]) == 2


def test_fetch_extracts_whole_wheel_once(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    pip = FakePip()
    monkeypatch.setattr(zoo.subprocess, "run", pip)
    path = zoo.fetch("ppocr-det")
    assert path == fake_cache / "ppocr-det.onnx"
    assert path.read_bytes() == FakePip.content("ch_PP-OCRv4_det_infer.onnx")
    assert pip.calls == ["rapidocr-onnxruntime==1.4.4"]
    # the other members of the same wheel came along; nothing else was downloaded
    assert sorted(p.name for p in fake_cache.glob("*.onnx")) == ["ppocr-cls.onnx", "ppocr-det.onnx", "ppocr-rec.onnx"]
    assert not list(fake_cache.glob("*.tmp"))

    monkeypatch.setattr(zoo.subprocess, "run", _fail_if_called)
    assert zoo.fetch("ppocr-det") == path
    assert zoo.fetch("ppocr-rec") == fake_cache / "ppocr-rec.onnx"


def test_pip_failure_is_download_error(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    stderr = "WARNING: Retrying...\nERROR: Could not find a version that satisfies the requirement nudenet==3.4.2\n"
    monkeypatch.setattr(zoo.subprocess, "run", FakePip(returncode=1, stderr=stderr))
    with pytest.raises(zoo.DownloadError) as info:
        zoo.fetch("yolov8n")
    message = str(info.value)
    assert "\n" not in message and "Could not find a version" in message
    assert not (fake_cache / "yolov8n.onnx").exists()
    assert zoo.main(["yolov8n"]) == 2


def test_pip_missing_is_download_error(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    def no_python(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(zoo.subprocess, "run", no_python)
    with pytest.raises(zoo.DownloadError, match="cannot run pip"):
        zoo.fetch("yolov8n")


def test_missing_member_is_model_error(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    monkeypatch.setattr(zoo.subprocess, "run", FakePip(skip="320n.onnx"))
    with pytest.raises(ModelError, match="320n.onnx is not in the wheel") as info:
        zoo.fetch("yolov8n")
    assert not isinstance(info.value, zoo.DownloadError)


def test_bad_hash_leaves_nothing(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    monkeypatch.setattr(zoo.subprocess, "run", FakePip())
    monkeypatch.setitem(zoo.SHA256, "yolov8n", "0" * 64)
    with pytest.raises(ModelError, match="SHA-256"):
        zoo.fetch("yolov8n")
    assert not list(fake_cache.glob("*.onnx")) and not list(fake_cache.glob("*.tmp"))


def test_concurrent_fetch_downloads_once(monkeypatch: pytest.MonkeyPatch, fake_cache: Path) -> None:
    pip = FakePip(delay=0.2)
    monkeypatch.setattr(zoo.subprocess, "run", pip)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda n=n: results.append(zoo.fetch(n))) for n in ("ppocr-det", "ppocr-rec")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [fake_cache / "ppocr-det.onnx", fake_cache / "ppocr-rec.onnx"]
    assert pip.calls == ["rapidocr-onnxruntime==1.4.4"]


def test_main_prints_paths(
    monkeypatch: pytest.MonkeyPatch, fake_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(zoo.subprocess, "run", FakePip())
    assert zoo.main(["ppocr-cls", "yolov8n"]) == 0
    assert capsys.readouterr().out.split() == [str(fake_cache / "ppocr-cls.onnx"), str(fake_cache / "yolov8n.onnx")]


@pytest.mark.real
@pytest.mark.parametrize("name", list(zoo.REAL_MODELS))
def test_real_model_fetch_and_run(
    real_models: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    ort = pytest.importorskip("onnxruntime")
    path = real_models(name)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == zoo.SHA256[name]

    monkeypatch.setattr(zoo.subprocess, "run", _fail_if_called)
    assert zoo.fetch(name) == path  # cached: no second download

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert any(n.op_type == "Conv" for n in model.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random(REAL_INPUTS[name], dtype=np.float32)
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    assert all(np.isfinite(o).all() for o in outputs)
