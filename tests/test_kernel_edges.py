"""Edges of the public kernels: meta tensors, counts given as tensors or arrays, ids that only look like ids,
outputs that cannot be written in place, and masks whose checks must not cost a synchronisation."""
import math
import warnings

import numpy as np
import pytest
import torch

from checks import raises
from conftest import ALL_BACKENDS, backend_device
from forgetscore import kernels
from forgetscore.kernels import dispatch, reference

ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _loss_args(dev="cpu", b=3, shape=(2, 4, 4)):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    return [torch.randn(b, *shape, generator=g).to(dev), torch.randn(b, *shape, generator=g).to(dev),
            torch.randint(0, 1000, (b,), generator=g).to(dev), ACP.to(dev), 7,
            torch.randint(0, 2 ** 40, (b,), generator=g).to(dev), torch.randint(0, 2 ** 20, (b,), generator=g).to(dev)]


def test_meta_tensors_give_the_shapes_of_every_op_without_values_or_warnings(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    meta = torch.device("meta")
    x0 = torch.empty(3, 2, 4, 4, dtype=torch.bfloat16, device=meta)
    ts, sids = torch.empty(3, dtype=torch.long, device=meta), torch.empty(3, dtype=torch.long, device=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: nothing runs on meta tensors
        x_t = kernels.add_noise(x0, ts, ACP.to(meta), 7, sids, 0)
        assert (x_t.shape, x_t.dtype, x_t.device) == (x0.shape, torch.bfloat16, meta)
        x_t = kernels.add_noise(x0, [1, 2, 3], ACP, 7, [4, 5, 6], 0)  # host ids and schedule, meta rows
        assert (x_t.shape, x_t.device) == (x0.shape, meta)
        for mask in (None, torch.empty(3, 1, 4, 4, device=meta)):
            loss = kernels.diffusion_loss(x0, x0, ts, ACP.to(meta), 7, sids, sids, mask=mask,
                                          prediction_type="v_prediction")
            assert (loss.shape, loss.dtype, loss.device) == ((3,), torch.float32, meta)
        fisher = torch.empty(4, 5, dtype=torch.float64, device=meta)
        out = kernels.fisher_accumulate(fisher, torch.empty(2, 3, 5, device=meta), torch.empty(2, 3, 4, device=meta))
        assert out is fisher
        assert kernels.normal(1, [1, 2], 0, (2, 3), device=meta).shape == (2, 2, 3)
        assert kernels.random_bits(1, sids, 0, 5).shape == (3, 5)
    with pytest.raises(ValueError, match=r"^backend: 'cpu' runs on cpu tensors here, but the tensors are on meta"):
        kernels.add_noise(x0, ts, ACP.to(meta), 7, sids, 0, backend="cpu")


def test_the_fallback_warning_names_the_device_without_kernels(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"reference kernels on xpu \(the compiled kernels run on cpu and cuda "
                                            r"tensors only\)$"):
        assert dispatch.resolve("auto", torch.device("xpu")) is reference


def test_counts_given_as_tensors_or_numpy_give_the_same_draws():
    sids = torch.tensor([3, 9])
    want = kernels.random_bits(5, sids, 1, 7)
    for numel in (torch.tensor(7), np.int32(7), np.array(7), torch.tensor([7])[0]):
        torch.testing.assert_close(kernels.random_bits(5, sids, 1, numel=numel), want, rtol=0, atol=0)
    want = kernels.normal(5, sids, 1, (2, 3))
    for shape in (np.array([2, 3]), [torch.tensor(2), np.int64(3)], torch.tensor([2, 3]), torch.Size([2, 3])):
        torch.testing.assert_close(kernels.normal(5, sids, 1, shape=shape), want, rtol=0, atol=0)
    assert kernels.normal(5, sids, 1, torch.tensor(6)).shape == (2, 6)
    for numel in (torch.tensor(7.0), torch.tensor(True), torch.tensor([7, 1]), np.array([7])):
        raises("numel", "non-negative int", kernels.random_bits, 5, sids, 1, numel)
    for shape in (np.array([2.0, 3.0]), [torch.tensor(2.5)], np.zeros((1, 2), dtype=np.int64), torch.tensor(-1)):
        raises("shape", "non-negative ints", kernels.normal, 5, sids, 1, shape)


@pytest.mark.parametrize("shape", [(2 ** 40, 2 ** 40), 2 ** 62, (2 ** 35,)])
def test_a_shape_beyond_the_counter_is_named(shape):
    raises("shape", r"2\*\*34", kernels.normal, 1, [0], 0, shape)
    raises("numel", r"2\*\*34", kernels.random_bits, 1, [0], 0, math.prod(shape) if isinstance(shape, tuple) else shape)


def test_ids_that_are_no_ids_are_refused_naming_the_problem():
    raises("sample_ids", "bytes", kernels.normal, 1, b"ab", 0, 3)
    raises("sample_ids", "str", kernels.normal, 1, "12", 0, 3)
    raises("draw_ids", "bytearray", kernels.normal, 1, [1, 2], bytearray(b"ab"), 3)
    raises("sample_ids", "single int", kernels.normal, 1, np.array(3), 0, 3)  # as the int 3 is
    raises("sample_ids", r"shape \(2, 2\)", kernels.normal, 1, np.zeros((2, 2), dtype=np.int64), 0, 3)
    raises("sample_ids", "float64", kernels.normal, 1, np.zeros(2), 0, 3)
    raises("draw_ids", "bool", kernels.normal, 1, [0, 1], np.array([True, False]), 3)
    # One id for every row, as an int or a 0-d tensor is, where the batch gives the length.
    x0 = torch.randn(2, 5)
    want = kernels.add_noise(x0, [3, 4], ACP, 1, [7, 8], 2)
    for sids_, dids in (([7, 8], np.array(2)), (np.array([7, 8]), np.uint8(2))):
        torch.testing.assert_close(kernels.add_noise(x0, [3, 4], ACP, 1, sids_, dids), want, rtol=0, atol=0)
    torch.testing.assert_close(kernels.add_noise(x0[:1], np.array(3), ACP, 1, np.array(7), 2), want[:1],
                               rtol=0, atol=0)


def test_a_dtype_given_by_name_says_which_torch_dtype_to_pass():
    raises("dtype", r"got the str 'float32'; pass torch\.float32", kernels.normal, 1, [0], 0, 3, dtype="float32")
    raises("dtype", r"pass a torch\.dtype", kernels.normal, 1, [0], 0, 3, dtype="double precision")
    raises("dtype", "not a floating type", kernels.normal, 1, [0], 0, 3, dtype=torch.int32)


def test_a_complex_mask_is_refused():
    args = _loss_args()
    raises("mask", r"complex64 .*real", kernels.diffusion_loss, *args, mask=torch.ones(4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_fisher_that_cannot_be_written_in_place_is_named_before_anything_runs(backend):
    dev = backend_device(backend)
    x, g = torch.randn(2, 3, 5, device=dev), torch.randn(2, 3, 4, device=dev)
    shared = torch.zeros(1, 5, dtype=torch.float64, device=dev)
    raises("fisher", r"overlap in memory .*torch\.zeros", kernels.fisher_accumulate, shared.expand(4, 5), x, g,
           backend=backend)
    assert torch.equal(shared, torch.zeros_like(shared))
    folded = torch.zeros(12, dtype=torch.float64, device=dev).as_strided((4, 5), (2, 1))  # rows share elements
    raises("fisher", "overlap in memory", kernels.fisher_accumulate, folded, x, g, backend=backend)
    with torch.inference_mode():
        frozen = torch.zeros(4, 5, device=dev)
    raises("fisher", "inference", kernels.fisher_accumulate, frozen, x, g, backend=backend)
    # Interleaved but without overlap (offsets 3 i + 4 j are distinct for i < 4, j < 5): written as usual.
    spread = torch.zeros(26, dtype=torch.float64, device=dev).as_strided((4, 5), (3, 4))
    kernels.fisher_accumulate(spread, x, g, backend=backend)
    torch.testing.assert_close(spread, kernels.fisher_accumulate(torch.zeros(4, 5, dtype=torch.float64,
                                                                             device=dev), x, g, backend="torch"),
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_mask_values_are_checked_only_when_asked(backend, monkeypatch):
    dev = backend_device(backend)
    args = _loss_args(dev)
    mask = torch.ones(3, 1, 4, 4, device=dev)
    mask[1] = 0  # row 1 selects nothing: its loss is 0 / 0
    raises("mask", r"selects no element in rows \[1\]", kernels.diffusion_loss, *args, mask=mask, backend=backend)
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    loss = kernels.diffusion_loss(*args, mask=mask, backend=backend, check=False)
    assert not reads  # not one value read back to the host
    monkeypatch.undo()
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    negative = torch.ones(4, 4, device=dev)
    negative[0, 0] = -1
    raises("mask", "finite and non-negative", kernels.diffusion_loss, *args, mask=negative, backend=backend)
    kernels.diffusion_loss(*args, mask=negative, backend=backend, check=False)
