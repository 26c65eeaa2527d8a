"""Drop-in for UniTok's ``VectorQuantizerM`` on the fused ``mcq_quantize`` op."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastcompress._validate import check_finite_number
from fastcompress.mcq import MCQOutput, mcq_dequantize, mcq_quantize, mcq_search


class NormalizedEmbedding(nn.Embedding):
    """UniTok's ``NormalizedEmbedding``: ``weight (K, d)`` is stored raw, every lookup
    returns unit rows. ``forward(idx (...)) -> (..., d)``; ``normalize=False`` (a plain
    L2 quantizer) returns the raw rows, like ``nn.Embedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, normalize: bool = True) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.normalize = normalize

    def get_norm_weight(self) -> Tensor:
        """``(K, d)``: the rows the search compares against (unit rows when normalizing)."""
        return F.normalize(self.weight, dim=1) if self.normalize else self.weight

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.get_norm_weight())


class CodebookEntry(nn.Module):
    """One sub-codebook, laid out like UniTok's ``VectorQuantizer`` so state dicts load:
    ``codebook.weight (K, d)`` (a :class:`NormalizedEmbedding`: ``codebook(idx)`` and
    ``codebook.get_norm_weight()`` give unit rows, as UniTok's) and the buffer
    ``vocab_usage (K,)``."""

    def __init__(self, vocab_size: int, vocab_width: int, normalize: bool = True) -> None:
        super().__init__()
        self.codebook = NormalizedEmbedding(vocab_size, vocab_width, normalize)
        self.register_buffer("vocab_usage", torch.zeros(vocab_size))
        self.vocab_usage_record_times: int = 0

    def update_usage(self, prob: Tensor) -> None:
        # UniTok's EMA: copy on the first call, 0.9 for the first 100 calls, then 0.99.
        if self.vocab_usage_record_times == 0:
            self.vocab_usage.copy_(prob)
        elif self.vocab_usage_record_times < 100:
            self.vocab_usage.mul_(0.9).add_(prob, alpha=0.1)
        else:
            self.vocab_usage.mul_(0.99).add_(prob, alpha=0.01)
        self.vocab_usage_record_times += 1


