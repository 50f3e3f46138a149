"""Two small, learnable synthetic HEAR tasks (hearpreprocess layout) for examples and tests.

`synth-texture` (train/valid/test): which kind of sound a 2 s clip is (tone, chord, chirp, noise, clicks).
`synth-pitch` (4 folds): the pitch class of a 1 s harmonic tone over three octaves and random timbres.
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
    write_task_files,
)

SAMPLE_RATE = 16000
PITCH_CLASSES = ("C", "D", "E", "F", "G", "A", "B")
_SEMITONES = (0, 2, 4, 5, 7, 9, 11)


def write_task(
    task_dir: Path, metadata: dict, labels: dict[str, dict[str, list[str]]], clips: dict[str, np.ndarray]
) -> Path:
    """Write one task: the layout's metadata, vocabulary and `{split}.json` files, and its 16 kHz audio."""
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


def make_tasks(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write both synthetic tasks under `out_dir` and return their folders."""
    out = Path(out_dir)
    return [texture_task(out, seed), pitch_task(out, seed)]
