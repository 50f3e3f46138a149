"""hear-eval-kit's scene metrics and the seed statistics (mean, t-distribution 95% interval), in numpy.

Every metric takes `predictions` [n, n_labels] (class probabilities or scores) and `targets` [n, n_labels]
(one-hot or multi-hot) and returns a float. mAP and ROC AUC reproduce scikit-learn's
`average_precision_score` / `roc_auc_score` (macro), which heareval calls, without depending on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Metric = Callable[[np.ndarray, np.ndarray], float]


def _check(predictions: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, targets = np.asarray(predictions, dtype=np.float64), np.asarray(targets)
    if predictions.ndim != 2 or predictions.shape != targets.shape:
        raise ValueError(f"expected two [n, n_labels] arrays, got {predictions.shape} and {targets.shape}")
    if len(predictions) == 0:
        raise ValueError("no examples to score")
    return predictions, targets


def top1_acc(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of examples whose highest-scoring class is the target class."""
    predictions, targets = _check(predictions, targets)
    return float(np.mean(predictions.argmax(1) == targets.argmax(1)))


def chroma_acc(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Top-1 accuracy up to octave errors: class indices compared modulo 12 (NSynth pitch labels)."""
    predictions, targets = _check(predictions, targets)
    return float(np.mean(predictions.argmax(1) % 12 == targets.argmax(1) % 12))


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of one class (Mann-Whitney form, ties count one half); NaN if one class is absent."""
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = _ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of one class: sum over distinct thresholds of (R_k - R_k-1) * P_k.

    A class without positives scores 0, as in current scikit-learn (recall set to one everywhere).
    """
    positive = positive.astype(bool)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, hits = scores[order], positive[order]
    # Examples with equal scores form one threshold: evaluate precision/recall at each group's end.
    ends = np.r_[np.nonzero(np.diff(sorted_scores))[0], len(scores) - 1]
    tp = np.cumsum(hits)[ends]
    precision = tp / (ends + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro average precision over classes (each class weighs the same, whatever its prior)."""
    predictions, targets = _check(predictions, targets)
    ap = [binary_average_precision(predictions[:, c], targets[:, c]) for c in range(targets.shape[1])]
    return float(np.mean(ap))


def _per_class_auc(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array([binary_auc(predictions[:, c], targets[:, c]) for c in range(targets.shape[1])])


def aucroc(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro ROC AUC; NaN if any class lacks positives or negatives (scikit-learn raises, heareval → NaN)."""
    auc = _per_class_auc(*_check(predictions, targets))
    return math.nan if np.isnan(auc).any() else float(auc.mean())


def d_prime(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro mean of sqrt(2) * Phi^-1(AUC) per class; NaN as for `aucroc`, +inf if a class has AUC 1."""
    auc = _per_class_auc(*_check(predictions, targets))
    if np.isnan(auc).any():
        return math.nan
    z = torch.special.ndtri(torch.from_numpy(auc)).numpy()  # inverse normal CDF, ±inf at 0 and 1
    return float(np.mean(z * math.sqrt(2.0)))


# heareval's `available_scores` for scene tasks; pitch_acc is top-1 accuracy under another name.
METRICS: dict[str, Metric] = {
    "top1_acc": top1_acc,
    "pitch_acc": top1_acc,
    "chroma_acc": chroma_acc,
    "mAP": mean_average_precision,
    "d_prime": d_prime,
    "aucroc": aucroc,
}

# Metrics that are fractions, shown x100 in tables (as papers do); d_prime is shown as is.
PERCENT_METRICS = frozenset({"top1_acc", "pitch_acc", "chroma_acc", "mAP", "aucroc"})


def metric(name: str) -> Metric:
    """The metric function called `name` in task_metadata.json's `evaluation` list."""
    if name not in METRICS:
        raise KeyError(f"unsupported metric {name!r}; scene metrics are {sorted(METRICS)}")
    return METRICS[name]


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df (Abramowitz & Stegun 26.7.3-4, exact finite series)."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom; scipy's value if available."""
    try:
        from scipy import stats

        return float(stats.t.ppf(p, df))
    except ModuleNotFoundError:
        pass
    target = 2 * p - 1
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < target:
        hi *= 2
    for _ in range(200):  # bisection to machine precision
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def mean_ci95(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of the 95% t interval (t_0.975,N-1 * s / sqrt(N)); None for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("no values")
    if len(x) == 1:
        return float(x[0]), None
    with np.errstate(invalid="ignore"):  # an infinite d_prime gives a NaN interval, not a warning
        spread = x.std(ddof=1)
    return float(x.mean()), float(t_quantile(0.975, len(x) - 1) * spread / math.sqrt(len(x)))
