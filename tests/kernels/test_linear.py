"""linear (GEMM + bias + residual) against the fp64 reference."""

import pytest
import torch

from segformer_fast.kernels.linear import linear, linear_ref

from helpers import assert_within_tolerance, poison_


@pytest.mark.parametrize("M, K, N", [(70, 32, 128), (130, 160, 64), (5, 512, 256), (1, 40, 24)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_linear(randn, device, dtype, M, K, N, with_residual):
    x = randn(M, K, dtype=dtype)
    w, b = randn(N, K, scale=K**-0.5, dtype=dtype), randn(N, scale=0.5, dtype=dtype)
    r = randn(M, N, dtype=dtype) if with_residual else None
    y = linear(x, w, b, residual=r, out=poison_(torch.empty(M, N, device=device, dtype=dtype)))
    ref = linear_ref(x.double(), w.double(), b.double(), None if r is None else r.double())
    assert_within_tolerance(y, ref, dtype, eager=linear_ref(x, w, b, r, upcast=False), what="linear")


def test_linear_batched_shape(randn, device):
    x = randn(3, 7, 5, 32, dtype=torch.float32)
    w, b = randn(48, 32, dtype=torch.float32), randn(48, dtype=torch.float32)
    y = linear(x, w, b)
    assert y.shape == (3, 7, 5, 48)
    assert_within_tolerance(y, linear_ref(x.double(), w.double(), b.double()), torch.float32)


def test_linear_input_checks(randn, device, other_device):
    x = randn(4, 32, dtype=torch.float32)
    w, b = randn(16, 32, dtype=torch.float32), randn(16, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 32\), got \(16, 31\)"):
        linear(x, w[:, :31].contiguous(), b)
    with pytest.raises(ValueError, match=r"bias: expected shape \(16,\), got \(15,\)"):
        linear(x, w, b[:15])
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.bfloat16, got torch.float32"):
        linear(x.bfloat16(), w, b)
    with pytest.raises(ValueError, match=r"x: expected a (cpu|cuda) tensor, got device"):
        linear(x.to(other_device), w, b)
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got list"):
        linear([1.0], w, b)


def test_linear_compiles_for_sm90(record_launches, compile_for_sm90, device):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for K, N in ((32, 128), (512, 2048), (2048, 512)):
            x = torch.empty(8, K, dtype=dtype)
            residual = torch.empty(8, N, dtype=dtype)
            linear(x, torch.empty(N, K, dtype=dtype), torch.empty(N, dtype=dtype), residual=residual)
    compile_for_sm90(record_launches)
