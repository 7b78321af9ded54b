"""Bad input gives a ValueError naming the argument; types and shapes before any kernel runs."""
import pytest
import torch

from conftest import ALL_BACKENDS, backend_device
from forgetscore import kernels

ACP = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def _loss_args(dev="cpu", b=3):
    return dict(model_output=torch.randn(b, 2, 4, 4, device=dev), x0=torch.randn(b, 2, 4, 4, device=dev),
                timesteps=torch.tensor([1, 500, 999][:b], device=dev), alphas_cumprod=ACP.to(dev), seed=7,
                sample_ids=torch.arange(b, device=dev), draw_ids=torch.zeros(b, dtype=torch.long, device=dev))


def _loss(**over):
    args = _loss_args()
    args.update(over)
    kw = {k: args.pop(k) for k in ("prediction_type", "mask", "backend") if k in args}
    return kernels.diffusion_loss(*args.values(), **kw)


@pytest.mark.parametrize("over,name", [
    (dict(model_output=torch.randn(3, 2, 4, 5)), "model_output"),
    (dict(model_output=torch.randn(3, 2, 4, 4).double()), "model_output"),
    (dict(x0=torch.randint(0, 3, (3, 2, 4, 4))), "x0"),
    (dict(timesteps=torch.tensor([1, 2])), "timesteps"),
    (dict(timesteps=torch.tensor([1, 2, 1000])), "timesteps"),
    (dict(timesteps=torch.tensor([1, -1, 3])), "timesteps"),
    (dict(timesteps=torch.tensor([1.0, 2.0, 3.0])), "timesteps"),
    (dict(alphas_cumprod=ACP.clone().fill_(float("nan"))), "alphas_cumprod"),
    (dict(alphas_cumprod=ACP.view(10, 100)), "alphas_cumprod"),
    (dict(seed=-1), "seed"),
    (dict(seed=2 ** 64), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(sample_ids=torch.arange(4)), "sample_ids"),
    (dict(sample_ids=torch.tensor([0, -3, 1])), "sample_ids"),
    (dict(sample_ids=torch.zeros(3, 1, dtype=torch.long)), "sample_ids"),
    (dict(draw_ids=torch.tensor([0, 0, 2 ** 32])), "draw_ids"),
    (dict(draw_ids=torch.tensor([0, 1])), "draw_ids"),
    (dict(prediction_type="flow"), "prediction_type"),
    (dict(mask=torch.ones(3, 3)), "mask"),
    (dict(mask=torch.ones(2, 2, 4, 4)), "mask"),
    (dict(mask=torch.zeros(4, 4)), "mask"),
    (dict(mask=-torch.ones(4, 4)), "mask"),
    (dict(backend="gpu"), "backend"),
])
def test_diffusion_loss_rejects(over, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        _loss(**over)


def test_empty_row_of_a_per_row_mask_is_named():
    mask = torch.ones(3, 1, 4, 4)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"mask: selects no element in rows \[1\]"):
        _loss(mask=mask)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("which", ["model_output", "x0"])
def test_non_finite_rows_are_named(backend, which):
    dev = backend_device(backend)
    args = _loss_args(dev)
    args[which] = args[which].clone()
    args[which][2, 1, 0, 3] = float("nan")
    args[which][0, 0, 0, 0] = float("inf")
    # x0 enters the loss of v- and sample-prediction (an epsilon target ignores it).
    with pytest.raises(ValueError, match=rf"^{which}: .*rows \[0, 2\]"):
        kernels.diffusion_loss(*args.values(), prediction_type="v_prediction", backend=backend)


