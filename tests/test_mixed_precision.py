"""The "mixed" sweep precision: bfloat16 autocast, the UNet's output end in float32."""
import copy
import re

import numpy as np
import pytest
import tiny
import torch

from conftest import fresh_seed
from forgetscore import cli
from forgetscore.attribution import DiffusionModel, ScoringPlan, TrainingSet, prepare
from forgetscore.attribution.dattri import ArrayData
from forgetscore.attribution.losses import LossSweep, probe_batch_size
from forgetscore.attribution.mixed import Float32Tail, tail_modules

PLAN = ScoringPlan(timesteps=(3, 250, 500, 750, 999), captions="all", flips=True, seed=6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    model = DiffusionModel.load(tiny.build_model(root / "model"))
    train = TrainingSet.load(tiny.build_train(root / "train", n=8))
    return model, prepare(model, train, root / "prepared", progress=False)


def _dtypes_seen(model, run):
    """The output dtype of every conv and linear layer during `run()`, by module name."""
    seen, handles = {}, []
    for name, mod in model.unet.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(mod.register_forward_hook(
                lambda m, a, out, name=name: seen.setdefault(name, set()).add(out.dtype)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def test_output_end_in_float32_the_rest_in_bfloat16(setup):
    model, data = setup
    sweep = LossSweep(model, data, PLAN, batch_size=64, precision="mixed")
    seen = _dtypes_seen(model, lambda: sweep.run([None], progress=False))
    n_up = len(model.unet.up_blocks)
    tail = {n for n in seen if n.startswith(f"up_blocks.{n_up - 1}.") or n == "conv_out"}
    assert tail and "conv_out" in tail
    for name, dtypes in seen.items():
        want = torch.float32 if name in tail else torch.bfloat16
        assert dtypes == {want}, (name, dtypes)
    # nothing stays installed after the sweep
    assert not [m for m in tail_modules(model.unet) if "forward" in m.__dict__]


def test_mixed_losses_lie_closer_to_float32_than_bfloat16s(setup):
    model, data = setup
    g = torch.Generator().manual_seed(fresh_seed("weights"))
    weights = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=g)
               for n, p in model.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    runs = {p: LossSweep(model, data, PLAN, batch_size=64, precision=p).run([None, weights], progress=False)
            for p in ("fp32", "bf16", "mixed")}
    err = {p: np.abs(runs[p] - runs["fp32"]).sum() for p in ("bf16", "mixed")}
    assert 0 < err["mixed"] < err["bf16"], err
    score_err = {p: np.abs((runs[p][1] - runs[p][0]) - (runs["fp32"][1] - runs["fp32"][0])).sum()
                 for p in ("bf16", "mixed")}
    assert score_err["mixed"] < score_err["bf16"], score_err


def test_float32_tail_keeps_a_forward_it_found_and_rejects_other_models(setup):
    model, _ = setup
    conv_out = model.unet.conv_out
    calls = []
    conv_out.forward = lambda x: calls.append(x.dtype) or torch.nn.Conv2d.forward(conv_out, x)
    try:
        tail = Float32Tail(model.unet)
        with tail.installed(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv_out(torch.randn(2, conv_out.in_channels, 4, 4, dtype=torch.bfloat16))
        assert calls == [torch.float32] and y.dtype == torch.float32
        assert conv_out.__dict__["forward"] is not tail._forwards[-1]  # the earlier forward is back
    finally:
        conv_out.__dict__.pop("forward", None)
    with pytest.raises(ValueError, match="^precision: 'mixed' needs a UNet with up_blocks"):
        Float32Tail(torch.nn.Linear(2, 2))


def test_mixed_is_a_precision_of_the_command_line_and_the_probe(setup, monkeypatch):
    args = cli.build_parser().parse_args(["score", "--model", "m", "--train", "t", "--precision", "mixed"])
    assert args.precision == "mixed"
    model, _ = setup
    installed = []
    real = Float32Tail.installed

    def spy(self):
        installed.append(True)
        return real(self)

    monkeypatch.setattr(Float32Tail, "installed", spy)
    assert probe_batch_size(model, "mixed", cap=4) == 4 and installed  # probed as the sweep calls the UNet


def test_non_finite_losses_are_an_error_that_names_the_cause(setup):
    model, data = setup
    name = next(n for n, _ in model.unet.named_parameters() if ".attn2.to_v." in n)
    p = model.unet.get_parameter(name)
    broken = {name: torch.full_like(p, float("nan"))}
    with pytest.raises(ValueError, match=r"^losses: the UNet's outputs for variant 1 are NaN or infinite "
                                         r"\(precision fp32\).*alpha, damping"):
        LossSweep(model, data, PLAN, batch_size=64).run([None, broken], progress=False)
    published = ScoringPlan(timesteps=(3, 500), seed=6, noise="reference", reference_batch=2, noise_device="cpu")
    with pytest.raises(ValueError, match=r"^losses: the UNet's outputs for variant 0 are NaN"):  # no kernel there
        LossSweep(model, data, published, batch_size=64).run([broken], progress=False)
    # values far beyond float16's range: fine in bfloat16 and float32, not in float16
    huge = {name: p.detach() * 1e6}
    for precision in ("fp32", "bf16"):
        assert np.isfinite(LossSweep(model, data, PLAN, batch_size=64, precision=precision).run(
            [huge], [0, 1], progress=False)).all()
    with pytest.raises(ValueError, match=r"^precision: .* under fp16, whose range .* use bf16 or mixed"):
        LossSweep(model, data, PLAN, batch_size=64, precision="fp16").run([huge], [0, 1], progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_prepared_inputs_are_named_by_image(setup, value):
    model, data = setup
    g = np.random.default_rng(fresh_seed())
    inputs = np.stack([data.inputs(np.arange(data.n))[:, v].numpy() for v in range(2)], axis=1)
    bad = sorted(g.choice(data.n, size=2, replace=False).tolist())
    size = inputs[0, 0].size
    np.put(inputs[bad[0], 1], g.integers(size), value)  # the flip of one image
    np.put(inputs[bad[1], 0], g.integers(size), value)
    text = data.text(np.arange(data.n), "all")[0].numpy()
    broken = ArrayData(inputs, text, np.asarray(data.caption_offsets), data.model_id)
    with pytest.raises(ValueError, match=rf"^data: the prepared inputs of images {re.escape(str(bad))} are NaN or "
                                         "infinite; prepare the training set again"):
        LossSweep(model, broken, PLAN, batch_size=4096).run([None], progress=False)  # one batch: both named
    # without the flips, the image whose flip holds the value is fine
    noflip = ScoringPlan(timesteps=(3, 500), flips=False, seed=6)
    assert np.isfinite(LossSweep(model, broken, noflip, batch_size=64).run([None], [bad[0]], progress=False)).all()


def test_mixed_needs_float32_weights(setup):
    model, data = setup
    half = DiffusionModel(model.tokenizer, model.text_encoder, copy.deepcopy(model.unet).to(torch.bfloat16),
                          model.scheduler)
    with pytest.raises(ValueError, match=r"^precision: 'mixed' .* needs float32 weights; this UNet's are "
                                         r"torch.bfloat16"):
        LossSweep(half, data, PLAN, batch_size=64, precision="mixed")
