"""fastcompress: fused kernels for visual-token compression in unified multimodal models."""

from fastcompress._backend import BackendUnavailableError, available_backends
from fastcompress.mcq import MCQOutput, mcq_dequantize, mcq_quantize, mcq_search

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MCQOutput",
    "available_backends",
    "mcq_dequantize",
    "mcq_quantize",
    "mcq_search",
]
