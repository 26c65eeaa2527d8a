"""Decode attention over a preallocated KV cache (UniCompress decompressor), with
FlashAttention's ``flash_attn_with_kvcache`` conventions:

q ``(B, Sq, H, D)``; caches ``(B, S_max, H_kv, D)`` (GQA: H % H_kv == 0); optional new
``k``/``v`` ``(B, Sn, H_kv, D)`` appended in place at ``cache_seqlens`` (int, or int32
``(B,)`` per sample); attention reads only the filled part ``cache_seqlens + Sn`` of each
sample; ``causal`` aligns the Sq queries to the end of the filled part;
``return_softmax_lse`` gives the natural-log LSE ``(B, H, Sq)``. Split-K over the cache
with a log-sum-exp merge (``num_splits``; 0 chooses). The op
``fastcompress::decode_attention`` declares both caches mutated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcompress._autocast import float32_under_autocast, register_float32_autocast, to_float32
from fastcompress._backend import (
    BackendUnavailableError,
    declare_gpu_kernels,
    select_backend,
    shape_fallback,
)
from fastcompress._parity import assert_close
from fastcompress._validate import (
    FLOAT_DTYPES,
    check_finite,
    check_finite_number,
    check_same,
    check_tensor,
)


def merge_splits(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``out (B, S, H, Sq, D)``, ``lse (B, S, H, Sq)`` per split -> merged ``(B, H, Sq, D)``,
    ``(B, H, Sq)``. Splits that saw no key have lse = -inf and weight 0."""
    total = torch.logsumexp(lse, dim=1)
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weight = torch.exp(lse - safe.unsqueeze(1)).nan_to_num(0.0)
    return (out * weight.unsqueeze(-1)).sum(1), total


def _attend_torch(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    scale: float,
    causal: bool,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """Reference math: per-split outputs and LSE (the same merge as the GPU kernel)."""
    batch, sq, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    # On CPU read only the filled part (one host read of the lengths); on GPU mask the full
    # cache instead, so a decode step has no host sync and can be captured in a graph.
    span = int(lengths.max()) if q.device.type == "cpu" else k_cache.shape[1]
    keys = k_cache[:, :span].float().permute(0, 2, 3, 1)  # (B, H_kv, D, S)
    values = v_cache[:, :span].float().transpose(1, 2)  # (B, H_kv, S, D)
    queries = q.float().permute(0, 2, 1, 3).reshape(batch, kv_heads, group * sq, dim)
    scores = torch.matmul(queries, keys) * scale  # (B, H_kv, group*Sq, S)
    position = torch.arange(span, device=q.device)
    limit = lengths.view(batch, 1, 1, 1).long() - 1
    if causal:
        query = torch.arange(sq, device=q.device).repeat(group).view(1, 1, -1, 1)
        limit = lengths.view(batch, 1, 1, 1).long() - sq + query
    visible = position.view(1, 1, 1, -1) <= limit
    scores = scores.masked_fill(~visible, float("-inf"))
    chunk = math.ceil(span / num_splits) if span else 1
    outs, lses = [], []
    for s0 in range(0, max(span, 1), chunk):
        part = scores[..., s0 : s0 + chunk]
        lse = torch.logsumexp(part, dim=-1)  # -inf where no visible key
        probs = torch.exp(part - torch.where(torch.isfinite(lse), lse, 0.0).unsqueeze(-1))
        outs.append(torch.matmul(probs, values[:, :, s0 : s0 + chunk]))
        lses.append(lse)
    while len(outs) < num_splits:  # splits past the filled part
        outs.append(torch.zeros_like(outs[0]))
        lses.append(torch.full_like(lses[0], float("-inf")))
    out = torch.stack(outs, 1).view(batch, num_splits, kv_heads, group, sq, dim)
    lse = torch.stack(lses, 1).view(batch, num_splits, kv_heads, group, sq)
    return out.reshape(batch, num_splits, heads, sq, dim), lse.reshape(batch, num_splits, heads, sq)


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, seqlens: Tensor) -> None:
    """Write the new keys and values at each sample's length, in place."""
    new = k.shape[1]
    if seqlens.device.type == "cpu":
        lo, hi = int(seqlens.min()), int(seqlens.max())
        if lo == hi:  # one length for the whole batch (every generate step): a slice copy
            k_cache[:, lo : lo + new] = k
            v_cache[:, lo : lo + new] = v
            return
    rows = torch.arange(k.shape[0], device=k.device).unsqueeze(1)
    slots = seqlens.long().unsqueeze(1) + torch.arange(new, device=k.device)
    k_cache[rows, slots] = k.to(k_cache.dtype)
    v_cache[rows, slots] = v.to(v_cache.dtype)


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_cpu_fused(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    """The whole 'cpu' backend: ATen's fused flash kernel (which also returns the LSE) over
    the filled part, in one split (``num_splits`` schedules GPU programs; the merged
    result is the same). Rows that see no key, in an empty cache or as causal queries
    before the first key, get output 0 and LSE -inf like the reference: the flash kernel
    alone gives them LSE 0, which an LSE merge would weigh as a real score."""
    if _FLASH_CPU is None:
        raise BackendUnavailableError(
            "decode_attention: backend 'cpu' needs aten._scaled_dot_product_flash_attention_for_cpu"
        )
    lo, hi = int(lengths.min()), int(lengths.max())
    batch, sq, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    limit = lengths.view(batch, 1, 1, 1).long() - 1
    if causal:
        query = torch.arange(sq, device=q.device).repeat(group).view(1, 1, -1, 1)
        limit = lengths.view(batch, 1, 1, 1).long() - sq + query
    no_key = (limit < 0).expand(batch, kv_heads, group * sq, 1)
    if hi == 0:
        out = q.new_zeros((batch, heads, sq, dim), dtype=torch.float32)
        return out, q.new_full((batch, heads, sq), float("-inf"), dtype=torch.float32)
    dtype = q.dtype if q.dtype == k_cache.dtype else torch.float32
    # GQA without copying the cache: the group's query heads become extra query rows. The
    # flash kernel assumes a unit stride in the last dim of every operand (a strided q was
    # read out of bounds): contiguous() is a no-op for the usual (B, 1, H, D) query.
    queries = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * sq, dim)
    queries = queries.to(dtype).contiguous()
    keys = k_cache[:, :hi].transpose(1, 2).to(dtype)
    values = v_cache[:, :hi].transpose(1, 2).to(dtype)
    mask = None
    if lo != hi or (causal and sq > 1):  # per-sample lengths or a causal block of queries
        visible = torch.arange(hi, device=q.device).view(1, 1, 1, -1) <= limit
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    out, lse = _FLASH_CPU(queries, keys, values, 0.0, False, attn_mask=mask, scale=scale)
    blind = bool(no_key.any())
    if blind:
        out = out.masked_fill(no_key, 0.0)
        lse = lse.masked_fill(no_key[..., 0], float("-inf"))
    return out.reshape(batch, heads, sq, dim), lse.reshape(batch, heads, sq).float()


