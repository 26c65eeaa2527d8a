"""VoCo decoupled-mask attention on CPU (2 threads): 580 hybrid + 1 <voco> + 64 text
tokens, 32 heads x 128, batch 1 and 8. Same run: fastcompress, SDPA with the dense mask,
FlexAttention (compiled) with the same mask_mod; plus a decode step over the full vs
the compacted KV cache, and the cache bytes before/after compaction."""

import pytest
import torch
import torch.nn.functional as F

import fastcompress as fc
from fastcompress.voco import VocoLayout

LAYOUT = VocoLayout(0, 580, 1, 64)
HEADS, DIM = 32, 128
_flex = {}


def _inputs(batch):
    gen = torch.Generator().manual_seed(batch)
    return tuple(torch.randn(batch, HEADS, LAYOUT.length, DIM, generator=gen) for _ in range(3))


def _flex_fn():
    if "fn" not in _flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(
            fc.voco_mask_mod(LAYOUT), None, None, LAYOUT.length, LAYOUT.length, device="cpu"
        )
        compiled = torch.compile(flex_attention, dynamic=False)
        _flex["fn"] = lambda q, k, v: compiled(q, k, v, block_mask=block)
    return _flex["fn"]


@pytest.mark.parametrize("impl", ["fastcompress[cpu]", "SDPA dense mask", "FlexAttention"])
@pytest.mark.parametrize("batch", [1, 8])
def test_prefill_attention(benchmark, record, batch, impl):
    q, k, v = _inputs(batch)
    mask = fc.voco_mask(LAYOUT.n_prefix, LAYOUT.n_hybrid, LAYOUT.n_voco, LAYOUT.n_text)
    if impl == "fastcompress[cpu]":
        fn = lambda: fc.voco_attention(q, k, v, LAYOUT, backend="cpu")
    elif impl == "SDPA dense mask":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    else:
        try:
            flex = _flex_fn()
            flex(q, k, v)
        except Exception as exc:  # no inductor / compiler for FlexAttention on this CPU
            pytest.skip(f"FlexAttention unavailable here: {type(exc).__name__}: {exc}")
        fn = lambda: flex(q, k, v)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fn(), want, atol=1e-4, rtol=1e-4)
    benchmark.group = f"voco prefill attention batch={batch}"
    record(benchmark, impl, "matches SDPA + dense mask", None)
    benchmark.pedantic(fn, rounds=5 if batch == 1 else 3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("cache", ["full cache + mask", "compacted cache"])
@pytest.mark.parametrize("batch", [1, 8])
def test_decode_step(benchmark, record, batch, cache):
    _, k, v = _inputs(batch)
    q = torch.randn(batch, HEADS, 1, DIM)
    k_small, v_small, compacted = fc.compact_kv_cache(k, v, LAYOUT)
    grown = VocoLayout(0, 580, 1, 65)
    row = fc.voco_mask(0, 580, 1, 65)[-1:]
    if cache == "full cache + mask":
        keys, values, mask = k, v, row[:, :-1]
    else:
        keys, values, mask = k_small, v_small, None
    fn = lambda: F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    benchmark.group = f"voco decode step batch={batch}"
    record(benchmark, cache, "compaction tested in tests", None)
    benchmark.extra_info.update(
        cache_bytes=2 * keys.nbytes,
        analytic_ratio=LAYOUT.length / compacted.length,
        grown_length=grown.length,
    )
    benchmark.pedantic(fn, rounds=50, iterations=1, warmup_rounds=3)
