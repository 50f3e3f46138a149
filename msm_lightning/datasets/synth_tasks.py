"""Small, learnable synthetic HEAR tasks (hearpreprocess layout) for examples and tests.

`synth-texture` (train/valid/test): which kind of sound a 2 s clip is (tone, chord, chirp, noise, clicks).
`synth-pitch` (4 folds): the pitch class of a 1 s harmonic tone over three octaves and random timbres.
`synth-events` (train/valid/test, an event task like DCASE 2016 Task 2): when harmonic tones and noise
bursts start and stop in 3 s clips, two or three events per clip at known onsets, scored with heareval's
onset F-measure (200 ms collar), segment error rate (1 s) and onset-offset F-measure (50 ms, 20 %).
Real-audio tasks come from `msm data`; these exist so the whole HEAR path runs anywhere in minutes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from msm_lightning.datasets.synth import _KINDS, _envelope, _harmonic, _signal
from msm_lightning.hear.layout import (
    NEW_SPLIT_KFOLD,
    TRAIN_VALID_TEST,
    TRAINVALTEST,
    audio_dir,
    fold_names,
    write_metadata,
    write_split_labels,
    write_task_files,
    write_vocabulary,
)

SAMPLE_RATE = 16000
PITCH_CLASSES = ("C", "D", "E", "F", "G", "A", "B")
_SEMITONES = (0, 2, 4, 5, 7, 9, 11)
EVENT_KINDS = ("noise", "tone")
EVENT_SECONDS = 3.0
# Events last 400-800 ms with at least 250 ms between them, so that heareval's postprocessing (a 250 ms
# median filter, events of at least 125 or 250 ms) keeps every one a good probe detects.
_EVENT_MS, _GAP_MS, _MARGIN_MS = (400, 800), 250, 100


def write_task(
    task_dir: Path, metadata: dict, labels: dict[str, dict[str, list]], clips: dict[str, np.ndarray]
) -> Path:
    """Write one task: the layout's metadata, vocabulary and `{split}.json` files, and its 16 kHz audio.

    `labels[split][clip]` lists a scene clip's labels, or an event clip's events {"label", "start", "end"}.
    """
    if metadata["embedding_type"] == "event":
        # The layout's task writer takes label lists; an event task's vocabulary is its events' labels.
        for split, split_labels in labels.items():
            write_split_labels(task_dir, split, split_labels)
        write_vocabulary(task_dir, (e["label"] for s in labels.values() for es in s.values() for e in es))
        write_metadata(task_dir, metadata)
    else:
        write_task_files(task_dir, metadata, labels)
    for split, split_labels in labels.items():
        folder = audio_dir(task_dir, split, SAMPLE_RATE)
        folder.mkdir(parents=True, exist_ok=True)
        for name in split_labels:
            sf.write(folder / name, clips[f"{split}/{name}"], SAMPLE_RATE, subtype="PCM_16")
    return task_dir


def _metadata(name: str, splits: list[str], seconds: float) -> dict:
    """hearpreprocess-style metadata of a multiclass scene task."""
    return {
        "task_name": name,
        "version": "synth-1",
        "embedding_type": "scene",
        "prediction_type": "multiclass",
        "split_mode": TRAINVALTEST if splits[0] == "train" else NEW_SPLIT_KFOLD,
        "nfolds": len(splits),
        "sample_duration": seconds,
        "evaluation": ["top1_acc"],
        "splits": splits,
    }


def texture_task(out_dir: Path, seed: int = 0, per_class: tuple[int, int, int] = (24, 8, 8)) -> Path:
    """`synth-texture`: 5 classes of 2 s clips, train/valid/test."""
    rng = np.random.default_rng(seed)
    n = 2 * SAMPLE_RATE
    splits = list(TRAIN_VALID_TEST)
    labels: dict[str, dict[str, list[str]]] = {s: {} for s in splits}
    clips: dict[str, np.ndarray] = {}
    for split, count in zip(splits, per_class, strict=True):
        for kind in _KINDS:
            for i in range(count):
                name = f"{kind}_{i:03d}.wav"
                labels[split][name] = [kind]
                clips[f"{split}/{name}"] = _signal(kind, n, SAMPLE_RATE, rng).astype(np.float32)
    return write_task(out_dir / "synth-texture", _metadata("synth-texture", splits, 2.0), labels, clips)


def pitch_task(out_dir: Path, seed: int = 0, per_class_per_fold: int = 4, n_folds: int = 4) -> Path:
    """`synth-pitch`: pitch class of 1 s harmonic notes (octaves 2-4, random timbre), k folds."""
    rng = np.random.default_rng(seed + 1)
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    splits = fold_names(n_folds)
    labels: dict[str, dict[str, list[str]]] = {s: {} for s in splits}
    clips: dict[str, np.ndarray] = {}
    for split in splits:
        for pitch, semitone in zip(PITCH_CLASSES, _SEMITONES, strict=True):
            for i in range(per_class_per_fold):
                octave = int(rng.integers(2, 5))
                f0 = 440.0 * 2 ** ((12 * (octave + 1) + semitone - 69) / 12)
                x = _harmonic(t, SAMPLE_RATE, f0, rng) * _envelope(t.size, SAMPLE_RATE, rng)
                x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.9)
                name = f"{pitch}{octave}_{i:03d}.wav"
                labels[split][name] = [pitch]
                clips[f"{split}/{name}"] = x.astype(np.float32)
    return write_task(out_dir / "synth-pitch", _metadata("synth-pitch", splits, 1.0), labels, clips)


def _event_times(rng: np.random.Generator, n_events: int) -> list[tuple[int, int]]:
    """(start, end) in whole ms of `n_events` separate events inside a clip, in time order."""
    lengths = rng.integers(*_EVENT_MS, size=n_events, endpoint=True)
    room = int(EVENT_SECONDS * 1000) - 2 * _MARGIN_MS - int(lengths.sum()) - (n_events - 1) * _GAP_MS
    # The free time, split at random between the n + 1 gaps before, between and after the events.
    extra = np.diff(np.concatenate([[0], np.sort(rng.integers(0, room, size=n_events, endpoint=True))]))
    times, t = [], _MARGIN_MS
    for i, (length, pause) in enumerate(zip(lengths, extra, strict=True)):
        t += int(pause) + (_GAP_MS if i else 0)
        times.append((t, t + int(length)))
        t += int(length)
    return times


def _event_sound(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A tone or noise burst of `n` samples with 10 ms fades, so that it starts and stops where annotated."""
    x = _KINDS[kind](np.arange(n) / SAMPLE_RATE, SAMPLE_RATE, rng)
    fade = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (0.01 * SAMPLE_RATE))
    return x * fade / (np.abs(x).max() + 1e-9) * rng.uniform(0.2, 0.8)


