"""Property-based tests of the compressor and attention ops against float64 oracles (see
props.py): every backend (the C++ one at every ISA level where it has kernels), odd and
empty sizes, every layout, half types, and defects that must end in an error naming the
argument. Each example runs in a child process."""

import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from props import (
    cases,
    check_report,
    close,
    expect_clear_error,
    inject,
    outcome,
    run,
    tensor,
    within_torch,
)
from sandbox import Sandbox

import fastcompress as fc

HALF_OR_FLOAT = [torch.float32, torch.bfloat16, torch.float16]
WEIGHT_LAYOUTS = ("contiguous", "strided", "transposed", "offset")


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


def _peak(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


# ---------------------------------------------------------------------------- compress


def _compress_oracle(args: dict, grid, stride, heads, dtype=torch.float64):
    """``avg_pool`` + ``nn.MultiheadAttention(batch_first)(Q, X, X)`` written out in
    ``dtype`` on leaves that require grad: float64 is the oracle, float32 torch's own
    error in the kernels' precision."""
    t = {
        k: (v.detach().to(dtype).requires_grad_() if v is not None else None)
        for k, v in args.items()
    }
    x, queries, in_w, in_b = t["x"], t["queries"], t["in_proj_weight"], t["in_proj_bias"]
    out_w, out_b = t["out_proj_weight"], t["out_proj_bias"]
    batch, tokens, dim = x.shape
    head_dim = dim // heads
    w_q, w_k, w_v = in_w.chunk(3)
    b_q, b_k, b_v = in_b.chunk(3) if in_b is not None else (None, None, None)
    q = F.linear(queries, w_q, b_q).view(-1, heads, head_dim).transpose(0, 1)  # (h, Ng, e)
    k = F.linear(x, w_k, b_k).view(batch, tokens, heads, head_dim).transpose(1, 2)
    v = F.linear(x, w_v, b_v).view(batch, tokens, heads, head_dim).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(-1)  # (B, h, Ng, T)
    meta = F.linear((probs @ v).transpose(1, 2).reshape(batch, -1, dim), out_w, out_b)
    pooled = None
    if stride:
        height, width = grid
        image = x.view(batch, height, width, dim).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(image, stride).flatten(2).transpose(1, 2)
    return t, meta, pooled


@pytest.mark.parametrize("op_backend, level", cases())
def test_compress_property(sandbox, op_backend, level):
    def body(data):
        heads = data.draw(st.integers(1, 3), label="heads")
        dim = heads * data.draw(st.integers(1, 12), label="head dim")
        stride = data.draw(st.sampled_from([2, 4]), label="stride")
        grid = tuple(stride * data.draw(st.integers(1, 3)) for _ in range(2))
        batch = data.draw(st.integers(1, 3), label="B")
        n_meta = data.draw(st.integers(1, 5), label="N_g")
        dtype = data.draw(st.sampled_from(HALF_OR_FLOAT), label="dtype")
        bias = data.draw(st.booleans(), label="bias")
        args = {
            "x": tensor(data, (batch, grid[0] * grid[1], dim), dtype),
            "queries": tensor(data, (n_meta, dim), dtype, WEIGHT_LAYOUTS, scale=0.5),
            "in_proj_weight": tensor(data, (3 * dim, dim), dtype, WEIGHT_LAYOUTS, scale=0.5),
            "in_proj_bias": tensor(data, (3 * dim,), dtype, scale=0.1) if bias else None,
            "out_proj_weight": tensor(data, (dim, dim), dtype, WEIGHT_LAYOUTS, scale=0.5),
            "out_proj_bias": tensor(data, (dim,), dtype, scale=0.1) if bias else None,
        }
        spoilable = ("nan", "inf", "int", "rank", "device")
        defect = inject(data, args, {k: spoilable for k, v in args.items() if v is not None})
        kwargs = dict(grid=grid, stride=stride, num_heads=heads, backend=op_backend)
        if defect:
            return expect_clear_error(
                lambda: sandbox.call("compress", **args, **kwargs, level=level),
                defect, op_backend,
            )  # fmt: skip
        weights = {
            0: torch.randn(batch, n_meta, dim),
            1: torch.randn(batch, grid[0] * grid[1] // stride**2, dim),
        }
        inputs = {k: v for k, v in args.items() if v is not None}
        rest = {k: None for k, v in args.items() if v is None}
        got = outcome(
            lambda: sandbox.call("compress_grad", inputs, weights, **rest, **kwargs, level=level),
            op_backend,
        )  # fmt: skip
        if got is None:
            return
        ((meta, pooled), grads), report = got
        check_report(report, op_backend, level, ran_kernel=dtype == torch.float32)
        leaves, want_meta, want_pooled = _compress_oracle(args, grid, stride, heads)
        ((want_meta * weights[0]).sum() + (want_pooled * weights[1]).sum()).backward()
        # Yardsticks, torch's own error in this precision: the formulas above in float32
        # (or the half type), and the reference backend (torch's attention) in the
        # input's type.
        torch_leaves, torch_meta, torch_pooled = _compress_oracle(
            args, grid, stride, heads, torch.float32
        )
        ((torch_meta * weights[0]).sum() + (torch_pooled * weights[1]).sum()).backward()
        formula_grads = {k: v.grad for k, v in torch_leaves.items() if v is not None}
        ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        ref_meta, ref_pooled = fc.compress(
            ref_leaves["x"], grid, stride, ref_leaves["queries"],
            ref_leaves["in_proj_weight"], ref_leaves.get("in_proj_bias"),
            ref_leaves["out_proj_weight"], ref_leaves.get("out_proj_bias"), heads,
            backend="reference",
        )  # fmt: skip
        ((ref_meta.float() * weights[0]).sum() + (ref_pooled.float() * weights[1]).sum()).backward()
        half = dtype != torch.float32  # half types: the float32 formulas are no yardstick
        assert meta.dtype == dtype and pooled.dtype == dtype
        if half and op_backend == "reference":
            return  # the reference in a half type is the yardstick itself (torch's own run)
        want_meta, want_pooled = want_meta.detach(), want_pooled.detach()
        within_torch(meta, want_meta, [ref_meta, None if half else torch_meta], dtype,
                     max(1.0, _peak(want_meta)), "meta")  # fmt: skip
        within_torch(pooled, want_pooled, [ref_pooled, None if half else torch_pooled], dtype,
                     max(1.0, _peak(want_pooled)), "pooled")  # fmt: skip
        for name, grad in grads.items():
            want = leaves[name].grad
            yardsticks = [ref_leaves[name].grad, None if half else formula_grads[name]]
            within_torch(grad, want, yardsticks, dtype, max(1.0, _peak(want)), f"grad {name}",
                         slack=1e-4)  # fmt: skip

    run(body, op_backend, 60)


# ---------------------------------------------------------------------- decode attention


def _decode_oracle(q, k_cache, v_cache, k, v, seqlens, scale, causal):
    """float64: append the new keys, then each sample attends to its filled part (causal:
    query i of Sq sees keys up to length - Sq + i). Returns out, lse, caches."""
    k_cache, v_cache = k_cache.double().clone(), v_cache.double().clone()
    batch, sq, heads, dim = q.shape
    new = 0 if k is None else k.shape[1]
    for b in range(batch):
        if new:
            k_cache[b, seqlens[b] : seqlens[b] + new] = k[b].double()
            v_cache[b, seqlens[b] : seqlens[b] + new] = v[b].double()
    group = heads // k_cache.shape[2]
    out = torch.zeros(batch, sq, heads, dim, dtype=torch.float64)
    lse = torch.full((batch, heads, sq), -math.inf, dtype=torch.float64)
    for b in range(batch):
        length = int(seqlens[b]) + new
        keys = k_cache[b, :length].repeat_interleave(group, dim=1)
        values = v_cache[b, :length].repeat_interleave(group, dim=1)
        for i in range(sq):
            visible = length - sq + i + 1 if causal else length
            if visible <= 0:
                continue
            scores = torch.einsum("hd,nhd->hn", q[b, i].double(), keys[:visible]) * scale
            lse[b, :, i] = torch.logsumexp(scores, -1)
            out[b, i] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values[:visible])
    return out, lse, k_cache, v_cache


@pytest.mark.parametrize("op_backend, level", cases(with_levels=False))  # cpu: ATen's kernel
def test_decode_attention_property(sandbox, op_backend, level):
    def body(data):
        kv_heads = data.draw(st.integers(1, 3), label="H_kv")
        heads = kv_heads * data.draw(st.integers(1, 3), label="group")
        dim = data.draw(st.integers(1, 20), label="D")
        batch = data.draw(st.integers(0, 3), label="B")
        sq = data.draw(st.integers(0, 3), label="Sq")
        new = data.draw(st.integers(0, 3), label="Sn")
        causal = data.draw(st.booleans(), label="causal") and new >= sq
        s_max = data.draw(st.integers(max(new, 1), 24), label="S_max")
        dtype = data.draw(st.sampled_from(HALF_OR_FLOAT), label="dtype")
        seed = data.draw(st.integers(0, 2**31 - 1), label="lengths")
        gen = torch.Generator().manual_seed(seed)
        seqlens = torch.randint(0, s_max - new + 1, (batch,), generator=gen, dtype=torch.int32)
        q = tensor(data, (batch, sq, heads, dim), dtype)
        cache_layout = ("contiguous", "offset")
        k_cache = tensor(data, (batch, s_max, kv_heads, dim), dtype, cache_layout, scale=1.0)
        v_cache = tensor(data, (batch, s_max, kv_heads, dim), dtype, ("contiguous",), scale=1.0)
        if k_cache.stride() != v_cache.stride():
            k_cache = k_cache.contiguous()
        args = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
        if new:
            args["k"] = tensor(data, (batch, new, kv_heads, dim), dtype, scale=1.0)
            args["v"] = tensor(data, (batch, new, kv_heads, dim), dtype, scale=1.0)
        scale = data.draw(st.sampled_from([None, 0.3]), label="softmax_scale")
        spoil = {"q": ("nan", "inf", "int", "rank", "device"), "k_cache": ("int", "rank")}
        if new:
            spoil |= {"k": ("nan", "rank", "device"), "v": ("inf", "int")}
        defect = inject(data, args, spoil)
        kwargs = dict(cache_seqlens=seqlens, softmax_scale=scale, causal=causal,
                      return_softmax_lse=True, backend=op_backend, level=level)  # fmt: skip
        if defect:
            return expect_clear_error(
                lambda: sandbox.call("decode_attention", **args, **kwargs), defect, op_backend
            )
        got = outcome(lambda: sandbox.call("decode_attention", **args, **kwargs), op_backend)
        if got is None:
            return
        (out, lse, new_k_cache, new_v_cache), report = got
        check_report(report, op_backend, level, ran_kernel=False)
        softmax_scale = dim**-0.5 if scale is None else scale
        want_out, want_lse, want_k, want_v = _decode_oracle(
            q, k_cache, v_cache, args.get("k"), args.get("v"), seqlens, softmax_scale, causal
        )
        assert out.shape == q.shape and out.dtype == dtype
        torch_out = None
        if dtype != torch.float32 and op_backend == "reference":
            return  # the reference in a half type is the yardstick itself (torch's own run)
        if dtype != torch.float32:
            torch_out = fc.decode_attention(
                q, k_cache.clone(), v_cache.clone(), args.get("k"), args.get("v"),
                cache_seqlens=seqlens, softmax_scale=scale, causal=causal, backend="reference",
            )  # fmt: skip
        within_torch(out, want_out, torch_out, dtype)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse)), (lse, want_lse)
        finite = torch.isfinite(want_lse)
        close(lse[finite], want_lse[finite], dtype, scale=max(1.0, _peak(want_lse[finite])))
        assert torch.equal(new_k_cache.double(), want_k) and torch.equal(
            new_v_cache.double(), want_v
        )

    run(body, op_backend, 80)


