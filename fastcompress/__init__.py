"""fastcompress: fused kernels for visual-token compression in unified multimodal models."""

from fastcompress._backend import BackendUnavailableError, available_backends
from fastcompress._version import __version__ as __version__
from fastcompress.compress import compress, meta_token_attention, pool_compress
from fastcompress.decode import decode_attention
from fastcompress.mcq import MCQOutput, mcq_dequantize, mcq_quantize, mcq_search
from fastcompress.voco import (
    VocoLayout,
    compact_kv_cache,
    voco_attention,
    voco_mask,
    voco_mask_mod,
)

__all__ = [
    "BackendUnavailableError",
    "MCQOutput",
    "VocoLayout",
    "available_backends",
    "compact_kv_cache",
    "compress",
    "decode_attention",
    "mcq_dequantize",
    "mcq_quantize",
    "mcq_search",
    "meta_token_attention",
    "pool_compress",
    "voco_attention",
    "voco_mask",
    "voco_mask_mod",
]
