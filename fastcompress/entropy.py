"""UniTok's entropy loss over the full codebooks, without the N x K matrix: the op, its
backends and its autograd.

Per codebook, logits ``l_nk = -|z_n - c_k|^2 / tau`` over every code, ``p = softmax(l)``,
and ``loss = mean_g [ mean_n H(p_n) - H(mean_n p_n) ]`` with UniTok's ``+1e-7`` inside
the log of the second entropy. The op takes the chunks and code rows as the quantizer
sees them (unit rows for cosine: the normalisation and its gradient stay in autograd
outside the op) and returns the loss, the mean probabilities ``a (G, K)`` and per-row
statistics ``(N, G, 3)`` = (max logit, log-sum-exp below it, entropy) that the backward
reuses. Backends: ``cpu`` (C++, every ISA level: ``csrc/cpu/entropy_kernels.inc``),
``triton`` (``triton_kernels/entropy.py``), ``reference`` (row-chunked torch below).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastcompress._autocast import register_float32_autocast, without_autocast
from fastcompress._backend import declare_gpu_kernels, select_backend
from fastcompress._validate import check_finite_number, check_tensor

_CHUNK_ELEMENTS = 1 << 22  # rows x K per tile of the torch passes (16 MiB)
EPS = 1e-7  # UniTok's, inside the log of the codebook entropy


def check_entropy_args(chunks: Tensor, book: Tensor, inv_temp: float) -> None:
    check_tensor("chunks", chunks, ndim=3, dtypes=(torch.float32,))
    check_tensor("book", book, ndim=3, dtypes=(torch.float32,))
    if book.shape[0] != chunks.shape[1] or book.shape[2] != chunks.shape[2] or not book.shape[1]:
        raise ValueError(
            f"book must be (G={chunks.shape[1]}, K > 0, d={chunks.shape[2]}) for chunks "
            f"(N, G, d) {tuple(chunks.shape)}, got {tuple(book.shape)}"
        )
    if book.device != chunks.device:
        raise ValueError(f"book is on {book.device} but chunks is on {chunks.device}")
    if not check_finite_number("inv_temp", inv_temp) > 0:
        raise ValueError(f"inv_temp (1 / entropy_temp) must be > 0, got {inv_temp}")


def loss_from(per_sample: Tensor, mean_p: Tensor) -> Tensor:
    """``mean_g [per_sample_g - H(a_g)]`` in float64, returned as float32 ``()``."""
    a = mean_p.double()
    codebook_entropy = -(a * torch.log(a + EPS)).sum(-1)
    return (per_sample.double() - codebook_entropy).mean().float()


def w_of(mean_p: Tensor) -> Tensor:
    """``d/da_k [sum_k a_k log(a_k + eps)]``: how the batch-mean term weighs each code."""
    a = mean_p.double()
    return (torch.log(a + EPS) + a / (a + EPS)).float()


# ------------------------------------------------------------ torch (the reference backend)


def _tile_rows(n: int, vocab: int) -> int:
    return max(1, min(n, _CHUNK_ELEMENTS // max(vocab, 1)))


def _logits(chunk: Tensor, book: Tensor, inv_temp: float) -> Tensor:
    """``(2 z.c - |c|^2) / tau``: UniTok's logits less the row constant ``|z|^2 / tau``."""
    return torch.addmm(book.square().sum(1), chunk, book.T, alpha=2, beta=-1).mul_(inv_temp)


def _forward_torch(chunks: Tensor, book: Tensor, inv_temp: float):
    n, groups, _ = chunks.shape
    vocab = book.shape[1]
    p_sum = chunks.new_zeros(groups, vocab, dtype=torch.float64)
    per_sample = chunks.new_zeros(groups, dtype=torch.float64)
    stats = chunks.new_empty(n, groups, 3)
    step = _tile_rows(n, vocab)
    for g in range(groups):
        for r0 in range(0, n, step):
            shifted = _logits(chunks[r0 : r0 + step, g], book[g], inv_temp)
            top = shifted.amax(-1, keepdim=True)
            shifted.sub_(top)
            p = shifted.exp()
            log_sum = p.sum(-1, keepdim=True).log_()
            p.div_(log_sum.exp())
            # H = log S - sum_k p_k (l_k - max)
            entropy = log_sum[:, 0] - (p * shifted).sum(-1)
            stats[r0 : r0 + step, g] = torch.cat([top, log_sum, entropy[:, None]], -1)
            per_sample[g] += entropy.sum(dtype=torch.float64)
            p_sum[g] += p.sum(0, dtype=torch.float64)
    rows = max(n, 1)
    return per_sample / rows, (p_sum / rows).float(), stats


def _backward_torch(chunks, book, mean_p, stats, inv_temp, grad):
    n, groups, _ = chunks.shape
    vocab = book.shape[1]
    w = w_of(mean_p)
    coef = grad / (max(n, 1) * groups)
    grad_chunks = torch.zeros_like(chunks)
    gz = book.new_zeros(book.shape, dtype=torch.float64)
    g_sum = book.new_zeros(groups, vocab, dtype=torch.float64)
    step = _tile_rows(n, vocab)
    for g in range(groups):
        for r0 in range(0, n, step):
            chunk, row = chunks[r0 : r0 + step, g], stats[r0 : r0 + step, g]
            log_p = (_logits(chunk, book[g], inv_temp) - row[:, :1]) - row[:, 1:2]
            p = log_p.exp()
            mixed = (p * w[g]).sum(-1, keepdim=True)
            grad_logits = coef * p * (w[g] - mixed - log_p - row[:, 2:3])
            grad_chunks[r0 : r0 + step, g] = (2 * inv_temp) * (grad_logits @ book[g])
            gz[g] += (grad_logits.T @ chunk).double()
            g_sum[g] += grad_logits.double().sum(0)
    grad_book = (2 * inv_temp) * (gz - book.double() * g_sum[..., None])
    return grad_chunks, grad_book.float()


