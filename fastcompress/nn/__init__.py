"""torch.nn modules."""

from fastcompress.nn.compress import (
    CompressedTokens,
    GlobalTokenExtractor,
    PoolingCompressor,
    UniCompressor,
)
from fastcompress.nn.decoder import ARDecompressor, DecoderBlock
from fastcompress.nn.mcq import CodebookEntry, MultiCodebookQuantizer

__all__ = [
    "ARDecompressor",
    "DecoderBlock",
    "CodebookEntry",
    "CompressedTokens",
    "GlobalTokenExtractor",
    "MultiCodebookQuantizer",
    "PoolingCompressor",
    "UniCompressor",
]
