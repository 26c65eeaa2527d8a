"""HTC-VLM hybrid anchors: discrete MGVQ features -> 4 anchor tokens, and the assembly
of ``[prefix; anchors; patches; <voco>; text]`` with its :class:`VocoLayout`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcompress.voco import VocoLayout


class HybridAnchorProjector(nn.Module):
    """Two-layer GELU MLP from flattened MGVQ quantised features ``(B, C, H, W)`` (or
    ``(B, C*H*W)``) to ``num_anchors`` tokens of the LLM width: ``(B, num_anchors, width)``."""

    def __init__(
        self, in_features: int, width: int, num_anchors: int = 4, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.width, self.num_anchors = in_features, width, num_anchors
        hidden = hidden or width
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, num_anchors * width)
        )

    def forward(self, features: Tensor) -> Tensor:
        flat = features.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"features must flatten to (B, {self.in_features}), got {tuple(features.shape)}"
            )
        return self.mlp(flat).view(-1, self.num_anchors, self.width)


def assemble_hybrid_sequence(
    anchors: Tensor,
    patches: Tensor,
    voco: Tensor,
    prefix: Tensor | None = None,
    text: Tensor | None = None,
    hybrid: str = "isolated",
    text_sees_prefix: bool = False,
) -> tuple[Tensor, VocoLayout]:
    """``[prefix; anchors; patches; voco; text]`` along the sequence and its layout.

    anchors ``(B, A, D)``, patches ``(B, N, D)``, voco ``(n_voco, D)`` (a learned token,
    shared) or ``(B, n_voco, D)``, prefix / text ``(B, *, D)`` or None. The text sees the
    prefix only with ``text_sees_prefix=True`` (VoCo-LLaMA and HTC-VLM: it does not)."""
    batch, _, width = anchors.shape
    if patches.shape[0] != batch or patches.shape[2] != width:
        raise ValueError(f"patches must be (B={batch}, N, {width}), got {tuple(patches.shape)}")
    if voco.dim() == 2:
        voco = voco.unsqueeze(0).expand(batch, -1, -1)
    parts = [p for p in (prefix, anchors, patches, voco, text) if p is not None]
    for part in parts:
        if part.dim() != 3 or part.shape[0] != batch or part.shape[2] != width:
            raise ValueError(f"every part must be (B={batch}, *, {width}), got {tuple(part.shape)}")
    layout = VocoLayout(
        0 if prefix is None else prefix.shape[1],
        anchors.shape[1] + patches.shape[1],
        voco.shape[1],
        0 if text is None else text.shape[1],
        hybrid,
        text_sees_prefix,
    )
    return torch.cat(parts, dim=1), layout
