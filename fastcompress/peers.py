"""The peers the benchmarks run beside fastcompress, and the benchmark-only baselines:
faiss-cpu's product quantizer, vector-quantize-pytorch, and UniTok's own search loop.
Imported by ``bench`` and ``benchmarks/`` only, never by the library itself (the import
contract in ``.importlinter`` checks it), so ``import fastcompress`` never touches them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unitok_style_search(z: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    """How UniTok's own code searches: a Python loop over codebooks, ``z @ c.T``, argmax."""
    groups, _, dim = books.shape
    out = []
    for g, part in enumerate(z.split(dim, dim=-1)):
        zn = F.normalize(part, dim=-1)
        cn = F.normalize(books[g], dim=1)
        out.append(torch.argmax(zn @ cn.T, dim=1))
    return torch.stack(out, dim=1)


class FaissPQ:
    """faiss ``ProductQuantizer(C, G, log2 K).compute_codes`` with our (unit) codebooks.
    On unit vectors the L2 argmin equals the cosine argmax, so indices must agree."""

    def __init__(self, books: torch.Tensor):
        import faiss

        groups, vocab, dim = books.shape
        self.faiss = faiss
        self.pq = faiss.ProductQuantizer(groups * dim, groups, int(vocab).bit_length() - 1)
        unit = F.normalize(books.float(), dim=-1).contiguous()
        faiss.copy_array_to_vector(unit.numpy().ravel(), self.pq.centroids)
        self.groups, self.bits = groups, int(vocab).bit_length() - 1

    def __call__(self, z_unit):
        import numpy as np

        codes = self.pq.compute_codes(z_unit)
        bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : self.groups * self.bits]
        weights = (1 << np.arange(self.bits)).astype(np.int64)
        return torch.from_numpy((bits.reshape(-1, self.groups, self.bits) * weights).sum(-1))


class VectorQuantizePytorch:
    """vector-quantize-pytorch ``VectorQuantize(..., heads=G, separate_codebook_per_head)``
    in eval mode, its codebooks set to ours (unit rows), indices only."""

    def __init__(self, books: torch.Tensor):
        from vector_quantize_pytorch import VectorQuantize

        groups, vocab, dim = books.shape
        self.vq = VectorQuantize(
            dim=groups * dim,
            codebook_size=vocab,
            codebook_dim=dim,
            heads=groups,
            separate_codebook_per_head=True,
        ).eval()
        with torch.no_grad():
            self.vq._codebook.embed.copy_(F.normalize(books.float(), dim=-1))

    def __call__(self, z_unit):
        with torch.no_grad():
            return self.vq(z_unit[None])[1][0]


def unit_chunks(z: torch.Tensor, books: torch.Tensor) -> torch.Tensor:
    groups, _, dim = books.shape
    return F.normalize(z.view(-1, groups, dim), dim=-1).reshape(z.shape).contiguous()
