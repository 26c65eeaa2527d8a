"""torch.nn modules."""

from fastcompress.nn.compress import (
    CompressedTokens,
    GlobalTokenExtractor,
    PoolingCompressor,
    UniCompressor,
)
from fastcompress.nn.mcq import CodebookEntry, MultiCodebookQuantizer

__all__ = [
    "CodebookEntry",
    "CompressedTokens",
    "GlobalTokenExtractor",
    "MultiCodebookQuantizer",
    "PoolingCompressor",
    "UniCompressor",
]
