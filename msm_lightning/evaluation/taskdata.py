"""Reading one downstream task's embeddings in hear-eval-kit's layout, with errors that name the file.

Of `EMB_DIR/<module>/<task>/` (see `msm_lightning.hear.layout`) it reads `task_metadata.json`,
`labelvocabulary.csv` and per split `{split}.embeddings.npy` (a headerless float32 memmap),
`{split}.embedding-dimensions.json` (`[n, dim]`) and `{split}.target-labels.pkl` (labels per row).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path
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
    list_tasks,
    metadata_path,
    read_json,
    read_task_metadata,
    read_vocabulary,
    split_names,
    target_labels_path,
)

REQUIRED_METADATA = ("embedding_type", "prediction_type", "split_mode", "evaluation")

# The layout's readers raise LayoutError; the evaluation reports every one of them under this name.
EmbeddingFormatError = LayoutError


@dataclass
class TaskData:
    """One task's metadata and all its splits in memory: embeddings [n, dim] and multi-hot targets."""

    name: str
    path: Path
    metadata: dict[str, Any]
    labels: list[str]
    embeddings: dict[str, torch.Tensor] = field(repr=False)
    targets: dict[str, torch.Tensor] = field(repr=False)

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


def read_metadata(task_dir: Path) -> dict[str, Any]:
    """task_metadata.json, checked for the keys the protocol needs."""
    path = metadata_path(task_dir)
    metadata = read_task_metadata(task_dir)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise EmbeddingFormatError(f"{path}: missing keys {missing}")
    if metadata["prediction_type"] not in ("multiclass", "multilabel"):
        raise EmbeddingFormatError(f"{path}: unknown prediction_type {metadata['prediction_type']!r}")
    if not metadata["evaluation"]:
        raise EmbeddingFormatError(f"{path}: `evaluation` lists no metric")
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
    with path.open("rb") as f:
        labels = pickle.load(f)
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


def load_task(task_dir: str | Path) -> TaskData:
    """Read and check a whole task folder."""
    task_dir = Path(task_dir)
    metadata = read_metadata(task_dir)
    labels = read_vocabulary(task_dir)
    vocab = {label: i for i, label in enumerate(labels)}
    embeddings, targets = {}, {}
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
    task = TaskData(task_dir.name, task_dir, metadata, labels, embeddings, targets)
    task.data_splits()  # fail now on a bad split_mode rather than mid-run
    return task


def find_tasks(module_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Task folders under a module's embedding folder (or the folder itself if it is a task), by name."""
    return list_tasks(Path(module_dir), names)
