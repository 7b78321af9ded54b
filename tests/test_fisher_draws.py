"""The Fisher's samples: epochs over the training set, as the paper, keyed on the sample index."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forgetscore.attribution.fisher import sample_draws


def _data(n: int, rng: np.random.Generator) -> SimpleNamespace:
    counts = rng.integers(1, 6, size=n)
    return SimpleNamespace(n=n, caption_offsets=np.concatenate([[0], np.cumsum(counts)]).tolist(), counts=counts)


@pytest.mark.parametrize("n", [1, 2, 7, 97])
def test_each_epoch_visits_every_image_once(n):
    rng = np.random.default_rng()
    seed = int(rng.integers(0, 2 ** 63))
    data = _data(n, rng)
    epochs = 3
    extra = int(rng.integers(0, n))  # a partial last epoch
    d = sample_draws(seed, 0, epochs * n + extra, data, 1000, True)
    images = d["image"].numpy()
    for e in range(epochs):
        assert sorted(images[e * n:(e + 1) * n]) == list(range(n))
    tail = images[epochs * n:]
    assert len(set(tail.tolist())) == extra  # without replacement within the partial epoch too
    counts = np.bincount(images, minlength=n)
    assert counts.min() >= epochs and counts.max() <= epochs + 1
    assert ((d["caption"].numpy() >= 0) & (d["caption"].numpy() < data.counts[images])).all()
    assert ((d["timestep"] >= 0) & (d["timestep"] < 1000)).all()
    assert set(d["version"].tolist()) <= {0, 1}
    if n > 20:  # each epoch has an order of its own, and the seed changes it (equal by chance: 1 in n!)
        assert not np.array_equal(images[:n], images[n:2 * n])
        other = sample_draws(seed ^ 1, 0, n, data, 1000, True)["image"].numpy()
        assert not np.array_equal(images[:n], other)


def test_any_range_of_samples_is_drawn_alone():
    rng = np.random.default_rng()
    seed, n = int(rng.integers(0, 2 ** 63)), int(rng.integers(5, 40))
    data = _data(n, rng)
    total = 4 * n + 3
    whole = sample_draws(seed, 0, total, data, 1000, True)
    cuts = sorted(rng.choice(np.arange(1, total), size=4, replace=False).tolist())
    bounds = [0, *cuts, total]
    parts = [sample_draws(seed, lo, hi - lo, data, 1000, True) for lo, hi in zip(bounds, bounds[1:])]
    for key, value in whole.items():
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), value, rtol=0, atol=0)
    noflip = sample_draws(seed, 0, total, data, 1000, False)
    assert (noflip["version"] == 0).all() and torch.equal(noflip["image"], whole["image"])


def test_epoch_orders_look_uniform():
    # Where image 0 lands over many epochs: a chi-square test of uniformity at n = 8 (7 degrees of freedom,
    # 99.99th percentile 29.9), so a fixed or biased order fails and a fair one passes 9,999 times in 10,000.
    rng = np.random.default_rng()
    seed, n, epochs = int(rng.integers(0, 2 ** 63)), 8, 800
    images = sample_draws(seed, 0, epochs * n, SimpleNamespace(n=n, caption_offsets=list(range(n + 1))), 1000,
                          False)["image"].numpy().reshape(epochs, n)
    where = np.argmax(images == 0, axis=1)
    observed = np.bincount(where, minlength=n)
    chi2 = ((observed - epochs / n) ** 2 / (epochs / n)).sum()
    assert chi2 < 29.9, observed
