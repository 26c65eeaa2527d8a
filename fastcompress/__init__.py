"""fastcompress: fused kernels for visual-token compression in unified multimodal models."""

from fastcompress._backend import BackendUnavailableError, available_backends
from fastcompress.compress import compress, meta_token_attention, pool_compress
from fastcompress.decode import decode_attention
from fastcompress.mcq import MCQOutput, mcq_dequantize, mcq_quantize, mcq_search

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "MCQOutput",
    "available_backends",
    "compress",
    "decode_attention",
    "mcq_dequantize",
    "mcq_quantize",
    "mcq_search",
    "meta_token_attention",
    "pool_compress",
]
