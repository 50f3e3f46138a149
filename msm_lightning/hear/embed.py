"""`msm embed`: HEAR embeddings of hearpreprocess task folders, written exactly as heareval's runner does.

The output is heareval's embedding layout (hear-eval-kit 2021.1.x, `heareval/embeddings/{runner,
task_embeddings}.py`), described with its file names in `msm_lightning.hear.layout`.

Rows of the memmap follow heareval's order: the split's files in `{split}.json` order, shuffled by one
`random.Random(0)` per task that is consumed split after split in `task_metadata.json` order. Files are
batched by duration (heareval batches by clip count from `sample_duration`); only clips of equal length
share a batch, so no clip is ever padded and batching cannot change an embedding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import random
import shutil
import time
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from msm_lightning.hear.layout import (
    EMBEDDINGS_DONE_MARKER,
    PROFILE_FILE,
    audio_dir,
    check_task,
    embedding_dimensions_path,
    embeddings_folder_name,
    embeddings_path,
    file_embedding_path,
    file_labels_path,
    file_output_stem,
    file_timestamps_path,
    filename_timestamps_path,
    list_tasks,
    metadata_path,
    read_split_labels,
    read_task_metadata,
    split_labels_path,
    split_names,
    target_labels_path,
    vocabulary_path,
)
from msm_lightning.safe_io import LockedError, atomic_write_json, file_lock, staged_folder

DEFAULT_BATCH_SECONDS = 84.0  # heareval's batch: 0.7 x 120 s of audio at 16 kHz
SCENE, EVENT = "scene", "event"


class Embedder:
    """A HEAR module and its model, run like heareval's `Embedding` wrapper (torch, no gradients)."""

    def __init__(
        self, module_name: str, model_path: str | None, model_options: dict[str, Any], device: str = "auto"
    ) -> None:
        self.module: ModuleType = import_module(module_name)
        if model_path is not None:
            self.model = self.module.load_model(model_path, **model_options)
        else:
            self.model = self.module.load_model(**model_options)
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(
                f"{module_name}.load_model returned a {type(self.model).__name__}, not a torch module"
            )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model.to(self.device)

    @property
    def name(self) -> str:
        """The module's import name (heareval names the output folder after it)."""
        return self.module.__name__

    @property
    def sample_rate(self) -> int:
        """The model's sample rate, which selects the task's audio folder."""
        return int(self.model.sample_rate)

    def scene(self, audio: np.ndarray) -> np.ndarray:
        """Scene embeddings [n, dim] of equal-length clips [n, samples]."""
        with torch.no_grad():
            emb = self.module.get_scene_embeddings(torch.from_numpy(audio).to(self.device), self.model)
        return emb.detach().cpu().numpy()

    def timestamps(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [n, T, dim], timestamps [n, T] in ms) of equal-length clips [n, samples]."""
        with torch.no_grad():
            emb, stamps = self.module.get_timestamp_embeddings(
                torch.from_numpy(audio).to(self.device), self.model
            )
        return emb.detach().cpu().numpy(), stamps.detach().cpu().numpy()


def read_clip(path: Path, sample_rate: int) -> np.ndarray:
    """A task's audio file as mono float32 at `sample_rate` (hearpreprocess already resampled it)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile reports missing and bad files through assorted exceptions
        raise ValueError(f"cannot read task audio '{path}': {err}") from err
    if rate != sample_rate:
        raise ValueError(f"task audio '{path}' is at {rate} Hz, the model needs {sample_rate} Hz")
    clip = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(clip).all():
        raise ValueError(f"task audio '{path}' holds NaN or infinite samples")
    return clip


