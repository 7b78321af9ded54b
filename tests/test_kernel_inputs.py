"""What the public kernels take besides plain int64 tensors: gradients, NumPy ids, ids beyond int64, rows without
elements; each either works as the reference formula says or is refused naming the argument."""
import numpy as np
import pytest
import torch

from conftest import ALL_BACKENDS, backend_device
from forgetscore import kernels

ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
NATIVE = [b for b in ALL_BACKENDS if b != "torch"]


def _rows(b=3, d=(2, 4, 4), dev="cpu"):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    return (torch.randn(b, *d, generator=g).to(dev), torch.tensor([1, 500, 999][:b], device=dev),
            torch.randint(0, 2 ** 40, (b,), generator=g).to(dev))


def _eps(sids, shape):
    return kernels.normal(7, sids, 0, shape, backend="torch")


def test_gradients_flow_through_auto_as_the_formulas_say():
    x0, ts, sids = _rows()
    out = torch.randn_like(x0, requires_grad=True)
    loss = kernels.diffusion_loss(out, x0, ts, ACP, 7, sids, 0, backend="auto")
    (loss.sum() + (out ** 2).sum()).backward()  # beside another term: a graph-less loss would add nothing
    d = x0[0].numel()
    want = 2 * (out.detach() - _eps(sids, x0.shape[1:])) / d + 2 * out.detach()
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-6)
    x = x0.clone().requires_grad_(True)
    kernels.add_noise(x, ts, ACP, 7, sids, 0).sum().backward()
    scale = ACP[ts].sqrt().float()  # d x_t / d x0 = sqrt(abar_t), row by row
    torch.testing.assert_close(x.grad, scale[:, None, None, None].expand_as(x0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", NATIVE)
def test_a_kernel_without_gradients_refuses_inputs_that_need_them(backend):
    dev = backend_device(backend)
    x0, ts, sids = _rows(dev=dev)
    out = torch.randn_like(x0, requires_grad=True)
    with pytest.raises(ValueError, match=rf"^model_output: requires grad, and the '{backend}' kernels are not "
                                         r"differentiable; use backend='auto' or 'torch'"):
        kernels.diffusion_loss(out, x0, ts, ACP.to(dev), 7, sids, 0, backend=backend)
    with pytest.raises(ValueError, match=r"^x0: requires grad"):
        kernels.add_noise(x0.requires_grad_(True), ts, ACP.to(dev), 7, sids, 0, backend=backend)
    with torch.no_grad():  # no graph wanted: the kernel runs
        got = kernels.diffusion_loss(out, x0, ts, ACP.to(dev), 7, sids, 0, backend=backend)
    torch.testing.assert_close(got, kernels.diffusion_loss(out.detach(), x0.detach(), ts, ACP.to(dev), 7, sids, 0,
                                                           backend="torch"), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_fisher_that_requires_grad_is_refused(backend):
    dev = backend_device(backend)
    fisher = torch.nn.Parameter(torch.zeros(4, 5, device=dev))
    with pytest.raises(ValueError, match=r"^fisher: requires grad; accumulate into a plain tensor"):
        kernels.fisher_accumulate(fisher, torch.randn(2, 3, 5, device=dev), torch.randn(2, 3, 4, device=dev),
                                  backend=backend)
    assert torch.equal(fisher.detach(), torch.zeros(4, 5, device=dev))


@pytest.mark.parametrize("call, says", [
    (lambda x, t: kernels.add_noise(x, t, ACP, 1, [2 ** 64, 0, 1], 0), r"^sample_ids: .* found 18446744073709551616"),
    (lambda x, t: kernels.add_noise(x, t, ACP, 1, [0, 1, 2], 2 ** 63), r"^draw_ids: .* found 9223372036854775808"),
    (lambda x, t: kernels.add_noise(x, t, ACP, 1, [0, 1, 2], 2 ** 64), r"^draw_ids: .* found 18446744073709551616"),
    (lambda x, t: kernels.add_noise(x, 10 ** 30, ACP, 1, [0, 1, 2], 0), r"^timesteps: .* found 10{30}"),
    (lambda x, t: kernels.add_noise(x, t, ACP, 1, torch.tensor([2 ** 63, 0, 1], dtype=torch.uint64), 0),
     r"^sample_ids: values must lie in \[0, 9223372036854775808\), found 9223372036854775808"),
    (lambda x, t: kernels.add_noise(x, [0, 1.5, 2], ACP, 1, [0, 1, 2], 0), r"^timesteps: .* holding a non-integer"),
    (lambda x, t: kernels.random_bits(1, [1, 2], 0, (2, 3)), r"^numel: expected a non-negative int"),
    (lambda x, t: kernels.random_bits(1, [1, 2], 0, -1), r"^numel: expected a non-negative int"),
    (lambda x, t: kernels.normal(1, [1, 2], 0, 2.5), r"^shape: expected non-negative ints"),
])
def test_ids_beyond_int64_and_bad_counts_are_named(call, says):
    x0, ts, _ = _rows()
    with pytest.raises(ValueError, match=says):
        call(x0, ts)


def test_numpy_ids_and_counts_read_as_the_same_python_ints():
    x0, ts, sids = _rows()
    want = kernels.add_noise(x0, ts, ACP, 7, sids, 0)
    as_numpy = sids.numpy()
    for t, s, d in ((ts.numpy(), as_numpy, np.int64(0)), (list(ts.numpy()), list(as_numpy), torch.tensor(0)),
                    (ts.tolist(), as_numpy.astype(np.uint64), np.uint32(0))):
        torch.testing.assert_close(kernels.add_noise(x0, t, ACP, 7, s, d), want, rtol=0, atol=0)
    torch.testing.assert_close(kernels.normal(7, as_numpy, np.int64(0), np.int64(32)),
                               kernels.normal(7, sids, 0, 32), rtol=0, atol=0)
    with pytest.raises(ValueError, match="^sample_ids: expected one id per row"):
        kernels.normal(7, np.int64(3), 0, 4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_without_elements(backend):
    dev = backend_device(backend)
    sids = torch.arange(3, device=dev)
    assert kernels.normal(1, sids, 0, (0, 2), backend=backend).shape == (3, 0, 2)
    assert kernels.random_bits(1, sids, 0, 0, backend=backend).shape == (3, 0)
    x0 = torch.randn(3, 0, device=dev)
    ts = torch.tensor([1, 2, 3], device=dev)
    assert kernels.add_noise(x0, ts, ACP.to(dev), 1, sids, 0, backend=backend).shape == (3, 0)
    with pytest.raises(ValueError, match=r"^model_output: rows of shape \(0,\) hold no elements"):
        kernels.diffusion_loss(x0, x0, ts, ACP.to(dev), 1, sids, 0, backend=backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_a_cuda_device_without_cuda_is_named():
    with pytest.raises(ValueError, match=r"^device: 'cuda' but this PyTorch sees no CUDA GPU"):
        kernels.normal(1, [1, 2], 0, 3, device="cuda")
    with pytest.raises(ValueError, match=r"^device: 'gpu0' is not a device"):
        kernels.normal(1, [1, 2], 0, 3, device="gpu0")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("weight, dtype", [(1e38, torch.float32), (1e-300, torch.float64), (3e4, torch.float16)])
def test_mask_weights_of_any_float_size_give_the_masked_mean(backend, weight, dtype):
    dev = backend_device(backend)
    x0, ts, sids = _rows(dev=dev)
    out = torch.randn_like(x0)
    mask = torch.zeros(4, 4, dtype=torch.float64)
    mask[1:3, :2] = 1
    err = (out.cpu().double() - _eps(sids.cpu(), x0.shape[1:]).double()) ** 2  # float64: the reference
    want = (err * mask).flatten(1).sum(1) / (mask.sum() * x0.shape[1])
    got = kernels.diffusion_loss(out, x0, ts, ACP.to(dev), 7, sids, 0, mask=(mask * weight).to(dev, dtype),
                                 backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=0)


def test_a_seed_that_is_a_bool_tensor_is_refused():
    with pytest.raises(ValueError, match="^seed: expected an int, got Tensor"):
        kernels.normal(torch.tensor(True), [1], 0, 3)
