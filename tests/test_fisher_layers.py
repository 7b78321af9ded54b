"""Squared per-sample gradients of each layer kind from one batched pass, against one pass per sample."""
import copy

import pytest
import torch
from torch import nn

from forgetscore.attribution import per_sample
from forgetscore.attribution.losses import _cuda_fp32_math


def _layers(rng: torch.Generator) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(label, layer, one sample's input shape) of every kind, with sizes drawn afresh."""
    c = int(torch.randint(2, 5, (1,), generator=rng))
    return [
        ("linear tokens", nn.Linear(5, 7), (6, 5)),
        ("linear flat", nn.Linear(4, 3, bias=False), (4,)),
        ("conv 3x3", nn.Conv2d(c, 4, 3, padding=1), (c, 7, 6)),
        ("conv stride 2", nn.Conv2d(c, 3, 3, stride=2, padding=1, bias=False), (c, 8, 7)),
        ("conv 1x1", nn.Conv2d(c, 5, 1), (c, 5, 5)),
        ("conv dilated", nn.Conv2d(2, 3, (3, 2), dilation=2, padding=(2, 1), stride=(1, 2)), (2, 9, 8)),
        ("group norm", nn.GroupNorm(2, 2 * c, eps=1e-3), (2 * c, 5, 4)),
        ("layer norm", nn.LayerNorm(6), (5, 6)),
        ("layer norm 2-D, no bias", nn.LayerNorm((3, 4), bias=False), (2, 3, 4)),
    ]


def _randomise(layer: nn.Module, rng: torch.Generator) -> None:
    with torch.no_grad():  # norms start at w = 1, b = 0: move them so that a mixed-up w and b would show
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=rng) * 0.5 + 0.3)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(9))
def test_each_kind_equals_squared_gradients_of_one_pass_per_sample(index, device):
    # IEEE float32 on a GPU too: cuDNN's default TF32 would move the layer's outputs by ~1e-3.
    with _cuda_fp32_math("ieee"):
        _check_kind(index, device)


def _check_kind(index: int, device: str) -> None:
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    label, layer, shape = _layers(rng)[index]
    _randomise(layer, rng)
    assert per_sample.supported(layer), label
    b = 4
    x = torch.randn(b, *shape, generator=rng)
    target = torch.randn(layer(x).shape, generator=rng)
    ref = copy.deepcopy(layer).double()
    layer, x_dev, target_dev = layer.to(device), x.to(device), target.to(device)

    def loss_of(y, t):  # each sample's own loss, nonlinear in the layer's output
        return ((y - t) ** 2).flatten(1).mean(1) + (y.flatten(1) ** 3).mean(1)

    captured = {}
    layer.register_forward_hook(lambda m, inp, o: captured.update(x=inp[0].detach(), y=o))
    (g,) = torch.autograd.grad(loss_of(layer(x_dev), target_dev).sum(), [captured["y"]])
    params = dict(layer.named_parameters())
    sums = {kind: torch.zeros(p.shape, dtype=torch.float64, device=device) for kind, p in params.items()}
    per_sample.accumulate(layer, [(captured["x"], g)], sums, b)

    want = {kind: torch.zeros(p.shape, dtype=torch.float64) for kind, p in params.items()}
    for i in range(b):
        ref.zero_grad()
        loss_of(ref(x[i:i + 1].double()), target[i:i + 1].double()).sum().backward()
        for kind, p in ref.named_parameters():
            want[kind] += p.grad ** 2
    for kind in params:
        # float32 layer inputs: entries are sums over positions, so allow float32 rounding of the largest.
        torch.testing.assert_close(sums[kind].cpu(), want[kind], rtol=1e-4, atol=1e-5 * float(want[kind].abs().max()),
                                   msg=lambda m: f"{label} {kind}: {m}")


