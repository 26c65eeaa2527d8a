"""torch.nn modules."""

from fastcompress.nn.compress import (
    CompressedTokens,
    GlobalTokenExtractor,
    PoolingCompressor,
    UniCompressor,
)
from fastcompress.nn.decoder import ARDecompressor, DecoderBlock
from fastcompress.nn.grouped import GroupedQuantizer
from fastcompress.nn.mcq import CodebookEntry, MultiCodebookQuantizer, NormalizedEmbedding
from fastcompress.nn.voco import HybridAnchorProjector, assemble_hybrid_sequence

__all__ = [
    "ARDecompressor",
    "DecoderBlock",
    "CodebookEntry",
    "CompressedTokens",
    "GlobalTokenExtractor",
    "GroupedQuantizer",
    "HybridAnchorProjector",
    "MultiCodebookQuantizer",
    "NormalizedEmbedding",
    "PoolingCompressor",
    "UniCompressor",
    "assemble_hybrid_sequence",
]
