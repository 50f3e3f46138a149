"""Reading one downstream task's embeddings in hear-eval-kit's layout, with errors that name the file.

Of `EMB_DIR/<module>/<task>/` (see `msm_lightning.hear.layout`) it reads `task_metadata.json`,
`labelvocabulary.csv` and per split `{split}.embeddings.npy` (a headerless float32 memmap),
`{split}.embedding-dimensions.json` (`[n, dim]`) and `{split}.target-labels.pkl` (labels per row). For an
event task a row is one timestamp of one file, its labels are the events active there (written by the
embedding runner), and two more files place the rows and hold the reference events the scores need:
`{split}.filename-timestamps.json` (file and timestamp in ms per row) and `{split}.json` (the events).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from msm_lightning.hear.layout import (
    KFOLD_MODES,
    TRAIN_VALID_TEST,
    TRAINVALTEST,
    LayoutError,
    embedding_dimensions_path,
    embeddings_path,
    filename_timestamps_path,
    list_tasks,
    metadata_path,
    read_json,
    read_split_labels,
    read_task_metadata,
    read_vocabulary,
    split_labels_path,
    split_names,
    target_labels_path,
)
from msm_lightning.safe_io import UnsafeFileError, load_data_pickle

REQUIRED_METADATA = ("embedding_type", "prediction_type", "split_mode", "evaluation")

# The layout's readers raise LayoutError; the evaluation reports every one of them under this name.
EmbeddingFormatError = LayoutError


@dataclass(frozen=True)
class EventFrames:
    """Where the embedding rows of event splits come from, and the splits' reference events."""

    files: list[str]  # per row: the audio file's name, as keyed in `{split}.json`
    timestamps: np.ndarray  # per row: the timestamp in ms, float64
    events: dict[str, list[dict[str, Any]]]  # file name -> reference events {"label", "start", "end"} in ms

    @staticmethod
    def concat(parts: list[EventFrames]) -> EventFrames:
        """Several splits' frames in order (file names must differ between splits, as heareval asserts)."""
        events: dict[str, list[dict[str, Any]]] = {}
        for part in parts:
            shared = sorted(set(events) & set(part.events))
            if shared:
                raise EmbeddingFormatError(f"file names in more than one split: {shared[:3]}")
            events.update(part.events)
        files = [name for part in parts for name in part.files]
        return EventFrames(files, np.concatenate([p.timestamps for p in parts]), events)


