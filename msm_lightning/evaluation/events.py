"""Sound event detection in the HEAR protocol: frame probabilities to events, and heareval's event metrics.

hear-eval-kit (2021.1.3) scores event tasks on events, not frames. Its probe predicts label probabilities
at every embedding timestamp; per file these are median filtered over time, thresholded at 0.5, and every
run of consecutive active timestamps of a label becomes an event from the run's first timestamp to its last,
kept if it lasts at least `min_duration` ms (`create_events_from_prediction`). The median filter width and
the minimum duration form a small grid (`EVENT_POSTPROCESSING_GRID`, or the task's
`evaluation_params.event_postprocessing_grid`) whose best point on the validation split is kept.

The metrics are sed_eval's (`heareval/score.py`, `available_scores`), computed file by file over the files
that have predictions and summed over files (sed_eval's overall, micro-averaged counts):

- `event_onset_200ms_fms`, `event_onset_50ms_fms`: event-based F-measure, an estimated event counting as
  correct when its label matches and its onset is within 200 / 50 ms of a reference onset, events paired
  one to one by a maximum bipartite matching (sed_eval's `event_matching_type="optimal"`);
- `event_onset_offset_50ms_20perc_fms`: as above, and the offset within max(50 ms, 20 % of the reference
  event's length) of the reference offset;
- `segment_1s_er`: segment-based error rate on 1 s segments, (S + D + I) / N over segments and files, the
  segments of a file reaching its last reference or estimated offset. Lower is better.

They are written here in numpy and scipy (sed_eval loops in Python over every pair of events, too slow to
score the validation split at every check) and `tests/test_events.py` checks them against sed_eval itself,
including its NaN cases: precision is NaN without estimated events, recall without reference events.
The protocol scores with sed_eval's `empty_system_output_handling="zero_score"` (`empty_output_zero`):
a probe that predicts no event at all gets an F-measure of 0, where heareval (sed_eval's default) reports
NaN, a value no table can rank; heareval itself counts that NaN as 0 when it picks the postprocessing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import median_filter
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

Event = dict[str, Any]  # {"label": str, "start": ms, "end": ms}, as in hearpreprocess's `{split}.json`
EventLists = Mapping[str, Sequence[Event]]  # file name -> its events
# One point of the postprocessing grid as heareval keeps it: (name, value) pairs in sorted name order.
Postprocessing = tuple[tuple[str, float], ...]

THRESHOLD = 0.5
# heareval's EVENT_POSTPROCESSING_GRID ("good for dcase"); tasks may bring their own.
EVENT_POSTPROCESSING_GRID: dict[str, list[float]] = {"median_filter_ms": [250], "min_duration": [125, 250]}
POSTPROCESSING_KEYS = ("median_filter_ms", "min_duration", "threshold")
# sed_eval divides its counts by N + eps in the error rates, so N = 0 gives a huge rate, not a division error.
_EPS = float(np.spacing(1))


@dataclass(frozen=True)
class EventMetric:
    """One of heareval's sed_eval scores: which sed_eval metric, its parameters and its direction."""

    name: str
    segment_based: bool  # SegmentBasedMetrics (error rate) rather than EventBasedMetrics (F-measure)
    maximise: bool
    t_collar: float = 0.2  # seconds
    evaluate_offset: bool = False
    percentage_of_length: float = 0.5
    time_resolution: float = 1.0  # seconds, segment-based only

    @property
    def primary(self) -> str:
        """The sub-score heareval reports as the metric's value (the first it lists)."""
        return "error_rate" if self.segment_based else "f_measure"


# heareval's event scores (heareval/score.py `available_scores`) with the parameters it passes to sed_eval.
EVENT_METRICS: dict[str, EventMetric] = {
    m.name: m
    for m in (
        EventMetric("event_onset_200ms_fms", segment_based=False, maximise=True, t_collar=0.2),
        EventMetric("event_onset_50ms_fms", segment_based=False, maximise=True, t_collar=0.05),
        EventMetric(
            "event_onset_offset_50ms_20perc_fms",
            segment_based=False,
            maximise=True,
            t_collar=0.05,
            evaluate_offset=True,
            percentage_of_length=0.2,
        ),
        EventMetric("segment_1s_er", segment_based=True, maximise=False, time_resolution=1.0),
    )
}


def event_metric(name: str) -> EventMetric:
    """The event metric called `name` in task_metadata.json's `evaluation` list."""
    if name not in EVENT_METRICS:
        raise KeyError(f"unsupported event metric {name!r}; event metrics are {sorted(EVENT_METRICS)}")
    return EVENT_METRICS[name]


# ---------------------------------------------------------------------------------------- postprocessing


