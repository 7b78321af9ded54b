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


def differences(there: dict, here: dict) -> list[str]:
    """'name: X there, Y here' for each setting of `here` that `there` records otherwise."""
    return [f"{k}: {there.get(k)!r} there, {here[k]!r} here" for k in here if there.get(k) != here[k]]


# Images per chunk of a scoring pass: finished chunks are kept in the cache, so a pass killed midway resumes
# from them. The engine's default (4096) exceeds the digits' 1,797 training images: one chunk, so a kill during
# "scored with unlearning" lost the whole pass. A chunk of the digits' default loo pass takes about 40 s.
SCORING_CHUNK = 256


def scoring_chunk_size(attributor, target: int | None = None) -> int:
    """A chunk size near `target` images (default :data:`SCORING_CHUNK`) at every multiple of which the
    unchunked pass starts an image batch, or the Attributor's own where there is none.

    A chunk's batches are then those of the unchunked pass, so the losses (and every score made of them)
    are bitwise the same: batches of other sizes change the last bits."""
    target = SCORING_CHUNK if target is None else target
    n = len(attributor.train)
    starts = {int(b[0]) for b in attributor.sweep().image_batches(np.arange(n))}
    fits = [c for c in sorted(starts) if c > 0 and all(s in starts for s in range(c, n, c))]
    return min(fits, key=lambda c: (abs(c - target), c)) if fits else attributor.chunk_size
