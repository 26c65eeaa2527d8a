"""``GlobalTokenExtractor`` with every ``nn.MultiheadAttention`` option it can load
(issue #14, item 5): dropout, add_bias_kv, add_zero_attn, kdim/vdim give the numbers of
``nn.MultiheadAttention`` itself (outputs, gradients, the dropout random stream), and
state dicts it was not built for are refused with the argument to set."""

import pytest
import torch

from fastcompress.nn import GlobalTokenExtractor, UniCompressor

DIM, HEADS, TOKENS = 32, 4, 3


def _mha(**options):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(DIM, HEADS, batch_first=True, **options)
    with torch.no_grad():
        for name, p in mha.named_parameters():
            if "bias" in name:
                p.normal_()
    return mha


def _extractor_like(mha, **options):
    extractor = GlobalTokenExtractor(DIM, HEADS, TOKENS, **options)
    extractor.attn.load_state_dict(mha.state_dict())
    return extractor


def _check_against_mha(extractor, mha, x, seed=None):
    queries = extractor.queries.detach().unsqueeze(0).expand(x.shape[0], -1, -1)
    x_ours, x_want = x.clone().requires_grad_(), x.clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    got = extractor(x_ours)
    if seed is not None:
        torch.manual_seed(seed)
    want = mha(queries, x_want, x_want, need_weights=False)[0]
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    weight = torch.linspace(-1, 1, got.numel()).view(got.shape)
    grad = torch.autograd.grad((got * weight).sum(), x_ours)[0]
    want_grad = torch.autograd.grad((want * weight).sum(), x_want)[0]
    torch.testing.assert_close(grad, want_grad, atol=2e-6, rtol=1e-5)
    return got


def test_dropout_in_training_follows_multihead_attention():
    mha = _mha(dropout=0.3)
    extractor = _extractor_like(mha, dropout=0.3)
    x = torch.randn(2, 40, DIM)
    mha.train(), extractor.train()
    assert extractor.fused_unsupported_reason() == "attention dropout 0.3 in training"
    dropped = _check_against_mha(extractor, mha, x, seed=5)
    mha.eval(), extractor.eval()
    assert extractor.fused_unsupported_reason() is None  # eval: the fused pass
    kept = _check_against_mha(extractor, mha, x)
    assert (dropped - kept).abs().max() > 1e-2  # dropout did act in training


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(add_bias_kv=True), "add_bias_kv"),
        (dict(add_zero_attn=True), "add_zero_attn"),
        (dict(add_bias_kv=True, add_zero_attn=True), "add_bias_kv"),
        (dict(kdim=24, vdim=24), "kdim=24, vdim=24 differ from dim=32"),
    ],
)
def test_options_the_fused_pass_lacks_give_multihead_attentions_numbers(options, reason):
    mha = _mha(**options)
    extractor = _extractor_like(mha, **options)
    assert extractor.fused_unsupported_reason() == reason
    x = torch.randn(2, 30, options.get("kdim", DIM))
    _check_against_mha(extractor.eval(), mha.eval(), x)


def test_an_assigned_attention_is_honoured():
    extractor = GlobalTokenExtractor(DIM, HEADS, TOKENS)
    mha = _mha(add_zero_attn=True)
    extractor.attn = mha
    _check_against_mha(extractor.eval(), mha.eval(), torch.randn(2, 20, DIM))


def test_plain_attention_keeps_the_fused_pass(monkeypatch):
    extractor = GlobalTokenExtractor(DIM, HEADS, TOKENS, dropout=0.1).eval()
    assert extractor.fused_unsupported_reason() is None
    monkeypatch.setattr(
        extractor, "attend_unfused", lambda x: (_ for _ in ()).throw(AssertionError("unfused"))
    )
    assert extractor(torch.randn(2, 20, DIM)).shape == (2, TOKENS, DIM)


def test_unicompressor_uses_the_attention_options():
    model = UniCompressor(DIM, HEADS, (4, 6), stride=2, num_meta_tokens=TOKENS)
    mha = _mha(add_bias_kv=True)
    model.extractor.attn = mha
    x = torch.randn(2, 24, DIM)
    out = model.eval()(x)
    queries = model.extractor.queries.detach().unsqueeze(0).expand(2, -1, -1)
    torch.testing.assert_close(out.meta, mha.eval()(queries, x, x)[0], atol=2e-6, rtol=1e-5)
    assert out.pooled.shape == (2, 6, DIM)


@pytest.mark.parametrize(
    "saved, match",
    [(dict(add_bias_kv=True), "add_bias_kv=True"), (dict(kdim=24, vdim=24), "kdim/vdim")],
)
def test_state_dicts_it_was_not_built_for_are_refused(saved, match):
    source = GlobalTokenExtractor(DIM, HEADS, TOKENS, **saved)
    plain = GlobalTokenExtractor(DIM, HEADS, TOKENS)
    with pytest.raises(ValueError, match=match):
        plain.load_state_dict(source.state_dict())
    rebuilt = GlobalTokenExtractor(DIM, HEADS, TOKENS, **saved)
    rebuilt.load_state_dict(source.state_dict())  # built alike: loads


def test_kdim_unlike_vdim_is_refused():
    with pytest.raises(ValueError, match="kdim=24 and vdim=16 must be equal"):
        GlobalTokenExtractor(DIM, HEADS, TOKENS, kdim=24, vdim=16)
