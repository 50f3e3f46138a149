"""Event tasks: heareval's postprocessing, sed_eval's metrics, the timestamp protocol, mixed score tables."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import random
import sys
import types
from collections import ChainMap
from pathlib import Path

import numpy as np
import pytest
import torch

from msm_lightning.datasets.synth_tasks import events_task
from msm_lightning.evaluation import score
from msm_lightning.evaluation.events import (
    EVENT_POSTPROCESSING_GRID,
    EventScorer,
    event_scores,
    frames_to_events,
    postprocessing_grid,
)
from msm_lightning.evaluation.protocol import ProtocolSettings, evaluate_all
from msm_lightning.evaluation.taskdata import EmbeddingFormatError, load_task
from msm_lightning.hear.embed import embed_tasks

LABELS = ["a", "b", "c"]
# The scores and sed_eval parameters of heareval/score.py's `available_scores`, written out independently
# of events.EVENT_METRICS so that a wrong parameter there fails the comparison.
HEAREVAL_SCORES = {
    "event_onset_200ms_fms": ("event", {"evaluate_onset": True, "evaluate_offset": False, "t_collar": 0.2}),
    "event_onset_50ms_fms": ("event", {"evaluate_onset": True, "evaluate_offset": False, "t_collar": 0.05}),
    "event_onset_offset_50ms_20perc_fms": (
        "event",
        {"evaluate_onset": True, "evaluate_offset": True, "t_collar": 0.05, "percentage_of_length": 0.2},
    ),
    "segment_1s_er": ("segment", {"time_resolution": 1.0}),
}


@pytest.fixture(autouse=True)
def one_thread():
    """The probes are tiny: one thread avoids contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sed_eval() -> types.ModuleType:
    """sed_eval (a dev dependency). dcase_util, which it imports, imports pkg_resources at import time only,
    for functions the metrics never call; setuptools >= 81 no longer ships it, so an empty stand-in is
    put in place for the import and removed after it."""
    shim = "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None
    if shim:
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    try:
        import sed_eval

        return sed_eval
    finally:
        if shim:
            del sys.modules["pkg_resources"]


def sed_eval_scores(sed_eval, name, estimated, reference, labels, zero_score=False) -> dict[str, float]:
    """heareval's SoundEventScore: sed_eval fed file by file over the predicted files, overall scores."""
    from dcase_util.containers import MetaDataContainer

    def container(events_by_file):
        return MetaDataContainer(
            [
                {
                    "event_label": str(e["label"]),
                    "event_onset": e["start"] / 1000.0,
                    "event_offset": e["end"] / 1000.0,
                    "file": f,
                }
                for f, events in events_by_file.items()
                for e in events
            ]
        )

    kind, params = HEAREVAL_SCORES[name]
    if kind == "segment":
        metrics = sed_eval.sound_event.SegmentBasedMetrics(event_label_list=list(labels), **params)
    else:
        extra = {"empty_system_output_handling": "zero_score"} if zero_score else {}
        metrics = sed_eval.sound_event.EventBasedMetrics(event_label_list=list(labels), **params, **extra)
    ref, est = container(reference), container(estimated)
    for filename in estimated:
        metrics.evaluate(
            reference_event_list=ref.filter(filename=filename),
            estimated_event_list=est.filter(filename=filename),
        )
    return dict(ChainMap(*metrics.results_overall_metrics().values()))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12 * max(1.0, abs(b))