def postprocessing_grid(metadata: Mapping[str, Any]) -> list[Postprocessing]:
    """The task's postprocessing points in scikit-learn's ParameterGrid order (sorted keys, last fastest)."""
    grid = metadata.get("evaluation_params", {}).get("event_postprocessing_grid", EVENT_POSTPROCESSING_GRID)
    unknown = sorted(set(grid) - set(POSTPROCESSING_KEYS))
    if unknown or not grid:
        raise ValueError(
            f"event_postprocessing_grid: unknown keys {unknown}; known {list(POSTPROCESSING_KEYS)}"
        )
    keys = sorted(grid)
    values = [[float(v) for v in grid[k]] for k in keys]
    if not all(values):
        raise ValueError(f"event_postprocessing_grid: every key needs a value, got {dict(grid)}")
    return [tuple(zip(keys, point, strict=True)) for point in itertools.product(*values)]


def frames_to_events(
    probs: np.ndarray, timestamps: np.ndarray, labels: Sequence[str], postprocessing: Postprocessing
) -> list[Event]:
    """Events of one file from its frame probabilities [T, n_labels] at sorted timestamps [T] (ms).

    heareval's rule: median filter over round(median_filter_ms / mean hop) frames (scipy, reflecting at
    the ends; skipped below one frame or with a single timestamp), then > threshold, then each run of
    active frames from its first to its last timestamp if that lasts at least min_duration ms; events
    sorted by start, label by label.
    """
    params = dict(postprocessing)
    threshold = params.get("threshold", THRESHOLD)
    min_duration = params.get("min_duration", 0.0)
    median_ms = params.get("median_filter_ms", 0.0)
    if median_ms and len(timestamps) > 1:  # heareval divides by a NaN hop on a single timestamp
        width = round(median_ms / float(np.mean(np.diff(timestamps))))  # half to even, as heareval's
        if width:
            probs = median_filter(probs, size=(width, 1))
    active = np.asarray(probs) > threshold
    events: list[Event] = []
    for k, label in enumerate(labels):
        edges = np.diff(np.concatenate([[0], active[:, k].astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
        for first, last in zip(starts, stops, strict=True):
            start, end = float(timestamps[first]), float(timestamps[last])
            if end - start >= min_duration:
                events.append({"label": label, "start": start, "end": end})
    events.sort(key=lambda e: e["start"])  # stable: equal starts keep the label order
    return events


# ----------------------------------------------------------------------------------------------- metrics


def _by_label(events: Sequence[Event]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """label -> (onsets, offsets) in seconds, converted as heareval does before calling sed_eval."""
    grouped: dict[str, tuple[list[float], list[float]]] = {}
    for e in events:
        onsets, offsets = grouped.setdefault(str(e["label"]), ([], []))
        onsets.append(e["start"] / 1000.0)
        offsets.append(e["end"] / 1000.0)
    return {
        k: (np.array(on, dtype=np.float64), np.array(off, dtype=np.float64))
        for k, (on, off) in grouped.items()
    }


def _matches(hits: np.ndarray) -> int:
    """Size of a maximum one-to-one matching of reference rows to estimated columns."""
    if not hits.any():
        return 0
    if (hits.sum(0) <= 1).all() or (hits.sum(1) <= 1).all():
        return int(min(hits.any(1).sum(), hits.any(0).sum()))  # no event competes for two partners
    return int((maximum_bipartite_matching(csr_matrix(hits), perm_type="column") >= 0).sum())


def _event_based(
    metric: EventMetric, estimated: EventLists, reference: EventLists, empty_output_zero: bool
) -> dict[str, float]:
    n_ref = n_sys = n_tp = 0
    for name, est_events in estimated.items():
        ref_events = reference.get(name, [])
        n_ref, n_sys = n_ref + len(ref_events), n_sys + len(est_events)
        est_by_label = _by_label(est_events)
        for label, (ref_on, ref_off) in _by_label(ref_events).items():
            if label not in est_by_label:
                continue
            est_on, est_off = est_by_label[label]
            hits = np.abs(ref_on[:, None] - est_on[None, :]) <= metric.t_collar
            if metric.evaluate_offset:
                tolerance = np.maximum(metric.t_collar, metric.percentage_of_length * (ref_off - ref_on))
                hits &= np.abs(ref_off[:, None] - est_off[None, :]) <= tolerance[:, None]
            n_tp += _matches(hits)
    empty = 0.0 if empty_output_zero else math.nan
    precision = empty if n_sys == 0 else n_tp / n_sys
    recall = math.nan if n_ref == 0 else n_tp / n_ref
    f_measure = 0.0 if precision == 0 and recall == 0 else 2.0 * precision * recall / (precision + recall)
    return {"f_measure": f_measure, "precision": precision, "recall": recall}


def _segment_roll(
    events: Sequence[Event], n_segments: int, columns: Mapping[str, int], res: float
) -> np.ndarray:
    roll = np.zeros((n_segments, len(columns)), dtype=bool)
    for e in events:
        label = str(e["label"])
        if label not in columns:
            raise ValueError(f"event label {label!r} is not in the label vocabulary {sorted(columns)}")
        first, stop = math.floor(e["start"] / 1000.0 / res), math.ceil(e["end"] / 1000.0 / res)
        roll[first:stop, columns[label]] = True
    return roll


def _segment_based(
    metric: EventMetric, estimated: EventLists, reference: EventLists, labels: Sequence[str]
) -> dict[str, float]:
    columns = {str(label): i for i, label in enumerate(labels)}
    res = metric.time_resolution
    n_ref = subs = dels = ins = 0
    for name, est_events in estimated.items():
        ref_events = reference.get(name, [])
        # sed_eval evaluates a file up to its last offset, reference or estimated (0 s without events).
        last = max([0.0] + [e["end"] / 1000.0 for e in (*ref_events, *est_events)])
        n_segments = math.ceil(last / res)
        ref = _segment_roll(ref_events, n_segments, columns, res)
        est = _segment_roll(est_events, n_segments, columns, res)
        per_ref, per_sys, per_tp = ref.sum(1), est.sum(1), (ref & est).sum(1)
        subs += int((np.minimum(per_ref, per_sys) - per_tp).sum())
        dels += int(np.maximum(0, per_ref - per_sys).sum())
        ins += int(np.maximum(0, per_sys - per_ref).sum())
        n_ref += int(per_ref.sum())
    rates = {
        "substitution_rate": subs / (n_ref + _EPS),
        "deletion_rate": dels / (n_ref + _EPS),
        "insertion_rate": ins / (n_ref + _EPS),
    }
    error_rate = rates["substitution_rate"] + rates["deletion_rate"] + rates["insertion_rate"]
    return {"error_rate": error_rate, **rates}


def event_scores(
    name: str,
    estimated: EventLists,
    reference: EventLists,
    labels: Sequence[str],
    empty_output_zero: bool = False,
) -> dict[str, float]:
    """sed_eval's overall scores of metric `name`, primary first, over the files of `estimated`.

    `estimated` and `reference` map file names to events in ms; reference files without estimated events
    must be present in `estimated` with an empty list to count (heareval scores every file it predicted).
    `empty_output_zero`: sed_eval's `empty_system_output_handling="zero_score"` (precision 0, not NaN,
    without estimated events; it changes no error rate).
    """
    metric = event_metric(name)
    if metric.segment_based:
        return _segment_based(metric, estimated, reference, labels)
    return _event_based(metric, estimated, reference, empty_output_zero)


def event_score(
    name: str,
    estimated: EventLists,
    reference: EventLists,
    labels: Sequence[str],
    empty_output_zero: bool = False,
) -> float:
    """The value heareval reports for metric `name`: its primary sub-score."""
    return event_scores(name, estimated, reference, labels, empty_output_zero)[event_metric(name).primary]


# ------------------------------------------------------------------------------------- scoring a split


class EventScorer:
    """Scores one split's frame probabilities as events: every file's frames, reference events and labels.

    Scores count an empty system output as 0 (sed_eval's "zero_score"), as the protocol reports them.
    """

    def __init__(
        self,
        files: Sequence[str],
        timestamps: np.ndarray,
        reference: EventLists,
        labels: Sequence[str],
        grid: Sequence[Postprocessing],
    ) -> None:
        """`files[i]` and `timestamps[i]` (ms) say where row i of the split's probabilities comes from."""
        if len(files) != len(timestamps):
            raise ValueError(f"{len(files)} file names but {len(timestamps)} timestamps")
        if not grid:
            raise ValueError("the postprocessing grid has no point")
        self.labels, self.reference, self.grid = list(labels), reference, list(grid)
        timestamps = np.asarray(timestamps, dtype=np.float64)
        names, codes = np.unique(np.asarray(files, dtype=object).astype(str), return_inverse=True)
        order = np.lexsort((timestamps, codes))  # by file, then by time within the file
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        self.rows = {str(names[codes[g[0]]]): g for g in np.split(order, bounds) if len(g)}
        self.timestamps = timestamps

    def events(self, probs: np.ndarray, postprocessing: Postprocessing) -> dict[str, list[Event]]:
        """Events of every file of the split from its probabilities [n_rows, n_labels]."""
        return {
            name: frames_to_events(probs[rows], self.timestamps[rows], self.labels, postprocessing)
            for name, rows in self.rows.items()
        }

    def scores(self, metric: str, probs: np.ndarray, postprocessing: Postprocessing) -> dict[str, float]:
        """Every sub-score of `metric` on the split after `postprocessing`."""
        events = self.events(probs, postprocessing)
        return event_scores(metric, events, self.reference, self.labels, empty_output_zero=True)

    def choose(self, metric: str, probs: np.ndarray) -> tuple[Postprocessing, float]:
        """The grid point with the best value of `metric` on this split, and that value.

        As heareval: a NaN score counts as 0 and of equal scores the greater point wins (heareval sorts
        (score, point) pairs in reverse, points being tuples of (name, value) pairs). Unlike heareval, an
        error rate is minimised (its reverse sort would keep the highest; no HEAR task has one as primary).
        """
        sign = 1.0 if event_metric(metric).maximise else -1.0
        scored = []
        for point in self.grid:
            value = event_score(metric, self.events(probs, point), self.reference, self.labels, True)
            scored.append((sign * (0.0 if math.isnan(value) else value), point))
        signed, point = max(scored)
        return point, sign * signed
