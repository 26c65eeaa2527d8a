"""The fused C++ decode step (``fastcompress_cpu::decoder_step``, used by
``ARDecompressor.generate`` on CPU float32) against the per-layer Python step on the
reference backend, the teacher-forced forward, and its input checks."""

import pytest
import torch
from torch import nn

from fastcompress import decode_step
from fastcompress.nn import ARDecompressor

pytestmark = pytest.mark.cpu_kernels  # the fused step is C++: every ISA level

# (dim, depth, heads, num_tokens, mlp_ratio, gelu, local grid): head_dim 16 / 8 / 16,
# dims and hidden widths off the 16-lane vectors (tails), sequences over the 64-position
# split-K chunk, exact and tanh GELU, local evidence.
CONFIGS = {
    "d48-h3-hidden120": (48, 2, 3, 150, 2.5, "none", None),
    "d40-h5-headdim8": (40, 1, 5, 70, 4.0, "none", None),
    "d64-tanh-local": (64, 2, 4, 64, 3.0, "tanh", (8, 8)),
}


def _decoder(name):
    dim, depth, heads, tokens, ratio, gelu, grid = CONFIGS[name]
    torch.manual_seed(sum(map(ord, name)))
    local = dict(local_grid=grid, local_stride=2, num_meta_tokens=2) if grid else {}
    model = ARDecompressor(dim, depth, heads, tokens, mlp_ratio=ratio, **local).eval()
    for block in model.blocks:
        block.mlp[1] = nn.GELU(approximate=gelu)
    with torch.no_grad():  # norms off their (1, 0) init, so that they are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    context_len = 2 + (grid[0] // 2) * (grid[1] // 2) if grid else 37
    return model, context_len


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = decode_step.decoder_step

    def counting(*args, **kwargs):
        calls.append(args[6])
        return original(*args, **kwargs)

    monkeypatch.setattr(decode_step, "decoder_step", counting)
    return calls


@pytest.mark.parametrize("batch", [1, 2, 7, 9])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_generate_matches_python_step(name, batch, fused_calls):
    model, context_len = _decoder(name)
    context = torch.randn(batch, context_len, model.dim)
    fused = model.generate(context)
    assert fused_calls == list(range(model.num_tokens)), "generate must take the fused step"
    model.backend = "reference"
    python_step = model.generate(context)
    assert len(fused_calls) == model.num_tokens, "the reference backend must not use it"
    torch.testing.assert_close(fused, python_step, atol=5e-5, rtol=5e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(fused, context), fused, atol=5e-5, rtol=5e-5)
    layers = len(model.blocks)
    assert model.last_cache_bytes == layers * 2 * batch * model.num_tokens * model.dim * 4


def test_forced_cpu_backend_uses_it_and_bf16_does_not(fused_calls):
    model, context_len = _decoder("d40-h5-headdim8")
    model.backend = "cpu"
    context = torch.randn(2, context_len, model.dim)
    model.generate(context, num_tokens=5)
    assert fused_calls == [0, 1, 2, 3, 4]
    model.backend = None
    model_bf16 = model.to(torch.bfloat16)
    out = model_bf16.generate(context.to(torch.bfloat16), num_tokens=5)
    assert out.dtype == torch.bfloat16 and len(fused_calls) == 5
    assert "float32" in decode_step.unsupported_reason(model_bf16, context)


def _step_args(batch=2, dim=32, heads=4, depth=1, cache_len=10, context_len=6):
    torch.manual_seed(0)
    model = ARDecompressor(dim, depth, heads, cache_len).eval()
    params = decode_step.pack_params(model)
    head_dim = dim // heads
    cache_k = [torch.randn(batch, cache_len, heads, head_dim) for _ in range(depth)]
    cache_v = [torch.randn(batch, cache_len, heads, head_dim) for _ in range(depth)]
    ctx_k = [torch.randn(batch, context_len, heads, head_dim) for _ in range(depth)]
    ctx_v = [torch.randn(batch, context_len, heads, head_dim) for _ in range(depth)]
    return model, [torch.randn(batch, dim), params, cache_k, cache_v, ctx_k, ctx_v, 3, heads]


def test_step_writes_cache_and_matches_block_step():
    model, args = _step_args()
    x, params, cache_k, cache_v, ctx_k, ctx_v, position, heads = args
    kc, vc = cache_k[0].clone(), cache_v[0].clone()
    with torch.no_grad():
        block = model.blocks[0]
        h = block.step(
            x[:, None],
            kc,
            vc,
            torch.full((2,), position, dtype=torch.int32),
            ctx_k[0],
            ctx_v[0],
            torch.full((2,), 6, dtype=torch.int32),
            "reference",
        )
        want = model.head(model.norm(h))[:, 0]
    got = decode_step.decoder_step(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_k[0], kc, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache_v[0], vc, atol=1e-6, rtol=1e-6)
    assert not torch.equal(cache_k[0][:, position], torch.zeros_like(kc[:, position]))


def test_opcheck():
    _, args = _step_args()
    decode_step.decoder_step(*args)  # loads the op and registers its fake
    torch.library.opcheck(torch.ops.fastcompress_cpu.decoder_step.default, (*args, 1e-5, False))


def test_bad_input():
    _, args = _step_args()
    step = decode_step.decoder_step
    with pytest.raises(RuntimeError, match="params must hold 18 tensors per layer plus 4"):
        step(args[0], args[1][:-1], *args[2:])
    with pytest.raises(RuntimeError, match="position=10 is outside the cache of layer 0"):
        step(*args[:6], 10, args[7])
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        step(args[0].double(), *args[1:])
    params = list(args[1])
    params[2] = params[2].t().contiguous().t()
    with pytest.raises(RuntimeError, match=r"params\[2\] must be a contiguous float32"):
        step(args[0], params, *args[2:])
    with pytest.raises(RuntimeError, match=r"cache_k\[0\] must be a contiguous float32 CPU .*B=3"):
        step(torch.randn(3, 32), *args[1:])
    with pytest.raises(RuntimeError, match="heads=5 must divide dim=32"):
        step(*args[:7], 5)
