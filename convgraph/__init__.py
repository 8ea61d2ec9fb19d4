"""convgraph: analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""

from .errors import CheckFailed, ConvGraphError, ModelError, UsageError
from .graph import ConvGraph, save
from .errors import ConvGraphWarning
from .shapes import TensorInfo
from .loader import load
from .analyze import Analysis, analyze
from .bench import BenchReport, bench
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "Analysis", "BenchReport", "CheckFailed", "ConvGraph", "ConvGraphError", "ConvGraphWarning", "ModelError", "TensorInfo", "UsageError",
    "VerifyReport", "analyze", "bench", "load", "save", "verify",
]
