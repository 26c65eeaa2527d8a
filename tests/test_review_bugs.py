"""Bugs found by the kernel review (issue 16), each pinned by a test that failed before
its fix: strided outputs, 32-bit offsets, the LSE of a row that sees no key, silent
fallbacks of a forced backend, and the build cache key."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fastcompress as fc
from fastcompress import _build
from fastcompress import decode as decode_mod
from fastcompress._backend import triton_available

HERE = pathlib.Path(__file__).resolve().parent
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")


@needs_triton
def test_voco_triton_with_a_query_whose_last_dim_is_strided():
    layout = fc.VocoLayout(2, 11, 1, 5)
    # A dense permuted q (stride(-1) = L): empty_like keeps that layout, and the kernel
    # stores with a unit lane stride, so the output must be allocated contiguous.
    q = torch.randn(2, 4, 16, layout.length).transpose(-1, -2)
    k, v = torch.randn(2, 2, layout.length, 16), torch.randn(2, 2, layout.length, 16)
    assert q.stride(-1) != 1
    want = fc.voco_attention(q.contiguous(), k, v, layout, backend="reference")
    got = fc.voco_attention(q, k, v, layout, backend="triton")
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    assert got.is_contiguous()


def _huge_stride_view(rows: int, stride: int, width: int, values: torch.Tensor) -> torch.Tensor:
    """A (rows, width) view whose row stride puts its last rows past 2^31 elements. The
    storage is reserved, not touched: only the pages of the rows written here are
    resident (a few hundred KiB), however large the virtual size."""
    storage = torch.empty((rows - 1) * stride + width)
    view = storage.as_strided((rows, width), (stride, 1))
    view.copy_(values)
    return view


def _decode_offsets_check():
    s_max, dim, heads = 72, 16, 2
    stride = 2**25  # key 71 starts at 71 * 2^25 > 2^31 elements
    assert (s_max - 1) * stride >= 2**31
    k_rows, v_rows = torch.randn(s_max, dim), torch.randn(s_max, dim)
    # One buffer for both caches: v sits `dim` elements after k in every row.
    both = _huge_stride_view(s_max, stride, 2 * dim, torch.cat([k_rows, v_rows], 1))
    k_cache = both[:, :dim].view(1, s_max, 1, dim)
    v_cache = both[:, dim:].view(1, s_max, 1, dim)
    q = torch.randn(1, 1, heads, dim)
    lengths = torch.tensor([s_max], dtype=torch.int32)
    got = fc.decode_attention(q, k_cache, v_cache, cache_seqlens=lengths, backend="triton")
    want = fc.decode_attention(
        q,
        k_rows.view(1, s_max, 1, dim),
        v_rows.view(1, s_max, 1, dim),
        cache_seqlens=lengths,
        backend="reference",
    )
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def _voco_offsets_check():
    layout = fc.VocoLayout(1, 60, 1, 10)
    length, dim = layout.length, 16
    stride = 2**25
    assert (length - 1) * stride >= 2**31
    k_rows, v_rows = torch.randn(length, dim), torch.randn(length, dim)
    both = _huge_stride_view(length, stride, 2 * dim, torch.cat([k_rows, v_rows], 1))
    k = both[:, :dim].view(1, 1, length, dim)
    v = both[:, dim:].view(1, 1, length, dim)
    q = torch.randn(1, 2, length, dim)
    got = fc.voco_attention(q, k, v, layout, backend="triton")
    want = fc.voco_attention(
        q,
        k_rows.view(1, 1, length, dim),
        v_rows.view(1, 1, length, dim),
        layout,
        backend="reference",
    )
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("check", ["_decode_offsets_check", "_voco_offsets_check"])
def test_triton_offsets_past_2_to_the_31(check):
    # In a child process: with 32-bit offsets the interpreter reads far outside the
    # buffer and the process dies (SIGSEGV) instead of failing an assert.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import {__name__} as t; t.{check}()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"


def _cache_problem(lengths, s_max=20, heads=4, kv_heads=2, dim=8, sq=1):
    batch = len(lengths)
    q = torch.randn(batch, sq, heads, dim)
    k_cache, v_cache = torch.randn(2, batch, s_max, kv_heads, dim)
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.isa_independent  # the cpu backend here is ATen code
@pytest.mark.parametrize("empty", [0, 1])
@pytest.mark.parametrize(
    "backend", ["reference", "cpu"] + (["triton"] if triton_available() else [])
)
def test_lse_of_rows_that_see_no_key_is_minus_inf(backend, empty):
    # Causal with Sq = 3: sample 2 (length 2) has one query that sees no key, sample 1
    # (length `empty`) has 3 - empty. Such rows: output 0 and LSE -inf on every backend
    # (an LSE merge would otherwise give them weight). empty = 1 keeps every sample
    # non-empty, the case the CPU flash kernel runs.
    lengths = torch.tensor([5, empty, 2], dtype=torch.int32)
    q, k_cache, v_cache, _ = _cache_problem(lengths.tolist(), sq=3)
    out, lse = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=lengths, causal=True, return_softmax_lse=True,
        backend=backend,
    )  # fmt: skip
    blind = 3 - empty
    assert torch.isneginf(lse[1, :, :blind]).all() and (out[1, :blind] == 0).all()
    assert torch.isneginf(lse[2, :, 0]).all() and (out[2, 0] == 0).all()
    assert torch.isfinite(lse[0]).all() and torch.isfinite(lse[2, :, 1:]).all()
    ref_out, ref_lse = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=lengths, causal=True, return_softmax_lse=True,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("lengths", [[6, 0, 9], [0, 0, 0], [4, 7, 7]])
def test_forced_cpu_backend_never_falls_back_to_torch_math(monkeypatch, lengths, num_splits):
    def no_math(*args, **kwargs):
        raise AssertionError("backend='cpu' ran the torch math path")

    q, k_cache, v_cache, seqlens = _cache_problem(lengths)
    want = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=seqlens, return_softmax_lse=True, backend="reference"
    )
    monkeypatch.setattr(decode_mod, "_attend_torch", no_math)
    got = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=seqlens, num_splits=num_splits,
        return_softmax_lse=True, backend="cpu",
    )  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-6, rtol=1e-5)


def test_build_key_changes_with_sources_flags_and_torch(tmp_path, monkeypatch):
    base = _build.build_key(["-O3"], "2.13.0")
    assert _build.build_key(["-O3"], "2.13.0") == base
    assert _build.build_key(["-O2"], "2.13.0") != base
    assert _build.build_key(["-O3"], "2.14.1") != base
    # Another checkout with one edited header: another key, so another build folder.
    copy = tmp_path / "csrc"
    import shutil

    shutil.copytree(_build.csrc_root(), copy)
    monkeypatch.setattr(_build, "csrc_root", lambda: copy)
    assert _build.build_key(["-O3"], "2.13.0") == base
    header = copy / "include" / "fastcompress" / "simd.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _build.build_key(["-O3"], "2.13.0") != base