def random_case(rng: random.Random) -> tuple[dict, dict]:
    """Reference and estimated events of a few files: near misses at the collars, substitutions, empties."""

    def events(n):
        out = []
        for _ in range(n):
            start = rng.choice([rng.uniform(0, 5000), round(rng.uniform(0, 5000), -2)])
            out.append(
                {
                    "label": rng.choice(LABELS),
                    "start": start,
                    "end": start + rng.choice([rng.uniform(0, 1500), 0.0, 40.0]),
                }
            )
        return out

    files = [f"f{i}.wav" for i in range(rng.randint(1, 4))]
    reference = {f: events(rng.randint(0, 6)) for f in files}
    estimated = {}
    for f in files:
        guesses = []
        for e in reference[f]:
            if rng.random() < 0.7:
                shift = rng.choice([0.0, 50.0, 200.0, -200.0, 49.999, 200.001, rng.uniform(-300, 300)])
                label = e["label"] if rng.random() < 0.8 else rng.choice(LABELS)
                end = max(e["start"] + shift, e["end"] + rng.choice([0.0, 50.0, rng.uniform(-300, 300)]))
                guesses.append({"label": label, "start": e["start"] + shift, "end": end})
        estimated[f] = guesses + events(rng.randint(0, 3))
    return estimated, reference


def test_metrics_equal_sed_eval_as_heareval_calls_it(sed_eval):
    rng = random.Random(0)
    cases = [random_case(rng) for _ in range(120)]
    cases += [
        ({"x.wav": []}, {"x.wav": [{"label": "a", "start": 0.0, "end": 500.0}]}),  # nothing predicted
        ({"x.wav": [{"label": "a", "start": 0.0, "end": 500.0}]}, {}),  # no reference events
        (
            {"x.wav": [{"label": "a", "start": 1200.0, "end": 1500.0}]},
            {"x.wav": [{"label": "a", "start": 1000.0, "end": 1500.0}]},
        ),
    ]
    for estimated, reference in cases:
        for name in HEAREVAL_SCORES:
            ours = event_scores(name, estimated, reference, LABELS)
            theirs = sed_eval_scores(sed_eval, name, estimated, reference, LABELS)
            assert next(iter(ours)) == ("error_rate" if name == "segment_1s_er" else "f_measure")
            for key, value in ours.items():
                assert same(value, theirs[key]), (name, key, value, theirs[key], estimated, reference)
            if name != "segment_1s_er":
                ours = event_scores(name, estimated, reference, LABELS, empty_output_zero=True)
                theirs = sed_eval_scores(sed_eval, name, estimated, reference, LABELS, zero_score=True)
                assert all(same(v, theirs[k]) for k, v in ours.items()), (name, ours, theirs)


def test_onset_f_measure_by_hand():
    reference = {
        "x.wav": [
            {"label": "a", "start": 1000.0, "end": 2000.0},
            {"label": "b", "start": 3000.0, "end": 3500.0},
        ]
    }
    estimated = {
        "x.wav": [
            {"label": "a", "start": 1150.0, "end": 1300.0},
            {"label": "a", "start": 3000.0, "end": 3500.0},
        ]
    }
    scores = event_scores("event_onset_200ms_fms", estimated, reference, ["a", "b"])
    assert scores == {"f_measure": 0.5, "precision": 0.5, "recall": 0.5}
    # The same onset within 50 ms only with a 50 ms collar; with offsets, 1300 is far from 2000.
    assert event_scores("event_onset_50ms_fms", estimated, reference, ["a", "b"])["f_measure"] == 0.0
    # Segments 1 (a), 3 (b) are annotated; a is found in 1 and, wrongly, in 3: one substitution in 2.
    assert event_scores("segment_1s_er", estimated, reference, ["a", "b"])["error_rate"] == pytest.approx(0.5)


def test_frames_to_events_follow_heareval():
    stamps = 15.0 + 40.0 * np.arange(30)
    probs = np.zeros((30, 2))
    probs[5:15, 0] = 0.9  # 10 frames: 215 ms to 575 ms
    probs[20, 0] = 0.9  # one frame: lasts 0 ms
    probs[22:25, 1] = 0.6  # three frames: 80 ms
    probs[26:28, 1] = 0.5  # not above the threshold
    raw = frames_to_events(probs, stamps, ["a", "b"], (("median_filter_ms", 0.0), ("min_duration", 0.0)))
    assert raw == [
        {"label": "a", "start": 215.0, "end": 575.0},
        {"label": "a", "start": 815.0, "end": 815.0},
        {"label": "b", "start": 895.0, "end": 975.0},
    ]
    kept = frames_to_events(probs, stamps, ["a", "b"], (("median_filter_ms", 0.0), ("min_duration", 125.0)))
    assert kept == raw[:1]
    # A 250 ms median filter (6 frames at a 40 ms hop) removes the single frame and keeps the long event.
    smooth = frames_to_events(probs, stamps, ["a", "b"], (("median_filter_ms", 250.0), ("min_duration", 0.0)))
    assert [e["label"] for e in smooth] == ["a", "b"] and abs(smooth[0]["start"] - 215.0) <= 80


