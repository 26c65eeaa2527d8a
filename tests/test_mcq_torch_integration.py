"""torch.library registration: opcheck on every op, torch.compile(fullgraph=True)."""

import pytest
import torch
from helpers import make_problem

import fastcompress as fc
from fastcompress import mcq


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_quantize_and_search(backend):
    z, books = make_problem(33, 4, 40, 8, seed=1)
    torch.library.opcheck(
        mcq._mcq_quantize_op, (z.requires_grad_(), books.requires_grad_(), 0.25, True, backend)
    )
    torch.library.opcheck(mcq._mcq_search_op, (z.detach(), books.detach(), False, backend))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck_entropy(backend):
    from fastcompress import entropy

    z, books = make_problem(20, 2, 30, 4, seed=2)
    chunks = torch.nn.functional.normalize(z.view(20, 2, 4), dim=-1).requires_grad_()
    book = torch.nn.functional.normalize(books, dim=-1).requires_grad_()
    torch.library.opcheck(entropy.entropy_op, (chunks, book, 10.0, backend))


class TinyTokenizer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 32)
        self.books = torch.nn.Parameter(torch.randn(4, 50, 8))

    def forward(self, x):
        out = fc.mcq_quantize(self.proj(x), self.books, entropy_temp=0.1)
        return out.z_q.sum() + out.vq_loss + out.entropy_loss, out.indices


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyTokenizer()
    x = torch.randn(2, 9, 16)
    eager_loss, eager_idx = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, idx = compiled(x)
    torch.testing.assert_close(loss, eager_loss)
    assert torch.equal(idx, eager_idx)
    loss.backward()
    assert model.books.grad is not None and model.proj.weight.grad.abs().sum() > 0
