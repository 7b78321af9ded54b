"""Recall@K, AP and mean +- s.e. against hand-computed values, ties, edge cases and bad input."""
import itertools
import math

import numpy as np
import pytest

from forgetscore.evaluation.metrics import average_precision, clustered_mean_se, mean_se, recall_at_k

# Ranking of SCORES, best first: 0 (0.9), 2 (0.8), 4 (0.5), 3 (0.3), 1 (0.1).
SCORES = [0.9, 0.1, 0.8, 0.3, 0.5]


def test_hand_computed_example():
    # Positives 0 and 3 sit at ranks 1 and 4: AP = (1/1 + 2/4) / 2.
    assert average_precision(SCORES, [0, 3]) == pytest.approx(0.75)
    assert recall_at_k(SCORES, [0, 3], k=1) == pytest.approx(0.5)
    assert recall_at_k(SCORES, [0, 3], k=3) == pytest.approx(0.5)
    assert recall_at_k(SCORES, [0, 3], k=4) == pytest.approx(1.0)
    # One positive at the bottom of five: AP = 1/5, and only Recall@5 finds it.
    assert average_precision(SCORES, [1]) == pytest.approx(0.2)
    assert recall_at_k(SCORES, [1], k=4) == 0.0
    assert recall_at_k(SCORES, [1], k=5) == 1.0
    # All positives first: AP 1 whatever their number.
    assert average_precision(SCORES, [0, 2, 4]) == pytest.approx(1.0)
    # Ranks 2 and 3 (images 2 and 4): (1/2 + 2/3) / 2.
    assert average_precision(SCORES, [2, 4]) == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_ties_are_broken_by_lower_index():
    flat = [1.0, 1.0, 1.0, 1.0]
    # Order 0, 1, 2, 3: positives 2 and 3 at ranks 3 and 4.
    assert average_precision(flat, [2, 3]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert average_precision(flat, [0]) == 1.0
    assert recall_at_k(flat, [2, 3], k=2) == 0.0
    assert recall_at_k(flat, [0, 3], k=2) == 0.5
    # Two tied pairs: order 1, 3, 0, 2 -> positives 3 and 2 at ranks 2 and 4.
    pairs = [0.5, 0.7, 0.5, 0.7]
    assert average_precision(pairs, [2, 3]) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert recall_at_k(pairs, [2, 3], k=1) == 0.0
    assert recall_at_k(pairs, [2, 3], k=2) == 0.5


def test_infinite_scores_rank_at_the_ends():
    s = [-np.inf, 0.0, np.inf, 1.0]
    assert average_precision(s, [2]) == 1.0
    assert average_precision(s, [0]) == pytest.approx(0.25)
    assert recall_at_k(s, [0], k=3) == 0.0


def test_vectorised_over_queries_matches_rows_and_masks():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 40))
    pos = np.stack([rng.choice(40, size=5, replace=False) for _ in range(6)])
    ap, rec = average_precision(scores, pos), recall_at_k(scores, pos, k=10)
    assert ap.shape == rec.shape == (6,)
    for q in range(6):
        assert ap[q] == average_precision(scores[q], pos[q])
        assert rec[q] == recall_at_k(scores[q], pos[q], k=10)
    mask = np.zeros((6, 40), dtype=bool)
    np.put_along_axis(mask, pos, True, axis=1)
    np.testing.assert_array_equal(average_precision(scores, mask), ap)
    np.testing.assert_array_equal(recall_at_k(scores, mask, k=10), rec)
    # A shared set of positives (the benchmark's case: every query has the same exemplars).
    shared = average_precision(scores, pos[0])
    np.testing.assert_array_equal(shared, [average_precision(s, pos[0]) for s in scores])
    np.testing.assert_array_equal(average_precision(scores, mask[0]), shared)


