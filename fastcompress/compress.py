"""UniCompress compressor: 2x2 / 4x4 pooling fused with meta-token cross-attention.

``compress(x, grid, stride, queries, <MultiheadAttention weights>)`` returns
``(G, X_hat)`` with the numbers of ``avg_pool2d`` + ``nn.MultiheadAttention``
(batch_first) but reads X once: scores of head h are ``x_j . (W_k,h^T q_h) / sqrt(d_h)``
(the key bias is constant over j and cancels in the softmax) and the output is
``(sum_j p_j x_j) W_v,h^T + b_v,h`` (the weights sum to one). The X pass is the custom
op ``fastcompress::meta_context_pool``; folding the queries and finishing with W_v and
out_proj are small torch ops, so autograd reaches every weight. Eager float32 CPU calls
without autograd take ``fastcompress_cpu::compress_forward`` instead: the same three
steps in one C++ call.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcompress._autocast import (
    float32_under_autocast,
    register_float32_autocast,
    without_autocast,
)
from fastcompress._backend import (
    declare_gpu_kernels,
    record,
    requested_backend,
    select_backend,
    shape_fallback,
)
from fastcompress._parity import assert_close
from fastcompress._validate import FLOAT_DTYPES, check_finite, check_same, check_tensor
from fastcompress.reference.compress import (
    meta_token_attention_reference,
    pool_compress_reference,
)
from fastcompress.reference.mcq import compute_dtype


def _check_grid(x: Tensor, grid: tuple[int, int], stride: int) -> tuple[int, int]:
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(int(g) > 0 for g in grid)):
        raise ValueError(f"grid must be (H, W) with positive sizes, got {grid!r}")
    height, width = int(grid[0]), int(grid[1])
    if stride not in (2, 4):
        raise ValueError(f"stride must be 2 or 4, got {stride}")
    if height * width != x.shape[1]:
        raise ValueError(
            f"x has T={x.shape[1]} tokens but grid {height}x{width} has {height * width}"
        )
    if height % stride or width % stride:
        raise ValueError(f"grid {height}x{width} is not divisible by stride {stride}")
    if x.shape[0] == 0:
        raise ValueError("x has an empty batch (B = 0)")
    return height, width


def _check_attention(
    x, queries, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads
) -> None:
    dim = x.shape[-1]
    check_tensor("queries", queries)
    if queries.dim() != 2 or queries.shape[1] != dim or queries.shape[0] == 0:
        raise ValueError(
            f"queries must be 2-D (N_g, d={dim}) with N_g > 0, got {tuple(queries.shape)}"
            + ("; for a (1, N_g, d) parameter pass queries[0]" if queries.dim() == 3 else "")
        )
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide d={dim}")
    expected = {
        "in_proj_weight": (in_proj_weight, (3 * dim, dim)),
        "in_proj_bias": (in_proj_bias, (3 * dim,)),
        "out_proj_weight": (out_proj_weight, (dim, dim)),
        "out_proj_bias": (out_proj_bias, (dim,)),
    }
    for name, (value, shape) in expected.items():
        if value is None and name.endswith("bias"):
            continue
        check_tensor(name, value)
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} for d={dim}, got {tuple(value.shape)}"
            )
    for name, value in (
        ("queries", queries),
        ("in_proj_weight", in_proj_weight),
        ("in_proj_bias", in_proj_bias),
        ("out_proj_weight", out_proj_weight),
        ("out_proj_bias", out_proj_bias),
    ):
        if value is not None:
            check_same(name, value, "x", x)


def fold_queries(
    queries: Tensor, in_proj_weight: Tensor, in_proj_bias: Tensor | None, num_heads: int
) -> Tensor:
    """``(N_g * heads, d)`` float32: row ``n * heads + h`` is ``W_k,h^T q_{n,h} / sqrt(d_h)``."""
    dim = queries.shape[-1]
    head_dim = dim // num_heads
    w_q, w_k, _ = in_proj_weight.float().chunk(3)
    b_q = in_proj_bias.float().chunk(3)[0] if in_proj_bias is not None else None
    q = F.linear(queries.float(), w_q, b_q).view(-1, num_heads, head_dim)
    folded = torch.einsum("nhe,hed->nhd", q, w_k.view(num_heads, head_dim, dim))
    return (folded * head_dim**-0.5).reshape(-1, dim)


def finish_meta(
    context: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    num_heads: int,
) -> Tensor:
    """``context (B, N_g * heads, d)`` -> meta tokens ``(B, N_g, d)`` (value + out proj)."""
    batch, _, dim = context.shape
    head_dim = dim // num_heads
    w_v = in_proj_weight.float().chunk(3)[2].view(num_heads, head_dim, dim)
    heads = torch.einsum("bnhd,hed->bnhe", context.view(batch, -1, num_heads, dim), w_v)
    if in_proj_bias is not None:
        heads = heads + in_proj_bias.float().chunk(3)[2].view(num_heads, head_dim)
    out_bias = out_proj_bias.float() if out_proj_bias is not None else None
    return F.linear(heads.reshape(batch, -1, dim), out_proj_weight.float(), out_bias)


# ---------------------------------------------------------------- the X-pass custom op


def _probabilities(xf: Tensor, folded: Tensor) -> Tensor:
    """``(B, M, T)`` softmax over tokens. The scores are one (B*T, d) x (d, M) GEMM, then
    transposed (B*T*M floats, small) so that the softmax runs over the contiguous dim."""
    batch, tokens, dim = xf.shape
    scores = torch.mm(xf.reshape(-1, dim), folded.T).view(batch, tokens, -1)
    return scores.transpose(1, 2).contiguous().softmax(-1)


def _context_pool_torch(x: Tensor, folded: Tensor, grid: tuple[int, int], stride: int):
    xf = x.to(compute_dtype(x))
    context = torch.bmm(_probabilities(xf, folded), xf)
    if stride == 0:
        return context, x.new_empty((x.shape[0], 0, x.shape[2]))
    return context, pool_compress_reference(x, grid, stride)


# Low-level registration (as for decode_attention): the custom_op Python wrapper added a
# fixed ~0.2-0.3 ms per call, which at d = 64 is a quarter of the whole op.
_LIB = torch.library.Library("fastcompress", "FRAGMENT")
_LIB.define(
    "meta_context_pool(Tensor x, Tensor folded, int grid_h, int grid_w, int stride, str backend)"
    " -> (Tensor, Tensor)"
)


def check_context_pool_args(
    x: Tensor, folded: Tensor, grid_h: int, grid_w: int, stride: int
) -> None:
    """The op's own checks (the op and its fake run them, so direct ``torch.ops`` calls
    and traced graphs are refused like the public functions)."""
    # float64 too: gradcheck runs the op in float64 on the reference backend.
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_tensor("folded", folded, ndim=2, dtypes=(torch.float32, torch.float64))
    batch, tokens, dim = x.shape
    if folded.shape[1] != dim or folded.shape[0] == 0:
        raise ValueError(f"folded must be (M > 0, d={dim}), got {tuple(folded.shape)}")
    if folded.device != x.device:
        raise ValueError(f"folded is on {folded.device} but x is on {x.device}")
    if batch == 0 or tokens == 0 or dim == 0:
        raise ValueError(f"x must have B, T, d > 0, got shape {tuple(x.shape)}")
    if stride not in (0, 2, 4):
        raise ValueError(f"stride must be 0 (no pooling), 2 or 4, got {stride}")
    if stride and (grid_h * grid_w != tokens or grid_h % stride or grid_w % stride):
        raise ValueError(
            f"grid {grid_h}x{grid_w} must hold the T={tokens} tokens and be divisible by "
            f"stride {stride}"
        )


def _meta_context_pool_impl(
    x: Tensor, folded: Tensor, grid_h: int, grid_w: int, stride: int, backend: str
) -> tuple[Tensor, Tensor]:
    check_context_pool_args(x, folded, grid_h, grid_w, stride)
    name = select_backend(x.device, backend, op="compress")
    # NaN in a folded query might be dropped by a kernel's running max instead of
    # propagating: checked here (M x d floats), before any kernel.
    if not bool(torch.isfinite(folded).all()):
        raise ValueError(
            "compress: queries, in_proj_weight or in_proj_bias contains NaN or inf "
            "(the folded queries are not finite)"
        )
    if name == "triton":
        from fastcompress.triton_kernels.compress import unsupported_reason

        reason = unsupported_reason(grid_w, stride, folded.shape[0])
        name = shape_fallback(name, backend, reason, op="compress")
    if name == "triton":
        from fastcompress.triton_kernels.compress import meta_context_pool_triton

        context, pooled = meta_context_pool_triton(
            x.contiguous(), folded.contiguous(), (grid_h, grid_w), stride
        )
    elif name == "cuda":
        from fastcompress._backend import BackendUnavailableError

        raise BackendUnavailableError(
            "compress: there is no CUDA C++ kernel for this op; use 'triton'"
        )
    elif name == "cpu" and x.dtype == torch.float32:  # the fused C++ pass over X
        context, pooled = torch.ops.fastcompress_cpu.meta_context_pool(
            x.contiguous(), folded.contiguous(), grid_h, grid_w, stride
        )
    else:  # reference, and cpu in bf16/f16: the folded formulation in torch (MKL GEMMs)
        context, pooled = _context_pool_torch(x, folded, (grid_h, grid_w), stride)
    # Every token enters every score, so NaN or inf anywhere in x reaches the small
    # (B, M, d) context: checking it replaces a pass over X (which cost as much as the
    # whole op at d = 64). Raised before anything is returned.
    if context.numel() and not bool(torch.isfinite(context).all()):
        check_finite("x", x)
        raise ValueError("compress: the attention scores overflow float32 (x is too large)")
    return context, pooled


_LIB.impl("meta_context_pool", _meta_context_pool_impl, "CPU")
_LIB.impl("meta_context_pool", _meta_context_pool_impl, "CUDA")
_meta_context_pool_op = torch.ops.fastcompress.meta_context_pool.default
register_float32_autocast(_LIB, "meta_context_pool")


@torch.library.register_fake("fastcompress::meta_context_pool")
def _(x, folded, grid_h, grid_w, stride, backend):
    check_context_pool_args(x, folded, grid_h, grid_w, stride)
    batch, tokens, dim = x.shape
    pooled = tokens // stride**2 if stride else 0
    return (
        x.new_empty((batch, folded.shape[0], dim), dtype=torch.float32),
        x.new_empty((batch, pooled, dim)),
    )


def _context_pool_setup(ctx, inputs, output):
    x, folded, grid_h, grid_w, stride, _ = inputs
    ctx.save_for_backward(x, folded)
    ctx.geometry = (grid_h, grid_w, stride)


@without_autocast
def _context_pool_backward(ctx, grad_context, grad_pooled):
    # Attention backward with K = V = X and only M = N_g * heads queries: the (B, M, T)
    # probabilities are recomputed (small), never a T x T or T x d*d intermediate. X-sized
    # traffic is what costs: dX = P^T dC + dS^T F is one batched GEMM over the stacked
    # [P; dS] (K = 2M), written once, and the pooled gradient is added in place, instead
    # of a zero-filled dX and a temporary per term (4 extra passes over B x T x d).
    x, folded = ctx.saved_tensors
    grid_h, grid_w, stride = ctx.geometry
    batch, tokens, dim = x.shape
    xf = x.to(compute_dtype(x))
    grad_x = None
    grad_folded = None
    if grad_context is not None:
        grad_context = grad_context.to(xf.dtype)
        probs = _probabilities(xf, folded)  # (B, M, T)
        grad_probs = torch.bmm(grad_context, xf.transpose(1, 2))  # (B, M, T)
        grad_scores = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        weights = torch.cat([probs, grad_scores], dim=1)  # (B, 2M, T)
        values = torch.cat([grad_context, folded.expand(batch, -1, -1)], dim=1)  # (B, 2M, d)
        grad_x = torch.bmm(weights.transpose(1, 2), values)
        grad_folded = torch.einsum("bmt,btd->md", grad_scores, xf)
    if grad_pooled is not None and stride > 0:
        spread = (grad_pooled.to(xf.dtype) / stride**2).view(
            batch, grid_h // stride, 1, grid_w // stride, 1, dim
        )
        if grad_x is None:
            grad_x = spread.expand(-1, -1, stride, -1, stride, -1).reshape(batch, tokens, dim)
        else:
            grad_x.view(batch, grid_h // stride, stride, grid_w // stride, stride, dim).add_(spread)
    if grad_x is None:
        grad_x = torch.zeros_like(xf)
    if grad_folded is None:
        grad_folded = torch.zeros_like(folded)
    return grad_x.to(x.dtype), grad_folded, None, None, None, None


torch.library.register_autograd(
    "fastcompress::meta_context_pool", _context_pool_backward, setup_context=_context_pool_setup
)


# ------------------------------------------------------------------------- public API


@float32_under_autocast
def pool_compress(x: Tensor, grid: tuple[int, int], stride: int) -> Tensor:
    """Non-overlapping ``s x s`` average over a row-major ``H x W`` token grid.

    ``x (B, T = H*W, d)`` -> ``(B, T / s^2, d)`` row-major; ``stride`` s is 2 or 4."""
    _check_grid(x, grid, stride)
    return pool_compress_reference(x, tuple(grid), stride)


@float32_under_autocast
def meta_token_attention(
    x: Tensor,
    queries: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    num_heads: int,
    backend: str | None = None,
) -> Tensor:
    """``nn.MultiheadAttention(d, num_heads, batch_first=True)(Q, X, X)[0]`` for shared
    queries ``(N_g, d)`` over ``x (B, T, d)`` -> ``(B, N_g, d)``, folded (reads X once)."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have B > 0 and T > 0, got shape {tuple(x.shape)}")
    weights = (queries, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    _check_attention(x, *weights)
    return _attend(x, weights, (0, 0), 0, backend)[0]


@float32_under_autocast
def compress(
    x: Tensor,
    grid: tuple[int, int],
    stride: int,
    queries: Tensor,
    in_proj_weight: Tensor,
    in_proj_bias: Tensor | None,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    num_heads: int,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """UniCompress compressor in one pass over X.

    Parameters
    ----------
    x : ``(B, T, d)`` tokens of a row-major ``grid = (H, W)``, ``T = H * W``.
    stride : 2 or 4 (H and W divisible by it).
    queries : ``(N_g, d)`` learned meta queries, 2-D (pass ``q[0]`` for a ``(1, N_g, d)``
        parameter).
    in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads :
        the parameters of an ``nn.MultiheadAttention(d, num_heads)``.

    Returns
    -------
    ``(G (B, N_g, d), X_hat (B, T / s^2, d))`` in x.dtype.
    """
    grid = _check_grid(x, grid, stride)
    weights = (queries, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    _check_attention(x, *weights)
    return _attend(x, weights, grid, stride, backend)


def _attend(
    x: Tensor, weights: tuple, grid: tuple[int, int], stride: int, backend: str | None
) -> tuple[Tensor, Tensor]:
    """Meta tokens and (stride > 0) pooled tokens on the chosen backend."""
    # NaN or inf in any argument makes the meta tokens non-finite (every token and weight
    # enters them): checking that small result, and naming the culprit only then, costs
    # nothing on good input, unlike a pass over X and the d x d weights on every call.
    eager = not torch.compiler.is_compiling()
    try:
        meta, pooled = _attend_unchecked(x, weights, grid, stride, backend)
    except ValueError as exc:
        if eager and "NaN or inf" in str(exc):
            _name_nonfinite(x, weights)
        raise
    if eager and not bool(torch.isfinite(meta).all()):
        _name_nonfinite(x, weights)
    return meta, pooled


def _attend_unchecked(
    x: Tensor, weights: tuple, grid: tuple[int, int], stride: int, backend: str | None
) -> tuple[Tensor, Tensor]:
    queries, in_w, in_b, out_w, out_b, num_heads = weights
    if requested_backend(backend) == "reference":  # traced code too: no lock, no probe
        record("reference")
        if not torch.compiler.is_compiling():
            # torch's attention may drop a NaN score instead of propagating it, so the
            # output check below cannot see every NaN argument here: check them all.
            _name_nonfinite(x, weights, then_raise=False)
        meta = meta_token_attention_reference(x, *weights)
        pooled = pool_compress_reference(x, grid, stride) if stride else x[:, :0]
        return meta, pooled
    if not torch.compiler.is_compiling():
        select_backend(x.device, backend, op="compress")  # a forced backend fails here
        # Small, and not all of them reach the result (the key bias cancels).
        small = (("queries", queries), ("in_proj_bias", in_b), ("out_proj_bias", out_b))
        for name, value in small:
            if value is not None:
                check_finite(name, value)
    if _inference_in_one_call(x, weights, backend):
        return torch.ops.fastcompress_cpu.compress_forward(
            x.contiguous(), queries, in_w, in_b, out_w, out_b, num_heads, *grid, stride
        )
    folded = fold_queries(queries, in_w, in_b, num_heads)
    context, pooled = _meta_context_pool_op(x, folded, grid[0], grid[1], stride, backend or "")
    meta = finish_meta(context, in_w, in_b, out_w, out_b, num_heads)
    return meta.to(x.dtype), pooled


def _name_nonfinite(x: Tensor, weights: tuple, then_raise: bool = True) -> None:
    """Raise a ValueError naming the first argument that holds NaN or inf (called once a
    result was found not finite; every backend gives the same message). With
    ``then_raise=False`` it only checks."""
    queries, in_w, in_b, out_w, out_b, _ = weights
    named = (
        ("queries", queries),
        ("in_proj_weight", in_w),
        ("in_proj_bias", in_b),
        ("out_proj_weight", out_w),
        ("out_proj_bias", out_b),
        ("x", x),
    )
    for name, value in named:
        if value is not None:
            check_finite(name, value)
    if not then_raise:
        return
    raise ValueError(
        "compress: the result is not finite although no argument holds NaN or inf: the "
        "attention scores overflow float32 (x or the weights are too large)"
    )


def _inference_in_one_call(x: Tensor, weights: tuple, backend: str | None) -> bool:
    """Whether ``fastcompress_cpu::compress_forward`` (fold + X pass + finish in one C++
    call) serves this eager, no-grad, float32 CPU call: it saves ~0.15 ms of Python
    dispatch, a quarter of the whole forward at d = 64. Traced code keeps the custom op
    with its autograd and fake."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    tensors = (x,) + tuple(w for w in weights if isinstance(w, Tensor))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if select_backend(x.device, backend, op="compress") != "cpu":
        return False
    _register_inference_fake()
    return True


@functools.cache
def _register_inference_fake() -> None:
    @torch.library.register_fake("fastcompress_cpu::compress_forward")
    def _(x, queries, in_w, in_b, out_w, out_b, num_heads, grid_h, grid_w, stride):
        batch, tokens, dim = x.shape
        pooled = tokens // stride**2 if stride else 0
        return x.new_empty((batch, queries.shape[0], dim)), x.new_empty((batch, pooled, dim))


# ------------------------------------------------------------ on-device parity case


def mha_weights(dim: int, heads: int, num_meta: int, device: torch.device) -> tuple:
    """Random ``nn.MultiheadAttention`` weights (biases not zero) and meta queries."""
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).to(device)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    queries = torch.randn(num_meta, dim, device=device, requires_grad=True)
    return (queries, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
            mha.out_proj.bias, heads)  # fmt: skip


def parity_case(backend: str, device: torch.device) -> dict:
    """The on-device parity case of the compressor kernels, forward and backward."""
    torch.manual_seed(1)
    out = {}
    for stride, grid, dim in ((2, (8, 12), 48), (4, (8, 16), 200)):
        weights = mha_weights(dim, 4, 3, device)
        x0 = torch.randn(3, grid[0] * grid[1], dim, device=device)
        grads = {}
        for name in (backend, "reference"):
            x = x0.clone().requires_grad_()
            meta, pooled = compress(x, grid, stride, *weights, backend=name)
            loss = meta.square().sum() + pooled.sin().sum()
            grads[name] = (meta, pooled, *torch.autograd.grad(loss, (x, weights[0])))
        for label, g, w in zip(("meta", "pooled", "grad x", "grad queries"), grads[backend],
                               grads["reference"], strict=True):  # fmt: skip
            out[f"{label} s={stride}"] = assert_close(f"compress {label}", g, w, atol=1e-4)
    return out


declare_gpu_kernels("compress", {"compress": ("triton",)}, parity_case)