def test_add_noise_rejects_non_finite_x0_and_bad_shapes():
    x0 = torch.randn(4, 3)
    x0[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^x0: .*rows \[3\]"):
        kernels.add_noise(x0, [0, 1, 2, 3], ACP, 0, [0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match="^timesteps"):
        kernels.add_noise(torch.randn(4, 3), [0, 1, 2], ACP, 0, [0, 1, 2, 3], 0)
    with pytest.raises(ValueError, match="^x0"):
        kernels.add_noise(torch.tensor(1.0), [0], ACP, 0, [0], 0)
    with pytest.raises(ValueError, match="^x0"):
        kernels.add_noise([[1.0]], [0], ACP, 0, [0], 0)


def test_mixed_devices_are_named():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    args = _loss_args()
    args["x0"] = args["x0"].cuda()
    with pytest.raises(ValueError, match="^x0"):
        kernels.diffusion_loss(*args.values())


@pytest.mark.parametrize("call,name", [
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5, dtype=torch.float16), torch.randn(2, 3, 5),
                                       torch.randn(2, 3, 4)), "fisher"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(2, 3, 6), torch.randn(2, 3, 4)), "fisher"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(2, 3, 5), torch.randn(2, 2, 4)),
     "grad_outputs"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(2, 3, 5), torch.randn(2, 4)),
     "grad_outputs"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(5), torch.randn(4)), "inputs"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(2, 3, 5).long(), torch.randn(2, 3, 4)),
     "inputs"),
    (lambda: kernels.fisher_accumulate(torch.zeros(4, 5), torch.randn(2, 3, 5),
                                       torch.full((2, 3, 4), float("inf"))), "grad_outputs"),
    (lambda: kernels.normal(1, [1, 2], [0], 3), "draw_ids"),
    (lambda: kernels.normal(1, 5, 0, 3), "sample_ids"),
    (lambda: kernels.normal(1, [1], 0, (2, -1)), "shape"),
    (lambda: kernels.normal(1, [1], 0, 3, dtype=torch.int32), "dtype"),
    (lambda: kernels.random_bits(2 ** 65, [1], 0, 3), "seed"),
])
def test_other_kernels_reject(call, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        call()


def test_fisher_is_untouched_when_input_is_rejected():
    fisher = torch.rand(4, 5, dtype=torch.float64)
    before = fisher.clone()
    g = torch.randn(2, 3, 4)
    g[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"^grad_outputs: .*rows \[1\]"):
        kernels.fisher_accumulate(fisher, torch.randn(2, 3, 5), g)
    assert torch.equal(fisher, before)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("over,name", [
    (dict(timesteps=[1, 1000, 3]), "timesteps"),
    (dict(timesteps=[1, -2, 3]), "timesteps"),
    (dict(sample_ids=[0, -1, 2]), "sample_ids"),
    (dict(draw_ids=[0, 2 ** 32, 1]), "draw_ids"),
])
def test_ids_held_on_the_device_are_checked(device, over, name):
    """On a GPU these ranges are read with the call's one synchronisation, after timesteps are clamped."""
    args = _loss_args(device)
    args.update({k: torch.tensor(v, device=device) for k, v in over.items()})
    with pytest.raises(ValueError, match=f"^{name}: values must lie"):
        kernels.diffusion_loss(*args.values())
    with pytest.raises(ValueError, match=f"^{name}: values must lie"):
        kernels.add_noise(args["x0"], *[args[k] for k in ("timesteps", "alphas_cumprod", "seed", "sample_ids",
                                                           "draw_ids")])


@pytest.mark.parametrize("device", DEVICES)
def test_check_false_skips_the_value_checks(device):
    args = _loss_args(device)
    args["x0"] = args["x0"].clone()
    args["x0"][1] = float("nan")
    x_t = kernels.add_noise(*[args[k] for k in ("x0", "timesteps", "alphas_cumprod", "seed", "sample_ids",
                                                "draw_ids")], check=False)
    assert torch.isnan(x_t[1]).all() and torch.isfinite(x_t[[0, 2]]).all()
    loss = kernels.diffusion_loss(*args.values(), prediction_type="v_prediction", check=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    fisher = torch.zeros(4, 5, dtype=torch.float64, device=device)
    g = torch.randn(2, 3, 4, device=device)
    g[1, 0, 0] = float("inf")
    kernels.fisher_accumulate(fisher, torch.randn(2, 3, 5, device=device), g, check=False)
    assert not torch.isfinite(fisher).all()
    with pytest.raises(ValueError, match=r"^x0: .*rows \[1\]"):
        kernels.diffusion_loss(*args.values(), prediction_type="v_prediction")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="watches GPU synchronisations")
@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if backend_device(b).type == "cuda"] or ["torch"])
def test_checked_calls_synchronise_only_to_read_their_checks(backend):
    """check=False never synchronises; check=True first synchronises in Deferred.resolve, which reads
    all of a call's checks at once. Under sync-debug mode "error" a synchronisation raises where it happens."""
    import traceback

    args = _loss_args("cuda", b=3)
    noise_args = [args[k] for k in ("x0", "timesteps", "alphas_cumprod", "seed", "sample_ids", "draw_ids")]
    fisher = torch.zeros(4, 5, dtype=torch.float64, device="cuda")
    x, g = torch.randn(2, 3, 5, device="cuda"), torch.randn(2, 3, 4, device="cuda")
    calls = (lambda check: kernels.add_noise(*noise_args, backend=backend, check=check),
             lambda check: kernels.diffusion_loss(*args.values(), backend=backend, check=check),
             lambda check: kernels.diffusion_loss(*args.values(), mask=torch.ones(4, 4, device="cuda"),
                                                  backend=backend, check=check),
             lambda check: kernels.fisher_accumulate(fisher, x, g, backend=backend, check=check))
    for call in calls:  # first calls: compilation and lazy initialisation may synchronise
        call(True)
    torch.cuda.synchronize()
    for call in calls:
        torch.cuda.set_sync_debug_mode("error")
        try:
            call(False)
            with pytest.raises(RuntimeError, match="synchroniz") as info:
                call(True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        frames = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "resolve" in frames, frames


def test_deferred_reads_every_flag_and_explains_the_false_ones_in_order():
    from forgetscore.kernels.validate import Deferred

    said = []
    d = Deferred()
    for k, ok in enumerate([True, False, True, False]):
        d.add(lambda ok=ok: torch.tensor(ok), lambda k=k: said.append(k))
    d.resolve()
    assert said == [1, 3]
    d.resolve()  # resolving empties it
    assert said == [1, 3]
    off = Deferred(enabled=False)
    off.add(lambda: pytest.fail("a disabled Deferred computes no flag"), lambda: said.append("no"))
    off.resolve()
    assert said == [1, 3]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batches_give_empty_results(backend):
    dev = backend_device(backend)
    empty = {k: (v[:0] if isinstance(v, torch.Tensor) and k != "alphas_cumprod" else v)
             for k, v in _loss_args(str(dev)).items()}
    x_t = kernels.add_noise(*[empty[k] for k in ("x0", "timesteps", "alphas_cumprod", "seed", "sample_ids",
                                                 "draw_ids")], backend=backend)
    assert x_t.shape == (0, 2, 4, 4) and x_t.dtype == empty["x0"].dtype
    loss = kernels.diffusion_loss(*empty.values(), backend=backend)
    assert loss.shape == (0,) and loss.dtype == torch.float32
    for mask in (torch.ones(1, 4, 4, device=dev), torch.ones(0, 2, 4, 4, device=dev)):
        assert kernels.diffusion_loss(*empty.values(), mask=mask, backend=backend).shape == (0,)
    fisher = torch.rand(4, 5, dtype=torch.float64, device=dev)
    before = fisher.clone()
    for rows, tokens in ((0, 3), (2, 0)):
        out = kernels.fisher_accumulate(fisher, torch.randn(rows, tokens, 5, device=dev),
                                        torch.randn(rows, tokens, 4, device=dev), backend=backend)
        assert out is fisher and torch.equal(fisher, before)
    # Ids and timesteps must still match the (empty) batch.
    with pytest.raises(ValueError, match="^timesteps"):
        kernels.add_noise(empty["x0"], torch.tensor([1], device=dev), ACP.to(dev), 7, empty["sample_ids"],
                          empty["draw_ids"], backend=backend)


def test_a_mask_that_is_no_tensor_is_named():
    with pytest.raises(ValueError, match="^mask: expected a tensor"):
        _loss(mask=[[1.0]])