def events_task(out_dir: Path, seed: int = 0, clips_per_split: tuple[int, int, int] = (20, 8, 8)) -> Path:
    """`synth-events`: 3 s clips with two or three tone or noise events each, train/valid/test."""
    rng = np.random.default_rng(seed + 2)
    n = int(EVENT_SECONDS * SAMPLE_RATE)
    splits = list(TRAIN_VALID_TEST)
    labels: dict[str, dict[str, list]] = {s: {} for s in splits}
    clips: dict[str, np.ndarray] = {}
    for split, count in zip(splits, clips_per_split, strict=True):
        for i in range(count):
            x = 0.001 * rng.standard_normal(n)  # a quiet floor: no clip is digital silence
            events = []
            for start, end in _event_times(rng, int(rng.integers(2, 3, endpoint=True))):
                kind = str(rng.choice(EVENT_KINDS))
                a, b = start * SAMPLE_RATE // 1000, end * SAMPLE_RATE // 1000
                x[a:b] += _event_sound(kind, b - a, rng)
                events.append({"label": kind, "start": float(start), "end": float(end)})
            name = f"clip_{i:03d}.wav"
            labels[split][name] = events
            clips[f"{split}/{name}"] = np.clip(x, -1.0, 1.0).astype(np.float32)
    metadata = {
        "task_name": "synth-events",
        "version": "synth-1",
        "embedding_type": "event",
        "prediction_type": "multilabel",
        "split_mode": TRAINVALTEST,
        "sample_duration": EVENT_SECONDS,
        "evaluation": ["event_onset_200ms_fms", "segment_1s_er", "event_onset_offset_50ms_20perc_fms"],
        "splits": splits,
    }
    return write_task(out_dir / "synth-events", metadata, labels, clips)


def make_tasks(out_dir: str | Path, seed: int = 0, events: bool = False) -> list[Path]:
    """Write the two scene tasks (and with `events`, the event task too) under `out_dir`; their folders."""
    out = Path(out_dir)
    tasks = [texture_task(out, seed), pitch_task(out, seed)]
    return [*tasks, events_task(out, seed)] if events else tasks
