"""Writing and checking `msm data`'s task folders in hearpreprocess's layout (`msm_lightning.hear.layout`).

Besides the layout's files, a task folder holds provenance.csv (clip -> groups and source files),
sources.json (the packages used) and checksums.sha256; it is built in `<dir>.partial` and renamed when
complete, and `BUILD_DONE_MARKER` is written last by the build step.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from msm_lightning.datasets.real.dsp import SAMPLE_RATE, write_wav
from msm_lightning.datasets.real.records import ClipPlan, TaskPlan
from msm_lightning.datasets.real.splits import check_disjoint
from msm_lightning.hear.layout import (
    NEW_SPLIT_KFOLD,
    PROVENANCE_FILE,
    SOURCES_FILE,
    TRAIN_VALID_TEST,
    TRAINVALTEST,
    VOCABULARY_FILE,
    LayoutError,
    audio_dir,
    fold_names,
    metadata_path,
    read_split_labels,
    read_task_metadata,
    read_vocabulary,
    split_labels_path,
    write_csv,
    write_json,
    write_task_files,
)

CHECKSUMS = "checksums.sha256"
BUILD_DONE_MARKER = ".msm-build.json"  # a finished build step, with its data version and plan fingerprint
REQUIRED_METADATA_KEYS = (  # what every built task's task_metadata.json holds
    "task_name",
    "version",
    "embedding_type",
    "prediction_type",
    "split_mode",
    "sample_duration",
    "evaluation",
    "splits",
)


def task_metadata(
    task_name: str,
    version: str,
    *,
    prediction_type: str,
    split_mode: str,
    sample_duration: float,
    evaluation: Sequence[str],
    nfolds: int | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The task_metadata.json content, with `splits` filled in the way hearpreprocess's runner does."""
    if prediction_type not in ("multiclass", "multilabel"):
        raise ValueError(f"prediction_type must be multiclass or multilabel, got {prediction_type!r}")
    meta: dict[str, Any] = {
        "task_name": task_name,
        "version": version,
        "embedding_type": "scene",
        "prediction_type": prediction_type,
        "split_mode": split_mode,
        "sample_duration": float(sample_duration),
        "evaluation": list(evaluation),
        "mode": "full",
    }
    if split_mode == TRAINVALTEST:
        meta["splits"] = list(TRAIN_VALID_TEST)
    elif split_mode == NEW_SPLIT_KFOLD:
        if not nfolds or nfolds < 3:
            raise ValueError(f"{task_name}: new_split_kfold needs nfolds >= 3, got {nfolds}")
        meta["nfolds"] = int(nfolds)
        meta["splits"] = fold_names(nfolds)
    else:
        raise ValueError(f"{task_name}: unknown split_mode {split_mode!r}")
    meta.update(extra or {})
    return meta


def write_checksums(folder: Path, skip: Sequence[str] = (CHECKSUMS, BUILD_DONE_MARKER)) -> str:
    """Write `sha256  relpath` for every file under `folder`; returns the digest of that listing."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in skip:
            continue
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}\n")
    text = "".join(lines)
    (folder / CHECKSUMS).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def verify_checksums(folder: Path) -> list[str]:
    """Files whose content no longer matches checksums.sha256 (or that are missing or unlisted)."""
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return [f"{listing}: missing"]
    problems, listed = [], set()
    for line in listing.read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed.add(rel)
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{path}: content changed")
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed and rel not in (CHECKSUMS, BUILD_DONE_MARKER):
            problems.append(f"{path}: not in {CHECKSUMS}")
    return problems


def write_task(
    out_dir: Path,
    plan: TaskPlan,
    render: Callable[[ClipPlan], np.ndarray],
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
) -> Path:
    """Write a whole task folder atomically (built in `<dir>.partial`, then renamed) and return it."""
    check_disjoint(plan.clips)
    meta = plan.metadata
    splits = list(meta["splits"])
    unknown = sorted({c.split for c in plan.clips} - set(splits))
    if unknown:
        raise ValueError(f"{plan.name}: clips in splits {unknown} not listed in metadata splits {splits}")
    n_samples = round(float(meta["sample_duration"]) * SAMPLE_RATE)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for split in splits:
        audio_dir(tmp, split, SAMPLE_RATE).mkdir(parents=True, exist_ok=True)
    bar = tqdm(plan.clips, desc=plan.name, unit="clip", disable=not progress, leave=False)
    for clip in bar:
        audio = np.asarray(render(clip), dtype=np.float32)
        if audio.ndim != 1 or len(audio) != n_samples:
            raise ValueError(
                f"{plan.name}/{clip.name}: rendered shape {audio.shape}, expected ({n_samples},)"
            )
        write_wav(audio_dir(tmp, clip.split, SAMPLE_RATE) / clip.name, audio)
    by_name = sorted(plan.clips, key=lambda c: c.name)
    labels = {split: {c.name: c.labels for c in by_name if c.split == split} for split in splits}
    write_task_files(tmp, meta, labels)
    write_csv(
        tmp / PROVENANCE_FILE,
        ["filename", "split", "labels", "groups", "sources"],
        (
            [c.name, c.split, "|".join(c.labels), "|".join(c.groups), "|".join(c.sources)]
            for c in sorted(plan.clips, key=lambda c: (c.split, c.name))
        ),
    )
    if provenance is not None:
        write_json(tmp / SOURCES_FILE, provenance, sort_keys=True)
    write_checksums(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def validate_task(task_dir: Path) -> list[str]:
    """Problems with a task folder's layout (empty list when it is what heareval expects)."""
    meta_path = metadata_path(task_dir)
    try:
        meta = read_task_metadata(task_dir)
    except LayoutError as err:
        return [str(err)]
    problems = [f"{meta_path}: missing key {key!r}" for key in REQUIRED_METADATA_KEYS if key not in meta]
    if problems:
        return problems
    if meta["split_mode"] == NEW_SPLIT_KFOLD and meta["splits"] != fold_names(int(meta.get("nfolds", 0))):
        problems.append(f"{meta_path}: splits {meta['splits']} do not match nfolds {meta.get('nfolds')}")
    try:
        vocab = read_vocabulary(task_dir)
    except LayoutError as err:
        problems.append(str(err))
        vocab = []
    n_samples = round(float(meta["sample_duration"]) * SAMPLE_RATE)
    for split in meta["splits"]:
        split_json = split_labels_path(task_dir, split)
        try:
            entries = read_split_labels(task_dir, split)
        except LayoutError as err:
            problems.append(str(err))
            continue
        audio = audio_dir(task_dir, split, SAMPLE_RATE)
        on_disk = {p.name for p in audio.glob("*.wav")} if audio.is_dir() else set()
        if set(entries) != on_disk:
            problems.append(f"{audio}: files differ from {split_json.name}")
        for name, labels in entries.items():
            if meta["prediction_type"] == "multiclass" and len(labels) != 1:
                problems.append(f"{split_json}: {name} has {len(labels)} labels in a multiclass task")
            if any(lab not in vocab for lab in labels):
                problems.append(f"{split_json}: {name} has a label outside {VOCABULARY_FILE}")
        for name in sorted(on_disk):
            info = sf.info(str(audio / name))
            if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames != n_samples:
                problems.append(f"{audio / name}: {info.samplerate} Hz, {info.channels} ch, {info.frames}")
    return problems
