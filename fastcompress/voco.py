"""HTC-VLM hybrid tokens and the VoCo bottleneck: decoupled-mask attention.

Sequence: ``[prefix; hybrid (anchors + patches); <voco> x n_voco; text]``. Mask (True =
may attend):

- prefix rows: causal over the prefix;
- hybrid rows: ``"isolated"`` (HTC-VLM): each sees itself only; ``"causal"``
  (VoCo-LLaMA): the prefix and the hybrid tokens up to itself;
- ``<voco>`` rows: the prefix, every hybrid token, and ``<voco>`` up to itself;
- text rows: every ``<voco>`` and text up to itself, never the hybrids. VoCo-LLaMA
  hides everything before the first ``<voco>`` from the text, the prefix (BOS, system
  prompt) included, and HTC-VLM's text "only reads <voco>": so by default the text does
  not see the prefix either; ``text_sees_prefix=True`` opens the prefix to the text.

``voco_attention`` exploits the structure instead of masking an ``L x L`` matrix:
isolated hybrid rows return their own value (softmax over one key), and every other
region attends to at most three contiguous key segments, the last one causal. After
prefill the text needs only prefix + ``<voco>`` + text keys: ``compact_kv_cache``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcompress._autocast import float32_under_autocast, register_float32_autocast
from fastcompress._backend import BackendUnavailableError, declare_gpu_kernels, select_backend
from fastcompress._parity import assert_close
from fastcompress._validate import FLOAT_DTYPES, check_finite, check_finite_number, check_tensor

HYBRID_MODES = ("isolated", "causal")


@dataclasses.dataclass(frozen=True)
class VocoLayout:
    """Token counts of ``[prefix; hybrid; voco; text]``, the hybrid mask mode and whether
    the text rows see the prefix (False: VoCo-LLaMA's and HTC-VLM's mask)."""

    n_prefix: int
    n_hybrid: int
    n_voco: int
    n_text: int
    hybrid: str = "isolated"
    text_sees_prefix: bool = False

    def __post_init__(self) -> None:
        for name in ("n_prefix", "n_hybrid", "n_voco", "n_text"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")
        if self.hybrid not in HYBRID_MODES:
            raise ValueError(f"hybrid must be one of {HYBRID_MODES}, got {self.hybrid!r}")
        if not isinstance(self.text_sees_prefix, bool):
            raise ValueError(f"text_sees_prefix must be a bool, got {self.text_sees_prefix!r}")

    @property
    def length(self) -> int:
        return self.n_prefix + self.n_hybrid + self.n_voco + self.n_text

    @property
    def hybrid_start(self) -> int:
        return self.n_prefix

    @property
    def voco_start(self) -> int:
        return self.n_prefix + self.n_hybrid

    @property
    def text_start(self) -> int:
        return self.voco_start + self.n_voco

    def regions(self) -> list[tuple[int, int, tuple[tuple[int, int], ...], tuple[int, int]]]:
        """``(row_start, row_end, full_key_segments, causal_key_segment)`` per region with
        attention; isolated hybrid rows are absent (they return their own value)."""
        p, h, v, t = self.hybrid_start, self.voco_start, self.text_start, self.length
        out = []
        if self.n_prefix:
            out.append((0, p, (), (0, p)))
        if self.n_hybrid and self.hybrid == "causal":
            out.append((p, h, ((0, p),), (p, h)))
        if self.n_voco:
            out.append((h, v, ((0, h),), (h, v)))
        if self.n_text:
            full = ((0, p), (h, v)) if self.text_sees_prefix else ((h, v),)
            out.append((v, t, full, (v, t)))
        return out


def _visible(layout: VocoLayout, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """The mask predicate on broadcastable index tensors (shared by mask and mask_mod)."""
    p, h, v = layout.hybrid_start, layout.voco_start, layout.text_start
    causal = kv_idx <= q_idx
    q_prefix, k_prefix = q_idx < p, kv_idx < p
    q_hybrid, k_hybrid = (q_idx >= p) & (q_idx < h), (kv_idx >= p) & (kv_idx < h)
    q_voco, k_voco = (q_idx >= h) & (q_idx < v), (kv_idx >= h) & (kv_idx < v)
    q_text, k_text = q_idx >= v, kv_idx >= v
    if layout.hybrid == "isolated":
        hybrid_rows = q_hybrid & (kv_idx == q_idx)
    else:
        hybrid_rows = q_hybrid & (k_prefix | (k_hybrid & causal))
    return (
        (q_prefix & k_prefix & causal)
        | hybrid_rows
        | (q_voco & (k_prefix | k_hybrid | (k_voco & causal)))
        | (q_text & ((k_prefix & layout.text_sees_prefix) | k_voco | (k_text & causal)))
    )


def voco_mask(
    n_prefix: int,
    n_hybrid: int,
    n_voco: int,
    n_text: int,
    hybrid: str = "isolated",
    device: torch.device | str | None = None,
    text_sees_prefix: bool = False,
) -> Tensor:
    """Dense boolean mask ``(L, L)``, True where a query row may attend to a key."""
    layout = VocoLayout(n_prefix, n_hybrid, n_voco, n_text, hybrid, text_sees_prefix)
    idx = torch.arange(layout.length, device=device)
    return _visible(layout, idx[:, None], idx[None, :])


def voco_mask_mod(layout: VocoLayout):
    """``mask_mod(b, h, q_idx, kv_idx)`` for ``torch.nn.attention.flex_attention``."""

    def mask_mod(b, h, q_idx, kv_idx):
        return _visible(layout, q_idx, kv_idx)

    return mask_mod


def voco_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, layout: VocoLayout, scale: float | None = None
) -> Tensor:
    """``scaled_dot_product_attention`` with the dense mask (the oracle)."""
    mask = voco_mask(
        layout.n_prefix,
        layout.n_hybrid,
        layout.n_voco,
        layout.n_text,
        layout.hybrid,
        device=q.device,
        text_sees_prefix=layout.text_sees_prefix,
    )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    ).contiguous()


def _segment_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rows: tuple[int, int],
    full: tuple[tuple[int, int], ...],
    causal: tuple[int, int],
    scale: float,
) -> Tensor:
    """Rows ``[r0, r1)`` over the full segments plus the causal segment (key j visible to
    row i when j <= i). Scores per key span by batched matmul on slices of k and v, which
    stay contiguous per (batch, head), so no key or value is copied (SDPA copied the
    <voco> row's 581 keys: 150 MB at batch 8); only the small score matrix is built."""
    r0, r1 = rows
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    # GQA: the query heads of a group become extra rows of one kv head.
    queries = q[:, :, r0:r1].float().reshape(batch, kv_heads, group * (r1 - r0), dim)
    spans = _merge_adjacent([seg for seg in full if seg[1] > seg[0]] + [causal])
    scores = (
        torch.cat(
            [torch.matmul(queries, k[:, :, a:b].float().transpose(-1, -2)) for a, b in spans],
            dim=-1,
        )
        * scale
    )
    c0, c1 = causal
    row_pos = torch.arange(r0, r1, device=q.device).repeat(group)
    hidden = torch.arange(c0, c1, device=q.device)[None, :] > row_pos[:, None]
    scores[..., scores.shape[-1] - (c1 - c0) :].masked_fill_(hidden, float("-inf"))
    probs = scores.softmax(-1)
    out, offset = 0, 0
    for a, b in spans:
        out = out + torch.matmul(probs[..., offset : offset + b - a], v[:, :, a:b].float())
        offset += b - a
    return out.reshape(batch, heads, r1 - r0, dim).to(q.dtype)


def _merge_adjacent(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = [spans[0]]
    for a, b in spans[1:]:
        if a == merged[-1][1]:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def _own_values(v: Tensor, heads: int, rows: tuple[int, int]) -> Tensor:
    """Isolated hybrid rows: softmax over a single key is 1, the output is its value."""
    own = v[:, :, rows[0] : rows[1]]
    return own.repeat_interleave(heads // v.shape[1], dim=1) if heads != v.shape[1] else own


def check_voco_args(q: Tensor, k: Tensor, v: Tensor, layout: VocoLayout) -> None:
    """Shapes, dtypes and devices (the public function, the op and its fake run this)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES)
    batch, heads, length, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[2:] != (length, dim):
        raise ValueError(
            f"k and v must both be (B={batch}, H_kv, L={length}, D={dim}), got "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or dim == 0:
        raise ValueError(f"k and v must have H_kv > 0 and D > 0, got shape {tuple(k.shape)}")
    if heads % k.shape[1]:
        raise ValueError(f"q has H={heads} heads, not a multiple of H_kv={k.shape[1]}")
    if length != layout.length:
        raise ValueError(
            f"sequence length L={length} does not match the layout's "
            f"{layout.length} (prefix {layout.n_prefix} + hybrid {layout.n_hybrid} "
            f"+ voco {layout.n_voco} + text {layout.n_text})"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype or k.device != q.device or v.device != q.device:
        raise TypeError(
            f"q, k and v must share dtype and device, got {q.dtype}/{q.device}, "
            f"{k.dtype}/{k.device} and {v.dtype}/{v.device}"
        )


@float32_under_autocast
def voco_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: VocoLayout,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Decoupled-mask attention exploiting the layout.

    ``q (B, H, L, D)``, ``k``/``v`` ``(B, H_kv, L, D)`` (GQA: H % H_kv == 0), ``L =
    layout.length`` -> ``(B, H, L, D)``; the same numbers as SDPA with ``voco_mask``."""
    if not isinstance(layout, VocoLayout):
        raise TypeError(f"layout must be a VocoLayout, got {type(layout).__name__}")
    check_voco_args(q, k, v, layout)
    dim = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    check_finite_number("softmax_scale", scale)
    if q.numel() == 0:
        return q.new_empty(q.shape)
    return _voco_attention_op(
        q,
        k,
        v,
        layout.n_prefix,
        layout.n_hybrid,
        layout.n_voco,
        layout.n_text,
        layout.hybrid,
        layout.text_sees_prefix,
        float(scale),
        backend or "",
    )


@torch.library.custom_op("fastcompress::voco_attention", mutates_args=())
def _voco_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_prefix: int,
    n_hybrid: int,
    n_voco: int,
    n_text: int,
    hybrid: str,
    text_sees_prefix: bool,
    scale: float,
    backend: str,
) -> Tensor:
    layout = VocoLayout(n_prefix, n_hybrid, n_voco, n_text, hybrid, text_sees_prefix)
    check_voco_args(q, k, v, layout)
    check_finite_number("scale", scale)
    heads = q.shape[1]
    name = select_backend(q.device, backend, op="voco_attention")
    for arg, value in (("q", q), ("k", k), ("v", v)):
        check_finite(arg, value)
    if name == "reference":
        return voco_attention_reference(q, k, v, layout, scale)
    if name == "cuda":
        raise BackendUnavailableError("voco_attention: no CUDA C++ kernel; use 'triton'")
    # Contiguous whatever q's strides: the Triton kernel stores with a unit lane stride
    # (empty_like would keep a strided q's layout), and the fake below must agree.
    out = q.new_empty(q.shape)
    if layout.n_hybrid and layout.hybrid == "isolated":
        rows = (layout.hybrid_start, layout.voco_start)
        out[:, :, rows[0] : rows[1]] = _own_values(v, heads, rows)
    if name == "triton":
        from fastcompress.triton_kernels.voco import segment_attention_triton

        if k.stride() != v.stride() or k.stride(-1) != 1 or q.stride(-1) != 1:
            k, v, q = k.contiguous(), v.contiguous(), q.contiguous()
        for r0, r1, full, causal in layout.regions():
            segment_attention_triton(q, k, v, out, (r0, r1), full, causal, scale)
        return out
    for r0, r1, full, causal in layout.regions():
        out[:, :, r0:r1] = _segment_attention_torch(q, k, v, (r0, r1), full, causal, scale)
    return out


_LIB = torch.library.Library("fastcompress", "FRAGMENT")  # kept: a dropped Library unregisters
register_float32_autocast(_LIB, "voco_attention")


@_voco_attention_op.register_fake
def _(q, k, v, n_prefix, n_hybrid, n_voco, n_text, hybrid, text_sees_prefix, scale, backend):
    layout = VocoLayout(n_prefix, n_hybrid, n_voco, n_text, hybrid, text_sees_prefix)
    check_voco_args(q, k, v, layout)
    check_finite_number("scale", scale)
    return q.new_empty(q.shape)


def compact_kv_cache(
    k_cache: Tensor, v_cache: Tensor, layout: VocoLayout
) -> tuple[Tensor, Tensor, VocoLayout]:
    """Drop what the text never reads after prefill: ``(B, H_kv, L, D)`` caches ->
    ``(B, H_kv, n_voco + n_text, D)`` (``n_prefix + n_voco + n_text`` when
    ``layout.text_sees_prefix``) and the layout of what is kept. Text (and later decoded
    tokens) never read hybrid keys, so attention over the compacted cache is plain causal
    attention with the same results."""
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    if k_cache.shape != v_cache.shape or k_cache.shape[2] != layout.length:
        raise ValueError(
            f"caches must both be (B, H_kv, L={layout.length}, D), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    kept_prefix = layout.n_prefix if layout.text_sees_prefix else 0
    keep = torch.cat(
        [torch.arange(0, kept_prefix), torch.arange(layout.voco_start, layout.length)]
    ).to(k_cache.device)
    compacted = VocoLayout(
        kept_prefix, 0, layout.n_voco, layout.n_text, layout.hybrid, layout.text_sees_prefix
    )
    return (
        k_cache.index_select(2, keep).contiguous(),
        v_cache.index_select(2, keep).contiguous(),
        compacted,
    )


# ------------------------------------------------------------ on-device parity case


def parity_case(backend: str, device: torch.device) -> dict:
    """The on-device parity case of the VoCo kernel, both hybrid modes."""
    torch.manual_seed(3)
    out = {}
    for layout in (VocoLayout(3, 40, 1, 20), VocoLayout(2, 33, 2, 9, "causal")):
        q = torch.randn(2, 4, layout.length, 16, device=device)
        k, v = torch.randn(2, 2, 2, layout.length, 16, device=device)
        got = voco_attention(q, k, v, layout, backend=backend)
        want = voco_attention(q, k, v, layout, backend="reference")
        out[layout.hybrid] = assert_close("voco", got, want)
    return out


declare_gpu_kernels("voco", {"voco_attention": ("triton",)}, parity_case)
