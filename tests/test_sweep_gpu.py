"""The engine on a GPU: the sweep waits for the device once per image batch and matches the CPU; the Fisher's
batch is probed."""
import warnings

import numpy as np
import pytest
import torch

import tiny
from forgetscore.attribution import DiffusionModel, ScoringPlan, TrainingSet, prepare
from forgetscore.attribution.losses import LossSweep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PLAN = ScoringPlan(timesteps=(5, 250, 500, 999), flips=True, seed=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_gpu")
    model_dir = tiny.build_model(root / "model")
    model = DiffusionModel.load(model_dir, device="cuda")
    data = prepare(model, TrainingSet.load(tiny.build_train(root / "train", n=12)), root / "prepared", progress=False)
    return model, data, model_dir


@pytest.mark.parametrize("prefetch", [True, False])
def test_the_sweep_synchronises_once_per_image_batch(setup, prefetch):
    model, data, _ = setup
    sweep = LossSweep(model, data, PLAN, batch_size=16, prefetch=prefetch)
    name = next(n for n, _ in model.unet.named_parameters() if ".attn2.to_v." in n)
    variant = {name: model.unet.get_parameter(name).detach() * 1.01}
    ids = np.arange(data.n)
    sweep.run([None, variant], ids, progress=False)  # first calls: lazy initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            sweep.run([None, variant], ids, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    where = sorted({f"{w.filename}:{w.lineno}" for w in syncs})
    assert len(syncs) == len(sweep.image_batches(ids)), where  # the means of both variants read back, nothing else
    assert all(w.filename.endswith("losses.py") for w in syncs), where


def test_gpu_losses_match_the_cpu_losses(setup):
    model, data, model_dir = setup
    gpu = LossSweep(model, data, PLAN, batch_size=16, precision="fp32").run([None], progress=False)
    cpu = LossSweep(DiffusionModel.load(model_dir), data, PLAN, batch_size=16).run([None], progress=False)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5)


def test_the_fisher_batch_is_probed_on_the_gpu_and_the_fisher_matches_that_batch(setup):
    from forgetscore.attribution import compute_fisher, select_weights
    from forgetscore.attribution.fisher import FISHER_AUTO_CAP, auto_fisher_batch_size

    model, data, _ = setup
    names = select_weights(model.unet, "kv")
    batch = auto_fisher_batch_size(model, data, names)
    assert batch == FISHER_AUTO_CAP  # the tiny model's batch of 512 fits any GPU
    a = compute_fisher(model, data, names, samples=40, batch_size=batch, progress=False)
    b = compute_fisher(model, data, names, samples=40, batch_size=8, progress=False)
    for n in names:  # another batch takes other convolution algorithms (TF32 by PyTorch's default) and sum orders
        torch.testing.assert_close(a[n], b[n], rtol=5e-3, atol=1e-3 * float(b[n].abs().max()))
