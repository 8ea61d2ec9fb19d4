"""convgraph: analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""

from .errors import CheckFailed, ConvGraphError, ModelError, UsageError
from .model.graph import ConvGraph, save
from .errors import ConvGraphWarning
from .model.shapes import TensorInfo
from .model.loader import load
from .analysis.analyze import Analysis, analyze
from .run.bench import BenchReport, bench
from .engine.verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Analysis", "BenchReport", "CheckFailed", "ConvGraph", "ConvGraphError", "ConvGraphWarning", "ModelError", "TensorInfo", "UsageError",
    "VerifyReport", "analyze", "bench", "load", "save", "verify",
]
