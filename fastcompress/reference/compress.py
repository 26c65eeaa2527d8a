"""Plain-torch UniCompress compressor: ``avg_pool2d`` over the token grid and
``nn.MultiheadAttention`` (batch_first) of learned meta queries over all tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def pool_compress_reference(x: Tensor, grid: tuple[int, int], stride: int) -> Tensor:
    """``x (B, T, d)`` on a row-major ``H x W`` grid -> ``(B, T / s^2, d)`` row-major."""
    batch, _, dim = x.shape
    height, width = grid
    image = x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
    return F.avg_pool2d(image, stride).flatten(2).transpose(1, 2)


def meta_token_attention_reference(
    x: Tensor,
    queries: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    num_heads: int,
) -> Tensor:
    """``nn.MultiheadAttention(d, num_heads, batch_first=True)(Q, X, X)[0]`` with these
    weights; ``queries (N_g, d)`` shared by the batch -> ``(B, N_g, d)``."""
    batch, _, dim = x.shape
    q = queries.unsqueeze(0).expand(batch, -1, -1).transpose(0, 1)
    kv = x.transpose(0, 1)
    out, _ = F.multi_head_attention_forward(
        q,
        kv,
        kv,
        dim,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        None,
        None,
        False,
        0.0,
        out_proj_weight,
        out_proj_bias,
        training=False,
        need_weights=False,
    )
    return out.transpose(0, 1)


def compress_reference(
    x,
    grid,
    stride,
    queries,
    in_proj_weight,
    in_proj_bias,
    out_proj_weight,
    out_proj_bias,
    num_heads,
) -> tuple[Tensor, Tensor]:
    """``(G (B, N_g, d), X_hat (B, T / s^2, d))``."""
    meta = meta_token_attention_reference(
        x, queries, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads
    )
    return meta, pool_compress_reference(x, grid, stride)


def compress_folded_einsum(
    x,
    grid,
    stride,
    queries,
    in_proj_weight,
    in_proj_bias,
    out_proj_weight,
    out_proj_bias,
    num_heads,
) -> tuple[Tensor, Tensor]:
    """The best plain-torch formulation (a benchmark peer): the key projection folded into
    the queries and the value projection applied after the weighted sum, as einsums."""
    batch, tokens, dim = x.shape
    head_dim = dim // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, _, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(queries, w_q, b_q).view(-1, num_heads, head_dim)
    folded = torch.einsum("nhe,hed->nhd", q, w_k.view(num_heads, head_dim, dim)) * head_dim**-0.5
    probs = torch.einsum("btd,nhd->bnht", x, folded).softmax(-1)
    context = torch.einsum("bnht,btd->bnhd", probs, x)
    heads = torch.einsum("bnhd,hed->bnhe", context, w_v.view(num_heads, head_dim, dim))
    if b_v is not None:
        heads = heads + b_v.view(num_heads, head_dim)
    meta = F.linear(heads.reshape(batch, -1, dim), out_proj_weight, out_proj_bias)
    return meta, pool_compress_reference(x, grid, stride)
