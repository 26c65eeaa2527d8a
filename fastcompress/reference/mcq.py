"""Plain-torch multi-codebook quantization, written the way UniTok computes it.

Canonical layout: ``z`` is ``(N, C)`` with ``C = G * d`` (chunk ``g`` is columns
``g*d:(g+1)*d``), ``codebooks`` is ``(G, K, d)``. Everything runs in float32, one
codebook at a time, so the peak extra memory is one ``N x K`` score matrix.
These functions are differentiable by torch autograd (they are the gradient oracle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for float32 / bfloat16 / float16 (UniTok runs in float32); float64 stays
    float64 so that gradcheck can run on the references."""
    return torch.promote_types(x.dtype, torch.float32)


def _prepare(z: Tensor, codebooks: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    num_codebooks, _, dim = codebooks.shape
    chunks = z.to(compute_dtype(z)).reshape(z.shape[0], num_codebooks, dim)
    book = codebooks.to(compute_dtype(codebooks))
    if normalize:
        chunks = F.normalize(chunks, dim=-1)
        book = F.normalize(book, dim=-1)
    return chunks, book


def _nearest(chunk: Tensor, book: Tensor, normalize: bool) -> Tensor:
    # Cosine: argmax of the dot product (UniTok). L2: argmin of the squared distance,
    # written out as |z|^2 - 2 z.c + |c|^2 like UniTok's entropy term.
    if normalize:
        return torch.argmax(chunk @ book.T, dim=1)
    dist = chunk.square().sum(1, keepdim=True) - 2 * chunk @ book.T + book.square().sum(1)
    return torch.argmin(dist, dim=1)


def mcq_search_reference(z: Tensor, codebooks: Tensor, normalize: bool = True) -> Tensor:
    """Nearest code per chunk. ``z (N, C)``, ``codebooks (G, K, d)`` -> ``(N, G)`` int64."""
    with torch.no_grad():
        chunks, book = _prepare(z, codebooks, normalize)
        cols = [_nearest(chunks[:, g], book[g], normalize) for g in range(book.shape[0])]
    return torch.stack(cols, dim=1) if cols else z.new_empty((z.shape[0], 0), dtype=torch.long)


def mcq_quantize_reference(
    z: Tensor, codebooks: Tensor, beta: float = 0.25, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """UniTok ``VectorQuantizerM.forward`` semantics on the canonical layout.

    Returns ``(z_q (N, C) in z.dtype, indices (N, G) int64, vq_loss () float32,
    counts (G, K) int64)``. ``z_q`` is the straight-through output
    ``(q - z_n).detach() + z_n``; ``vq_loss`` is the mean over codebooks of
    ``beta * mse(q.detach(), z_n) + mse(q, z_n.detach())``.
    """
    num_codebooks, vocab, _ = codebooks.shape
    n = z.shape[0]
    chunks, book = _prepare(z, codebooks, normalize)
    outs, idxs, counts = [], [], []
    vq_loss = chunks.new_zeros(())
    for g in range(num_codebooks):
        chunk = chunks[:, g]
        idx = _nearest(chunk.detach(), book[g].detach(), normalize)
        q = F.embedding(idx, book[g])
        if n > 0:
            vq_loss = vq_loss + beta * F.mse_loss(q.detach(), chunk) + F.mse_loss(q, chunk.detach())
        outs.append((q.detach() - chunk.detach()) + chunk)
        idxs.append(idx)
        counts.append(torch.bincount(idx, minlength=vocab))
    z_q = torch.cat(outs, dim=-1).to(z.dtype)
    return z_q, torch.stack(idxs, dim=1), vq_loss / num_codebooks, torch.stack(counts)


def mcq_entropy_loss_reference(
    z: Tensor, codebooks: Tensor, temperature: float = 0.01, normalize: bool = True
) -> Tensor:
    """UniTok's entropy loss, dense ``N x K`` per codebook, averaged over codebooks.

    ``logits = -|z_n - c_n|^2 / temperature``; loss = mean per-sample entropy minus the
    entropy of the batch-mean distribution (with UniTok's ``+1e-7`` inside the log).
    """
    chunks, book = _prepare(z, codebooks, normalize)
    total = chunks.new_zeros(())
    for g in range(book.shape[0]):
        chunk, cb = chunks[:, g], book[g]
        dist = chunk.square().sum(1, keepdim=True) + cb.square().sum(1)
        dist = torch.addmm(dist, chunk, cb.T, alpha=-2, beta=1)
        logits = -dist / temperature
        prob, log_prob = logits.softmax(-1), logits.log_softmax(-1)
        per_sample = (-prob * log_prob).sum(-1).mean()
        avg = prob.mean(0)
        codebook_entropy = (-avg * torch.log(avg + 1e-7)).sum()
        total = total + per_sample - codebook_entropy
    return total / book.shape[0]


def normalize_backward(grad: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """The gradient through ``F.normalize`` given the unit vectors and the norms (the
    analytic backwards of the kernels share it)."""
    # y = x / max(|x|, eps): dx = (g - y (y.g)) / |x| where the clamp is inactive, g / eps
    # where it is active (torch passes the norm's gradient through at |x| == eps too).
    active = norm >= 1e-12
    denom = norm.clamp_min(1e-12)
    through = (grad - unit * (unit * grad).sum(-1, keepdim=True)) / denom
    return torch.where(active, through, grad / denom)


def split_norm(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """``(x / max(|x|, eps), |x|)`` over the last dim, or ``(x, None)`` without normalize."""
    if not normalize:
        return x, None
    norm = x.norm(dim=-1, keepdim=True)
    return x / norm.clamp_min(1e-12), norm
