"""diffusion_loss: every prediction type and mask form, against float64 formulas and the reference."""
import pytest
import torch

from conftest import ALL_BACKENDS, NATIVE_BACKENDS, backend_device, poison_heap
from forgetscore import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["epsilon", "v_prediction", "sample"]


def _schedule():
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _inputs(rng, shape, out_dtype=torch.float32, x_dtype=torch.float32):
    b = shape[0]
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    return dict(
        model_output=torch.randn(shape, generator=rng).to(out_dtype),
        x0=torch.randn(shape, generator=rng).to(x_dtype),
        timesteps=torch.randint(0, 1000, (b,), generator=rng),
        seed=seed,
        sample_ids=torch.randint(0, 2 ** 40, (b,), generator=rng),
        draw_ids=torch.randint(0, 2 ** 20, (b,), generator=rng),
    )


def _float64_loss(a, acp, kind, mask=None):
    """The definition, written out in float64 with the noise from the public normal()."""
    out, x0, ts = a["model_output"].double(), a["x0"].double(), a["timesteps"]
    eps = kernels.normal(a["seed"], a["sample_ids"], a["draw_ids"], out.shape[1:], dtype=torch.float64,
                         backend="torch")
    shape = (-1,) + (1,) * (out.dim() - 1)
    s, n = acp[ts].sqrt().view(shape), (1 - acp[ts]).sqrt().view(shape)
    target = {"epsilon": eps, "v_prediction": s * eps - n * x0, "sample": x0}[kind]
    sq = (out - target) ** 2
    if mask is None:
        return sq.flatten(1).mean(1)
    m = torch.broadcast_to(mask.double(), sq.shape)
    return (m * sq).flatten(1).sum(1) / m.flatten(1).sum(1)


def _call(a, acp, kind, backend="torch", mask=None, device="cpu"):
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    return kernels.diffusion_loss(moved["model_output"], moved["x0"], moved["timesteps"], acp.to(device),
                                  moved["seed"], moved["sample_ids"], moved["draw_ids"], prediction_type=kind,
                                  mask=None if mask is None else mask.to(device), backend=backend).cpu()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 2, 5, 5), (6, 37)])
