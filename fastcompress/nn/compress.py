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
    ``nn.MultiheadAttention(dim, num_heads, batch_first=True, ...)`` built with the same
    ``dropout``, ``add_bias_kv``, ``add_zero_attn``, ``kdim`` and ``vdim``, so an existing
    attention's weights load into ``extractor.attn`` unchanged (a state dict with
    ``bias_k`` or separate ``*_proj_weight`` keys that this extractor was not built for
    is refused with the argument to set).
    ``forward(x (B, T, kdim)) -> (B, N_g, d)``.

    The fused pass serves the plain attention (and dropout outside training). What it
    cannot express, it leaves to ``self.attn`` itself, with the same numbers and random
    stream: dropout in training, ``add_bias_kv``, ``add_zero_attn`` and ``kdim``/``vdim``
    unlike ``dim`` (these also hold for an ``attn`` assigned after construction).
    ``fused_unsupported_reason()`` says which applies.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int = 4,
        bias: bool = True,
        backend: str | None = None,
        dropout: float = 0.0,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
    ) -> None:
        super().__init__()
        if (kdim or dim) != (vdim or dim):
            raise ValueError(
                f"kdim={kdim} and vdim={vdim} must be equal: the tokens x are both the "
                f"keys and the values"
            )
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5)
        self.attn = nn.MultiheadAttention(
            dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=True,
        )
        self.backend = backend

    def fused_unsupported_reason(self) -> str | None:
        """Why ``forward`` runs ``self.attn`` instead of the fused pass, or None."""
        attn = self.attn
        if attn.dropout > 0 and attn.training:
            return f"attention dropout {attn.dropout:g} in training"
        if attn.bias_k is not None:
            return "add_bias_kv"
        if attn.add_zero_attn:
            return "add_zero_attn"
        if not attn._qkv_same_embed_dim:
            return f"kdim={attn.kdim}, vdim={attn.vdim} differ from dim={attn.embed_dim}"
        return None

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

    def attend_unfused(self, x: Tensor) -> Tensor:
        """``self.attn(queries, x, x)`` for every sample, batch-first in and out."""
        queries = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1).to(x.dtype)
        if not self.attn.batch_first:
            out = self.attn(queries.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0]
            return out.transpose(0, 1)
        return self.attn(queries, x, x, need_weights=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_unsupported_reason() is not None:
            return self.attend_unfused(x)
        return meta_token_attention(x, *self.attention_weights(), backend=self.backend)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        attn = prefix + "attn."
        needs = {
            "bias_k": ("add_bias_kv=True", self.attn.bias_k is not None),
            "q_proj_weight": (
                "kdim/vdim of the saved attention",
                not self.attn._qkv_same_embed_dim,
            ),
        }
        for key, (argument, built) in needs.items():
            if attn + key in state_dict and not built:
                raise ValueError(
                    f"the state dict has {attn + key}: build GlobalTokenExtractor with "
                    f"{argument} to load it (this one was built without)"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
        if self.extractor.fused_unsupported_reason() is not None:
            meta, pooled = self.extractor.attend_unfused(x), self.pooling(x)
        else:
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