# ------------------------------------------------------------------------------ VoCo


@pytest.mark.parametrize("op_backend, level", cases(with_levels=False))  # cpu: torch code
def test_voco_attention_property(sandbox, op_backend, level):
    def body(data):
        counts = data.draw(st.tuples(*[st.integers(0, 6)] * 4), label="prefix hybrid voco text")
        if sum(counts) == 0:
            counts = (0, 1, 1, 1)
        hybrid = data.draw(st.sampled_from(["isolated", "causal"]), label="hybrid")
        sees_prefix = data.draw(st.booleans(), label="text_sees_prefix")
        layout = (*counts, hybrid, sees_prefix)
        length = sum(counts)
        kv_heads = data.draw(st.integers(1, 3), label="H_kv")
        heads = kv_heads * data.draw(st.integers(1, 2), label="group")
        dim = data.draw(st.integers(1, 20), label="D")
        batch = data.draw(st.integers(0, 2), label="B")
        dtype = data.draw(st.sampled_from(HALF_OR_FLOAT), label="dtype")
        args = {
            "q": tensor(data, (batch, heads, length, dim), dtype),
            "k": tensor(data, (batch, kv_heads, length, dim), dtype, scale=1.0),
            "v": tensor(data, (batch, kv_heads, length, dim), dtype, scale=1.0),
        }
        defect = inject(data, args, {n: ("nan", "inf", "int", "rank", "device") for n in "qkv"})
        kwargs = dict(backend=op_backend, level=level)
        if defect:
            return expect_clear_error(
                lambda: sandbox.call("voco_attention", **args, layout=layout, **kwargs),
                defect, op_backend,
            )  # fmt: skip
        got = outcome(
            lambda: sandbox.call("voco_attention", **args, layout=layout, **kwargs), op_backend
        )
        if got is None:
            return
        out, report = got
        if batch and heads and length:
            check_report(report, op_backend, level, ran_kernel=False)
        mask = fc.voco_mask(*counts, hybrid=hybrid, text_sees_prefix=sees_prefix)
        group = heads // kv_heads
        want = F.scaled_dot_product_attention(
            args["q"].double(), args["k"].double().repeat_interleave(group, 1),
            args["v"].double().repeat_interleave(group, 1), attn_mask=mask,
        )  # fmt: skip
        assert out.shape == args["q"].shape and out.dtype == dtype
        torch_out = None
        if dtype != torch.float32 and op_backend == "reference":
            return  # the reference in a half type is the yardstick itself (torch's own run)
        if dtype != torch.float32:
            torch_out = F.scaled_dot_product_attention(
                args["q"], args["k"].repeat_interleave(group, 1),
                args["v"].repeat_interleave(group, 1), attn_mask=mask,
            )  # fmt: skip
        within_torch(out, want, torch_out, dtype)

    run(body, op_backend, 80)


