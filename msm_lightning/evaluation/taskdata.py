"""Reading one downstream task's embeddings in hear-eval-kit's layout, with errors that name the file.

Layout of `EMB_DIR/<module>/<task>/`: `task_metadata.json`, `labelvocabulary.csv` (columns `idx,label`)
and per split `{split}.embeddings.npy` (a headerless float32 memmap), `{split}.embedding-dimensions.json`
(`[n, dim]`) and `{split}.target-labels.pkl` (one list of labels per file).
"""

from __future__ import annotations

import csv
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

KFOLD_MODES = ("new_split_kfold", "presplit_kfold", "folds")
REQUIRED_METADATA = ("embedding_type", "prediction_type", "split_mode", "evaluation")


class EmbeddingFormatError(ValueError):
    """An embedding folder that does not follow hear-eval-kit's layout; the message names the file."""


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

    def gather(self, split_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and targets of several splits concatenated (e.g. the training folds)."""
        x = torch.cat([self.embeddings[s] for s in split_names])
        y = torch.cat([self.targets[s] for s in split_names])
        return x, y


def data_splits(split_mode: str, split_names: list[str]) -> list[dict[str, list[str]]]:
    """hear-eval-kit's rotation: fold i is test, fold i+1 (mod k) is valid, the rest is train."""
    if split_mode == "trainvaltest":
        return [{"train": ["train"], "valid": ["valid"], "test": ["test"]}]
    if split_mode not in KFOLD_MODES:
        raise EmbeddingFormatError(f"unknown split_mode {split_mode!r}")
    folds = sorted(split_names)
    if len(folds) < 3:
        raise EmbeddingFormatError(f"k-fold evaluation needs at least 3 folds, got {folds}")
    out = []
    for i, test in enumerate(folds):
        valid = folds[(i + 1) % len(folds)]
        out.append({"train": [f for f in folds if f not in (test, valid)], "valid": [valid], "test": [test]})
    return out


def split_names(metadata: dict[str, Any], task_dir: Path) -> list[str]:
    """Split names from the metadata's `splits`, else implied by `split_mode`/`nfolds`, else the files."""
    if metadata.get("splits"):
        return [str(s) for s in metadata["splits"]]
    if metadata["split_mode"] == "trainvaltest":
        return ["train", "valid", "test"]
    if "nfolds" in metadata:
        return [f"fold{i:02d}" for i in range(int(metadata["nfolds"]))]
    found = sorted(p.name.split(".")[0] for p in task_dir.glob("fold*.embeddings.npy"))
    if not found:
        raise EmbeddingFormatError(f"{task_dir / 'task_metadata.json'}: no `splits`/`nfolds`, no fold files")
    return found


def read_json(path: Path) -> Any:
    """JSON content, or an error naming the missing or malformed file."""
    if not path.is_file():
        raise EmbeddingFormatError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EmbeddingFormatError(f"{path}: not valid JSON ({err})") from err


def read_metadata(task_dir: Path) -> dict[str, Any]:
    """task_metadata.json, checked for the keys the protocol needs."""
    path = task_dir / "task_metadata.json"
    metadata = read_json(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise EmbeddingFormatError(f"{path}: missing keys {missing}")
    if metadata["prediction_type"] not in ("multiclass", "multilabel"):
        raise EmbeddingFormatError(f"{path}: unknown prediction_type {metadata['prediction_type']!r}")
    if not metadata["evaluation"]:
        raise EmbeddingFormatError(f"{path}: `evaluation` lists no metric")
    return metadata


def read_vocabulary(task_dir: Path) -> list[str]:
    """Labels ordered by their index in labelvocabulary.csv (labels compared as strings, as heareval does)."""
    path = task_dir / "labelvocabulary.csv"
    if not path.is_file():
        raise EmbeddingFormatError(f"missing file {path}")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "idx" not in rows[0] or "label" not in rows[0]:
        raise EmbeddingFormatError(f"{path}: expected a header with columns `idx` and `label`")
    by_idx = {int(r["idx"]): str(r["label"]) for r in rows}
    if sorted(by_idx) != list(range(len(rows))):
        raise EmbeddingFormatError(f"{path}: indices must be 0..{len(rows) - 1} without gaps or repeats")
    return [by_idx[i] for i in range(len(rows))]


def read_embeddings(task_dir: Path, split: str) -> np.ndarray:
    """One split's [n, dim] float32 matrix, checked against its dimensions file and for NaN/Inf."""
    dims_path = task_dir / f"{split}.embedding-dimensions.json"
    dims = read_json(dims_path)
    if not (isinstance(dims, list) and len(dims) == 2 and all(isinstance(d, int) and d >= 0 for d in dims)):
        raise EmbeddingFormatError(f"{dims_path}: expected [n, dim], got {dims!r}")
    path = task_dir / f"{split}.embeddings.npy"
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
    path = task_dir / f"{split}.target-labels.pkl"
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
                f"{task_dir / f'{split}.embedding-dimensions.json'}: embedding size {x.shape[1]} differs "
                f"from {first}'s {embeddings[first].shape[1]}"
            )
        y = read_targets(task_dir, split, len(x), vocab, metadata["prediction_type"] == "multiclass")
        embeddings[split], targets[split] = torch.from_numpy(x), torch.from_numpy(y)
    task = TaskData(task_dir.name, task_dir, metadata, labels, embeddings, targets)
    task.data_splits()  # fail now on a bad split_mode rather than mid-run
    return task


def find_tasks(module_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Task folders under a module's embedding folder (or the folder itself if it is a task), by name."""
    module_dir = Path(module_dir)
    if not module_dir.is_dir():
        raise EmbeddingFormatError(f"no such folder {module_dir}")
    if (module_dir / "task_metadata.json").is_file():
        found = [module_dir]
    else:
        found = sorted(p.parent for p in module_dir.glob("*/task_metadata.json"))
    if names:
        aliases = {p: {p.name, read_json(p / "task_metadata.json").get("task_name")} for p in found}
        unknown = [n for n in names if not any(n in a for a in aliases.values())]
        if unknown:
            raise EmbeddingFormatError(
                f"{module_dir}: no task named {unknown}; found {[p.name for p in found]}"
            )
        found = [p for p in found if aliases[p] & set(names)]
    if not found:
        raise EmbeddingFormatError(f"{module_dir}: no task folders (subfolders with task_metadata.json)")
    return found
