"""Drop-in for MGVQ's multi-group ``VectorQuantizer`` on the fused search."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcompress._autocast import float32_under_autocast
from fastcompress._validate import check_finite, check_finite_number
from fastcompress.mcq import mcq_search

USAGE_WINDOW = 65536  # MGVQ's codebook_used: the last 65536 indices of each group


class GroupedQuantizer(nn.Module):
    """MGVQ's multi-group quantizer: channel-first features, one embedding of ``n_e`` rows
    whose rows ``[g * n_e / groups, (g + 1) * n_e / groups)`` are group g's codebook.

    Same constructor arguments, state dict (``embedding.weight (n_e, e_dim)``,
    ``codebook_used (groups, 65536)`` with ``show_usage``, ``embed_prob (groups, n_e /
    groups)``) and forward outputs as MGVQ's ``VectorQuantizer``; the nearest-code search
    is :func:`fastcompress.mcq_search` (no ``N x K`` distance matrix, no sort) instead of
    sorting the full distance matrix.

    Parameters
    ----------
    n_e : int
        Rows of the embedding over all groups (16384 in MGVQ's 8-group release).
    e_dim : int
        Channels per group (``C = groups * e_dim``).
    beta : float
        Commitment weight (0.25).
    groups : int
        Number of channel groups G.
    l2_norm : bool
        Cosine search on unit features and unit code rows (MGVQ: True); plain L2 otherwise.
    show_usage : bool
        Keep the ``codebook_used`` window and report each group's usage in training.
    group_mask_probs : sequence of float
        Coarse-to-fine masking (training): group ``0 < g < len`` is zeroed when one
        uniform draw per forward falls below ``group_mask_probs[g]``. MGVQ's released
        fine-tuning uses zeros (nothing masked); its first stage ``(0, 0.2, 0.3, 0.4)``.
    return_min_encodings : bool
        Also return the last group's ``(N, n_e / groups)`` one-hot like MGVQ (off: None,
        it is ``N x K`` floats that nothing downstream reads).
    backend : str, optional
        Backend of :func:`fastcompress.mcq_search`.

    ``forward(z (B, groups * e_dim, H, W))`` returns ``(quant (B, C, H, W), (vq_loss (G,),
    commit_loss (G,), entropy_loss, codebook_usage (G,)), (perplexity (), min_encodings,
    indices (B * H * W, G)))``. In training the losses are per group; in eval they are
    zeros and ``entropy_loss`` is None (in training 0), as in MGVQ.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        groups: int = 8,
        l2_norm: bool = True,
        show_usage: bool = True,
        group_mask_probs: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        return_min_encodings: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if groups <= 0 or n_e % groups:
            raise ValueError(f"n_e={n_e} must be divisible by groups={groups}")
        beta = check_finite_number("beta", beta)
        self.n_e, self.e_dim, self.beta, self.groups = n_e, e_dim, beta, groups
        self.l2_norm, self.show_usage = l2_norm, show_usage
        self.n_e_group = n_e // groups
        self.group_mask_probs = tuple(group_mask_probs)
        self.return_min_encodings = return_min_encodings
        self.backend = backend
        self.prob_alpha = 0.01
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(groups, USAGE_WINDOW))
        self.register_buffer("embed_prob", torch.zeros(groups, self.n_e_group))

    def group_codebooks(self) -> Tensor:
        """``(G, n_e / G, e_dim)`` view of the embedding (carries its gradient)."""
        return self.embedding.weight.view(self.groups, self.n_e_group, self.e_dim)

    @float32_under_autocast  # the re-seeding scores too: float32 inside autocast
    def forward(self, z_groups: Tensor):
        batch, channels, height, width = z_groups.shape
        if channels != self.groups * self.e_dim:
            raise ValueError(
                f"z must be (B, groups * e_dim = {self.groups * self.e_dim}, H, W), "
                f"got {tuple(z_groups.shape)}"
            )
        check_finite_number("beta", self.beta)
        # One uniform draw per forward, as MGVQ takes it, so that a training script's
        # random stream (and so the re-seeding draws below) stays the same.
        mask_draw = float(torch.rand(1))
        masked = [
            self.training and 0 < g < len(self.group_mask_probs)
            and mask_draw < self.group_mask_probs[g]
            for g in range(self.groups)
        ]  # fmt: skip
        books = self.group_codebooks()
        indices = mcq_search(
            z_groups.detach(), books.detach(), normalize=self.l2_norm,
            channel_dim=1, backend=self.backend,
        ).reshape(-1, self.groups)  # fmt: skip  # rows in (b, h, w) order, as MGVQ's
        z = z_groups.float().permute(0, 2, 3, 1).reshape(-1, self.groups, self.e_dim)
        unit_books = F.normalize(books.float(), dim=-1) if self.l2_norm else books.float()
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        picked = unit_books[torch.arange(self.groups, device=z.device), indices]  # (N, G, e)
        keep = torch.tensor([not m for m in masked], device=z.device)
        z_q = (z + (picked - z).detach()) * keep[:, None]
        quant = z_q.view(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()

        zeros = z.new_zeros(self.groups)
        vq_loss, commit_loss, usage = zeros, zeros.clone(), zeros.clone()
        entropy_loss = None
        if self.training:
            entropy_loss = 0
            keep_f = keep.float()
            vq_loss = (picked - z.detach()).square().mean((0, 2)) * keep_f
            commit_loss = self.beta * (picked.detach() - z).square().mean((0, 2)) * keep_f
            usage = self._train_updates(z.detach(), unit_books.detach(), indices, masked)
        # MGVQ reports the perplexity (and one-hot) of the last group it quantised.
        last = max((g for g in range(self.groups) if not masked[g]), default=0)
        avg_probs = torch.bincount(indices[:, last], minlength=self.n_e_group).float()
        avg_probs = avg_probs / max(indices.shape[0], 1)
        perplexity = torch.exp(-(avg_probs * torch.log(avg_probs + 1e-10)).sum())
        min_encodings = None
        if self.return_min_encodings:
            min_encodings = F.one_hot(indices[:, last], self.n_e_group).to(z_groups.dtype)
        out_indices = indices.masked_fill(~keep, -1)
        return (
            quant.to(z_groups.dtype),
            (vq_loss, commit_loss, entropy_loss, usage),
            (perplexity, min_encodings, out_indices),
        )

    @torch.no_grad()
    def _train_updates(
        self, z: Tensor, unit_books: Tensor, indices: Tensor, masked: list[bool]
    ) -> Tensor:
        """The usage window, the usage EMA ``embed_prob`` and MGVQ's re-seeding of rarely
        used codes, group by group in MGVQ's order (so the multinomial draws match)."""
        # The EMA buffer feeds the re-seeding of the embedding: NaN there (a damaged state
        # dict) would spread into the weights without a word.
        check_finite("GroupedQuantizer: embed_prob", self.embed_prob)
        usage = z.new_zeros(self.groups)
        rows = indices.shape[0]
        for g in range(self.groups):
            if masked[g]:  # MGVQ still reports the window's share for a masked group
                if self.show_usage:
                    usage[g] = torch.unique(self.codebook_used[g]).numel() / self.n_e_group
                continue
            if self.show_usage:
                window = self.codebook_used[g]
                kept = max(USAGE_WINDOW - rows, 0)
                window[:kept] = window[USAGE_WINDOW - kept :].clone()
                window[kept:] = indices[rows - (USAGE_WINDOW - kept) :, g].to(window.dtype)
                usage[g] = torch.unique(window).numel() / self.n_e_group
            avg_probs = torch.bincount(indices[:, g], minlength=self.n_e_group).float() / rows
            updated = torch.lerp(self.embed_prob[g], avg_probs, self.prob_alpha)
            self.embed_prob[g].copy_(updated)
            # Each code draws a feature with probability softmax over features of its
            # score -||z - c||^2, shifted by the global max as MGVQ does.
            chunk, book = z[:, g], unit_books[g]
            scores = (
                -chunk.square().sum(1, keepdim=True)
                - book.square().sum(1)
                + 2 * torch.mm(chunk, book.t())
            )
            probs = F.softmax((scores - scores.max()).t(), dim=1)
            if not torch.isfinite(probs).all():
                probs = torch.full_like(probs, 1.0 / probs.numel())
            probs = probs.clamp_min(1e-10)
            probs /= probs.sum()
            drawn = torch.multinomial(probs, num_samples=1).view(-1)
            keep = 1 - torch.exp(-(updated * self.n_e_group * 10) / self.prob_alpha - 0.001)
            keep = keep.unsqueeze(1)
            rows_g = slice(g * self.n_e_group, (g + 1) * self.n_e_group)
            weight = self.embedding.weight.data
            weight[rows_g] = weight[rows_g] * keep + chunk[drawn] * (1 - keep)
        return usage

    def get_codebook_entry(
        self, indices: Tensor, shape=None, channel_first: bool = True, groups_to_use: int = 0
    ) -> Tensor:
        """MGVQ's lookup: ``indices (B, L, G)`` -> ``(B, L, C)``; groups ``>= groups_to_use``
        give zeros (MGVQ's default 0 zeroes every group). ``shape (B, C, H, W)`` reshapes,
        channel-first or not."""
        if not isinstance(indices, Tensor) or indices.dtype.is_floating_point:
            raise TypeError(f"indices must be an integer tensor, got {indices!r:.80}")
        if indices.dim() < 1 or indices.shape[-1] != self.groups:
            raise ValueError(
                f"indices must be (..., groups={self.groups}), got shape {tuple(indices.shape)}"
            )
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            # -1 is what forward returns for a masked group; MGVQ reads it as the last row.
            if low < -1 or high >= self.n_e_group:
                raise ValueError(
                    f"indices must lie in [0, {self.n_e_group}) (n_e / groups; -1 marks a "
                    f"masked group), found values in [{low}, {high}]"
                )
        books = self.group_codebooks()
        if self.l2_norm:
            books = F.normalize(books, dim=-1)
        vectors = books[torch.arange(self.groups, device=indices.device), indices]
        use = torch.arange(self.groups, device=indices.device) < groups_to_use
        quant = (vectors * use[:, None]).flatten(-2)
        if shape is not None:
            if channel_first:
                quant = quant.reshape(shape[0], shape[2], shape[3], shape[1])
                quant = quant.permute(0, 3, 1, 2).contiguous()
            else:
                quant = quant.view(shape)
        return quant

    def extra_repr(self) -> str:
        return (
            f"n_e={self.n_e}, e_dim={self.e_dim}, groups={self.groups}, "
            f"beta={self.beta:g}, l2_norm={self.l2_norm}"
        )
