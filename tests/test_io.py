"""Atomic writes: whole files or none, and arrays streamed to disk without a copy in memory."""
import tracemalloc

import numpy as np
import pytest

from conftest import fresh_seed
from forgetscore.attribution.io import write_npy


def test_write_npy_round_trips_and_streams(tmp_path):
    arr = np.random.default_rng(fresh_seed("data")).standard_normal((64, 1024, 128)).astype(np.float32)  # 32 MiB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        write_npy(tmp_path / "a.npy", arr)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < arr.nbytes / 8, f"writing {arr.nbytes} bytes held {peak} more in memory"
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]


def test_a_failed_write_leaves_nothing(tmp_path):
    write_npy(tmp_path / "a.npy", np.arange(3))
    with pytest.raises(ValueError):
        write_npy(tmp_path / "a.npy", np.array([{"not": "an array of numbers"}], dtype=object))
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # the old file whole, no temporary beside it
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.arange(3))


def test_write_npy_rows_streams_parts_into_one_array(tmp_path):
    g = np.random.default_rng(fresh_seed("data"))
    parts = [g.standard_normal((n, 7, 5)).astype(np.float16) for n in (4, 1, 6)]
    from forgetscore.attribution.io import write_npy_rows

    write_npy_rows(tmp_path / "r.npy", (11, 7, 5), np.float16, iter(parts))
    got = np.load(tmp_path / "r.npy")
    assert got.dtype == np.float16 and np.array_equal(got, np.concatenate(parts))
    for shape, says in (((12, 7, 5), "11 rows written for an array of 12"), ((11, 7, 4), "a part of shape")):
        with pytest.raises(ValueError, match=says):
            write_npy_rows(tmp_path / "bad.npy", shape, np.float16, iter(parts))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.npy"]  # nothing half-written