def test_postprocessing_grid_is_heareval_s_unless_the_task_sets_one():
    assert EVENT_POSTPROCESSING_GRID == {"median_filter_ms": [250], "min_duration": [125, 250]}
    assert postprocessing_grid({}) == [
        (("median_filter_ms", 250.0), ("min_duration", 125.0)),
        (("median_filter_ms", 250.0), ("min_duration", 250.0)),
    ]
    maestro = {
        "evaluation_params": {"event_postprocessing_grid": {"median_filter_ms": [150], "min_duration": [50]}}
    }
    assert postprocessing_grid(maestro) == [(("median_filter_ms", 150.0), ("min_duration", 50.0))]
    with pytest.raises(ValueError, match="unknown keys"):
        postprocessing_grid({"evaluation_params": {"event_postprocessing_grid": {"smoothing": [1]}}})
    with pytest.raises(ValueError, match="every key needs a value"):
        postprocessing_grid({"evaluation_params": {"event_postprocessing_grid": {"min_duration": []}}})


def test_the_best_postprocessing_wins_and_ties_go_to_the_greater_point():
    stamps = 15.0 + 40.0 * np.arange(25)
    probs = np.zeros((25, 1))
    probs[5:10, 0] = 0.9  # 160 ms: kept by min_duration 125, dropped by 250
    reference = {"x.wav": [{"label": "a", "start": 200.0, "end": 380.0}]}
    grid = postprocessing_grid({})
    scorer = EventScorer(["x.wav"] * 25, stamps, reference, ["a"], grid)
    assert scorer.choose("event_onset_200ms_fms", probs) == (grid[0], 1.0)
    # Nothing predicted: both points score 0 (not NaN) and the greater point is kept, as heareval's sort does.
    assert scorer.choose("event_onset_200ms_fms", np.zeros((25, 1))) == (grid[1], 0.0)
    # An error rate is minimised.
    point, error = scorer.choose("segment_1s_er", probs)
    assert point == grid[0] and error == pytest.approx(0.0)


def shuffle_rows(task_dir: Path, seed: int = 0) -> None:
    """Permute the embedding rows of every split: labels and timestamps stay, the information goes."""
    rng = np.random.default_rng(seed)
    for split in ("train", "valid", "test"):
        n, dim = json.loads((task_dir / f"{split}.embedding-dimensions.json").read_text())
        rows = np.memmap(task_dir / f"{split}.embeddings.npy", dtype=np.float32, mode="r+", shape=(n, dim))
        rows[:] = rows[rng.permutation(n)]
        rows.flush()
        del rows