def test_reference_matches_float64(kind, shape, rng):
    acp = _schedule()
    a = _inputs(rng, shape)
    got = _call(a, acp, kind)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    torch.testing.assert_close(got.double(), _float64_loss(a, acp, kind), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dtype,x_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("shape", [(1, 3), (5, 2, 3, 7), (2, 1, 31)])
def test_backend_matches_reference(backend, kind, out_dtype, x_dtype, shape, rng):
    acp = _schedule()
    a = _inputs(rng, shape, out_dtype, x_dtype)
    want = _call(a, acp, kind)
    poison_heap(shape[0])
    got = _call(a, acp, kind, backend=backend, device=backend_device(backend))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


MASKS = {
    "hw": lambda b, c, h, w, g: torch.rand(h, w, generator=g) > 0.4,
    "11hw": lambda b, c, h, w, g: torch.rand(1, 1, h, w, generator=g) > 0.5,
    "b1hw": lambda b, c, h, w, g: torch.rand(b, 1, h, w, generator=g) > 0.3,
    "bchw-weights": lambda b, c, h, w, g: torch.rand(b, c, h, w, generator=g),
    "c11": lambda b, c, h, w, g: torch.rand(c, 1, 1, generator=g) + 0.1,
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_masks(backend, mask_kind, kind, rng):
    acp = _schedule()
    b, c, h, w = 4, 3, 5, 6
    a = _inputs(rng, (b, c, h, w))
    mask = MASKS[mask_kind](b, c, h, w, rng)
    # Make sure no row is empty (that is an error, tested elsewhere).
    mask = mask.clone()
    mask.view(-1)[0] = True if mask.dtype == torch.bool else 1.0
    if mask.dim() == 4 and mask.shape[0] == b:
        mask[:, ..., 0, 0] = True if mask.dtype == torch.bool else 1.0
    got = _call(a, acp, kind, backend=backend, mask=mask, device=backend_device(backend))
    torch.testing.assert_close(got.double(), _float64_loss(a, acp, kind, mask), rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_ones_mask_equals_no_mask(backend, rng):
    acp = _schedule()
    a = _inputs(rng, (3, 2, 4, 4))
    dev = backend_device(backend)
    plain = _call(a, acp, "epsilon", backend=backend, device=dev)
    ones = _call(a, acp, "epsilon", backend=backend, device=dev, mask=torch.ones(4, 4))
    torch.testing.assert_close(plain, ones, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_inputs(backend, rng):
    acp = _schedule()
    a = _inputs(rng, (4, 3, 6, 6))
    want = _call(a, acp, "v_prediction")
    a["model_output"] = a["model_output"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    a["x0"] = torch.stack([a["x0"], torch.zeros_like(a["x0"])], dim=-1)[..., 0]  # stride 2 in the last dim
    assert not a["model_output"].is_contiguous() and not a["x0"].is_contiguous()
    got = _call(a, acp, "v_prediction", backend=backend, device=backend_device(backend))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_of_the_true_noise_is_zero(backend, rng):
    # Feeding the regenerated noise back as the model output must give exactly zero loss:
    # the kernel's noise is the same stream add_noise and normal use.
    acp = _schedule()
    a = _inputs(rng, (3, 2, 4, 4))
    a["model_output"] = kernels.normal(a["seed"], a["sample_ids"], a["draw_ids"], (2, 4, 4), backend=backend
                                       if backend_device(backend).type == "cpu" else "torch")
    got = _call(a, acp, "epsilon", backend=backend, device=backend_device(backend))
    assert torch.all(got <= 1e-12)


def test_rows_do_not_depend_on_batching(rng):
    acp = _schedule()
    a = _inputs(rng, (10, 2, 4, 4))
    full = _call(a, acp, "epsilon", backend="auto")
    perm = torch.randperm(10, generator=rng)
    sub = {k: (v[perm] if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    assert torch.equal(_call(sub, acp, "epsilon", backend="auto"), full[perm])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_per_image_mask_without_its_channel_dim_is_refused_when_batch_equals_channels(backend, rng):
    acp = _schedule()
    b = c = 4
    a = _inputs(rng, (b, c, 3, 5))
    dev = backend_device(backend)
    mask = (torch.rand(b, 3, 5, generator=rng) > 0.3).float()
    mask[:, 0, 0] = 1
    with pytest.raises(ValueError, match=r"^mask: shape \(4, 3, 5\) is ambiguous .*\(4, 1, 3, 5\) for one mask per "
                                         r"image or \(1, 4, 3, 5\) for one mask per channel"):
        _call(a, acp, "epsilon", backend=backend, mask=mask, device=dev)
    for spelled in (mask[:, None], mask[None]):  # the two readings, each given unambiguously
        got = _call(a, acp, "epsilon", backend=backend, mask=spelled, device=dev)
        torch.testing.assert_close(got.double(), _float64_loss(a, acp, "epsilon", spelled), rtol=3e-6, atol=1e-7)
    # A spatial mask whose height happens to equal the batch size is not ambiguous: it has two dims fewer.
    hw = _inputs(rng, (b, c, 4, 5))
    spatial = torch.rand(4, 5, generator=rng) + 0.1
    got = _call(hw, acp, "epsilon", backend=backend, mask=spatial, device=dev)
    torch.testing.assert_close(got.double(), _float64_loss(hw, acp, "epsilon", spatial), rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_weight_mask_is_rescaled_in_float32(backend, dtype, rng):
    """Weights that are not powers of two lose up to 2**-9 relative each when divided by the row's largest in
    half precision; the loss must be that of the mask's own values, as a float64 formula gives it."""
    acp = _schedule()
    a = _inputs(rng, (3, 2, 4, 4))
    mask = (torch.rand(3, 2, 4, 4, generator=rng, dtype=torch.float64) * 1000 + 1).to(dtype)
    mask[1, 0, 0, 0] = 1023  # a largest weight that is no power of two (exact in both dtypes)
    got = _call(a, acp, "v_prediction", backend=backend, mask=mask, device=backend_device(backend))
    torch.testing.assert_close(got.double(), _float64_loss(a, acp, "v_prediction", mask), rtol=3e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_squared_error_sum_beyond_float32_is_reported_by_every_backend(backend):
    """Each (o - x0)**2 = 2.25e38 fits float32, their sum does not: every backend reports it the same way."""
    acp = _schedule()
    dev = backend_device(backend)
    a = dict(model_output=torch.zeros(1, 4), x0=torch.full((1, 4), 1.5e19), timesteps=torch.tensor([3]), seed=1,
             sample_ids=torch.tensor([0]), draw_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match=r"^model_output: squared error overflowed float32 in rows \[0\]"):
        _call(a, acp, "sample", backend=backend, device=dev)
    a["x0"] = torch.full((1, 4), 9e18)  # sum 3.24e38: still finite in float32
    torch.testing.assert_close(_call(a, acp, "sample", backend=backend, device=dev).double(),
                               torch.tensor([81e36], dtype=torch.float64), rtol=1e-6, atol=0)