def test_only_the_requested_parameters_are_added_to():
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    for label, layer, shape in _layers(rng):
        if getattr(layer, "bias", None) is None:
            continue
        x = torch.randn(3, *shape, generator=rng)
        y = layer(x)
        g = torch.randn(y.shape, generator=rng)
        only_bias = {"bias": torch.zeros(layer.bias.shape, dtype=torch.float64)}
        per_sample.accumulate(layer, [(x, g)], only_bias, 3)
        both = {kind: torch.zeros(p.shape, dtype=torch.float64) for kind, p in layer.named_parameters()}
        per_sample.accumulate(layer, [(x, g)], both, 3)
        assert torch.equal(only_bias["bias"], both["bias"]), label


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(2, 3, 3, padding="same"),
                                   nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
                                   nn.GroupNorm(2, 4, affine=False), nn.LayerNorm(4, elementwise_affine=False),
                                   nn.Embedding(5, 3), nn.BatchNorm2d(3)])
def test_other_layers_are_left_to_one_pass_per_sample(layer):
    assert not per_sample.supported(layer)


def test_convolution_patches_are_taken_a_few_samples_at_a_time(monkeypatch):
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(5, 3, 6, 6, generator=rng)
    g = torch.randn(5, 4, 6, 6, generator=rng)

    def fisher() -> torch.Tensor:
        sums = {"weight": torch.zeros(layer.weight.shape, dtype=torch.float64)}
        per_sample.accumulate(layer, [(x, g)], sums, 5)
        return sums["weight"]

    whole = fisher()
    monkeypatch.setattr(per_sample, "PATCH_BYTES", 2 * 3 * 9 * 36 * 4)  # two samples' patches
    calls = []
    real = per_sample.kernels.fisher_accumulate
    monkeypatch.setattr(per_sample.kernels, "fisher_accumulate", lambda f, xs, *a, **kw: (calls.append(len(xs)),
                                                                                         real(f, xs, *a, **kw))[1])
    torch.testing.assert_close(fisher(), whole, rtol=1e-12, atol=0)
    assert calls == [2, 2, 1]


class _Doubled(nn.Linear):
    def forward(self, x):  # the same weight, another function of it
        return 2 * super().forward(x)


class _Named(nn.Conv2d):  # a subclass that keeps the layer's own forward
    pass


def test_subclasses_count_only_with_the_layers_own_forward():
    assert not per_sample.supported(_Doubled(3, 4))
    assert per_sample.supported(_Named(2, 3, 3, padding=1))


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(2, 3, 3, padding=1), lambda: nn.GroupNorm(2, 2, eps=1e-3),
                                  lambda: nn.Linear(2, 3)], ids=["conv", "group norm", "linear"])
def test_a_layer_run_twice_sums_both_calls(make):
    """Two calls of one layer on inputs of different sizes: each sample's gradient is the sum of both."""
    rng = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))
    layer = make()
    _randomise(layer, rng)
    b = 3
    shapes = [(2, 5, 4), (2, 3, 6)] if not isinstance(layer, nn.Linear) else [(4, 2), (7, 2)]
    xs = [torch.randn(b, *sh, generator=rng) for sh in shapes]

    def loss_of(m, inputs):  # per-sample, nonlinear in both outputs
        a, c = (m(x) for x in inputs)
        return (a.flatten(1) ** 2).mean(1) * (c.flatten(1) ** 3).mean(1) + c.flatten(1).mean(1)

    calls = []
    handle = layer.register_forward_hook(lambda m, inp, o: calls.append((inp[0].detach(), o)))
    total = loss_of(layer, xs).sum()
    handle.remove()
    grads = torch.autograd.grad(total, [y for _, y in calls])
    sums = {kind: torch.zeros(p.shape, dtype=torch.float64) for kind, p in layer.named_parameters()}
    per_sample.accumulate(layer, [(x, g) for (x, _), g in zip(calls, grads)], sums, b)

    ref = copy.deepcopy(layer).double()
    want = {kind: torch.zeros(p.shape, dtype=torch.float64) for kind, p in ref.named_parameters()}
    for i in range(b):
        ref.zero_grad()
        loss_of(ref, [x[i:i + 1].double() for x in xs]).sum().backward()
        for kind, p in ref.named_parameters():
            want[kind] += p.grad ** 2
    for kind in sums:
        torch.testing.assert_close(sums[kind], want[kind], rtol=1e-4, atol=1e-5 * float(want[kind].abs().max()))
