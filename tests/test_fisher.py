"""fisher_accumulate against brute-force per-sample gradients."""
import pytest
import torch
from torch import nn

from conftest import ALL_BACKENDS, NATIVE_BACKENDS, backend_device
from forgetscore import kernels


def _loop_fisher(x, g):
    """float64, one sample at a time: sum_b (G_b^T X_b)^2."""
    x, g = x.double(), g.double()
    if x.dim() == 2:
        x, g = x[:, None], g[:, None]
    out = torch.zeros(g.shape[-1], x.shape[-1], dtype=torch.float64)
    for b in range(x.shape[0]):
        out += (g[b].T @ x[b]) ** 2
    return out


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 2), (4, 1, 16, 9), (2, 77, 40, 24)])
def test_reference_matches_loop(shape, rng):
    b, l, di, do = shape
    x, g = torch.randn(b, l, di, generator=rng), torch.randn(b, l, do, generator=rng)
    start = torch.rand(do, di, dtype=torch.float64, generator=rng)
    got = kernels.fisher_accumulate(start.clone(), x, g, backend="torch")
    torch.testing.assert_close(got, start + _loop_fisher(x, g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", NATIVE_BACKENDS)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 3, 2), (3, 5, 19, 33), (5, 20, 17, 40), (2, 1, 70, 9)])
def test_backend_matches_reference(backend, acc, dtype, shape, rng):
    b, l, di, do = shape
    dev = backend_device(backend)
    x = torch.randn(b, l, di, generator=rng).to(dtype)
    g = torch.randn(b, l, do, generator=rng).to(dtype)
    start = torch.rand(do, di, generator=rng).to(acc)
    want = kernels.fisher_accumulate(start.clone(), x, g, backend="torch")
    got = start.clone().to(dev)
    out = kernels.fisher_accumulate(got, x.to(dev), g.to(dev), backend=backend)
    assert out is got and got.dtype == acc
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4 if acc == torch.float32 else 2e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_two_dimensional_inputs_and_accumulation(backend, rng):
    dev = backend_device(backend)
    x, g = torch.randn(6, 11, generator=rng), torch.randn(6, 5, generator=rng)
    f = torch.zeros(5, 11, dtype=torch.float64, device=dev)
    kernels.fisher_accumulate(f, x[:2].to(dev), g[:2].to(dev), backend=backend)
    kernels.fisher_accumulate(f, x[2:].to(dev), g[2:].to(dev), backend=backend)
    torch.testing.assert_close(f.cpu(), _loop_fisher(x, g), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_arguments(backend, rng):
    dev = backend_device(backend)
    x = torch.randn(4, 9, 13, generator=rng).transpose(1, 2)  # [4, 13, 9], strided
    g = torch.randn(4, 6, 13, generator=rng).transpose(1, 2)
    fisher = torch.zeros(9, 6, dtype=torch.float64, device=dev).T  # [6, 9], non-contiguous accumulator
    out = kernels.fisher_accumulate(fisher, x.to(dev), g.to(dev), backend=backend)
    assert out is fisher
    torch.testing.assert_close(fisher.cpu(), _loop_fisher(x, g), rtol=1e-5, atol=1e-9)


def _capture(store, inp, out):
    store["x"] = inp[0].detach()
    out.register_hook(lambda g: store.__setitem__("g", g.detach()))


def test_linear_layer_against_torch_func(rng):
    """Hooks on nn.Linear: captured (X, G) give the squared per-sample gradients of torch.func."""
    layer = nn.Linear(12, 7, bias=False)
    nn.init.normal_(layer.weight, generator=rng)
    x = torch.randn(5, 3, 12, generator=rng)
    target = torch.randn(5, 3, 7, generator=rng)

    def loss_one(w, xb, tb):
        return ((xb @ w.T - tb) ** 2).mean()

    grads = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(layer.weight.detach(), x, target)
    want = (grads.double() ** 2).sum(0)

    captured = {}
    layer.register_forward_hook(lambda m, inp, out: _capture(captured, inp, out))
    out = layer(x)
    # The sum of per-row means: each row's output gradient is that row's own loss gradient.
    ((out - target) ** 2).mean(dim=(1, 2)).sum().backward()
    got = kernels.fisher_accumulate(torch.zeros(7, 12, dtype=torch.float64), captured["x"], captured["g"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10)


def _tiny_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)


def test_unet_cross_attention_kv_against_brute_force(rng):
    """Hooked (X, G) of a real UNet's cross-attention K/V give its squared per-sample gradients.

    The UNet runs in float64 so that the batched and one-at-a-time passes agree to ~1e-12:
    in float32 an entry whose per-sample gradient nearly cancels differs between the two
    passes by more than any fixed relative tolerance. The kernel is then checked on the same
    (X, G) cast to float32, with an error bound that scales with the entries' norms.
    """
    torch.manual_seed(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    unet = _tiny_unet().double().eval()
    names = [n for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(names) >= 4
    modules = dict(unet.named_modules())
    b = 3
    x = torch.randn(b, 1, 8, 8, generator=rng, dtype=torch.float64)
    ctx = torch.randn(b, 5, 12, generator=rng, dtype=torch.float64)
    t = torch.randint(0, 1000, (b,), generator=rng)
    target = torch.randn(b, 1, 8, 8, generator=rng, dtype=torch.float64)

    captured: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    handles = []
    for n in names:
        handles.append(modules[n].register_forward_hook(lambda m, inp, out, n=n: _capture(captured[n], inp, out)))
    out = unet(x, t, encoder_hidden_states=ctx).sample
    ((out - target) ** 2).mean(dim=(1, 2, 3)).sum().backward()
    for h in handles:
        h.remove()

    brute = {n: torch.zeros_like(modules[n].weight) for n in names}
    for i in range(b):
        unet.zero_grad()
        o = unet(x[i:i + 1], t[i:i + 1], encoder_hidden_states=ctx[i:i + 1]).sample
        ((o - target[i:i + 1]) ** 2).mean().backward()
        for n in names:
            brute[n] += modules[n].weight.grad ** 2
    for n in names:
        cx, cg = captured[n]["x"], captured[n]["g"]
        # Each per-sample gradient entry is a dot product over tokens: rounding errs by ~eps times
        # sum|g||x|, so its square errs by ~2 eps (sum|g||x|)^2 at most, whatever the entry's size.
        scale = (torch.einsum("blo,bli->boi", cg.abs(), cx.abs()) ** 2).sum(0)
        assert torch.all((_loop_fisher(cx, cg) - brute[n]).abs() <= 1e-10 * scale)
        x32, g32 = cx.float(), cg.float()
        got = kernels.fisher_accumulate(torch.zeros(brute[n].shape, dtype=torch.float64), x32, g32)
        err = (got - _loop_fisher(x32, g32)).abs()
        assert torch.all(err <= 1e-5 * scale + 1e-30), float((err / scale).max())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("two_d", [True, False])
def test_one_position_products_that_fit_though_their_factors_square_out_of_range(backend, acc, two_d, rng):
    """Each sample's g and x are scaled by powers of two far apart (2**-75 .. 2**75) whose products stay
    moderate: every (g x)**2 is a normal float32, but g**2 or x**2 alone under- or overflows."""
    dev = backend_device(backend)
    b, di, do = 6, 9, 5
    k = torch.randint(-75, 76, (b, 1), generator=rng).double()
    shift = torch.randint(-8, 9, (b, 1), generator=rng).double()
    x = (torch.randn(b, di, generator=rng, dtype=torch.float64) * torch.exp2(k)).float()
    g = (torch.randn(b, do, generator=rng, dtype=torch.float64) * torch.exp2(shift - k)).float()
    x[0], g[0] = 0, 0
    x[0, 0], g[0, 0] = 1e20, 1e-20  # (g x)**2 = 1 from squares of 1e40 and 1e-40
    start = torch.rand(do, di, generator=rng, dtype=torch.float64)
    got = start.to(dev, acc, copy=True)
    xs, gs = (x, g) if two_d else (x[:, None], g[:, None])
    kernels.fisher_accumulate(got, xs.to(dev), gs.to(dev), backend=backend)
    want = start.to(acc).double() + _loop_fisher(x, g)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5 if acc == torch.float32 else 2e-6, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inputs_that_require_grad_leave_no_graph_on_fisher(backend, rng):
    dev = backend_device(backend)
    x = torch.randn(3, 4, 6, generator=rng).to(dev).requires_grad_(True)
    g = torch.randn(3, 4, 2, generator=rng).to(dev).requires_grad_(True)
    fisher = torch.zeros(2, 6, dtype=torch.float64, device=dev)
    kernels.fisher_accumulate(fisher, x, g, backend=backend)
    assert fisher.grad_fn is None and not fisher.requires_grad
    kernels.fisher_accumulate(fisher, x, g, backend=backend)  # refused as "requires grad" with a graph attached
    torch.testing.assert_close(fisher.cpu(), 2 * _loop_fisher(x.detach().cpu(), g.detach().cpu()), rtol=1e-5,
                               atol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_an_overflowing_update_is_reported_when_checked(backend, tokens):
    dev = backend_device(backend)
    x, g = torch.full((2, tokens, 3), 3e38, device=dev), torch.full((2, tokens, 2), 3e38, device=dev)
    fisher = torch.zeros(2, 3, dtype=torch.float64, device=dev)
    with pytest.raises(ValueError, match=r"^fisher: entries \[\[0, 0\], .*overflowed float32.*scale the loss down"):
        kernels.fisher_accumulate(fisher, x, g, backend=backend)
    fisher = torch.zeros(2, 3, dtype=torch.float64, device=dev)
    kernels.fisher_accumulate(fisher, x, g, backend=backend, check=False)  # unchecked: the caller checks the result
    assert torch.isinf(fisher).all()
    # Entries already inf are the caller's: only what this call makes non-finite is reported.
    kernels.fisher_accumulate(fisher, x / 1e30, g / 1e30, backend=backend)
