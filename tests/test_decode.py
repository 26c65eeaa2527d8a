"""decode_attention against a per-sample loop reference; the ARDecompressor's generate
against the no-cache reference and the teacher-forced forward."""

import pytest
import torch

import fastcompress as fc
from fastcompress import decode as decode_mod
from fastcompress._backend import triton_available
from fastcompress.nn import ARDecompressor, MultiCodebookQuantizer

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
TOL = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _loop_reference(q, k_cache, v_cache, lengths, causal, scale):
    """Each sample and head separately, in float64, over its first lengths[b] keys."""
    batch, sq, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = torch.zeros(batch, sq, heads, dim, dtype=torch.float64)
    lse = torch.zeros(batch, heads, sq, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        for h in range(heads):
            keys = k_cache[b, :n, h // group].double()
            scores = q[b, :, h].double() @ keys.T * scale
            if causal:
                allowed = torch.arange(n)[None, :] <= (n - sq + torch.arange(sq))[:, None]
                scores = scores.masked_fill(~allowed, float("-inf"))
            lse[b, h] = torch.logsumexp(scores, -1)
            out[b, :, h] = scores.softmax(-1) @ v_cache[b, :n, h // group].double()
    return out, lse


def _problem(batch=3, s_max=70, heads=4, kv_heads=2, dim=16, sq=1, new=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(batch * 7 + sq)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return (
        rand(batch, sq, heads, dim),
        rand(batch, s_max, kv_heads, dim),
        rand(batch, s_max, kv_heads, dim),
        rand(batch, new, kv_heads, dim),
        rand(batch, new, kv_heads, dim),
    )


@pytest.mark.isa_independent  # the cpu backend here is ATen code
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [0, 1, 3])
@pytest.mark.parametrize(
    "sq, causal, heads, kv_heads",
    [(1, False, 4, 2), (3, True, 4, 4), (2, False, 6, 2), (1, True, 2, 2)],
)
def test_matches_loop_reference(backend, num_splits, sq, causal, heads, kv_heads):
    q, k_cache, v_cache, k, v = _problem(sq=sq, new=max(sq, 1), heads=heads, kv_heads=kv_heads)
    seqlens = torch.tensor([0, 17, 66], dtype=torch.int32)[: q.shape[0]]  # 66 + 3 <= 70
    seqlens = seqlens.clamp(max=70 - k.shape[1])
    want_cache = k_cache.clone()
    for b in range(3):
        want_cache[b, seqlens[b] : seqlens[b] + k.shape[1]] = k[b]
    out, lse = fc.decode_attention(
        q,
        k_cache,
        v_cache,
        k,
        v,
        cache_seqlens=seqlens,
        causal=causal,
        num_splits=num_splits,
        return_softmax_lse=True,
        backend=backend,
    )
    assert torch.equal(k_cache, want_cache), "new keys must be written in place at cache_seqlens"
    want_out, want_lse = _loop_reference(
        q, k_cache, v_cache, seqlens + k.shape[1], causal, q.shape[-1] ** -0.5
    )
    torch.testing.assert_close(out.double(), want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.isa_independent  # the cpu backend here is ATen code
@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_and_no_append(backend):
    q, k_cache, v_cache, _, _ = _problem(dtype=torch.bfloat16)
    out = fc.decode_attention(
        q, k_cache, v_cache, cache_seqlens=30, softmax_scale=0.3, backend=backend
    )
    want, _ = _loop_reference(q, k_cache, v_cache, torch.full((3,), 30), False, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, **TOL[torch.bfloat16])


def test_non_contiguous_query():
    q, k_cache, v_cache, k, v = _problem(heads=4)
    wide = torch.cat([q, q], dim=-1)[..., :16]
    assert not wide.is_contiguous()
    out = fc.decode_attention(wide, k_cache.clone(), v_cache.clone(), k, v, cache_seqlens=9)
    want = fc.decode_attention(
        q.contiguous(), k_cache, v_cache, k, v, cache_seqlens=9, backend="reference"
    )
    torch.testing.assert_close(out, want)


def test_opcheck_declares_mutation():
    q, k_cache, v_cache, k, v = _problem()
    seqlens = torch.tensor([3, 4, 5], dtype=torch.int32)
    torch.library.opcheck(
        decode_mod._decode_attention_op, (q, k_cache, v_cache, k, v, seqlens, 0.25, False, 2, "cpu")
    )


def test_compile_fullgraph():
    torch._dynamo.reset()
    q, k_cache, v_cache, k, v = _problem()
    seqlens = torch.tensor([3, 4, 5], dtype=torch.int32)

    def step(q, k_cache, v_cache, k, v):
        return fc.decode_attention(q, k_cache, v_cache, k, v, cache_seqlens=seqlens) * 2

    want = step(q, k_cache.clone(), v_cache.clone(), k, v)
    kc, vc = k_cache.clone(), v_cache.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, k, v)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc[1, 4], k[1, 0]), "the compiled op must still mutate the cache"


def test_bad_input():
    q, k_cache, v_cache, k, v = _problem()
    with pytest.raises(ValueError, match="too many steps"):
        fc.decode_attention(q, k_cache, v_cache, k, v, cache_seqlens=70)
    with pytest.raises(ValueError, match="pass both k and v"):
        fc.decode_attention(q, k_cache, v_cache, k, None)
    with pytest.raises(ValueError, match="not a multiple of the caches' H_kv=2"):
        fc.decode_attention(q[:, :, :3], k_cache, v_cache)
    with pytest.raises(ValueError, match=r"cache_seqlens must be \(B=3,\)"):
        fc.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"k_cache and v_cache must both be \(B=3"):
        fc.decode_attention(q, k_cache[:2], v_cache[:2])
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        fc.decode_attention(q, k_cache, v_cache, cache_seqlens=torch.zeros(3))


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return ARDecompressor(dim=32, depth=2, heads=4, num_tokens=24, context_dim=24).eval()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_matches_no_cache_and_teacher_forcing(decoder, batch, backend):
    decoder.backend = backend
    context = torch.randn(batch, 7, 24)
    generated = decoder.generate(context)
    assert generated.shape == (batch, 24, 32)
    torch.testing.assert_close(generated, decoder.generate_reference(context), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(decoder(generated, context), generated, atol=1e-5, rtol=1e-5)
    dim, layers = 32, 2
    assert decoder.last_cache_bytes == layers * 2 * batch * 24 * dim * 4


def test_generate_with_requantization(decoder):
    quantizer = MultiCodebookQuantizer(8 * 16, 32, num_codebooks=8).eval()

    def requantize(y):
        return quantizer(y)[0]

    context = torch.randn(2, 5, 24)
    generated = decoder.generate(context, num_tokens=10, quantize=requantize, progress=True)
    torch.testing.assert_close(
        generated, decoder.generate_reference(context, 10, requantize), atol=1e-5, rtol=1e-5
    )
    # every generated token is a (unit-norm) code row of each codebook chunk
    norms = generated.view(2, 10, 8, 4).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_decoder_bad_input(decoder):
    with pytest.raises(ValueError, match=r"context must be \(B, Lc > 0, 24\)"):
        decoder.generate(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"num_tokens must be in \[1, 24\]"):
        decoder.generate(torch.randn(2, 5, 24), num_tokens=25)
    with pytest.raises(ValueError, match=r"tokens must be \(B=2"):
        decoder(torch.randn(3, 24, 32), torch.randn(2, 5, 24))


def test_teacher_forced_training_step(decoder):
    decoder.train()
    tokens, context = torch.randn(2, 24, 32), torch.randn(2, 6, 24)
    loss = (decoder(tokens, context) - tokens).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in decoder.parameters())