def test_known_good_embedding_scores_near_one_and_a_shuffled_one_does_not(tmp_path):
    events_task(tmp_path / "tasks", seed=0, clips_per_split=(12, 4, 4))
    # The log-mel baseline is frame energy per mel band: tones and noise bursts are plain to see in it.
    (emb,) = embed_tasks("hear_modules.logmel", tmp_path / "tasks", tmp_path / "emb")

    # msm embed wrote heareval's timestamp layout; each row's labels are the events active at its timestamp.
    task = load_task(emb)
    assert task.embedding_type == "event" and set(task.frames) == {"train", "valid", "test"}
    with (emb / "test.target-labels.pkl").open("rb") as f:
        row_labels = pickle.load(f)
    frames = task.frames["test"]
    for labels, name, t in zip(row_labels, frames.files, frames.timestamps, strict=True):
        active = {e["label"] for e in frames.events[name] if e["start"] <= t < e["end"] + 0.0001}
        assert set(labels) == active
    assert sorted(set(frames.files)) == sorted(json.loads((emb / "test.json").read_text()))

    settings = ProtocolSettings(grid="restricted", grid_points=1, max_epochs=45)
    _, good = evaluate_all(
        emb, tmp_path / "results", model="logmel", seeds=[0], protocol=settings, echo=print
    )
    entry = good["synth-events"]
    assert entry["primary_metric"] == "event_onset_200ms_fms" and entry["embedding_type"] == "event"
    assert entry["higher_is_better"] is True
    assert entry["chosen_postprocessing"][0][0] in entry["postprocessing_grid"]
    assert entry["mean"] >= 0.9
    assert entry["test_metrics"]["segment_1s_er"]["mean"] <= 0.2
    saved = json.loads((tmp_path / "results" / "logmel.json").read_text())["tasks"]["synth-events"]
    assert saved["mean"] == entry["mean"]

    shuffle_rows(emb)
    _, bad = evaluate_all(
        emb, tmp_path / "results", model="shuffled", seeds=[0], protocol=settings, echo=print
    )
    assert bad["synth-events"]["mean"] < 0.5
    assert bad["synth-events"]["test_metrics"]["segment_1s_er"]["mean"] > 0.5


def test_event_frames_must_match_the_rows(tmp_path):
    events_task(tmp_path / "tasks", seed=1, clips_per_split=(2, 1, 1))
    (emb,) = embed_tasks("hear_modules.logmel", tmp_path / "tasks", tmp_path / "emb")
    pairs_path = emb / "valid.filename-timestamps.json"
    pairs = json.loads(pairs_path.read_text())
    pairs_path.write_text(json.dumps(pairs[:-1]))
    with pytest.raises(EmbeddingFormatError, match=r"valid\.filename-timestamps\.json.*pairs but"):
        load_task(emb)
    pairs_path.write_text(json.dumps([["elsewhere/unknown.wav", t] for _, t in pairs]))
    with pytest.raises(EmbeddingFormatError, match=r"not in valid\.json.*unknown\.wav"):
        load_task(emb)


def entry(name: str, mean: float, per_seed: list[float], metric: str, higher: bool | None = None) -> dict:
    """A task's entry in an `msm evaluate` result, with what `msm score` reads."""
    out = {"task_name": name, "primary_metric": metric, "mean": mean, "ci95": 0.1, "seeds": [0, 1]}
    out["test_scores"] = per_seed
    if higher is not None:
        out["higher_is_better"] = higher
    return out


def test_score_mixes_scene_and_event_tasks_and_lower_error_is_better(tmp_path):
    results = {
        "A": {
            "tasks": {
                "scene": entry("scene", 0.9, [0.9, 0.9], "top1_acc"),
                "events": entry("events", 0.2, [0.1, 0.3], "segment_1s_er", False),
            }
        },
        "B": {
            "tasks": {
                "scene": entry("scene", 0.5, [0.5, 0.5], "top1_acc"),
                "events": entry("events", 0.6, [0.6, 0.6], "segment_1s_er", False),
            }
        },
        "C": {
            "tasks": {
                "scene": entry("scene", 0.7, [0.7, 0.7], "top1_acc"),
                "events": entry("events", 0.4, [0.4, 0.4], "segment_1s_er", False),
            }
        },
    }
    c = score.compare(results)
    # A is best on both (lowest error rate); C is half way on both; B is worst on both.
    assert c.s == pytest.approx({"A": 100.0, "B": 0.0, "C": 50.0})
    assert c.s_method["A"] == "per-seed"
    table = score.markdown(c)
    assert "events (segment_1s_er, lower is better)" in table and "scene (top1_acc)" in table
    assert table.index("| A |") < table.index("| C |") < table.index("| B |")
    results["B"]["tasks"]["events"]["higher_is_better"] = True
    with pytest.raises(ValueError, match="disagree"):
        score.compare(results)
