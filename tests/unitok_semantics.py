"""An independent torch model of UniTok's ``VectorQuantizerM`` (written from its
documented semantics in shared/DESIGN.md, not from fastcompress): the oracle that the
module and the ops are checked against, and a source of UniTok-shaped state dicts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SubQuantizer(nn.Module):
    def __init__(self, vocab: int, width: int, beta: float, entropy_temp: float | None):
        super().__init__()
        self.codebook = nn.Embedding(vocab, width)
        self.register_buffer("vocab_usage", torch.zeros(vocab))
        self.calls = 0
        self.beta = beta
        self.entropy_temp = entropy_temp

    def forward(self, x):
        b, seq, c = x.shape
        z = F.normalize(x.reshape(-1, c), dim=-1).float()
        book = F.normalize(self.codebook.weight, dim=1)
        idx = (z.detach() @ book.T).argmax(1)
        entropy = torch.zeros(())
        if self.entropy_temp is not None:
            sq = (z[:, None, :] - book[None]).square().sum(-1)
            logits = -sq / self.entropy_temp
            p = logits.softmax(-1)
            per_sample = -(p * logits.log_softmax(-1)).sum(-1).mean()
            mean_p = p.mean(0)
            entropy = per_sample + (mean_p * torch.log(mean_p + 1e-7)).sum()
        q = book[idx]
        loss = self.beta * ((q.detach() - z) ** 2).mean() + ((q - z.detach()) ** 2).mean()
        out = z + (q - z).detach()
        hist = torch.bincount(idx, minlength=book.shape[0]).float()
        if self.training and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hist)
        prob = hist / hist.sum()
        usage_pct = 100.0 * (prob > 0.01 / book.shape[0]).float().mean()
        with torch.no_grad():
            if self.calls == 0:
                self.vocab_usage.copy_(prob)
            else:
                m = 0.9 if self.calls < 100 else 0.99
                self.vocab_usage.mul_(m).add_(prob * (1 - m))
        self.calls += 1
        return out.view(b, seq, c), loss, entropy, usage_pct, idx.view(b, seq)


class UniTokQuantizer(nn.Module):
    def __init__(
        self,
        vocab_size,
        vocab_width,
        beta=0.25,
        use_entropy_loss=False,
        entropy_temp=0.01,
        num_codebooks=16,
    ):
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebooks = nn.ModuleList(
            SubQuantizer(
                vocab_size // num_codebooks,
                vocab_width // num_codebooks,
                beta,
                entropy_temp if use_entropy_loss else None,
            )
            for _ in range(num_codebooks)
        )

    def forward(self, features):
        parts = features.chunk(self.num_codebooks, dim=-1)
        outs = [cb(p) for cb, p in zip(self.codebooks, parts, strict=False)]
        g = self.num_codebooks
        return (
            torch.cat([o[0] for o in outs], -1),
            sum(o[1] for o in outs) / g,
            sum(o[2] for o in outs) / g,
            sum(o[3] for o in outs) / g,
            torch.stack([o[4] for o in outs], 1),
        )
