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
