"""UniCompress compressor modules: meta-token extraction, pooling, and both together."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastcompress.compress import compress, meta_token_attention, pool_compress
from fastcompress.mcq import MCQOutput
from fastcompress.nn.mcq import MultiCodebookQuantizer


class GlobalTokenExtractor(nn.Module):
    """``num_tokens`` learned meta queries cross-attending to all tokens (unidirectional).

    State dict: ``queries (N_g, d)`` and ``attn.*``, the keys of an
    ``nn.MultiheadAttention(dim, num_heads, batch_first=True)``, so an existing
    attention's weights load into ``extractor.attn`` unchanged.
    ``forward(x (B, T, d)) -> (B, N_g, d)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int = 4,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(dim, num_heads, bias=bias, batch_first=True)
        self.backend = backend

    def attention_weights(self) -> tuple:
        attn = self.attn
        return (
            self.queries,
            attn.in_proj_weight,
            attn.in_proj_bias,
            attn.out_proj.weight,
            attn.out_proj.bias,
            attn.num_heads,
        )

    def forward(self, x: Tensor) -> Tensor:
        return meta_token_attention(x, *self.attention_weights(), backend=self.backend)


class PoolingCompressor(nn.Module):
    """Non-overlapping ``stride x stride`` average over a row-major ``grid`` of tokens.
    ``forward(x (B, H*W, d)) -> (B, H*W / stride^2, d)``."""

    def __init__(self, grid: tuple[int, int], stride: int = 2) -> None:
        super().__init__()
        self.grid, self.stride = tuple(grid), stride

    def forward(self, x: Tensor) -> Tensor:
        return pool_compress(x, self.grid, self.stride)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, stride={self.stride}"


class CompressedTokens(NamedTuple):
    """``meta (B, N_g, d)`` and ``pooled (B, T/s^2, d)``: the continuous representation
    (understanding). With a quantizer: ``quantized`` is the MCQ output of the compact
    sequence ``[meta; pooled]`` (``z_q (B, N_g + T/s^2, d)``, ``indices (B, N_g + T/s^2,
    G)``: the discrete representation for generation) and ``usage`` its usage percent."""

    meta: Tensor
    pooled: Tensor
    quantized: MCQOutput | None = None
    usage: Tensor | None = None


class UniCompressor(nn.Module):
    """UniCompress compressor: meta tokens + pooling from one pass over X, optionally
    quantised through a :class:`MultiCodebookQuantizer` (dual representation)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid: tuple[int, int],
        stride: int = 2,
        num_meta_tokens: int = 4,
        quantizer: MultiCodebookQuantizer | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.extractor = GlobalTokenExtractor(dim, num_heads, num_meta_tokens, backend=backend)
        self.pooling = PoolingCompressor(grid, stride)
        self.quantizer = quantizer
        self.backend = backend

    @property
    def num_compressed_tokens(self) -> int:
        height, width = self.pooling.grid
        return self.extractor.queries.shape[0] + height * width // self.pooling.stride**2

    def forward(self, x: Tensor) -> CompressedTokens:
        meta, pooled = compress(
            x,
            self.pooling.grid,
            self.pooling.stride,
            *self.extractor.attention_weights(),
            backend=self.backend,
        )
        if self.quantizer is None:
            return CompressedTokens(meta, pooled)
        quantized, usage = self.quantizer.quantize(torch.cat([meta, pooled], dim=1))
        return CompressedTokens(meta, pooled, quantized, usage)