# ------------------------------------------------------------ the ops without backends


def test_pool_and_compact_property(sandbox):
    def body(data):
        stride = data.draw(st.sampled_from([2, 4]), label="stride")
        grid = tuple(stride * data.draw(st.integers(1, 3)) for _ in range(2))
        dtype = data.draw(st.sampled_from(HALF_OR_FLOAT), label="dtype")
        x = tensor(data, (data.draw(st.integers(1, 3)), grid[0] * grid[1], 5), dtype)
        pooled, _ = sandbox.call("pool_compress", x, grid, stride)
        image = x.double().view(x.shape[0], *grid, 5).permute(0, 3, 1, 2)
        want = F.avg_pool2d(image, stride).flatten(2).transpose(1, 2)
        close(pooled, want, dtype)

        counts = data.draw(st.tuples(*[st.integers(0, 5)] * 4), label="layout")
        sees_prefix = data.draw(st.booleans())
        layout = (*counts, "isolated", sees_prefix)
        caches = [tensor(data, (2, 3, sum(counts), 4), dtype) for _ in range(2)]
        (k, v, kept), _ = sandbox.call("compact_kv_cache", *caches, layout)
        p, h = counts[0], counts[1]
        keep = list(range(p if sees_prefix else 0)) + list(range(p + h, sum(counts)))
        assert torch.equal(k, caches[0][:, :, keep]) and torch.equal(v, caches[1][:, :, keep])
        assert kept == ((p if sees_prefix else 0), 0, counts[2], counts[3])

    run(body, "reference", 60)
