"""convgraph: analyze and rewrite the convolution layers of ONNX models, verified with onnxruntime."""

from .errors import CheckFailed, ConvGraphError, ModelError, UsageError
from .graph import ConvGraph, ConvGraphWarning, TensorInfo, load, save

__version__ = "0.1.0"

__all__ = [
    "CheckFailed", "ConvGraph", "ConvGraphError", "ConvGraphWarning", "ModelError", "TensorInfo", "UsageError",
    "load", "save",
]