@functools.cache
def _register_cpu_fakes() -> None:
    """Fake implementations of the C++ kernels (traced backwards call them directly)."""

    @torch.library.register_fake("fastcompress_cpu::entropy_forward")
    def _(chunks, book, inv_temp):
        n, groups, _ = chunks.shape
        return (
            chunks.new_empty((groups,), dtype=torch.float64),
            chunks.new_empty((groups, book.shape[1])),
            chunks.new_empty((n, groups, 3)),
        )

    @torch.library.register_fake("fastcompress_cpu::entropy_backward")
    def _(chunks, book, mean_p, stats, inv_temp, grad):
        return torch.empty_like(chunks), torch.empty_like(book)


# ---------------------------------------------------------------------------- the op


@torch.library.custom_op("fastcompress::mcq_entropy_loss", mutates_args=())
def entropy_op(
    chunks: Tensor, book: Tensor, inv_temp: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``chunks (N, G, d)``, ``book (G, K, d)`` float32 -> (loss ``()``, mean
    probabilities ``(G, K)``, row statistics ``(N, G, 3)``)."""
    check_entropy_args(chunks, book, inv_temp)
    name = select_backend(chunks.device, backend, op="mcq_entropy_loss")
    if name == "cpu":
        _register_cpu_fakes()
        per_sample, mean_p, stats = torch.ops.fastcompress_cpu.entropy_forward(
            chunks.contiguous(), book.contiguous(), inv_temp
        )
    elif name == "triton":
        from fastcompress.triton_kernels.entropy import entropy_forward_triton

        per_sample, mean_p, stats = entropy_forward_triton(
            chunks.contiguous(), book.contiguous(), inv_temp
        )
    else:  # reference, and cuda (no C++ CUDA kernel: torch on the GPU)
        per_sample, mean_p, stats = _forward_torch(chunks, book, inv_temp)
    return loss_from(per_sample, mean_p), mean_p, stats


@entropy_op.register_fake
def _(chunks, book, inv_temp, backend):
    check_entropy_args(chunks, book, inv_temp)
    n, groups, _ = chunks.shape
    return (
        chunks.new_empty(()),
        chunks.new_empty((groups, book.shape[1])),
        chunks.new_empty((n, groups, 3)),
    )


def _setup_context(ctx, inputs, output):
    chunks, book, inv_temp, backend = inputs
    ctx.save_for_backward(chunks, book, output[1], output[2])
    ctx.inv_temp, ctx.backend = inv_temp, backend
    ctx.mark_non_differentiable(output[1], output[2])


@without_autocast
def _backward(ctx, grad_loss, _grad_mean_p, _grad_stats):
    chunks, book, mean_p, stats = ctx.saved_tensors
    if grad_loss is None:
        return torch.zeros_like(chunks), torch.zeros_like(book), None, None
    # The kernels run for a unit gradient and the result is scaled by the tensor: no host
    # read of grad_loss (a sync on GPU, a graph break under torch.compile).
    name = select_backend(chunks.device, ctx.backend, op="mcq_entropy_loss backward")
    if name == "cpu":
        _register_cpu_fakes()
        grad_chunks, grad_book = torch.ops.fastcompress_cpu.entropy_backward(
            chunks.contiguous(), book.contiguous(), mean_p, stats, ctx.inv_temp, 1.0
        )
    elif name == "triton":
        from fastcompress.triton_kernels.entropy import entropy_backward_triton

        grad_chunks, grad_book = entropy_backward_triton(
            chunks.contiguous(), book.contiguous(), w_of(mean_p), stats, ctx.inv_temp
        )
    else:
        grad_chunks, grad_book = _backward_torch(chunks, book, mean_p, stats, ctx.inv_temp, 1.0)
    scale = grad_loss.to(grad_chunks.dtype)
    return grad_chunks * scale, grad_book * scale, None, None


entropy_op.register_autograd(_backward, setup_context=_setup_context)

_LIB = torch.library.Library("fastcompress", "FRAGMENT")  # kept: a dropped Library unregisters
register_float32_autocast(_LIB, "mcq_entropy_loss")


def entropy_loss(chunks: Tensor, book: Tensor, inv_temp: float, backend: str | None) -> Tensor:
    """The loss ``()`` of :func:`entropy_op` (the statistics are for its backward)."""
    return entropy_op(chunks, book, float(inv_temp), backend or "")[0]


# The mcq parity case runs this loss (mcq_quantize with entropy_temp): the forward and
# the backward share its verdict, so they always resolve to the same backend and their
# row statistics agree.
declare_gpu_kernels(
    "mcq", {"mcq_entropy_loss": ("triton",), "mcq_entropy_loss backward": ("triton",)}
)
