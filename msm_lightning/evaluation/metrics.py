"""hear-eval-kit's scene metrics and the seed statistics (mean, t-distribution 95% interval).

Every metric takes `predictions` [n, n_labels] (class probabilities or scores) and `targets` [n, n_labels]
(one-hot or multi-hot) and returns a float. mAP, ROC AUC and d' make heareval's own calls:
scikit-learn's `average_precision_score` / `roc_auc_score` (macro over classes) and scipy's normal
quantile; the t quantile of the interval is scipy's too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import average_precision_score, roc_auc_score

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


def mean_average_precision(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro average precision: each class weighs the same, whatever its prior.

    A class without positives scores 0 (scikit-learn >= 1.1; earlier versions made the whole mAP NaN).
    """
    predictions, targets = _check(predictions, targets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        return float(average_precision_score(targets, predictions, average="macro"))


def _per_class_auc(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """ROC AUC of every class; all NaN when a class lacks positives or negatives, as heareval scores it."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UndefinedMetricWarning)
            auc = roc_auc_score(targets, predictions, average=None)
    except ValueError:  # older scikit-learn raises where newer versions warn and return NaN
        return np.full(targets.shape[1], math.nan)
    return np.atleast_1d(np.asarray(auc, dtype=np.float64))


def aucroc(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro ROC AUC; NaN if any class lacks positives or negatives (heareval's value there)."""
    auc = _per_class_auc(*_check(predictions, targets))
    return math.nan if np.isnan(auc).any() else float(auc.mean())


def d_prime(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Macro mean of sqrt(2) * Phi^-1(AUC) per class; NaN as for `aucroc`, +inf if a class has AUC 1."""
    auc = _per_class_auc(*_check(predictions, targets))
    if np.isnan(auc).any():
        return math.nan
    return float(np.mean(stats.norm.ppf(auc) * math.sqrt(2.0)))


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


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    return float(stats.t.ppf(p, df))


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
