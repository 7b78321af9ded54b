"""add_noise: backends against the reference, the reference against a float64 formula."""
import pytest
import torch

from conftest import ALL_BACKENDS, NATIVE_BACKENDS, backend_device, poison_heap
from forgetscore import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (1, 4, 3, 3), (3, 5), (7, 2, 3, 5)]


def _schedule():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def _inputs(rng, shape, dtype):
    b = shape[0]
    x0 = torch.randn(shape, generator=rng).to(dtype)
    ts = torch.randint(0, 1000, (b,), generator=rng)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    sids = torch.randint(0, 2 ** 40, (b,), generator=rng)
    dids = torch.randint(0, 2 ** 20, (b,), generator=rng)
    return x0, ts, seed, sids, dids


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_float64_formula(shape, dtype, rng):
    acp = _schedule()
    x0, ts, seed, sids, dids = _inputs(rng, shape, dtype)
    got = kernels.add_noise(x0, ts, acp, seed, sids, dids, backend="torch")
    eps = kernels.normal(seed, sids, dids, shape[1:], dtype=torch.float64)
    a = acp[ts].sqrt().view(-1, *[1] * (len(shape) - 1))
    want = a * x0.double() + (1 - acp[ts]).sqrt().view_as(a) * eps
    assert got.dtype == dtype and got.shape == x0.shape
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_reference(backend, shape, dtype, rng):
    dev = backend_device(backend)
    acp = _schedule()
    x0, ts, seed, sids, dids = _inputs(rng, shape, dtype)
    want = kernels.add_noise(x0, ts, acp, seed, sids, dids, backend="torch")
    poison_heap(x0.numel())
    got = kernels.add_noise(x0.to(dev), ts.to(dev), acp.to(dev), seed, sids.to(dev), dids.to(dev),
                            backend=backend).cpu()
    assert got.dtype == dtype and got.shape == x0.shape
    # Same float32 arithmetic; only the rounding of fused multiply-adds may differ.
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_input(backend, rng):
    dev = backend_device(backend)
    acp = _schedule()
    big = torch.randn(6, 3, 8, 10, generator=rng)
    x0 = big[::2, :, 1:7, ::3]  # strided in every dimension
    assert not x0.is_contiguous()
    _, ts, seed, sids, dids = _inputs(rng, x0.shape, torch.float32)
    got = kernels.add_noise(x0.to(dev), ts.to(dev), acp.to(dev), seed, sids.to(dev), dids.to(dev),
                            backend=backend).cpu()
    want = kernels.add_noise(x0.contiguous(), ts, acp, seed, sids, dids, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noise_is_the_public_normal(backend, rng):
    # x_t at abar = 0 is exactly the noise, so add_noise and normal agree bit for bit in intent.
    dev = backend_device(backend)
    acp = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x0 = torch.randn(4, 2, 3, 3, generator=rng)
    sids, dids = torch.arange(4) * 7919, torch.arange(4)
    x_t = kernels.add_noise(x0.to(dev), [0] * 4, acp.to(dev), 99, sids.to(dev), dids.to(dev), backend=backend)
    torch.testing.assert_close(x_t.cpu(), kernels.normal(99, sids, dids, (2, 3, 3)), atol=1e-6, rtol=1e-6)
    x_1 = kernels.add_noise(x0.to(dev), [1] * 4, acp.to(dev), 99, sids.to(dev), dids.to(dev), backend=backend)
    torch.testing.assert_close(x_1.cpu(), x0)


def test_rows_do_not_depend_on_batching(rng):
    acp = _schedule()
    x0, ts, seed, sids, dids = _inputs(rng, (9, 2, 4, 4), torch.float32)
    full = kernels.add_noise(x0, ts, acp, seed, sids, dids)
    perm = torch.randperm(9, generator=rng)
    assert torch.equal(kernels.add_noise(x0[perm], ts[perm], acp, seed, sids[perm], dids[perm]), full[perm])
    assert torch.equal(kernels.add_noise(x0[3:4], ts[3:4], acp, seed, sids[3:4], dids[3:4]), full[3:4])
