"""HTC-VLM / VoCo decoupled-mask attention: masks, structured attention against SDPA
with the dense mask, KV-cache compaction, anchors and sequence assembly."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastcompress as fc
from fastcompress._backend import triton_available
from fastcompress.nn import HybridAnchorProjector, assemble_hybrid_sequence
from fastcompress.voco import VocoLayout

# voco_attention's cpu backend is torch code (segment matmuls), no C++ kernel.
pytestmark = pytest.mark.isa_independent
BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
LAYOUTS = [
    VocoLayout(0, 21, 1, 9),
    VocoLayout(3, 20, 2, 7),
    VocoLayout(2, 17, 1, 0),
    VocoLayout(0, 12, 2, 5, "causal"),
    VocoLayout(4, 9, 1, 6, "causal"),
    VocoLayout(3, 20, 2, 7, text_sees_prefix=True),
    VocoLayout(4, 9, 1, 6, "causal", text_sees_prefix=True),
]


def _mask_by_rules(layout):
    """The HTC-VLM / VoCo-LLaMA rules, one (row, key) pair at a time."""
    p, h, v, n = layout.hybrid_start, layout.voco_start, layout.text_start, layout.length
    region = ["prefix"] * p + ["hybrid"] * (h - p) + ["voco"] * (v - h) + ["text"] * (n - v)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            qi, kj = region[i], region[j]
            if qi == "prefix":
                ok = kj == "prefix" and j <= i
            elif qi == "hybrid":
                ok = (
                    (i == j)
                    if layout.hybrid == "isolated"
                    else (kj == "prefix" or (kj == "hybrid" and j <= i))
                )
            elif qi == "voco":
                ok = kj in ("prefix", "hybrid") or (kj == "voco" and j <= i)
            else:
                ok = (
                    (kj == "prefix" and layout.text_sees_prefix)
                    or kj == "voco"
                    or (kj == "text" and j <= i)
                )
            mask[i, j] = ok
    return mask


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_mask_follows_the_rules(layout):
    mask = fc.voco_mask(
        layout.n_prefix,
        layout.n_hybrid,
        layout.n_voco,
        layout.n_text,
        layout.hybrid,
        text_sees_prefix=layout.text_sees_prefix,
    )
    assert torch.equal(mask, _mask_by_rules(layout))
    idx = torch.arange(layout.length)
    mod = fc.voco_mask_mod(layout)
    assert torch.equal(mod(0, 0, idx[:, None], idx[None, :]), mask)


def _voco_llama_mask(n_prefix, n_vision, n_voco, n_text):
    """VoCo-LLaMA's construction, re-derived from its description: the plain causal mask
    of a decoder, then every row after the last <voco> loses every key before the first
    <voco> (the vision tokens and the BOS / system prompt before them)."""
    length = n_prefix + n_vision + n_voco + n_text
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    first_voco, after_voco = n_prefix + n_vision, n_prefix + n_vision + n_voco
    mask[after_voco:, :first_voco] = False
    return mask


@pytest.mark.parametrize(
    "n_prefix, n_vision, n_voco, n_text",
    [(0, 12, 1, 5), (35, 24, 1, 9), (5, 16, 2, 7), (1, 8, 4, 3), (6, 10, 1, 0), (0, 0, 2, 4)],
)
def test_causal_layout_is_voco_llamas_mask(n_prefix, n_vision, n_voco, n_text):
    want = _voco_llama_mask(n_prefix, n_vision, n_voco, n_text)
    got = fc.voco_mask(n_prefix, n_vision, n_voco, n_text, hybrid="causal")
    assert torch.equal(got, want)
    # Opting in to "text sees the prefix" opens exactly the text x prefix block.
    opened = fc.voco_mask(n_prefix, n_vision, n_voco, n_text, "causal", text_sees_prefix=True)
    text_start = n_prefix + n_vision + n_voco
    want[text_start:, :n_prefix] = True
    assert torch.equal(opened, want)
    # HTC-VLM's isolated layout differs only in the hybrid rows: each sees itself alone.
    isolated = fc.voco_mask(n_prefix, n_vision, n_voco, n_text)
    hybrid = slice(n_prefix, n_prefix + n_vision)
    assert torch.equal(isolated[hybrid], torch.eye(len(want))[hybrid].bool())
    others = torch.ones(len(want), dtype=torch.bool)
    others[hybrid] = False
    assert torch.equal(
        isolated[others], _voco_llama_mask(n_prefix, n_vision, n_voco, n_text)[others]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_outputs_ignore_the_prefix_unless_opted_in(backend):
    layout = VocoLayout(35, 24, 1, 9, "causal")
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, layout.length, 16, generator=gen) for _ in range(3))
    text = slice(layout.text_start, None)
    base = fc.voco_attention(q, k, v, layout, backend=backend)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[:, :, : layout.n_prefix] += 3.0
    changed_v[:, :, : layout.n_prefix] -= 2.0
    moved = fc.voco_attention(q, changed_k, changed_v, layout, backend=backend)
    # The prefix reaches the text only through <voco>'s own output, never as a key here.
    torch.testing.assert_close(moved[:, :, text], base[:, :, text], atol=0, rtol=0)
    opened = dataclasses.replace(layout, text_sees_prefix=True)
    assert not torch.allclose(
        fc.voco_attention(q, changed_k, changed_v, opened, backend=backend)[:, :, text],
        fc.voco_attention(q, k, v, opened, backend=backend)[:, :, text],
    )


def test_flex_attention_mask_mod_matches_sdpa():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    layout = VocoLayout(2, 14, 1, 5)
    q, k, v = (torch.randn(1, 2, layout.length, 16) for _ in range(3))
    block = flex.create_block_mask(
        fc.voco_mask_mod(layout), 1, 2, layout.length, layout.length, device="cpu"
    )
    got = flex.flex_attention(q, k, v, block_mask=block)
    torch.testing.assert_close(
        got, fc.voco_attention(q, k, v, layout, backend="reference"), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_matches_sdpa_with_dense_mask(backend, layout, heads, kv_heads):
    gen = torch.Generator().manual_seed(layout.length + heads)
    q = torch.randn(2, heads, layout.length, 16, generator=gen)
    k = torch.randn(2, kv_heads, layout.length, 16, generator=gen)
    v = torch.randn(2, kv_heads, layout.length, 16, generator=gen)
    mask = _mask_by_rules(layout)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    got = fc.voco_attention(q, k, v, layout, backend=backend)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_bfloat16_and_non_contiguous(backend):
    layout = VocoLayout(1, 15, 1, 6)
    base = torch.randn(2, layout.length, 4, 32)
    q = base.transpose(1, 2)[..., :16]  # (B, H, L, D), non-contiguous
    k, v = torch.randn(2, 4, layout.length, 16), torch.randn(2, 4, layout.length, 16)
    want = fc.voco_attention(q.contiguous(), k, v, layout, backend="reference")
    torch.testing.assert_close(
        fc.voco_attention(q, k, v, layout, backend=backend), want, atol=2e-6, rtol=1e-5
    )
    q16, k16, v16 = q.bfloat16(), k.bfloat16(), v.bfloat16()
    ref16 = fc.voco_attention(q16, k16, v16, layout, backend="reference")
    got16 = fc.voco_attention(q16, k16, v16, layout, backend=backend)
    assert got16.dtype == torch.bfloat16
    want64 = F.scaled_dot_product_attention(
        q16.double(), k16.double(), v16.double(), attn_mask=_mask_by_rules(layout)
    )
    err = (got16.double() - want64).abs()
    torch_err = (ref16.double() - want64).abs().max()
    # 2x torch's error, plus the one rounding of the output to bf16 (half an ulp, at most
    # 2^-8 relative) that every kernel pays whichever way its float32 result falls.
    assert (err <= 2 * torch_err + want64.abs() * 2.0**-8 + 1e-6).all(), err.max()


@pytest.mark.parametrize("text_sees_prefix", [False, True])
def test_compacted_cache_gives_the_same_decoding(text_sees_prefix):
    layout = VocoLayout(2, 30, 1, 5, text_sees_prefix=text_sees_prefix)
    k, v = torch.randn(2, 4, layout.length, 16), torch.randn(2, 4, layout.length, 16)
    k_small, v_small, compacted = fc.compact_kv_cache(k, v, layout)
    kept_prefix = 2 if text_sees_prefix else 0
    assert k_small.shape == (2, 4, kept_prefix + 1 + 5, 16) and compacted.n_hybrid == 0
    assert k.nbytes / k_small.nbytes == layout.length / compacted.length
    # A new text token after prefill: dense mask over the full cache vs plain attention
    # over the compacted cache.
    q_new, k_new, v_new = (
        torch.randn(2, 4, 1, 16),
        torch.randn(2, 4, 1, 16),
        torch.randn(2, 4, 1, 16),
    )
    grown = VocoLayout(2, 30, 1, 6, text_sees_prefix=text_sees_prefix)
    full_mask = _mask_by_rules(grown)[-1:]
    want = F.scaled_dot_product_attention(
        q_new, torch.cat([k, k_new], 2), torch.cat([v, v_new], 2), attn_mask=full_mask
    )
    got = F.scaled_dot_product_attention(
        q_new, torch.cat([k_small, k_new], 2), torch.cat([v_small, v_new], 2)
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_anchors_and_assembly():
    projector = HybridAnchorProjector(in_features=8 * 4 * 4, width=32, num_anchors=4)
    anchors = projector(torch.randn(2, 8, 4, 4))  # MGVQ features, channel-first
    assert anchors.shape == (2, 4, 32)
    patches, voco, text = torch.randn(2, 24, 32), torch.randn(1, 32), torch.randn(2, 5, 32)
    sequence, layout = assemble_hybrid_sequence(anchors, patches, voco, text=text)
    assert layout == VocoLayout(0, 28, 1, 5)
    assert torch.equal(sequence[:, 4:28], patches) and torch.equal(
        sequence[:, 28], voco.expand(2, -1)
    )
    with pytest.raises(ValueError, match=r"features must flatten to \(B, 128\)"):
        projector(torch.randn(2, 8, 4, 5))


def test_bad_input():
    layout = VocoLayout(0, 10, 1, 3)
    q = torch.randn(1, 4, 14, 16)
    with pytest.raises(ValueError, match="does not match the layout's 14"):
        fc.voco_attention(q[:, :, :13], q[:, :, :13], q[:, :, :13], layout)
    with pytest.raises(ValueError, match="not a multiple of H_kv=3"):
        fc.voco_attention(q, q[:, :3], q[:, :3], layout)
    with pytest.raises(TypeError, match="layout must be a VocoLayout"):
        fc.voco_attention(q, q, q, (0, 10, 1, 3))
    with pytest.raises(ValueError, match="hybrid must be one of"):
        VocoLayout(0, 10, 1, 3, "dense")
    with pytest.raises(ValueError, match="n_text must be a non-negative int"):
        VocoLayout(0, 10, 1, -3)
    bad = q.clone()
    bad[0, 1, 3, 2] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        fc.voco_attention(bad, q, q, layout, backend="cpu")


def test_opcheck_and_compile():
    import importlib

    voco = importlib.import_module("fastcompress.voco")
    layout = VocoLayout(1, 9, 1, 4)
    q, k, v = (torch.randn(1, 2, layout.length, 16) for _ in range(3))
    torch.library.opcheck(
        voco._voco_attention_op, (q, k, v, 1, 9, 1, 4, "isolated", False, 0.25, "cpu")
    )
    torch._dynamo.reset()
    fn = torch.compile(
        lambda q, k, v: fc.voco_attention(q, k, v, layout) * 2, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(fn(q, k, v), fc.voco_attention(q, k, v, layout) * 2)
