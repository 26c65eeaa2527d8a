"""MGVQ's multi-group quantizer on CPU (2 threads): B = 4 latents of 32 x 32 x 32 channels,
8 groups x 2048 codes x 4 dims (MGVQ's 8-group release): N = 4096 rows per group.

Same run: ``GroupedQuantizer`` (the fused search) at every ISA level, and the "torch
reference": the independent model of MGVQ's ``VectorQuantizer`` from the tests (scores
``N x 2048`` per group, then a full sort of every row, as MGVQ searches). Eval is the
tokenizer's encode path; train adds MGVQ's re-seeding (one softmax over the ``N x K``
scores and a multinomial draw per group on both sides), so the gap narrows there.
"""

import os
import sys

import pytest
import torch
from isa_levels import at_level, cpu_impls

from fastcompress.nn import GroupedQuantizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from mgvq_semantics import MGVQQuantizer  # noqa: E402

N_E, E_DIM, GROUPS = 8 * 2048, 4, 8
SHAPE = (4, GROUPS * E_DIM, 32, 32)
IMPLS = [*cpu_impls(), "torch reference"]


def _model(impl):
    torch.manual_seed(0)
    oracle = MGVQQuantizer(N_E, E_DIM, 0.25, GROUPS)
    if impl == "torch reference":
        return oracle
    ours = GroupedQuantizer(N_E, E_DIM, 0.25, GROUPS, backend="cpu")
    ours.load_state_dict(oracle.state_dict())
    return ours


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_grouped_quantizer(benchmark, record, impl, mode):
    z = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    model = _model(impl).train(mode == "train")
    want = _model("torch reference").eval()(z)[2][2]

    def run():
        with at_level(impl), torch.no_grad():
            return model(z)

    same = float((run()[2][2] == want).float().mean())
    benchmark.group = f"MGVQ grouped quantizer {mode}, N={SHAPE[0] * 32 * 32} x 8 groups"
    benchmark.extra_info.update(index_agreement=same)
    record(benchmark, impl, f"indices equal to the sort search: {same:.4%}", None)
    assert same > 0.999
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
