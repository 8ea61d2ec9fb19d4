"""convgraph: analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""

from typing import TYPE_CHECKING

from .errors import CheckFailed, ConvGraphError, ModelError, UsageError
from .model.graph import ConvGraph, save
from .errors import ConvGraphWarning
from .model.shapes import TensorInfo
from .model.loader import load
from .analysis.analyze import Analysis, analyze

if TYPE_CHECKING:
    from .engine.verify import VerifyReport, verify
    from .run.bench import BenchReport, bench

__version__ = "0.1.0"

#: Names imported on first use: ``convgraph analyze`` does not pay for what running a model needs.
_LAZY = {"BenchReport": ".run.bench", "bench": ".run.bench", "VerifyReport": ".engine.verify", "verify": ".engine.verify"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Analysis", "BenchReport", "CheckFailed", "ConvGraph", "ConvGraphError", "ConvGraphWarning", "ModelError", "TensorInfo", "UsageError",
    "VerifyReport", "analyze", "bench", "load", "save", "verify",
]
