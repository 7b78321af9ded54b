"""Caching an evaluation's expensive arrays beside the key they were computed under."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..attribution.io import read_json, write_json, write_npy


def cached_scores(path: Path, key: dict, compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
    """`compute()` saved at `path` (.npy) with its key beside it (.json); reused while the key matches.

    Returns (scores, reused).  The key must name everything the scores depend on (method and
    its settings, model, training set, plan, queries): a stale array is recomputed, never reused.
    """
    path = Path(path)
    meta = path.with_suffix(".json")
    key = json.loads(json.dumps(key, default=str))
    if path.is_file() and meta.is_file() and read_json(meta) == key:
        return np.load(path), True
    s = np.asarray(compute(), dtype=np.float64)
    # The array first, then its key: a crash in between leaves an array without a key, recomputed next time.
    write_npy(path, s)
    write_json(meta, key)
    return s, False
