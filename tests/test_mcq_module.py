"""MultiCodebookQuantizer against an independent model of UniTok's VectorQuantizerM."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_same_codes
from unitok_semantics import UniTokQuantizer

from fastcompress.nn import MultiCodebookQuantizer

CONFIG = dict(vocab_size=8 * 96, vocab_width=64, beta=0.25, num_codebooks=8)


def _pair(use_entropy=False, backend="cpu"):
    unitok = UniTokQuantizer(**CONFIG, use_entropy_loss=use_entropy, entropy_temp=0.01)
    ours = MultiCodebookQuantizer(
        **CONFIG, use_entropy_loss=use_entropy, entropy_temp=0.01, backend=backend
    )
    missing, unexpected = ours.load_state_dict(unitok.state_dict(), strict=True)
    assert not missing and not unexpected
    return unitok, ours


def test_state_dict_keys_are_unitoks():
    unitok, ours = _pair()
    assert set(ours.state_dict()) == set(unitok.state_dict())
    assert "codebooks.3.codebook.weight" in ours.state_dict()
    assert ours.state_dict()["codebooks.0.vocab_usage"].shape == (96,)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("use_entropy", [False, True])
def test_forward_and_gradients_match_unitok(backend, use_entropy):
    unitok, ours = _pair(use_entropy, backend)
    x = torch.randn(3, 17, 64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    f_hat, vq, ent, usage, idx = unitok(x1)
    g_hat, vq2, ent2, usage2 = ours(x2)
    assert_same_codes(
        x.view(-1, 64),
        ours.stacked_codebooks().detach(),
        ours.f_to_idx(x).movedim(1, -1).reshape(-1, 8),
        idx.movedim(1, -1).reshape(-1, 8),
        normalize=True,
    )
    torch.testing.assert_close(g_hat, f_hat, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(vq2, vq, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(usage2, usage)
    w = torch.randn_like(f_hat)
    ((f_hat * w).sum() + vq + ent).backward()
    ((g_hat * w).sum() + vq2 + ent2).backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-4)
    for a, b in zip(unitok.codebooks, ours.codebooks, strict=False):
        torch.testing.assert_close(
            b.codebook.weight.grad, a.codebook.weight.grad, atol=1e-6, rtol=1e-4
        )


def test_usage_ema_follows_unitok_schedule():
    unitok, ours = _pair()
    for step in range(103):
        x = torch.randn(2, 9, 64) * (1 + step % 3)
        unitok(x)
        ours(x)
    for a, b in zip(unitok.codebooks, ours.codebooks, strict=False):
        torch.testing.assert_close(b.vocab_usage, a.vocab_usage, atol=1e-6, rtol=1e-5)
    assert ours.codebooks[0].vocab_usage_record_times == 103


def test_index_layout_round_trip():
    _, ours = _pair()
    x = torch.randn(2, 12, 64)
    idx = ours.f_to_idx(x)
    assert idx.shape == (2, 8, 12) and idx.dtype == torch.long
    feats = ours.idx_to_f(idx)
    torch.testing.assert_close(feats, ours(x)[0].detach(), atol=2e-6, rtol=1e-5)
    grid = ours.idx_to_f(idx.view(2, 8, 3, 4))  # (B, G, H, W) flattens like UniTok
    torch.testing.assert_close(grid, feats)
    with pytest.raises(ValueError, match=r"indices must be \(B, G=8"):
        ours.idx_to_f(idx[:, :4])


def test_codebook_entries_look_up_unit_rows_like_unitoks_normalized_embedding():
    unitok, ours = _pair()
    idx = torch.randint(0, 96, (5, 7))
    for i in (0, 5):
        entry = ours.codebooks[i].codebook
        weight = unitok.codebooks[i].codebook.weight
        unit = weight / weight.norm(dim=1, keepdim=True)  # UniTok: F.normalize(weight, dim=1)
        torch.testing.assert_close(entry.get_norm_weight(), unit, atol=1e-7, rtol=1e-6)
        looked_up = entry(idx)
        assert looked_up.shape == (5, 7, 8)
        torch.testing.assert_close(looked_up, unit[idx], atol=1e-7, rtol=1e-6)
        grad = torch.autograd.grad(looked_up.sum(), entry.weight)[0]
        want = torch.autograd.grad(unit[idx].sum(), weight)[0]
        torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)  # through the norm
    # idx_to_f is each entry's lookup, concatenated.
    flat = torch.randint(0, 96, (2, 8, 6))
    parts = [ours.codebooks[g].codebook(flat[:, g]) for g in range(8)]
    torch.testing.assert_close(ours.idx_to_f(flat), torch.cat(parts, -1), atol=0, rtol=0)
    plain = MultiCodebookQuantizer(**CONFIG, normalize=False)
    raw = plain.codebooks[0].codebook
    assert torch.equal(raw(idx), raw.weight[idx])  # L2 codebooks return the raw rows


def test_constructor_rejects_indivisible():
    with pytest.raises(ValueError, match="divisible by num_codebooks=8"):
        MultiCodebookQuantizer(100, 64, num_codebooks=8)


def _worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    quantizer = MultiCodebookQuantizer(8 * 16, 32, num_codebooks=8, backend="cpu")
    # Each rank sees different data; usage must be computed on the all-reduced counts.
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(rank))
    _, _, _, usage = quantizer(x)
    results[rank] = (usage.item(), quantizer.codebooks[0].vocab_usage.clone())
    dist.destroy_process_group()


def test_usage_all_reduced_across_ranks_gloo():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
    # Expected: one process quantising both ranks' data together (no all-reduce needed).
    torch.manual_seed(0)
    single = MultiCodebookQuantizer(8 * 16, 32, num_codebooks=8, backend="cpu")
    both = torch.cat(
        [torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(r)) for r in range(2)], dim=1
    )
    _, _, _, usage = single(both)
    for rank in range(2):
        assert results[rank][0] == pytest.approx(usage.item())
        torch.testing.assert_close(results[rank][1], single.codebooks[0].vocab_usage)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_search_the_float32_master_codebook(backend, dtype):
    # UniTok searches its float32 codebook even for bf16 features: rounding the codebook
    # to the feature dtype picks other codes at near-ties and rounds its gradients.
    torch.manual_seed(0)
    quantizer = MultiCodebookQuantizer(2048, 64, num_codebooks=8, backend=backend)
    features = torch.randn(4, 300, 64).to(dtype)
    z_q, vq_loss, _, _ = quantizer(features)
    assert z_q.dtype == torch.float32  # UniTok's output dtype, the module default
    (z_q.square().sum() + vq_loss).backward()
    grads = [entry.codebook.weight.grad for entry in quantizer.codebooks]
    assert all(g.dtype == torch.float32 for g in grads)
    # (Which codes: test_half_features_give_unitoks_codes, against UniTok's own rounding.)
    out = MultiCodebookQuantizer(2048, 64, num_codebooks=8, output_dtype=None)(features)[0]
    assert out.dtype == dtype


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("use_entropy", [False, True])
def test_half_features_give_unitoks_codes(backend, dtype, use_entropy):
    # UniTok normalises each chunk in the features' dtype, then casts to float32 (issue 22:
    # normalising in float32 moved 37-41 of 8,192 codes in bf16). The module reproduces
    # its codes, losses and gradients on the same bf16 / f16 features.
    unitok, ours = _pair(use_entropy, backend)
    features = torch.randn(4, 1024, CONFIG["vocab_width"]).to(dtype)
    f1, f2 = features.clone().requires_grad_(), features.clone().requires_grad_()
    got = ours(f1)
    want = unitok(f2)
    # The same codes but at float32 near-ties (UniTok's z.c against our z.c - |c|^2 / 2
    # with |c| = 1 to 1e-7): at most 2 of 32,768 here.
    assert int((ours.f_to_idx(features) != want[4]).sum()) <= 2
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[2], want[2], atol=1e-5, rtol=1e-5)
    (got[0].square().sum() + got[1] + got[2]).backward()
    (want[0].square().sum() + want[1] + want[2]).backward()
    torch.testing.assert_close(f1.grad.float(), f2.grad.float(), atol=1e-2, rtol=1e-2)
    for a, b in zip(ours.codebooks, unitok.codebooks, strict=True):
        torch.testing.assert_close(a.codebook.weight.grad, b.codebook.weight.grad,
                                   atol=1e-5, rtol=1e-3)  # fmt: skip
