"""Scene metrics and seed statistics: heareval's values (scikit-learn's and scipy's) and its edge cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from msm_lightning.evaluation.metrics import (
    aucroc,
    chroma_acc,
    d_prime,
    mean_average_precision,
    mean_ci95,
    metric,
    t_quantile,
    top1_acc,
)


def test_accuracies():
    p = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    y = np.array([[0, 1], [0, 1], [0, 1]])
    assert top1_acc(p, y) == pytest.approx(2 / 3)
    assert metric("pitch_acc") is top1_acc
    # 24 pitches: 14 vs 2 is an octave error (right chroma), 3 vs 2 is wrong.
    p, y = np.zeros((2, 24)), np.zeros((2, 24))
    p[0, 14] = p[1, 3] = 1
    y[0, 2] = y[1, 2] = 1
    assert chroma_acc(p, y) == 0.5
    assert top1_acc(p, y) == 0.0


def test_average_precision_and_auc_by_hand():
    scores, pos = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    column = (scores[:, None], pos[:, None])
    assert mean_average_precision(*column) == pytest.approx((1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert aucroc(*column) == pytest.approx(3 / 4)  # 3 of 4 positive/negative pairs ordered
    # Ties form one threshold: at 0.5, P=1/2 R=1/2; at 0.2, P=2/3 R=1.
    tied = (np.array([[0.5], [0.5], [0.2]]), np.array([[1], [0], [1]]))
    assert mean_average_precision(*tied) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert aucroc(*tied) == pytest.approx(0.25)  # one tie (1/2) and one loss out of 2 pairs
    p = np.stack([scores, scores[::-1]], 1)
    y = np.stack([pos, pos[::-1]], 1)
    assert mean_average_precision(p, y) == pytest.approx((1 + 2 / 3) / 2)
    assert aucroc(p, y) == pytest.approx(0.75)
    assert d_prime(p, y) == pytest.approx(math.sqrt(2) * 0.6744897501960817)  # Phi^-1(0.75)


def test_edge_cases_as_heareval_scores_them():
    scores, pos = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])
    p = np.stack([scores, scores[::-1]], 1)
    y_none = np.stack([pos, np.zeros(4)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the documented outcomes below come without warnings
        # A class without positives: AUC undefined (NaN, as heareval), AP 0 (current scikit-learn).
        assert math.isnan(aucroc(p, y_none)) and math.isnan(d_prime(p, y_none))
        assert mean_average_precision(p, y_none) == pytest.approx((1 + 2 / 3) / 4)
        # A perfectly ranked class has AUC 1, so d' is infinite.
        perfect = np.stack([pos, pos], 1)
        assert d_prime(perfect.astype(float), perfect) == math.inf
    with pytest.raises(ValueError, match="expected two"):
        top1_acc(np.zeros((3, 2)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="no examples"):
        aucroc(np.zeros((0, 2)), np.zeros((0, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_definitions_on_random_scores(seed):
    """Without ties: AP = mean over positives of the precision at its rank; AUC = ordered pair fraction."""
    rng = np.random.default_rng(seed)
    p = rng.random((60, 5))
    y = (rng.random((60, 5)) < 0.3).astype(np.float32)
    y[0] = 1  # every class has a positive ...
    y[1] = 0  # ... and a negative
    ap, auc = [], []
    for c in range(5):
        order = np.argsort(-p[:, c])
        hits = y[order, c].astype(bool)
        ranks = np.nonzero(hits)[0] + 1
        ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        positive, negative = p[y[:, c] == 1, c], p[y[:, c] == 0, c]
        auc.append(np.mean(positive[:, None] > negative[None, :]))
    assert mean_average_precision(p, y) == pytest.approx(np.mean(ap), rel=1e-12)
    assert aucroc(p, y) == pytest.approx(np.mean(auc), rel=1e-12)
    assert d_prime(p, y) == pytest.approx(np.mean(math.sqrt(2) * norm.ppf(auc)), rel=1e-12)


def test_t_interval():
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047, abs=1e-6)
    assert t_quantile(0.975, 2) == pytest.approx(4.3026527, abs=1e-6)
    assert t_quantile(0.975, 9) == pytest.approx(2.2621572, abs=1e-6)
    mean, ci = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.3026527 / math.sqrt(3), abs=1e-6)
    assert mean_ci95([0.7]) == (0.7, None)
    assert math.isnan(mean_ci95([1.0, math.inf])[1])  # an infinite d' gives no interval
