"""Bad input: a clear error naming the argument, raised before any kernel runs."""

import pytest
import torch

import fastcompress as fc
from fastcompress._backend import BackendUnavailableError


@pytest.fixture
def books():
    return torch.randn(8, 32, 8)


def test_channels_not_divisible(books):
    with pytest.raises(ValueError, match=r"C=60.*not divisible by G=8"):
        fc.mcq_quantize(torch.randn(2, 3, 60), books)


def test_channels_wrong(books):
    with pytest.raises(ValueError, match=r"C = G\*d = 64"):
        fc.mcq_search(torch.randn(2, 3, 72), books)


def test_codebooks_wrong_rank():
    with pytest.raises(ValueError, match="codebooks must have 3 dimensions"):
        fc.mcq_quantize(torch.randn(2, 64), torch.randn(32, 8))


def test_dtype_mismatch(books):
    # A float32 master codebook takes any feature dtype; otherwise the dtypes must match.
    with pytest.raises(
        TypeError, match="codebooks has dtype torch.float16 but z has torch.bfloat16"
    ):
        fc.mcq_quantize(torch.randn(2, 3, 64, dtype=torch.bfloat16), books.half())
    with pytest.raises(
        TypeError, match="codebooks has dtype torch.bfloat16 but z has torch.float32"
    ):
        fc.mcq_quantize(torch.randn(2, 3, 64), books.bfloat16())
    out = fc.mcq_quantize(torch.randn(2, 3, 64, dtype=torch.bfloat16), books)
    assert out.z_q.dtype == torch.bfloat16


def test_integer_z(books):
    with pytest.raises(TypeError, match="z must have dtype in"):
        fc.mcq_quantize(torch.ones(2, 3, 64, dtype=torch.int32), books)


def test_device_mismatch(books):
    with pytest.raises(ValueError, match="codebooks is on meta but z is on cpu"):
        fc.mcq_search(torch.randn(2, 64), books.to("meta"))


@pytest.mark.no_kernel  # refused before any backend is chosen
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_z(books, bad, backend):
    z = torch.randn(4, 64)
    z[2, 5] = bad
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        fc.mcq_quantize(z, books, backend=backend)


def test_non_finite_codebooks(books):
    books[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="codebooks contains NaN"):
        fc.mcq_search(torch.randn(4, 64), books)


@pytest.mark.parametrize("value", [-1, 32])
def test_dequantize_out_of_range(books, value):
    idx = torch.zeros(3, 8, dtype=torch.long)
    idx[1, 2] = value
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 32\)"):
        fc.mcq_dequantize(idx, books)


def test_dequantize_wrong_groups(books):
    with pytest.raises(ValueError, match=r"indices must be \(\.\.\., G=8\)"):
        fc.mcq_dequantize(torch.zeros(3, 4, dtype=torch.long), books)


def test_unknown_backend(books):
    with pytest.raises(ValueError, match="backend .* must be one of"):
        fc.mcq_search(torch.randn(2, 64), books, backend="fast")


def test_forced_backend_unavailable(books, monkeypatch):
    monkeypatch.setenv("FASTCOMPRESS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="'cuda' was forced but"):
        fc.mcq_search(torch.randn(2, 64), books)


def test_bad_channel_dim(books):
    with pytest.raises(ValueError, match="channel_dim=5 is out of range"):
        fc.mcq_search(torch.randn(2, 64), books, channel_dim=5)


def test_bad_entropy_temp(books):
    with pytest.raises(ValueError, match="entropy_temp must be > 0"):
        fc.mcq_quantize(torch.randn(2, 64), books, entropy_temp=0.0)


def test_cpu_op_rejects_a_bias_on_the_cosine_search(books):
    # The cosine kernel skips the bias add; a non-zero bias there must not be ignored.
    from fastcompress import _ext

    _ext.load_cpu_extension()
    bias = torch.zeros(8, 32)
    bias[3, 5] = 0.5
    with pytest.raises(RuntimeError, match="bias must be 0 for the cosine search"):
        torch.ops.fastcompress_cpu.mcq_forward(torch.randn(4, 64), books, bias, True, False)