@dataclass
class TaskData:
    """One task's metadata and all its splits in memory: embeddings [n, dim] and multi-hot targets."""

    name: str
    path: Path
    metadata: dict[str, Any]
    labels: list[str]
    embeddings: dict[str, torch.Tensor] = field(repr=False)
    targets: dict[str, torch.Tensor] = field(repr=False)
    frames: dict[str, EventFrames] = field(default_factory=dict, repr=False)  # event tasks only

    @property
    def embedding_type(self) -> str:
        """ "scene" (a row per file) or "event" (a row per timestamp)."""
        return self.metadata["embedding_type"]

    @property
    def prediction_type(self) -> str:
        """ "multiclass" or "multilabel"."""
        return self.metadata["prediction_type"]

    @property
    def metrics(self) -> list[str]:
        """The task's metric names; the first is the primary one."""
        return list(self.metadata["evaluation"])

    @property
    def dim(self) -> int:
        """Embedding size."""
        return next(iter(self.embeddings.values())).shape[1]

    @property
    def n_labels(self) -> int:
        """Size of the label vocabulary."""
        return len(self.labels)

    def data_splits(self) -> list[dict[str, list[str]]]:
        """The train/valid/test assignments to run (one for trainvaltest, k rotations for k folds)."""
        return data_splits(self.metadata["split_mode"], list(self.embeddings))

    def gather(self, splits: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and targets of several splits concatenated (e.g. the training folds)."""
        x = torch.cat([self.embeddings[s] for s in splits])
        y = torch.cat([self.targets[s] for s in splits])
        return x, y

    def gather_frames(self, splits: list[str]) -> EventFrames:
        """Where the rows of `gather(splits)` come from, and those splits' reference events (event tasks)."""
        if not self.frames:
            raise EmbeddingFormatError(f"{self.path}: a {self.embedding_type} task has no event frames")
        return EventFrames.concat([self.frames[s] for s in splits])


def data_splits(split_mode: str, splits: list[str]) -> list[dict[str, list[str]]]:
    """hear-eval-kit's rotation: fold i is test, fold i+1 (mod k) is valid, the rest is train."""
    if split_mode == TRAINVALTEST:
        return [{split: [split] for split in TRAIN_VALID_TEST}]
    if split_mode not in KFOLD_MODES:
        raise EmbeddingFormatError(f"unknown split_mode {split_mode!r}")
    folds = sorted(splits)
    if len(folds) < 3:
        raise EmbeddingFormatError(f"k-fold evaluation needs at least 3 folds, got {folds}")
    out = []
    for i, test in enumerate(folds):
        valid = folds[(i + 1) % len(folds)]
        out.append({"train": [f for f in folds if f not in (test, valid)], "valid": [valid], "test": [test]})
    return out


def selection_metric(metadata: dict[str, Any]) -> str | None:
    """The validation score that picks probe states and grid points: the primary metric, or None when the
    task selects on the loss (`use_scoring_for_early_stopping: false`)."""
    return metadata["evaluation"][0] if metadata.get("use_scoring_for_early_stopping", True) else None


def read_metadata(task_dir: Path) -> dict[str, Any]:
    """task_metadata.json, checked for the keys the protocol needs."""
    path = metadata_path(task_dir)
    metadata = read_task_metadata(task_dir)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise EmbeddingFormatError(f"{path}: missing keys {missing}")
    if metadata["prediction_type"] not in ("multiclass", "multilabel"):
        raise EmbeddingFormatError(f"{path}: unknown prediction_type {metadata['prediction_type']!r}")
    evaluation = metadata["evaluation"]
    if not (isinstance(evaluation, list) and evaluation and all(isinstance(m, str) for m in evaluation)):
        raise EmbeddingFormatError(f"{path}: `evaluation` must list metric names, got {evaluation!r}")
    params = metadata.get("evaluation_params", {})
    if not isinstance(params, dict) or not isinstance(params.get("task_specific_param_grid", {}), dict):
        raise EmbeddingFormatError(f"{path}: `evaluation_params.task_specific_param_grid` must be an object")
    return metadata


def read_embeddings(task_dir: Path, split: str) -> np.ndarray:
    """One split's [n, dim] float32 matrix, checked against its dimensions file and for NaN/Inf."""
    dims_path = embedding_dimensions_path(task_dir, split)
    dims = read_json(dims_path)
    if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) and d >= 0 for d in dims)):
        raise EmbeddingFormatError(f"{dims_path}: expected [n, dim], got {dims!r}")
    path = embeddings_path(task_dir, split)
    if not path.is_file():
        raise EmbeddingFormatError(f"missing file {path}")
    expected = dims[0] * dims[1] * 4
    if path.stat().st_size != expected:
        raise EmbeddingFormatError(
            f"{path}: {path.stat().st_size} bytes, but {dims_path.name} says {dims} float32, {expected} bytes"
        )
    # heareval writes a raw memmap without an .npy header, so np.load would misread it.
    x = np.array(np.memmap(path, dtype=np.float32, mode="r", shape=tuple(dims)))
    if not np.isfinite(x).all():
        raise EmbeddingFormatError(f"{path}: contains NaN or Inf")
    return x


def read_targets(task_dir: Path, split: str, n: int, vocab: dict[str, int], multiclass: bool) -> np.ndarray:
    """Multi-hot [n, n_labels] targets from the split's label lists (exactly one label each if multiclass)."""
    path = target_labels_path(task_dir, split)
    if not path.is_file():
        raise EmbeddingFormatError(f"missing file {path}")
    try:
        # heareval pickles plain lists of labels; anything else (a class, a function) is refused unbuilt.
        labels = load_data_pickle(path, "label file")
    except UnsafeFileError as err:
        raise EmbeddingFormatError(str(err)) from err
    if not isinstance(labels, list) or not all(isinstance(x, (list, tuple)) for x in labels):
        raise EmbeddingFormatError(f"{path}: expected a list of label lists, one per embedding")
    if len(labels) != n:
        raise EmbeddingFormatError(f"{path}: {len(labels)} label lists but {n} embeddings")
    y = np.zeros((n, len(vocab)), dtype=np.float32)
    for i, file_labels in enumerate(labels):
        if multiclass and len(file_labels) != 1:
            raise EmbeddingFormatError(f"{path}: item {i} has {len(file_labels)} labels in a multiclass task")
        for label in file_labels:
            if str(label) not in vocab:
                raise EmbeddingFormatError(f"{path}: item {i} has label {label!r}, not in the vocabulary")
            y[i, vocab[str(label)]] = 1.0
    return y


