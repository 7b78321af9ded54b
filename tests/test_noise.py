"""Counter-based noise: bit-exact streams, invariance to batching, sane statistics."""
import math

import pytest
import torch

from conftest import ALL_BACKENDS, backend_device, poison_heap
from forgetscore import kernels
import pyref

# Known-answer vectors published with Philox4x32-10 (Random123 kat_vectors).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_python_reference_matches_published_vectors(counter, key, expected):
    assert tuple(pyref.philox(counter, key)) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_known_answers_through_the_counter_layout(backend, counter, key, expected):
    # Quad 0 of a row is Philox(counter=(0, draw, sid_lo, sid_hi), key=seed): reuse the published
    # counters' upper words (the element word stays 0); where the whole counter matches, expect the vector.
    seed = key[0] | (key[1] << 32)
    sid = counter[2] | (counter[3] << 32)
    if sid >= 2 ** 63:
        pytest.skip("sample ids are limited to [0, 2**63)")
    dev = backend_device(backend)
    got = kernels.random_bits(seed, torch.tensor([sid], device=dev), torch.tensor([counter[1]], device=dev), 4,
                              backend=backend)[0].tolist()
    assert tuple(got) == tuple(pyref.philox((0,) + tuple(counter[1:]), key))
    if counter[0] == 0:
        assert tuple(got) == expected


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 13, 130])
def test_bits_equal_python_integers(backend, numel, rng):
    dev = backend_device(backend)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng)) * 4 + 3  # exercise the high key word
    sids = torch.randint(0, 2 ** 62, (3,), generator=rng)
    dids = torch.randint(0, 2 ** 32, (3,), generator=rng)
    poison_heap(3 * numel)
    got = kernels.random_bits(seed, sids.to(dev), dids.to(dev), numel, backend=backend).cpu()
    want = torch.tensor([pyref.row_bits(seed, int(s), int(d), numel) for s, d in zip(sids, dids)])
    assert got.dtype == torch.int64
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_normals_match_float64_box_muller(backend, rng):
    dev = backend_device(backend)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    sids = torch.randint(0, 2 ** 40, (4,), generator=rng)
    dids = torch.randint(0, 2 ** 32, (4,), generator=rng)
    numel = 37
    poison_heap(4 * numel)
    got = kernels.normal(seed, sids.to(dev), dids.to(dev), numel, backend=backend).cpu().double()
    want = torch.tensor([pyref.row_normals(seed, int(s), int(d), numel) for s, d in zip(sids, dids)],
                        dtype=torch.float64)
    # float32 Box-Muller against float64: a few ulp of values up to ~6.
    torch.testing.assert_close(got, want, atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_normals_near_u_equal_1_match_float64(backend, rng):
    """Radii from uniforms just below 1 (r = sqrt(-2 log u) is steep there): where rounding shows most."""
    dev = backend_device(backend)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    sids = torch.arange(1 << 20) + int(torch.randint(0, 2 ** 40, (1,), generator=rng))
    bits = kernels.random_bits(seed, sids, torch.zeros_like(sids), 4, backend="cpu" if "cpu" in ALL_BACKENDS
                               else "torch")
    near = sids[(bits[:, 0] >> 8) >= (1 << 24) - 256][:4]  # 1 in 2**16 rows: about 16 found
    assert len(near) == 4
    dids = torch.zeros_like(near)
    got = kernels.normal(seed, near.to(dev), dids.to(dev), 4, backend=backend).cpu().double()
    want = torch.tensor([pyref.row_normals(seed, int(s), 0, 4) for s in near], dtype=torch.float64)
    assert float(want[:, :2].abs().max()) < 0.01  # small radii indeed
    torch.testing.assert_close(got, want, atol=3e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "torch"])
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5), (1, 8, 8)])
def test_backend_normals_equal_reference(backend, shape, rng):
    dev = backend_device(backend)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    sids = torch.randint(0, 2 ** 62, (5,), generator=rng)
    dids = torch.randint(0, 2 ** 32, (5,), generator=rng)
    ref = kernels.normal(seed, sids, dids, shape, backend="torch")
    got = kernels.normal(seed, sids.to(dev), dids.to(dev), shape, backend=backend).cpu()
    assert got.shape == (5, *shape)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    bits_ref = kernels.random_bits(seed, sids, dids, math.prod(shape), backend="torch")
    assert torch.equal(kernels.random_bits(seed, sids.to(dev), dids.to(dev), math.prod(shape),
                                           backend=backend).cpu(), bits_ref)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_do_not_depend_on_batching(backend, rng):
    dev = backend_device(backend)
    n = 12
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    sids = torch.randint(0, 2 ** 50, (n,), generator=rng).to(dev)
    dids = torch.randint(0, 50, (n,), generator=rng).to(dev)
    full = kernels.normal(seed, sids, dids, (3, 4, 4), backend=backend)
    perm = torch.randperm(n, generator=rng).to(dev)
    assert torch.equal(kernels.normal(seed, sids[perm], dids[perm], (3, 4, 4), backend=backend), full[perm])
    parts = [kernels.normal(seed, sids[i:i + k], dids[i:i + k], (3, 4, 4), backend=backend)
             for i, k in ((0, 1), (1, 4), (5, 7))]
    assert torch.equal(torch.cat(parts), full)
    # Shards of a strided split (rank r of 3 takes rows r, r+3, ...).
    for r in range(3):
        assert torch.equal(kernels.normal(seed, sids[r::3], dids[r::3], (3, 4, 4), backend=backend), full[r::3])