def check_decode_args(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor,
    softmax_scale: float,
    causal: bool,
    num_splits: int,
) -> None:
    """Every shape, dtype and device rule of the op, before any kernel (the op itself and
    its fake run this: direct ``torch.ops`` calls and traced graphs get the same errors)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    batch, sq, heads, dim = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != batch or k_cache.shape[3] != dim:
        raise ValueError(
            f"k_cache and v_cache must both be (B={batch}, S_max, H_kv, D={dim}), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if dim == 0:
        raise ValueError(f"q must have a head dim D > 0, got shape {tuple(q.shape)}")
    if k_cache.shape[2] == 0:
        raise ValueError(f"k_cache must have H_kv > 0 heads, got shape {tuple(k_cache.shape)}")
    if heads % k_cache.shape[2]:
        raise ValueError(
            f"q has H={heads} heads, not a multiple of the caches' H_kv={k_cache.shape[2]}"
        )
    # Strides of size-1 dims (and of empty caches) address nothing: only the rest must
    # agree between the caches, which the kernels index with one set of strides.
    used = [i for i, size in enumerate(k_cache.shape) if size > 1] if k_cache.numel() else []
    if any(k_cache.stride(i) != v_cache.stride(i) for i in used) or (
        3 in used and k_cache.stride(3) != 1
    ):
        raise ValueError(
            f"k_cache and v_cache must share strides with a contiguous last dim, got "
            f"{k_cache.stride()} and {v_cache.stride()}"
        )
    check_same("k_cache", k_cache, "v_cache", v_cache)
    if k_cache.device != q.device:
        raise ValueError(f"k_cache is on {k_cache.device} but q is on {q.device}")
    if (k is None) != (v is None):
        raise ValueError("pass both k and v, or neither")
    if k is not None:
        for name, new in (("k", k), ("v", v)):
            check_tensor(name, new, ndim=4, dtypes=FLOAT_DTYPES)
            if new.shape[0] != batch or new.shape[2:] != k_cache.shape[2:]:
                raise ValueError(
                    f"{name} must be (B={batch}, Sn, H_kv={k_cache.shape[2]}, "
                    f"D={dim}), got {tuple(new.shape)}"
                )
            if new.device != q.device:
                raise ValueError(f"{name} is on {new.device} but q is on {q.device}")
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"k and v must have the same Sn, got {k.shape[1]} and {v.shape[1]}")
    if causal and k is not None and k.shape[1] < sq:
        raise ValueError("causal with new k/v needs Sn >= Sq")
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if cache_seqlens.shape[0] != batch or cache_seqlens.device != q.device:
        raise ValueError(
            f"cache_seqlens must be (B={batch},) on {q.device}, got "
            f"{tuple(cache_seqlens.shape)} on {cache_seqlens.device}"
        )
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0, got {num_splits}")
    check_finite_number("softmax_scale", softmax_scale)


# Registered with the low-level Library API rather than ``torch.library.custom_op``: the
# latter's Python wrapper cost ~290 us per call for this mutating op (3x the attention
# itself at decode sizes, 8 calls per decoder step). The schema declares both caches
# mutated (``Tensor(a!)``); the fake implementation is registered below.
_LIB = torch.library.Library("fastcompress", "FRAGMENT")
_LIB.define(
    "decode_attention(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
    "Tensor cache_seqlens, float softmax_scale, bool causal, int num_splits, str backend)"
    " -> (Tensor, Tensor)"
)


def _decode_attention_impl(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    cache_seqlens: Tensor,
    softmax_scale: float,
    causal: bool,
    num_splits: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    check_decode_args(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, num_splits)
    batch, sq, heads, dim = q.shape
    s_max = k_cache.shape[1]
    new = 0 if k is None else k.shape[1]
    lengths = cache_seqlens.to(torch.int32) + new
    name = select_backend(q.device, backend, op="decode_attention")
    on_cpu = q.device.type == "cpu"  # data-dependent checks; on GPU they would sync
    if on_cpu and batch:
        if int(cache_seqlens.min()) < 0 or int(lengths.max()) > s_max:
            raise ValueError(
                f"cache_seqlens + new tokens must lie in [0, S_max={s_max}]: "
                f"got lengths up to {int(lengths.max())} (too many steps for "
                f"the cache?)"
            )
        check_finite("q", q)
        if k is not None:
            check_finite("k", k)
            check_finite("v", v)
    if name == "triton":
        from fastcompress.triton_kernels.decode_attention import unsupported_reason

        reason = unsupported_reason(heads, k_cache.shape[2], sq, dim)
        name = shape_fallback(name, backend, reason, op="decode_attention")
    if name == "cuda":  # refused before the caches are written
        raise BackendUnavailableError("decode_attention: no CUDA C++ kernel; use 'triton'")
    if k is not None and new and batch:
        _append(k_cache, v_cache, k, v, cache_seqlens)
    if q.numel() == 0:  # no query (Sq = 0, B = 0 or H = 0): the append above still holds
        empty = q.new_empty((batch, heads, sq), dtype=torch.float32)
        return torch.empty_like(q, memory_format=torch.contiguous_format), empty
    out, lse = _attend(q, k_cache, v_cache, lengths, softmax_scale, causal, num_splits, name)
    if on_cpu and not bool(torch.isfinite(out).all()):
        raise ValueError(
            "decode_attention: the output is not finite although q is: k_cache or v_cache "
            "holds NaN or inf in its filled part (or the scores overflow float32)"
        )
    return out, lse


def _attend(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    softmax_scale: float,
    causal: bool,
    num_splits: int,
    name: str,
) -> tuple[Tensor, Tensor]:
    """``out (B, Sq, H, D)`` in q.dtype and ``lse (B, H, Sq)`` on the chosen backend."""
    batch = q.shape[0]
    s_max = k_cache.shape[1]
    if num_splits > 0:
        splits = num_splits
    else:  # split-K pays off only on a GPU with few (batch, head) programs
        splits = 1 if q.device.type == "cpu" else _auto_splits(batch, k_cache.shape[2], s_max)
    if name == "cpu":
        out, lse = _attend_cpu_fused(q, k_cache, v_cache, lengths, softmax_scale, causal)
        return out.transpose(1, 2).to(q.dtype), lse
    if name == "triton":
        from fastcompress.triton_kernels.decode_attention import decode_attention_triton

        parts = decode_attention_triton(
            q.contiguous(), k_cache, v_cache, lengths, softmax_scale, causal, splits
        )
    else:
        parts = _attend_torch(q, k_cache, v_cache, lengths, softmax_scale, causal, splits)
    out, lse = merge_splits(*parts)
    return out.transpose(1, 2).to(q.dtype), lse


_LIB.impl("decode_attention", _decode_attention_impl, "CPU")
_LIB.impl("decode_attention", _decode_attention_impl, "CUDA")
_decode_attention_op = torch.ops.fastcompress.decode_attention.default


def _float32_except_caches(args: tuple) -> tuple:
    # The caches are written in place: a float32 copy would lose the write.
    q, k_cache, v_cache, k, v, *rest = args
    return (to_float32(q), k_cache, v_cache, to_float32(k), to_float32(v), *rest)


register_float32_autocast(_LIB, "decode_attention", _float32_except_caches)


@torch.library.register_fake("fastcompress::decode_attention")
def _(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, num_splits, backend):
    check_decode_args(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, causal, num_splits)
    batch, sq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, sq), dtype=torch.float32)


def _auto_splits(batch: int, kv_heads: int, s_max: int, target_programs: int = 264) -> int:
    """Split-K only when batch x heads cannot fill the GPU; at least 256 keys per split."""
    return max(1, min(target_programs // max(batch * kv_heads, 1), s_max // 256, 32))


@float32_under_autocast(keep=("k_cache", "v_cache"))
def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of ``q (B, Sq, H, D)`` over a KV cache ``(B, S_max, H_kv, D)``.

    New ``k``/``v`` ``(B, Sn, H_kv, D)`` are written into the caches in place at
    ``cache_seqlens`` (default 0); then each sample attends to its first
    ``cache_seqlens + Sn`` cache entries. Returns ``out (B, Sq, H, D)`` in q.dtype and,
    with ``return_softmax_lse``, ``lse (B, H, Sq)`` float32 (natural log). Under
    ``torch.autocast`` a half-precision ``q`` (and ``k``, ``v``) is cast to float32
    first; the caches keep their dtype.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    if cache_seqlens is None:
        cache_seqlens = 0
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    dim = q.shape[-1]
    if softmax_scale is None and dim == 0:
        raise ValueError(f"q must have a head dim D > 0, got shape {tuple(q.shape)}")
    scale = softmax_scale if softmax_scale is not None else dim**-0.5
    out, lse = _decode_attention_op(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens,
        float(scale),
        bool(causal),
        int(num_splits),
        backend or "",
    )
    return (out, lse) if return_softmax_lse else out


# ------------------------------------------------------------ on-device parity case


def parity_case(backend: str, device: torch.device) -> dict:
    """The on-device parity case of the decode kernel: lengths, splits, causal, append."""
    torch.manual_seed(2)
    out = {}
    lengths = torch.tensor([70, 0, 33], dtype=torch.int32, device=device)
    for splits, causal, sq in ((1, False, 1), (3, False, 1), (2, True, 4)):
        q = torch.randn(3, sq, 4, 16, device=device)
        k_cache, v_cache = torch.randn(2, 3, 80, 2, 16, device=device)
        k_new, v_new = torch.randn(2, 3, sq, 2, 16, device=device)
        results = {}
        for name in (backend, "reference"):
            kc, vc = k_cache.clone(), v_cache.clone()
            results[name] = decode_attention(
                q, kc, vc, k=k_new, v=v_new, cache_seqlens=lengths, causal=causal,
                num_splits=splits, return_softmax_lse=True, backend=name,
            ) + (kc,)  # fmt: skip
        got, want = results[backend], results["reference"]
        tag = f"splits={splits} causal={causal}"
        out[f"out {tag}"] = assert_close("decode out", got[0], want[0])
        finite = torch.isfinite(want[1])
        if not torch.equal(finite, torch.isfinite(got[1])):
            raise AssertionError("decode lse: -inf rows differ from the reference")
        out[f"lse {tag}"] = assert_close("decode lse", got[1][finite], want[1][finite])
        assert_close("decode cache append", got[2], want[2], atol=0, rtol=0)
    return out


declare_gpu_kernels("decode_attention", {"decode_attention": ("triton",)}, parity_case)
