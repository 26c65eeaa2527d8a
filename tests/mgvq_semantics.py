"""An independent torch model of MGVQ's multi-group ``VectorQuantizer`` (re-derived from its
behaviour, not from fastcompress and not its code): the oracle for
:class:`fastcompress.nn.GroupedQuantizer`.

Rules it encodes, per forward:
- one ``torch.rand(1)`` draw (coarse-to-fine group masking);
- per group g, channels ``[g*e, (g+1)*e)`` of a channel-first input, unit-normalised;
  the group's codebook is rows ``[g*K, (g+1)*K)`` of one embedding, unit-normalised;
- score ``-|z|^2 - |c|^2 + 2 z.c``; the code is the last column of an ascending sort of the
  scores (the best; among exact ties, whichever the sort puts last);
- training: per-group losses ``mean((q - z.detach())^2)`` and ``beta * mean((q.detach() -
  z)^2)``; a sliding window of the last 65536 indices gives the usage share; the usage
  EMA ``embed_prob = lerp(embed_prob, mean one-hot, 0.01)``; every code draws one feature
  from a softmax over features of its (globally shifted) score column and moves towards
  it by ``exp(-embed_prob * K * 10 / 0.01 - 0.001)``;
- outputs the straight-through unit features (channel-first), the per-group losses and
  usage, and the perplexity and one-hot of the last group, indices ``(B*H*W, G)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MGVQQuantizer(nn.Module):
    def __init__(self, n_e, e_dim, beta, groups, l2_norm=True, show_usage=True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.groups = n_e, e_dim, beta, groups
        self.l2_norm, self.show_usage = l2_norm, show_usage
        self.per_group = n_e // groups
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / n_e, 1.0 / n_e)
            if l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if show_usage:
            self.register_buffer("codebook_used", torch.zeros(groups, 65536))
        self.register_buffer("embed_prob", torch.zeros(groups, self.per_group))

    def forward(self, z_groups):
        k, e = self.per_group, self.e_dim
        vq_loss, commit_loss, usage = (torch.zeros(self.groups) for _ in range(3))
        torch.rand(1)  # the masking draw (every group kept at probability 0)
        outs, all_idx = [], []
        entropy = None
        for g in range(self.groups):
            z = z_groups[:, g * e : (g + 1) * e].permute(0, 2, 3, 1)
            flat = z.reshape(-1, e)
            book = self.embedding.weight[g * k : (g + 1) * k]
            if self.l2_norm:
                z, flat, book = (
                    F.normalize(z, dim=-1),
                    F.normalize(flat, dim=-1),
                    F.normalize(book, dim=-1),
                )
            scores = -flat.pow(2).sum(1, keepdim=True) - book.pow(2).sum(1) + 2 * flat @ book.t()
            idx = scores.sort(dim=1).indices[:, -1]
            q = book[idx].view(z.shape)
            all_idx.append(idx)
            if self.training:
                if self.show_usage:
                    window = self.codebook_used[g]
                    n = idx.shape[0]
                    window[:-n] = window[n:].clone()
                    window[-n:] = idx.float()
                    usage[g] = window.unique().numel() / k
                vq_loss[g] = ((q - z.detach()) ** 2).mean()
                commit_loss[g] = self.beta * ((q.detach() - z) ** 2).mean()
                entropy = 0
            outs.append((z + (q - z).detach()).permute(0, 3, 1, 2))
            one_hot = F.one_hot(idx, k).float()
            avg = one_hot.mean(0)
            perplexity = torch.exp(-(avg * torch.log(avg + 1e-10)).sum())
            if self.training:
                with torch.no_grad():
                    new_prob = torch.lerp(self.embed_prob[g], avg, 0.01)
                    self.embed_prob[g] = new_prob
                    probs = F.softmax((scores - scores.max()).t(), dim=1).clamp(min=1e-10)
                    probs = probs / probs.sum()
                    pick = torch.multinomial(probs, 1).view(-1)
                    target = flat.detach()[pick]
                    stay = 1 - torch.exp(-new_prob * k * 10 / 0.01 - 0.001)
                    rows = self.embedding.weight.data[g * k : (g + 1) * k]
                    rows.copy_(rows * stay[:, None] + target * (1 - stay[:, None]))
        return (
            torch.cat(outs, dim=1),
            (vq_loss, commit_loss, entropy, usage),
            (perplexity, one_hot, torch.stack(all_idx, -1)),
        )
