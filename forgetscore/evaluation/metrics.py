"""Retrieval metrics of the customized-model benchmark: Recall@K, average precision, mean +- s.e.

A method's scores rank the pool (higher = more responsible); the ground truth is the set of
exemplars the model was customized on.  Following "Evaluating Data Attribution for
Text-to-Image Models" (ICCV 2023):

* Recall@K = (positives among the K best-ranked) / (number of positives);
* AP = mean over the positives of (i / rank of the i-th positive), ranks 1-based;
* mAP = mean AP over queries.

Ties are broken by the lower index first (the same rule as ``base.top_k``), so a method that
gives every image the same score is not rewarded for it unless the positives happen to come
first in the pool: the rule is fixed and stated rather than averaged over orderings, and
methods with ties should add their own tie-breaking noise if they want an expected value.
NaN scores are refused: they have no place in a ranking.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _prepare(scores: np.ndarray | Sequence, positives: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray, bool]:
    """Scores as float64 [Q, N], positives as a bool mask [Q, N]; whether the input was one query."""
    s = np.asarray(scores, dtype=np.float64)
    single = s.ndim == 1
    if s.ndim not in (1, 2) or s.shape[-1] == 0:
        raise ValueError(f"scores: shape {s.shape} is not [N] or [Q, N] with N >= 1; pass one score per pool image")
    if np.isnan(s).any():
        raise ValueError("scores: hold NaN; a ranking needs comparable scores (use -inf for 'never')")
    s2 = s[None] if single else s
    mask = _mask(positives, s2.shape, single)
    if not mask.any(axis=1).all():
        bad = int(np.nonzero(~mask.any(axis=1))[0][0])
        raise ValueError(f"positives: query {bad} has none; every query needs at least one ground-truth image")
    return s2, mask, single


def _mask(positives, shape: tuple[int, int], single: bool) -> np.ndarray:
    q, n = shape
    p = np.asarray(positives)
    if p.dtype == bool:
        if p.shape not in ((n,), (q, n)):
            raise ValueError(f"positives: boolean mask of shape {p.shape}, need ({n},) or ({q}, {n}) to match scores")
        return np.broadcast_to(p, shape).copy()
    if p.size and not np.issubdtype(p.dtype, np.integer):
        raise ValueError(f"positives: dtype {p.dtype}; give pool indices (ints) or a boolean mask")
    if p.ndim > 2 or (p.ndim == 2 and p.shape[0] != q):
        raise ValueError(f"positives: index array of shape {p.shape}; give [P] (shared) or [Q, P] (per query)")
    idx = np.broadcast_to(p.astype(np.int64).reshape(-1) if p.ndim < 2 else p.astype(np.int64),
                          (q, p.size) if p.ndim < 2 else p.shape)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"positives: indices must be in [0, {n}) (positions in the pool)")
    mask = np.zeros(shape, dtype=bool)
    rows = np.repeat(np.arange(q), idx.shape[1])
    mask[rows, idx.reshape(-1)] = True
    if (mask.sum(axis=1) != idx.shape[1]).any():
        raise ValueError("positives: an index repeats; list each ground-truth image once")
    return mask


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Order of each row, best first: score descending, ties by the lower index."""
    n = scores.shape[1]
    return np.stack([np.lexsort((np.arange(n), -row)) for row in scores])


def recall_at_k(scores: np.ndarray | Sequence, positives: np.ndarray | Sequence, k: int = 10) -> np.ndarray | float:
    """Fraction of the positives among the `k` best-scored pool images, per query.

    scores: [N] or [Q, N]; positives: pool indices ([P] shared, or [Q, P]) or a boolean mask
    ([N] or [Q, N]).  Returns a float for [N] scores, else float64 [Q].
    """
    s, mask, single = _prepare(scores, positives)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= s.shape[1]:
        raise ValueError(f"k: {k!r} must be an int in [1, {s.shape[1]}] (the pool size)")
    order = _ranks(s)[:, :k]
    hits = np.take_along_axis(mask, order, axis=1).sum(axis=1)
    out = hits / mask.sum(axis=1)
    return float(out[0]) if single else out


def average_precision(scores: np.ndarray | Sequence, positives: np.ndarray | Sequence) -> np.ndarray | float:
    """AP = mean over positives of (i / rank of the i-th positive), ranks 1-based, per query.

    Same arguments as :func:`recall_at_k`; ties broken by the lower index (module docstring).
    """
    s, mask, single = _prepare(scores, positives)
    ranked = np.take_along_axis(mask, _ranks(s), axis=1)  # [Q, N]: is the r-th best a positive?
    hits = np.cumsum(ranked, axis=1)
    rank = np.arange(1, s.shape[1] + 1)
    precision_at_hits = np.where(ranked, hits / rank, 0.0)
    out = precision_at_hits.sum(axis=1) / mask.sum(axis=1)
    return float(out[0]) if single else out


def mean_se(values: np.ndarray | Sequence) -> tuple[float, float | None]:
    """(mean, standard error of the mean with ddof=1); the error of a single value is undefined: None."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("values: empty; need at least one value to average")
    if not np.isfinite(v).all():
        raise ValueError("values: hold NaN or inf; average finite metric values only")
    if v.size == 1:
        return float(v[0]), None
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size))


def clustered_mean_se(values: np.ndarray | Sequence, groups: np.ndarray | Sequence) -> tuple[float, float]:
    """(mean over all values, standard error that treats each group as one independent draw).

    Queries of one concept share its customized model and exemplars, so they are not independent:
    the plain standard error over queries understates the spread between concepts.  This is the
    cluster-robust (CR1) error, se^2 = C/(C-1) * sum_c (sum_{i in c} (v_i - mean))^2 / N^2 over C
    groups; with equal group sizes it equals the standard error of the C group means.  Needs
    at least two groups.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if g.shape != v.shape:
        raise ValueError(f"groups: {g.size} labels for {v.size} values; give one group label per value")
    mean, _ = mean_se(v)
    labels, inverse = np.unique(g, return_inverse=True)
    if labels.size < 2:
        raise ValueError(f"groups: {labels.size} distinct group(s); a between-group error needs at least two "
                         "(use mean_se for one)")
    sums = np.bincount(inverse, weights=v - mean)
    c = labels.size
    return mean, float(np.sqrt(c / (c - 1) * (sums ** 2).sum()) / v.size)
