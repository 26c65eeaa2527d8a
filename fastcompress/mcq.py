"""Multi-codebook quantization (UniTok ``VectorQuantizerM``, MGVQ): ops and public API.

Canonical op layout: ``z (N, C)`` with ``C = G * d``, ``codebooks (G, K, d)``. The
public functions accept channel-last ``(..., C)`` or channel-first ``(B, C, H, W)``
input and reshape to it. Ops are ``torch.library`` custom ops in the ``fastcompress``
namespace (fake implementations for ``torch.compile``, autograd registered), and each
dispatches to a backend: ``reference`` (torch), ``cpu`` (C++), ``triton``, ``cuda``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcompress._autocast import (
    float32_under_autocast,
    register_float32_autocast,
    without_autocast,
)
from fastcompress._backend import declare_gpu_kernels, select_backend
from fastcompress._parity import assert_close, codes_agree
from fastcompress._validate import (
    FLOAT_DTYPES,
    check_finite,
    check_finite_number,
    check_same,
    check_tensor,
)
from fastcompress.entropy import entropy_loss
from fastcompress.reference.mcq import (
    compute_dtype,
    mcq_quantize_reference,
    mcq_search_reference,
)
from fastcompress.reference.mcq import (
    normalize_backward as _normalize_backward,
)
from fastcompress.reference.mcq import (
    split_norm as _split_norm,
)


class MCQOutput(NamedTuple):
    """Result of :func:`mcq_quantize`.

    z_q : straight-through output, same shape and dtype as ``z``.
    indices : ``(..., G)`` int64, the chosen code of each chunk.
    vq_loss : ``()`` float32, mean over codebooks of ``beta*|sg(q)-z|^2 + |q-sg(z)|^2``.
    entropy_loss : ``()`` float32 when ``entropy_temp`` is given, else ``None``.
    usage_counts : ``(G, K)`` int64, how often each code was chosen in this call.
    """

    z_q: Tensor
    indices: Tensor
    vq_loss: Tensor
    entropy_loss: Tensor | None
    usage_counts: Tensor


# ----------------------------------------------------------------------------- helpers


def prepare_codebooks(codebooks: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """Code rows ``(G, K, d)`` in float32 (unit rows for cosine) and the per-code bias
    ``(G, K)`` that turns both metrics into one argmax: 0 for cosine, ``-|c|^2/2`` for L2
    (``argmin |z-c|^2 = argmax z.c - |c|^2/2``)."""
    book = codebooks.float()
    if normalize:
        book = F.normalize(book, dim=-1)
    book = book.contiguous()
    bias = torch.zeros_like(book[..., 0]) if normalize else -0.5 * book.square().sum(-1)
    return book, bias.contiguous()


# ------------------------------------------------------------------------ forward impls


def check_op_args(z: Tensor, codebooks: Tensor) -> None:
    """The canonical layout of the ops, checked by each op and its fake (direct
    ``torch.ops`` calls and traced graphs get the same errors as the public functions)."""
    check_tensor("z", z, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("codebooks", codebooks, ndim=3, dtypes=FLOAT_DTYPES)
    groups, vocab, dim = codebooks.shape
    if groups == 0 or vocab == 0 or dim == 0:
        raise ValueError(
            f"codebooks must be (G, K, d) with G, K, d > 0, got {tuple(codebooks.shape)}"
        )
    if z.shape[1] != groups * dim:
        raise ValueError(
            f"z must be (N, C = G*d = {groups * dim}) for codebooks {tuple(codebooks.shape)}, "
            f"got {tuple(z.shape)}"
        )
    if codebooks.device != z.device:
        raise ValueError(f"codebooks is on {codebooks.device} but z is on {z.device}")
    if codebooks.dtype not in (z.dtype, torch.float32):
        raise TypeError(
            f"codebooks must have z's dtype ({z.dtype}) or float32, got {codebooks.dtype}"
        )


def _forward(
    z: Tensor, codebooks: Tensor, beta: float, normalize: bool, full: bool, backend: str, op: str
):
    """(indices, z_q, counts, vq_loss) on the selected backend; z_q etc. only when full."""
    check_op_args(z, codebooks)
    check_finite_number("beta", beta)
    name = select_backend(z.device, backend, op=op)
    check_finite("z", z)
    check_finite("codebooks", codebooks)
    groups, vocab, dim = codebooks.shape
    n = z.shape[0]
    if name == "reference":
        if not full:
            return mcq_search_reference(z, codebooks, normalize), None, None, None
        with torch.no_grad():
            z_q, idx, loss, counts = mcq_quantize_reference(z, codebooks, beta, normalize)
        return idx, z_q, counts, loss
    book, bias = prepare_codebooks(codebooks, normalize)
    if name == "cpu":
        idx, z_q, counts, sq_err = torch.ops.fastcompress_cpu.mcq_forward(
            z, book, bias, normalize, full
        )
    elif name == "triton":
        from fastcompress.triton_kernels.mcq import mcq_forward_triton

        idx, z_q, counts, sq_err = mcq_forward_triton(z, book, bias, normalize, full)
    else:  # cuda: search kernel, the rest composed in torch
        idx = torch.ops.fastcompress_cuda.mcq_search(z, book, bias, normalize)
        if not full:
            return idx, None, None, None
        z_q, counts, sq_err = _finish_from_indices(z, book, idx, normalize)
    if not full:
        return idx, None, None, None
    scale = (1.0 + beta) / (max(n, 1) * dim * groups)
    loss = (sq_err.double().sum() * scale).float()
    return idx, z_q, counts, loss


def _finish_from_indices(z: Tensor, book: Tensor, idx: Tensor, normalize: bool):
    groups, vocab, dim = book.shape
    chunks, _ = _split_norm(z.float().view(-1, groups, dim), normalize)
    q = book[torch.arange(groups, device=z.device), idx]
    z_q = ((q - chunks) + chunks).reshape(z.shape).to(z.dtype)
    counts = torch.stack([torch.bincount(idx[:, g], minlength=vocab) for g in range(groups)])
    return z_q, counts, (q - chunks).double().square().sum((0, 2))


# ---------------------------------------------------------------------------- the ops


@torch.library.custom_op("fastcompress::mcq_search", mutates_args=())
def _mcq_search_op(z: Tensor, codebooks: Tensor, normalize: bool, backend: str) -> Tensor:
    return _forward(z, codebooks, 0.0, normalize, False, backend, "mcq_search")[0]


@_mcq_search_op.register_fake
def _(z, codebooks, normalize, backend):
    check_op_args(z, codebooks)
    return z.new_empty((z.shape[0], codebooks.shape[0]), dtype=torch.long)


@torch.library.custom_op("fastcompress::mcq_quantize", mutates_args=())
def _mcq_quantize_op(
    z: Tensor, codebooks: Tensor, beta: float, normalize: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    idx, z_q, counts, loss = _forward(z, codebooks, beta, normalize, True, backend, "mcq_quantize")
    return z_q, idx, loss, counts


@_mcq_quantize_op.register_fake
def _(z, codebooks, beta, normalize, backend):
    check_op_args(z, codebooks)
    check_finite_number("beta", beta)
    groups, vocab, _ = codebooks.shape
    return (
        torch.empty_like(z),
        z.new_empty((z.shape[0], groups), dtype=torch.long),
        z.new_empty((), dtype=torch.float32),
        z.new_empty((groups, vocab), dtype=torch.long),
    )


def _quantize_setup_context(ctx, inputs, output):
    z, codebooks, beta, normalize, backend = inputs
    ctx.save_for_backward(z, codebooks, output[1])
    ctx.beta, ctx.normalize, ctx.backend = beta, normalize, backend
    ctx.mark_non_differentiable(output[1], output[3])


@without_autocast
def _quantize_backward(ctx, grad_z_q, _grad_idx, grad_loss, _grad_counts):
    z, codebooks, idx = ctx.saved_tensors
    if grad_z_q is None:
        grad_z_q = torch.zeros_like(z)
    if grad_loss is None:
        grad_loss = torch.zeros((), device=z.device)
    name = select_backend(z.device, ctx.backend, op="mcq_quantize backward")
    if name == "triton":
        from fastcompress.triton_kernels.mcq import mcq_backward_triton

        grad_z, grad_book = mcq_backward_triton(
            grad_z_q, grad_loss, z, codebooks, idx, ctx.beta, ctx.normalize
        )
    else:
        grad_z, grad_book = mcq_backward_torch(
            grad_z_q, grad_loss, z, codebooks, idx, ctx.beta, ctx.normalize
        )
    return grad_z, grad_book, None, None, None


def mcq_backward_torch(
    grad_z_q: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    codebooks: Tensor,
    idx: Tensor,
    beta: float,
    normalize: bool,
) -> tuple[Tensor, Tensor]:
    """Analytic gradients of ``mcq_quantize`` with O(N*C + G*K*d) memory (no N x K)."""
    groups, vocab, dim = codebooks.shape
    n = z.shape[0]
    chunks, z_norm = _split_norm(z.to(compute_dtype(z)).view(n, groups, dim), normalize)
    book, c_norm = _split_norm(codebooks.to(compute_dtype(codebooks)), normalize)
    q = book[torch.arange(groups, device=z.device), idx]  # (N, G, d)
    scale = grad_loss.to(book.dtype) * (2.0 / (max(n, 1) * dim * groups))
    # Straight-through: d z_q / d z_n = I; the commitment term pulls z_n towards q.
    grad_chunks = grad_z_q.to(chunks.dtype).view(n, groups, dim) + (beta * scale) * (chunks - q)
    # Codebook term: (q - sg(z_n)) scattered into the chosen rows.
    flat = (idx + torch.arange(groups, device=z.device) * vocab).reshape(-1)
    grad_rows = book.new_zeros(groups * vocab, dim)
    grad_rows.index_add_(0, flat, (scale * (q - chunks)).reshape(-1, dim))
    grad_rows = grad_rows.view(groups, vocab, dim)
    if normalize:
        grad_chunks = _normalize_backward(grad_chunks, chunks, z_norm)
        grad_rows = _normalize_backward(grad_rows, book, c_norm)
    return grad_chunks.reshape(z.shape).to(z.dtype), grad_rows.to(codebooks.dtype)


_mcq_quantize_op.register_autograd(_quantize_backward, setup_context=_quantize_setup_context)


_LIB = torch.library.Library("fastcompress", "FRAGMENT")
for _name in ("mcq_search", "mcq_quantize"):
    register_float32_autocast(_LIB, _name)


# ------------------------------------------------------------------------- public API


def _as_codebooks(
    codebooks: Tensor | Sequence[Tensor], dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
) -> Tensor:
    if isinstance(codebooks, (list, tuple)):
        if not codebooks:
            raise ValueError("codebooks must not be an empty sequence")
        for i, book in enumerate(codebooks):
            check_tensor(f"codebooks[{i}]", book, ndim=2, dtypes=dtypes)
            if book.shape != codebooks[0].shape or book.dtype != codebooks[0].dtype:
                raise ValueError(
                    f"codebooks[{i}] is {tuple(book.shape)} {book.dtype} but codebooks[0] is "
                    f"{tuple(codebooks[0].shape)} {codebooks[0].dtype}: every codebook of the "
                    "sequence must have the same (K, d) and dtype"
                )
            if book.device != codebooks[0].device:
                raise ValueError(
                    f"codebooks[{i}] is on {book.device} but codebooks[0] is on "
                    f"{codebooks[0].device}"
                )
        return torch.stack(list(codebooks))
    return check_tensor("codebooks", codebooks, ndim=3, dtypes=dtypes)


def _rows(z: Tensor, books: Tensor, channel_dim: int) -> tuple[Tensor, int]:
    """Validate and move channels last: returns ``(N, C)`` rows and the channel dim."""
    check_tensor("z", z, dtypes=FLOAT_DTYPES)
    if books.dtype == torch.float32 and z.dtype != torch.float32:
        # A float32 master codebook with half-precision features (UniTok under autocast):
        # the search, losses and codebook gradients stay float32; z_q follows z.
        if books.device != z.device:
            raise ValueError(f"codebooks is on {books.device} but z is on {z.device}")
    else:
        check_same("codebooks", books, "z", z)
    if z.dim() < 2:
        raise ValueError(f"z must have at least 2 dimensions (..., C), got shape {tuple(z.shape)}")
    if not -z.dim() <= channel_dim < z.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for z of shape {tuple(z.shape)}"
        )
    given = channel_dim
    channel_dim %= z.dim()
    groups, vocab, dim = books.shape
    channels = z.shape[channel_dim]
    if groups == 0 or vocab == 0 or dim == 0:
        raise ValueError(f"codebooks must be (G, K, d) with G, K, d > 0, got {tuple(books.shape)}")
    if channels != groups * dim:
        hint = f"; C={channels} is not divisible by G={groups}" if channels % groups else ""
        if z.dim() == 4 and given == -1 and z.shape[1] == groups * dim:
            hint += "; for channel-first (B, C, H, W) input (MGVQ) pass channel_dim=1"
        raise ValueError(
            f"z of shape {tuple(z.shape)} has C={channels} channels on channel_dim={given} "
            f"(its dim {channel_dim}), but codebooks "
            f"{tuple(books.shape)} (G, K, d) expect C = G*d = {groups * dim}{hint}"
        )
    moved = z.movedim(channel_dim, -1)
    return moved.reshape(-1, channels).contiguous(), channel_dim


def _restore(rows: Tensor, like: Tensor, channel_dim: int) -> Tensor:
    shape = list(like.movedim(channel_dim, -1).shape)
    return rows.reshape(shape).movedim(-1, channel_dim)


def _index_shape(z: Tensor, channel_dim: int, groups: int) -> list[int]:
    return [s for i, s in enumerate(z.shape) if i != channel_dim] + [groups]


@float32_under_autocast
def mcq_quantize(
    z: Tensor,
    codebooks: Tensor | Sequence[Tensor],
    *,
    beta: float = 0.25,
    normalize: bool = True,
    entropy_temp: float | None = None,
    channel_dim: int = -1,
    backend: str | None = None,
) -> MCQOutput:
    """Multi-codebook quantization with a straight-through estimator.

    Parameters
    ----------
    z : Tensor
        ``(..., C)`` channel-last (UniTok ``(B, L, C)``) or, with ``channel_dim=1``,
        channel-first ``(B, C, H, W)`` (MGVQ). float32, bfloat16 or float16; all math
        runs in float32. Chunk ``g`` is channels ``g*d:(g+1)*d``.
    codebooks : Tensor or sequence of Tensor
        ``(G, K, d)`` (or G tensors ``(K, d)`` of one shape), on ``z``'s device, in
        ``z``'s dtype or float32 (a float32 master codebook for bf16 / f16 ``z``: the
        search, the losses and the codebook gradients stay float32). For an MGVQ
        embedding of ``n_e`` rows pass ``weight.view(G, n_e // G, d)``.
    beta : float
        Commitment weight (UniTok / MGVQ: 0.25).
    normalize : bool
        True: cosine (chunks and code rows L2-normalised, argmax of the dot product,
        the output is the unit code row). False: plain L2 nearest neighbour.
    entropy_temp : float, optional
        If given, also return UniTok's entropy loss at this temperature (0.01 there).
    channel_dim : int
        Dimension of ``z`` holding the C channels.
    backend : str, optional
        ``auto`` (default, or ``FASTCOMPRESS_BACKEND``), ``reference``, ``cpu``,
        ``triton``, ``cuda``.

    Returns
    -------
    MCQOutput
        ``z_q`` like ``z``; ``indices`` ``(..., G)`` int64 (the non-channel dims of ``z``,
        then G); ``vq_loss`` ``()``; ``entropy_loss`` ``()`` or None; ``usage_counts``
        ``(G, K)`` int64.
    """
    beta = check_finite_number("beta", beta)
    if entropy_temp is not None:
        entropy_temp = check_finite_number("entropy_temp", entropy_temp)
        if entropy_temp <= 0:
            raise ValueError(f"entropy_temp must be > 0, got {entropy_temp}")
    books = _as_codebooks(codebooks)
    rows, channel_dim = _rows(z, books, channel_dim)
    groups, vocab, dim = books.shape
    z_q, idx, vq_loss, counts = _mcq_quantize_op(
        rows, books, float(beta), bool(normalize), backend or ""
    )
    entropy = None
    if entropy_temp is not None:
        chunks, _ = _split_norm(rows.float().view(-1, groups, dim), normalize)
        book, _ = _split_norm(books.float(), normalize)
        entropy = entropy_loss(chunks, book, 1.0 / entropy_temp, backend)
    return MCQOutput(
        _restore(z_q, z, channel_dim),
        idx.reshape(_index_shape(z, channel_dim, groups)),
        vq_loss,
        entropy,
        counts,
    )


@float32_under_autocast
def mcq_search(
    z: Tensor,
    codebooks: Tensor | Sequence[Tensor],
    *,
    normalize: bool = True,
    channel_dim: int = -1,
    backend: str | None = None,
) -> Tensor:
    """Nearest code per chunk, no autograd. Shapes as in :func:`mcq_quantize`;
    returns ``(..., G)`` int64."""
    books = _as_codebooks(codebooks)
    rows, channel_dim = _rows(z, books, channel_dim)
    idx = _mcq_search_op(rows.detach(), books.detach(), bool(normalize), backend or "")
    return idx.reshape(_index_shape(z, channel_dim, books.shape[0]))


@float32_under_autocast
def mcq_dequantize(
    indices: Tensor,
    codebooks: Tensor | Sequence[Tensor],
    *,
    normalize: bool = True,
    channel_dim: int = -1,
) -> Tensor:
    """Indices ``(..., G)`` -> vectors ``(..., C)`` (or channel-first with
    ``channel_dim=1``), in the codebooks' dtype (float64 allowed: pure torch);
    differentiable in ``codebooks``.

    Out-of-range indices raise (they would otherwise read arbitrary memory on GPU)."""
    books = _as_codebooks(codebooks, FLOAT_DTYPES + (torch.float64,))
    check_tensor("indices", indices, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
    groups, vocab, dim = books.shape
    if groups == 0 or vocab == 0 or dim == 0:
        raise ValueError(f"codebooks must be (G, K, d) with G, K, d > 0, got {tuple(books.shape)}")
    if indices.device != books.device:
        raise ValueError(f"indices is on {indices.device} but codebooks is on {books.device}")
    if indices.dim() < 1 or indices.shape[-1] != groups:
        raise ValueError(f"indices must be (..., G={groups}), got shape {tuple(indices.shape)}")
    if not torch.compiler.is_compiling():
        check_finite("codebooks", books)
    if indices.numel() and not torch.compiler.is_compiling():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"indices must lie in [0, {vocab}) (K of codebooks), "
                f"found values in [{low}, {high}]"
            )
    if not -indices.dim() <= channel_dim < indices.dim():
        raise ValueError(
            f"channel_dim={channel_dim} is out of range for the output of rank "
            f"{indices.dim()} (indices {tuple(indices.shape)} -> (..., C))"
        )
    book = F.normalize(books, dim=-1) if normalize else books
    vectors = book[torch.arange(groups, device=books.device), indices.long()]
    out = vectors.reshape(*indices.shape[:-1], groups * dim)
    if channel_dim in (-1, out.dim() - 1):
        return out
    return out.movedim(-1, channel_dim)


# ------------------------------------------------------------ on-device parity case


def parity_case(backend: str, device: torch.device) -> dict:
    """The on-device parity case of the MCQ kernels (search, quantize, their backward and
    the entropy loss): ``backend`` against the reference on small odd-sized problems."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for normalize in (True, False):
        z0 = torch.randn(301, 64, generator=gen).to(device)
        books0 = torch.randn(8, 130, 8, generator=gen).to(device)
        idx = mcq_search(z0, books0, normalize=normalize, backend=backend)
        ref_idx = mcq_search(z0, books0, normalize=normalize, backend="reference")
        out[f"near_ties_normalize={normalize}"] = codes_agree(z0, books0, idx, ref_idx, normalize)
        weight = torch.randn(z0.shape, generator=gen).to(device)
        results = {}
        for name in (backend, "reference"):
            z, books = z0.clone().requires_grad_(), books0.clone().requires_grad_()
            q = mcq_quantize(z, books, normalize=normalize, entropy_temp=0.01, backend=name)
            loss = (q.z_q * weight).sum() + q.vq_loss + q.entropy_loss
            results[name] = (
                q.z_q,
                q.vq_loss,
                q.entropy_loss,
                *torch.autograd.grad(loss, (z, books)),
            )
        same = (idx == ref_idx).all(-1)
        got, want = results[backend], results["reference"]
        assert_close("mcq z_q", got[0][same], want[0][same])
        for name, g, w in zip(("vq_loss", "entropy_loss", "grad z", "grad codebooks"), got[1:],
                              want[1:], strict=True):  # fmt: skip
            out[f"{name} normalize={normalize}"] = assert_close(f"mcq {name}", g, w, atol=1e-4)
    return out


declare_gpu_kernels(
    "mcq",
    {
        "mcq_search": ("cuda", "triton"),
        "mcq_quantize": ("cuda", "triton"),
        "mcq_quantize backward": ("triton",),
    },
    parity_case,
)