def test_average_precision_matches_sklearn_without_ties():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(2, 60))
        s = rng.normal(size=n)
        y = rng.random(n) < 0.3
        y[rng.integers(n)] = True
        assert average_precision(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_recall_is_monotone_and_reaches_one():
    rng = np.random.default_rng(2)
    s = rng.normal(size=30)
    pos = [3, 17, 29]
    rec = [recall_at_k(s, pos, k) for k in range(1, 31)]
    assert all(a <= b for a, b in itertools.pairwise(rec))
    assert rec[-1] == 1.0


def test_mean_se():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # sd (ddof=1) = sqrt(5/3), / sqrt(4)
    assert mean_se([0.7]) == (0.7, None)  # one value has no spread to estimate, not a spread of 0
    assert mean_se(np.array([[2.0, 2.0], [2.0, 2.0]])) == (2.0, 0.0)


def test_clustered_se_hand_computed():
    # Groups a: (1, 2), b: (6,); mean 3; residual sums a: -3, b: 3; se^2 = 2/1 * (9 + 9) / 3^2 = 4.
    assert clustered_mean_se([1.0, 2.0, 6.0], ["a", "a", "b"]) == (3.0, pytest.approx(2.0))


def test_clustered_se_equals_the_se_of_group_means_when_balanced():
    rng = np.random.default_rng()
    v = rng.normal(size=(5, 4))  # 5 groups of 4
    groups = np.repeat(np.arange(5), 4)
    m, se = clustered_mean_se(v.reshape(-1), groups)
    assert m == pytest.approx(v.mean())
    assert se == pytest.approx(v.mean(1).std(ddof=1) / np.sqrt(5))


def test_clustered_se_matches_a_plain_loop_on_unbalanced_groups():
    rng = np.random.default_rng()
    sizes = rng.integers(1, 6, size=4)
    v = rng.normal(size=sizes.sum())
    groups = rng.permutation(np.repeat(np.arange(4), sizes))
    n, mean = len(v), sum(v) / len(v)
    total = sum(sum(x - mean for x, g in zip(v, groups) if g == c) ** 2 for c in range(4))
    assert clustered_mean_se(v, groups)[1] == pytest.approx(math.sqrt(4 / 3 * total) / n)
    # One value per group is the plain per-query error.
    assert clustered_mean_se(v, np.arange(len(v)))[1] == pytest.approx(mean_se(v)[1])


@pytest.mark.parametrize("call, match", [
    (lambda: clustered_mean_se([1.0, 2.0], [0, 0]), "groups: 1 distinct"),
    (lambda: clustered_mean_se([1.0, 2.0], [0]), "groups: 1 labels for 2 values"),
    (lambda: average_precision([0.1, np.nan], [0]), "scores: hold NaN"),
    (lambda: average_precision([], [0]), "scores: shape"),
    (lambda: average_precision(np.zeros((2, 2, 2)), [0]), "scores: shape"),
    (lambda: average_precision([0.1, 0.2], [2]), r"positives: indices must be in \[0, 2\)"),
    (lambda: average_precision([0.1, 0.2], [-1]), "positives: indices"),
    (lambda: average_precision([0.1, 0.2, 0.3], [1, 1]), "positives: an index repeats"),
    (lambda: average_precision([0.1, 0.2], []), "positives: query 0 has none"),
    (lambda: average_precision([[0.1, 0.2], [0.3, 0.4]], [[True, False], [False, False]]),
     "positives: query 1 has none"),
    (lambda: average_precision([0.1, 0.2], [True, False, True]), "positives: boolean mask of shape"),
    (lambda: average_precision([0.1, 0.2], [0.5]), "positives: dtype"),
    (lambda: average_precision(np.zeros((3, 4)), np.zeros((2, 1), dtype=int)), "positives: index array"),
    (lambda: recall_at_k([0.1, 0.2], [0], k=0), r"k: 0 must be an int in \[1, 2\]"),
    (lambda: recall_at_k([0.1, 0.2], [0], k=3), "k: 3"),
    (lambda: recall_at_k([0.1, 0.2], [0], k=1.0), "k: 1.0"),
    (lambda: mean_se([]), "values: empty"),
    (lambda: mean_se([1.0, np.inf]), "values: hold NaN or inf"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
