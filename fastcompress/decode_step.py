"""The fused CPU decode step of :class:`fastcompress.nn.ARDecompressor`.

One generated token is one call of ``fastcompress_cpu::decoder_step`` (C++,
``csrc/cpu/decode_step_kernels.inc``): every layer's norms, projections, cache append,
self- and cross-attention, MLP, then the final norm and head. At batch 1 a step is
bound by reading the weights (~60 MB at dim 512, depth 4), and the per-op dispatch of
~150 ATen calls plus a single-threaded batch-1 GEMV cost more than that read; see
``benchmarks/NOTES.md`` section 3.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from fastcompress import _backend

PARAMS_PER_LAYER = 18


@functools.cache
def _load() -> None:
    from fastcompress import _ext

    _ext.load_cpu_extension()  # raises with the build error if it is unavailable

    @torch.library.register_fake("fastcompress_cpu::decoder_step")
    def _(x, params, cache_k, cache_v, ctx_k, ctx_v, position, heads, eps, gelu_tanh):
        return x.new_empty(x.shape[0], params[-1].shape[0])


def unsupported_reason(model: nn.Module, context: Tensor) -> str | None:
    """Why the fused step cannot run ``model`` on ``context``, or None if it can."""
    if context.device.type != "cpu":
        return f"it takes CPU tensors, got device {context.device}"
    if model.pos.dtype != torch.float32:
        return f"it takes float32 weights, got {model.pos.dtype}"
    norms = [model.norm] + [n for b in model.blocks for n in (b.norm1, b.norm2, b.norm3)]
    if any(n.weight is None or n.bias is None or n.eps != model.norm.eps for n in norms):
        return "every LayerNorm must be affine with one eps"
    for block in model.blocks:
        mlp = block.mlp
        if not (
            len(mlp) == 3
            and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.GELU)
            and isinstance(mlp[2], nn.Linear)
        ):
            return "the MLP must be Linear, GELU, Linear"
    if not _backend.cpu_extension_available():
        from fastcompress import _ext

        return f"the C++ CPU extension is unavailable: {_ext.cpu_error()}"
    return None


def pack_params(model: nn.Module) -> list[Tensor]:
    """The weights in the op's order (see the C++ header comment); no copies."""
    params: list[Tensor] = []
    for b in model.blocks:
        for module in (b.norm1, b.qkv, b.proj, b.norm2, b.cross_q, b.cross_proj, b.norm3):
            params += [module.weight, module.bias]
        params += [b.mlp[0].weight, b.mlp[0].bias, b.mlp[2].weight, b.mlp[2].bias]
    params += [model.norm.weight, model.norm.bias, model.head.weight, model.head.bias]
    return [p.detach().contiguous() for p in params]


def decoder_step(
    x: Tensor,
    params: list[Tensor],
    cache_k: list[Tensor],
    cache_v: list[Tensor],
    ctx_k: list[Tensor],
    ctx_v: list[Tensor],
    position: int,
    heads: int,
    eps: float = 1e-5,
    gelu_tanh: bool = False,
) -> Tensor:
    """One decode step of every layer, the final norm and the head.

    Parameters
    ----------
    x : ``(B, dim)`` float32, the input token (embedding + position + local evidence).
    params : ``PARAMS_PER_LAYER * depth + 4`` tensors in :func:`pack_params` order.
    cache_k, cache_v : per layer ``(B, S, H, D)``; written at ``position`` (in place).
    ctx_k, ctx_v : per layer ``(B, Lc, H, D)``, the cross-attention keys and values.
    position : the index of this token; self-attention reads positions ``0..position``.

    Returns
    -------
    ``(B, out_dim)``: the head's output for this position.
    """
    _load()
    return torch.ops.fastcompress_cpu.decoder_step(
        x, params, cache_k, cache_v, ctx_k, ctx_v, position, heads, eps, gelu_tanh
    )