class MultiCodebookQuantizer(nn.Module):
    """Multi-codebook quantizer, same arguments and outputs as UniTok's ``VectorQuantizerM``.

    Parameters
    ----------
    vocab_size : int
        Total codes over all codebooks; each has ``vocab_size // num_codebooks`` rows.
    vocab_width : int
        Channels C of the features; each codebook has ``vocab_width // num_codebooks`` dims.
    beta : float
        Commitment weight.
    use_entropy_loss : bool
        Also compute UniTok's entropy loss (temperature ``entropy_temp``).
    num_codebooks : int
        G.
    normalize : bool
        Cosine (UniTok, MGVQ) when True, plain L2 otherwise.
    backend : str, optional
        Forces a backend of :func:`fastcompress.mcq_quantize`.

    ``forward(features (B, L, C))`` returns ``(features_hat (B, L, C), vq_loss (),
    entropy_loss (), vocab_usage ())`` where ``vocab_usage`` is the mean over codebooks
    of the percentage of codes chosen with probability above ``0.01 / K``.
    """

    def __init__(
        self,
        vocab_size: int,
        vocab_width: int,
        beta: float = 0.25,
        use_entropy_loss: bool = False,
        entropy_temp: float = 0.01,
        num_codebooks: int = 16,
        normalize: bool = True,
        backend: str | None = None,
        output_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        # UniTok's forward returns float32 features_hat whatever the input dtype (it runs
        # the quantizer in float32); None returns the input's dtype instead.
        self.output_dtype = output_dtype
        if vocab_size % num_codebooks or vocab_width % num_codebooks:
            raise ValueError(
                f"vocab_size={vocab_size} and vocab_width={vocab_width} must both "
                f"be divisible by num_codebooks={num_codebooks}"
            )
        self.num_codebooks = num_codebooks
        self.beta = check_finite_number("beta", beta)
        check_finite_number("entropy_temp", entropy_temp)
        self.use_entropy_loss = use_entropy_loss
        self.entropy_temp = entropy_temp
        self.normalize = normalize
        self.backend = backend
        self.codebooks = nn.ModuleList(
            CodebookEntry(vocab_size // num_codebooks, vocab_width // num_codebooks, normalize)
            for _ in range(num_codebooks)
        )

    def init_vocab(self, eini: float) -> None:
        """UniTok's initialisation: truncated normal (eini > 0) or uniform (eini < 0)."""
        for entry in self.codebooks:
            weight = entry.codebook.weight.data
            if eini > 0:
                nn.init.trunc_normal_(weight, std=eini)
            elif eini < 0:
                base = weight.shape[1] ** -0.5 / 36
                weight.uniform_(-abs(eini) * base, abs(eini) * base)

    def stacked_codebooks(self) -> Tensor:
        """``(G, K, d)`` view of the parameters (a copy that carries their gradients)."""
        return torch.stack([entry.codebook.weight for entry in self.codebooks])

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out, usage = self.quantize(features)
        entropy = out.entropy_loss if out.entropy_loss is not None else out.vq_loss.new_zeros(())
        z_q = out.z_q.to(features.dtype if self.output_dtype is None else self.output_dtype)
        return z_q, out.vq_loss, entropy, usage

    def quantize(self, features: Tensor) -> tuple[MCQOutput, Tensor]:
        """Like ``forward`` but returns the whole :class:`fastcompress.MCQOutput` (with
        indices ``(..., G)``) and the usage percentage; the usage EMA is updated."""
        # The float32 master codebook whatever the feature dtype, as UniTok searches: a
        # codebook rounded to bf16 picks other codes and rounds the codebook gradients.
        features, books, normalize = self._as_unitok_sees(features)
        out = mcq_quantize(
            features,
            books,
            beta=self.beta,
            normalize=normalize,
            entropy_temp=self.entropy_temp if self.use_entropy_loss else None,
            backend=self.backend,
        )
        return out, self._record_usage(out.usage_counts)

    def _as_unitok_sees(self, features: Tensor) -> tuple[Tensor, Tensor, bool]:
        """(features, codebooks, normalize) for the op. UniTok normalises each chunk in the
        features' own dtype and only then casts to float32: for bf16 / f16 features the
        chunks are normalised here the same way (rounded unit chunks pick other codes at
        near-ties than float32 ones: 37-41 of 8,192 in bf16), and the op gets them as they
        are, against the unit float32 code rows (L2 to unit rows is the cosine argmax;
        the losses and z_q are then UniTok's, on its rounded chunks)."""
        books = self.stacked_codebooks()
        half = features.dtype in (torch.bfloat16, torch.float16)
        if not (self.normalize and half and features.shape[-1] % self.num_codebooks == 0):
            return features, books, self.normalize  # (a wrong C: the op names it)
        groups = self.num_codebooks
        chunks = features.unflatten(-1, (groups, features.shape[-1] // groups))
        unit = F.normalize(chunks, dim=-1).float().flatten(-2)
        return unit, F.normalize(books.float(), dim=-1), False

    @torch.no_grad()
    def _record_usage(self, counts: Tensor) -> Tensor:
        counts = counts.float()
        if self.training and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        prob = counts / counts.sum(-1, keepdim=True).clamp_min(1)
        vocab = prob.shape[-1]
        percent = (prob > 0.01 / vocab).float().mean(-1).mul(100)
        for entry, row in zip(self.codebooks, prob, strict=False):
            entry.update_usage(row)
        return percent.mean()

    def f_to_idx(self, features: Tensor) -> Tensor:
        """``(B, L, C)`` -> indices ``(B, G, L)`` (UniTok's layout)."""
        features, books, normalize = self._as_unitok_sees(features)
        idx = mcq_search(features, books.detach(), normalize=normalize, backend=self.backend)
        return idx.movedim(-1, 1)

    def idx_to_f(self, indices: Tensor) -> Tensor:
        """``(B, G, ...)`` -> features ``(B, L, C)`` with ``L = prod(...)``."""
        if indices.dim() < 2 or indices.shape[1] != self.num_codebooks:
            raise ValueError(
                f"indices must be (B, G={self.num_codebooks}, ...), "
                f"got shape {tuple(indices.shape)}"
            )
        flat = indices.flatten(start_dim=2).movedim(1, -1)  # (B, L, G)
        return mcq_dequantize(flat, self.stacked_codebooks(), normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"num_codebooks={self.num_codebooks}, beta={self.beta:g}, normalize={self.normalize}"
