"""``GroupedQuantizer`` against an independent model of MGVQ's ``VectorQuantizer``
(tests/mgvq_semantics.py): state dicts, eval and training outputs, per-group losses,
usage window and EMA, re-seeded codes, gradients, index layout, ties, bad input."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_codes
from mgvq_semantics import MGVQQuantizer

from fastcompress._backend import triton_available
from fastcompress.nn import GroupedQuantizer

BACKENDS = ["reference", "cpu"] + (["triton"] if triton_available() else [])
# (n_e, e_dim, groups): MGVQ's 8 x 2048 x 4 shape scaled down, and its 4 x 8192 x 8 one.
CONFIGS = [(8 * 96, 4, 8), (4 * 130, 8, 4)]
CLOSE = dict(atol=2e-6, rtol=1e-5)


def _pair(n_e, e_dim, groups, backend=None):
    torch.manual_seed(n_e)
    oracle = MGVQQuantizer(n_e, e_dim, 0.25, groups)
    ours = GroupedQuantizer(n_e, e_dim, 0.25, groups, True, True, backend=backend)
    ours.load_state_dict(oracle.state_dict())  # strict: the same keys and shapes
    return oracle, ours


def _features(groups, e_dim, seed, shape=(3, 7, 9)):
    gen = torch.Generator().manual_seed(seed)
    batch, height, width = shape
    return torch.randn(batch, groups * e_dim, height, width, generator=gen)


def test_state_dict_round_trip():
    oracle, ours = _pair(8 * 96, 4, 8)
    assert set(ours.state_dict()) == {"embedding.weight", "codebook_used", "embed_prob"}
    assert ours.state_dict()["codebook_used"].shape == (8, 65536)
    assert ours.state_dict()["embed_prob"].shape == (8, 96)
    back = MGVQQuantizer(8 * 96, 4, 0.25, 8)
    back.load_state_dict(ours.state_dict())
    assert torch.equal(back.embedding.weight, oracle.embedding.weight)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", CONFIGS)
def test_eval_outputs_match(backend, config):
    n_e, e_dim, groups = config
    oracle, ours = _pair(n_e, e_dim, groups, backend)
    oracle.eval(), ours.eval()
    z = _features(groups, e_dim, seed=1)
    want = oracle(z)
    got = ours(z)
    idx, want_idx = got[2][2], want[2][2]
    assert idx.shape == want_idx.shape == (3 * 7 * 9, groups)
    rows = z.permute(0, 2, 3, 1).reshape(-1, groups * e_dim)
    books = ours.group_codebooks().detach()
    assert_same_codes(rows, books, idx, want_idx, True)
    same = (idx == want_idx).all(-1).view(3, 7, 9)
    quant, want_quant = got[0].permute(0, 2, 3, 1), want[0].permute(0, 2, 3, 1)
    torch.testing.assert_close(quant[same], want_quant[same], **CLOSE)
    for got_stat, want_stat in zip(got[1], want[1], strict=True):
        if want_stat is None:
            assert got_stat is None
        else:
            torch.testing.assert_close(got_stat, want_stat)  # zeros in eval
    torch.testing.assert_close(got[2][0], want[2][0], **CLOSE)  # last group's perplexity
    assert got[2][1] is None  # the one-hot is opt-in


@pytest.mark.parametrize("config", CONFIGS)
def test_training_steps_match(config):
    """Three training steps: per-group losses, gradients, the usage window and EMA, and
    the re-seeded codebook, with the same random stream on both sides."""
    n_e, e_dim, groups = config
    oracle, ours = _pair(n_e, e_dim, groups, backend="cpu")
    ours.return_min_encodings = True
    oracle.train(), ours.train()
    for step in range(3):
        z = _features(groups, e_dim, seed=10 + step).requires_grad_()
        torch.manual_seed(100 + step)
        want = oracle(z)
        torch.manual_seed(100 + step)
        got = ours(z)
        assert torch.equal(got[2][2], want[2][2]), step  # random data: no near-ties here
        torch.testing.assert_close(got[0], want[0], **CLOSE)
        (vq, commit, entropy, usage), (want_vq, want_commit, want_entropy, want_usage) = (
            got[1],
            want[1],
        )
        torch.testing.assert_close(vq, want_vq, **CLOSE)
        torch.testing.assert_close(commit, want_commit, **CLOSE)
        torch.testing.assert_close(usage, want_usage)
        assert entropy == want_entropy == 0
        torch.testing.assert_close(got[2][0], want[2][0], **CLOSE)
        assert torch.equal(got[2][1], want[2][1])
        weight = torch.linspace(-1, 1, z.numel()).view(z.shape)
        loss_ours = vq.sum() + commit.sum() + (got[0] * weight).sum()
        loss_want = want_vq.sum() + want_commit.sum() + (want[0] * weight).sum()
        grads = torch.autograd.grad(loss_ours, (z, ours.embedding.weight))
        want_grads = torch.autograd.grad(loss_want, (z, oracle.embedding.weight))
        for g, w in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.embed_prob, oracle.embed_prob)
        assert torch.equal(ours.codebook_used, oracle.codebook_used)
        torch.testing.assert_close(ours.embedding.weight, oracle.embedding.weight, **CLOSE)
    assert ours.embed_prob.abs().sum() > 0 and ours.codebook_used.abs().sum() > 0


def test_reseeding_moves_rare_codes_and_keeps_used_ones():
    torch.manual_seed(0)
    ours = GroupedQuantizer(4 * 64, 4, 0.25, 4)
    before = ours.embedding.weight.detach().clone()
    ours.embed_prob.fill_(0.5)  # a well used history: 1 - exp(-big) = 1, nothing moves
    ours(_features(4, 4, seed=3))
    assert torch.equal(ours.embedding.weight, before)
    ours.embed_prob.zero_()
    z = _features(4, 4, seed=4)
    ours(z)
    # Codes this batch never chose (EMA still 0) land on a unit feature of the batch,
    # up to exp(-0.001) of their old value.
    unchosen = ours.embed_prob == 0  # (G, K)
    new = ours.embedding.weight.detach().view(4, 64, 4)
    feats = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4, 4), dim=-1).transpose(0, 1)
    gap = torch.cdist(new, feats).amin(-1)  # (G, K): distance to the nearest feature
    assert unchosen.sum() > 10 and float(gap[unchosen].max()) < 0.01
    assert not torch.equal(ours.embedding.weight, before)


def test_exact_ties_pick_the_lowest_index():
    ours = GroupedQuantizer(2 * 8, 4, 0.25, 2, backend="cpu").eval()
    with torch.no_grad():
        book = F.normalize(torch.randn(8, 4), dim=-1)
        book[5] = book[2]  # an exact duplicate: every feature nearest to 2 ties with 5
        ours.embedding.weight.copy_(torch.cat([book, book]))
    z = book[2].repeat(2).view(1, 8, 1, 1).expand(1, 8, 3, 2) * 3.0
    idx = ours(z)[2][2]
    assert torch.equal(idx, torch.full_like(idx, 2))


def test_channels_last_and_bfloat16_input():
    _, ours = _pair(8 * 96, 4, 8, backend="cpu")
    ours.eval()
    z = _features(8, 4, seed=6)
    want = ours(z)
    got = ours(z.to(memory_format=torch.channels_last))
    assert torch.equal(got[2][2], want[2][2])
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    half = ours(z.bfloat16())
    assert half[0].dtype == torch.bfloat16
    assert torch.equal(half[2][2], ours(z.bfloat16().float())[2][2])


def test_get_codebook_entry_layout():
    _, ours = _pair(8 * 96, 4, 8)
    idx = torch.randint(0, 96, (2, 15, 8))
    unit = F.normalize(ours.embedding.weight.detach(), dim=-1).view(8, 96, 4)
    want = torch.cat([unit[g][idx[..., g]] for g in range(8)], dim=-1)
    got = ours.get_codebook_entry(idx, groups_to_use=8)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    partial = ours.get_codebook_entry(idx, shape=(2, 32, 3, 5), groups_to_use=3)
    assert partial.shape == (2, 32, 3, 5)
    assert torch.equal(partial[:, 12:], torch.zeros_like(partial[:, 12:]))
    torch.testing.assert_close(
        partial[:, :12], want[..., :12].view(2, 3, 5, 12).permute(0, 3, 1, 2), atol=0, rtol=0
    )


def test_group_masking_zeroes_groups_and_marks_their_indices():
    _, ours = _pair(8 * 96, 4, 8)
    ours.group_mask_probs = (0.0, 1.0, 0.0, 1.0)  # groups 1 and 3 always masked
    ours.train()
    quant, (vq, commit, _, _), (_, _, idx) = ours(_features(8, 4, seed=8))
    for g in (1, 3):
        assert torch.equal(quant[:, g * 4 : (g + 1) * 4], torch.zeros_like(quant[:, :4]))
        assert vq[g] == 0 and commit[g] == 0 and (idx[:, g] == -1).all()
    assert (vq[[0, 2, 4]] > 0).all() and (idx[:, 0] >= 0).all()


def test_bad_input():
    ours = GroupedQuantizer(8 * 16, 4, 0.25, 8)
    with pytest.raises(ValueError, match=r"groups \* e_dim = 32"):
        ours(torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="divisible by groups=3"):
        GroupedQuantizer(100, 4, 0.25, 3)


def test_training_step_under_autocast_is_float32():
    _, ours = _pair(8 * 96, 4, 8, backend="cpu")
    twin = GroupedQuantizer(8 * 96, 4, 0.25, 8, backend="cpu")
    twin.load_state_dict(ours.state_dict())
    z = _features(8, 4, seed=12)
    torch.manual_seed(3)
    want = twin.train()(z)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours.train()(z)
    assert got[0].dtype == torch.float32 and torch.equal(got[2][2], want[2][2])
    torch.testing.assert_close(got[1][0], want[1][0], **CLOSE)
    # The re-seeding drew from float32 scores: the same codes moved the same way.
    torch.testing.assert_close(ours.embedding.weight, twin.embedding.weight, **CLOSE)