def batches(
    filenames: list[str], folder: Path, sample_rate: int, batch_seconds: float
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Consecutive clips of equal length, up to `batch_seconds` of audio (at least one clip) per batch."""
    budget = batch_seconds * sample_rate
    clips: list[np.ndarray] = []
    names: list[str] = []
    for name in filenames:
        clip = read_clip(folder / name, sample_rate)
        if clips and (len(clip) != len(clips[0]) or (len(clips) + 1) * len(clip) > budget):
            yield np.stack(clips), names
            clips, names = [], []
        clips.append(clip)
        names.append(name)
    if clips:
        yield np.stack(clips), names


def labels_at(events: list[dict[str, Any]], timestamps: np.ndarray) -> list[list[str]]:
    """Labels active at each timestamp (heareval: start <= t < end + 0.0001, duplicate events once)."""
    unique = list(dict.fromkeys((e["start"], e["end"] + 0.0001, e["label"]) for e in events))
    return [[label for start, end, label in unique if start <= t < end] for t in timestamps.tolist()]


def _save_json(obj: Any, path: Path, indent: int | None = None) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=indent)


def check_finite(emb: np.ndarray, names: list[str], folder: Path) -> None:
    """A ValueError naming the clips whose embeddings hold NaN or infinity (never written, never trusted)."""
    bad = [name for name, rows in zip(names, emb, strict=True) if not np.isfinite(rows).all()]
    if bad:
        paths = [str(folder / n) for n in bad]
        raise ValueError(f"the model returned NaN or infinite embeddings for {paths}")


def embed_split(
    embedder: Embedder,
    metadata: dict[str, Any],
    split_data: dict[str, Any],
    audio_folder: Path,
    task_out: Path,
    split: str,
    batch_seconds: float,
    desc: str,
) -> None:
    """Per-file embeddings and labels of one split into `task_out` (heareval's first pass)."""
    filenames = list(split_data)
    with tqdm(total=len(filenames), desc=desc, unit="file") as bar:
        for audio, names in batches(filenames, audio_folder, embedder.sample_rate, batch_seconds):
            if metadata["embedding_type"] == SCENE:
                emb = embedder.scene(audio)
                check_finite(emb, names, audio_folder)
                for name, row in zip(names, emb, strict=True):
                    out = file_embedding_path(task_out, split, name)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    np.save(out, row)
                    _save_json(split_data[name], file_labels_path(task_out, split, name))
            else:
                emb, stamps = embedder.timestamps(audio)
                check_finite(emb, names, audio_folder)
                for name, rows, ts in zip(names, emb, stamps, strict=True):
                    out = file_embedding_path(task_out, split, name)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    np.save(out, rows)
                    _save_json(ts.tolist(), file_timestamps_path(task_out, split, name))
                    labels = labels_at(split_data[name], ts)
                    _save_json(labels, file_labels_path(task_out, split, name), indent=4)
            bar.update(len(names))


def memmap_split(
    metadata: dict[str, Any],
    split: str,
    split_data: dict[str, Any],
    task_out: Path,
    prng: random.Random,
) -> None:
    """Gather a split's per-file embeddings into the headerless float32 memmap + labels pickle."""
    names = list(split_data)
    prng.shuffle(names)  # the same draws as heareval's memmap_embeddings, so the same row order
    event = metadata["embedding_type"] == EVENT
    shapes = [np.load(file_embedding_path(task_out, split, n), mmap_mode="r").shape for n in names]
    n_rows = sum(s[0] if event else 1 for s in shapes)
    dim = shapes[0][-1] if shapes else 0
    if n_rows == 0:
        raise ValueError(f"split {split!r} of task {task_out.name} has no embeddings to write")
    embedding_dimensions_path(task_out, split).write_text(json.dumps((n_rows, dim)))
    path = embeddings_path(task_out, split)
    memmap = np.memmap(path, dtype=np.float32, mode="w+", shape=(n_rows, dim))
    labels: list[Any] = []
    filename_timestamps: list[tuple[str, float]] = []
    row = 0
    for name in names:
        emb_path = file_embedding_path(task_out, split, name)
        emb = np.load(emb_path)
        label = json.loads(file_labels_path(task_out, split, name).read_text())
        if not event:
            if metadata["prediction_type"] == "multiclass" and len(label) != 1:
                raise ValueError(
                    f"multiclass task file '{emb_path}' must have exactly one label, has {label}"
                )
            memmap[row] = emb
            labels.append(label)
            row += 1
        else:
            stamps = json.loads(file_timestamps_path(task_out, split, name).read_text())
            memmap[row : row + emb.shape[0]] = emb
            labels += label
            slug = str(file_output_stem(task_out, split, name))
            filename_timestamps += [(slug, t) for t in stamps]
            row += emb.shape[0]
    memmap.flush()
    del memmap
    with target_labels_path(task_out, split).open("wb") as f:
        pickle.dump(labels, f)
    if event:
        filename_timestamps_path(task_out, split).write_text(json.dumps(filename_timestamps, indent=4))


def embed_task(embedder: Embedder, task_path: Path, task_out: Path, batch_seconds: float) -> None:
    """Embeddings of every split of one task into `task_out` (which is created afresh)."""
    metadata = read_task_metadata(task_path)
    kind = metadata.get("embedding_type")
    if kind not in (SCENE, EVENT):
        raise ValueError(f"task '{task_path}' has unknown embedding_type {kind!r} (expected scene or event)")
    task_out.mkdir(parents=True, exist_ok=True)
    shutil.copy(metadata_path(task_path), task_out)
    shutil.copy(vocabulary_path(task_path), task_out)
    prng = random.Random(0)  # one generator per task, consumed split after split, as in heareval
    for split in split_names(metadata, task_path):
        split_data = read_split_labels(task_path, split)
        shutil.copy(split_labels_path(task_path, split), task_out)
        audio_folder = audio_dir(task_path, split, embedder.sample_rate)
        if not audio_folder.is_dir():
            raise ValueError(f"task '{task_path}' has no audio folder '{audio_folder}' for split {split!r}")
        desc = f"{task_path.name}/{split}"
        embed_split(embedder, metadata, split_data, audio_folder, task_out, split, batch_seconds, desc)
        memmap_split(metadata, split, split_data, task_out, prng)


def model_fingerprint(model_path: str | None) -> str | None:
    """sha256 of a model file (a bundle folder: of its files in name order), None for no file."""
    if model_path is None:
        return None
    path = Path(model_path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with f.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def provenance(module_name: str, model_path: str | None, model_options: dict[str, Any]) -> dict[str, Any]:
    """What made a task's embeddings: written into its done marker and compared on every rerun."""
    return {
        "module": module_name,
        "model_file": None if model_path is None else str(Path(model_path).resolve()),
        "model_sha256": model_fingerprint(model_path),
        "model_options": model_options,
    }


def _finished_by(marker: Path) -> dict[str, Any] | None:
    """The provenance in a done marker; None when there is no marker or it records none (older runs)."""
    if not marker.is_file():
        return None
    try:
        recorded = json.loads(marker.read_text() or "null")
    except json.JSONDecodeError:
        return None
    return recorded if isinstance(recorded, dict) else None


def embed_tasks(
    module_name: str,
    tasks_dir: str | Path,
    out_dir: str | Path,
    model_path: str | None = None,
    model_options: dict[str, Any] | None = None,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    task: str = "all",
    device: str = "auto",
) -> list[Path]:
    """Embed every task (skipping ones finished by the same module, model and options); returns the folders.

    Each task is written into a staged folder renamed into place when complete, under a lock, and its done
    marker records the module, the model file's hash and the options, so two runs into one folder never mix
    splits of two models, and a rerun with another model redoes the task instead of trusting it.
    """
    model_options = dict(model_options or {})
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
    tasks = list_tasks(Path(tasks_dir), None if task == "all" else [task])
    out_root = Path(out_dir) / embeddings_folder_name(module_name, model_options)
    made_by = provenance(module_name, model_path, model_options)
    todo = []
    for t in tasks:
        recorded = _finished_by(out_root / t.name / EMBEDDINGS_DONE_MARKER)
        if recorded == made_by:
            print(f"skipping {t.name}: embeddings already in {out_root / t.name}")
            continue
        if (out_root / t.name).exists():
            reason = "an unfinished run" if recorded is None else f"other inputs ({recorded})"
            print(f"redoing {t.name}: {out_root / t.name} holds embeddings from {reason}")
        todo.append(t)
    if not todo:
        return [out_root / t.name for t in tasks]
    for task_path in todo:
        check_task(task_path)  # a malformed task folder stops the run here, before the model is loaded
    embedder = Embedder(module_name, model_path, model_options, device)
    for task_path in todo:
        task_out = out_root / task_path.name
        try:
            with file_lock(out_root / f".{task_path.name}.lock", f"the embeddings of '{task_out}'"):
                start = time.time()
                with staged_folder(task_out) as stage:
                    embed_task(embedder, task_path, stage, batch_seconds)
                    elapsed = time.time() - start
                    profile = {
                        "time_elapsed": elapsed,
                        "gpu_max_mem": _gpu_max_mem(),
                        "gpu_device_name": _device_name(),
                    }
                    atomic_write_json(stage / PROFILE_FILE, profile, indent=4)
                    atomic_write_json(stage / EMBEDDINGS_DONE_MARKER, made_by)
        except LockedError as err:
            raise ValueError(str(err)) from None
        print(f"computed embeddings of {task_path.name} in {elapsed:.1f} s -> {task_out}")
    return [out_root / t.name for t in tasks]


def _gpu_max_mem() -> float | None:
    # heareval records the peak GPU memory in GB; on CPU it records null.
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_reserved() / 1024**3


def _device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str]) -> None:
    """`msm embed`: heareval-layout embeddings of hearpreprocess tasks with any HEAR module."""
    parser = argparse.ArgumentParser(
        prog="msm embed",
        description="Compute HEAR embeddings of every task folder (hearpreprocess layout) with a HEAR "
        "module and write them exactly as heareval's embeddings runner does. Finished tasks are skipped.",
    )
    parser.add_argument("--module", required=True, help="HEAR module to import, e.g. hear_modules.ssam")
    parser.add_argument("--model", default=None, help="model file for load_model (bundle or checkpoint)")
    parser.add_argument("--tasks", required=True, help="folder of task folders (hearpreprocess output)")
    parser.add_argument("--out", required=True, help="embeddings folder (heareval's --embeddings-dir)")
    parser.add_argument(
        "--task", default="all", help="embed only this task (folder name or task_name; default: all)"
    )
    parser.add_argument("--model-options", default="{}", help="JSON dict of keyword arguments for load_model")
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=DEFAULT_BATCH_SECONDS,
        help=f"audio per batch in seconds (default {DEFAULT_BATCH_SECONDS:g})",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = parser.parse_args(argv)
    try:
        options = json.loads(args.model_options)
    except json.JSONDecodeError as err:
        raise SystemExit(f"msm embed: --model-options is not valid JSON ({err})") from err
    if not isinstance(options, dict):
        raise SystemExit("msm embed: --model-options must be a JSON object, e.g. '{\"chunk_batch\": 8}'")
    if args.model is not None and not Path(args.model).exists():
        raise SystemExit(f"msm embed: model file '{args.model}' does not exist")
    try:
        embed_tasks(
            args.module,
            args.tasks,
            args.out,
            model_path=args.model,
            model_options=options,
            batch_seconds=args.batch_seconds,
            task=args.task,
            device=args.device,
        )
    except ValueError as err:
        raise SystemExit(f"msm embed: {err}") from err