def _check_event(path: Path, name: str, event: Any) -> dict[str, Any]:
    if not (isinstance(event, dict) and {"label", "start", "end"} <= set(event)):
        raise EmbeddingFormatError(f"{path}: {name!r} has {event!r}, not an event with label, start and end")
    try:
        start, end = float(event["start"]), float(event["end"])
    except (TypeError, ValueError) as err:
        raise EmbeddingFormatError(
            f"{path}: {name!r} has an event with a non-numeric time: {event!r}"
        ) from err
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        raise EmbeddingFormatError(f"{path}: {name!r} has an event that ends before it starts: {event!r}")
    return {"label": str(event["label"]), "start": start, "end": end}


def read_event_frames(task_dir: Path, split: str, n: int) -> EventFrames:
    """An event split's file and timestamp per row and its reference events, checked against each other."""
    path = filename_timestamps_path(task_dir, split)
    pairs = read_json(path)
    if not isinstance(pairs, list) or len(pairs) != n:
        count = len(pairs) if isinstance(pairs, list) else "no list of"
        raise EmbeddingFormatError(f"{path}: {count} (file, timestamp) pairs but {n} embeddings")
    try:
        # heareval keys predictions on the name of the file (its `{split}.json` key): drop the folders.
        files = [PurePath(str(name)).name for name, _ in pairs]
        timestamps = np.array([float(t) for _, t in pairs], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise EmbeddingFormatError(f"{path}: expected [file, timestamp in ms] pairs ({err})") from err
    labels_path = split_labels_path(task_dir, split)
    raw = read_split_labels(task_dir, split)
    events: dict[str, list[dict[str, Any]]] = {}
    for name, file_events in raw.items():
        if not isinstance(file_events, list):
            raise EmbeddingFormatError(
                f"{labels_path}: {name!r} maps to {file_events!r}, not a list of events"
            )
        events[name] = [_check_event(labels_path, name, e) for e in file_events]
    unknown = sorted(set(files) - set(events))
    if unknown:
        raise EmbeddingFormatError(f"{path}: rows of files not in {labels_path.name}: {unknown[:3]}")
    return EventFrames(files, timestamps, events)


def load_task(task_dir: str | Path) -> TaskData:
    """Read and check a whole task folder."""
    task_dir = Path(task_dir)
    metadata = read_metadata(task_dir)
    labels = read_vocabulary(task_dir)
    vocab = {label: i for i, label in enumerate(labels)}
    if metadata["embedding_type"] not in ("scene", "event"):
        raise EmbeddingFormatError(
            f"{metadata_path(task_dir)}: unknown embedding_type {metadata['embedding_type']!r}"
        )
    embeddings, targets, frames = {}, {}, {}
    for split in split_names(metadata, task_dir):
        x = read_embeddings(task_dir, split)
        if embeddings and x.shape[1] != next(iter(embeddings.values())).shape[1]:
            first = next(iter(embeddings))
            raise EmbeddingFormatError(
                f"{embedding_dimensions_path(task_dir, split)}: embedding size {x.shape[1]} differs "
                f"from {first}'s {embeddings[first].shape[1]}"
            )
        y = read_targets(task_dir, split, len(x), vocab, metadata["prediction_type"] == "multiclass")
        embeddings[split], targets[split] = torch.from_numpy(x), torch.from_numpy(y)
        if metadata["embedding_type"] == "event":
            frames[split] = read_event_frames(task_dir, split, len(x))
    task = TaskData(task_dir.name, task_dir, metadata, labels, embeddings, targets, frames)
    task.data_splits()  # fail now on a bad split_mode rather than mid-run
    return task


def find_tasks(module_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Task folders under a module's embedding folder (or the folder itself if it is a task), by name."""
    return list_tasks(Path(module_dir), names)