def test_rows_differ_by_seed_sample_and_draw():
    base = kernels.normal(5, [10], [2], 64, backend="torch")
    for other in (kernels.normal(6, [10], [2], 64, backend="torch"),
                  kernels.normal(5, [11], [2], 64, backend="torch"),
                  kernels.normal(5, [10], [3], 64, backend="torch"),
                  kernels.normal(5, [10 + 2 ** 32], [2], 64, backend="torch")):
        assert not torch.equal(base, other)


def test_statistics(rng):
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=rng))
    n, d = 4000, 256
    sids = torch.arange(n)
    z = kernels.normal(seed, sids, torch.zeros(n, dtype=torch.int64), d).double()
    flat = z.flatten()
    # Mean and variance of 1M normals: standard errors 1e-3 and 1.4e-3.
    assert abs(flat.mean()) < 5e-3
    assert abs(flat.var() - 1) < 7e-3
    # Tails: P(|z| > 3) = 0.0027.
    assert abs((flat.abs() > 3).double().mean() - 0.0027) < 4e-4
    # No correlation between neighbouring sample ids, draw ids, or neighbouring elements.
    zd = kernels.normal(seed, sids, torch.ones(n, dtype=torch.int64), d).double()
    for a, b in ((z[:-1], z[1:]), (z, zd), (z[:, :-1], z[:, 1:]), (z[:, 0::2], z[:, 1::2])):
        corr = torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1]
        assert abs(corr) < 6 / math.sqrt(a.numel()), (corr, a.shape)  # six standard errors
    # Kolmogorov-Smirnov distance to the standard normal CDF.
    sample = flat[:200_000].sort().values
    cdf = 0.5 * (1 + torch.erf(sample / math.sqrt(2)))
    ecdf = torch.arange(1, sample.numel() + 1, dtype=torch.float64) / sample.numel()
    assert float((cdf - ecdf).abs().max()) < 1.63 / math.sqrt(sample.numel()) * 1.5


def test_dtype_and_device_arguments():
    z = kernels.normal(1, [1, 2], 0, (2, 2), dtype=torch.bfloat16)
    assert z.dtype == torch.bfloat16 and z.shape == (2, 2, 2)
    assert torch.equal(z, kernels.normal(1, [1, 2], [0, 0], (2, 2), backend="torch").to(torch.bfloat16))
    z64 = kernels.normal(1, [1, 2], 0, 3, dtype=torch.float64, device="cpu")
    assert z64.dtype == torch.float64
