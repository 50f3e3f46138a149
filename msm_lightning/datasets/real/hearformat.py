"""hearpreprocess's task layout: task_metadata.json, labelvocabulary.csv, {split}.json, 16000/{split}/*.wav.

Layout (as hearpreprocess writes it and heareval / `msm embed` read it):

    TASK/task_metadata.json    task_name, version, embedding_type, prediction_type, split_mode,
                               [nfolds], sample_duration, evaluation (primary metric first), splits
    TASK/labelvocabulary.csv   header `idx,label`, labels sorted, indices 0..n-1
    TASK/{split}.json          {"<name>.wav": [label, ...]} for every clip of the split
    TASK/16000/{split}/<name>.wav   16 kHz mono, every clip exactly sample_duration long

plus our own provenance.csv (clip -> groups and source files) and checksums.sha256.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from msm_lightning.datasets.real.dsp import SAMPLE_RATE, write_wav
from msm_lightning.datasets.real.records import ClipPlan, TaskPlan
from msm_lightning.datasets.real.splits import SPLITS, check_disjoint, fold_names

CHECKSUMS = "checksums.sha256"
MARKER = ".msm-build.json"


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
    if split_mode == "trainvaltest":
        meta["splits"] = list(SPLITS)
    elif split_mode == "new_split_kfold":
        if not nfolds or nfolds < 3:
            raise ValueError(f"{task_name}: new_split_kfold needs nfolds >= 3, got {nfolds}")
        meta["nfolds"] = int(nfolds)
        meta["splits"] = fold_names(nfolds)
    else:
        raise ValueError(f"{task_name}: unknown split_mode {split_mode!r}")
    meta.update(extra or {})
    return meta


def sorted_labels(labels: set[str]) -> list[str]:
    """Vocabulary order: numeric labels by value (pitch, counts), others alphabetically, as pandas sorts."""
    if labels and all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_checksums(folder: Path, skip: Sequence[str] = (CHECKSUMS, MARKER)) -> str:
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
        if path.is_file() and rel not in listed and rel not in (CHECKSUMS, MARKER):
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
        (tmp / str(SAMPLE_RATE) / split).mkdir(parents=True, exist_ok=True)
    bar = tqdm(plan.clips, desc=plan.name, unit="clip", disable=not progress, leave=False)
    for clip in bar:
        audio = np.asarray(render(clip), dtype=np.float32)
        if audio.ndim != 1 or len(audio) != n_samples:
            raise ValueError(
                f"{plan.name}/{clip.name}: rendered shape {audio.shape}, expected ({n_samples},)"
            )
        write_wav(tmp / str(SAMPLE_RATE) / clip.split / clip.name, audio)
    for split in splits:
        entries = {
            c.name: list(c.labels) for c in sorted(plan.clips, key=lambda c: c.name) if c.split == split
        }
        _write_bytes(tmp / f"{split}.json", _json_bytes(entries))
    vocab = sorted_labels({lab for c in plan.clips for lab in c.labels})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["idx", "label"])
    writer.writerows(enumerate(vocab))
    _write_bytes(tmp / "labelvocabulary.csv", buf.getvalue().encode())
    _write_bytes(tmp / "task_metadata.json", _json_bytes(meta))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "split", "labels", "groups", "sources"])
    for c in sorted(plan.clips, key=lambda c: (c.split, c.name)):
        writer.writerow([c.name, c.split, "|".join(c.labels), "|".join(c.groups), "|".join(c.sources)])
    _write_bytes(tmp / "provenance.csv", buf.getvalue().encode())
    if provenance is not None:
        _write_bytes(tmp / "sources.json", _json_bytes(provenance))
    write_checksums(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def validate_task(task_dir: Path) -> list[str]:
    """Problems with a task folder's layout (empty list when it is what heareval expects)."""
    problems: list[str] = []
    meta_path = task_dir / "task_metadata.json"
    if not meta_path.is_file():
        return [f"{meta_path}: missing"]
    meta = json.loads(meta_path.read_text())
    for key in (
        "task_name",
        "version",
        "embedding_type",
        "prediction_type",
        "split_mode",
        "sample_duration",
        "evaluation",
        "splits",
    ):
        if key not in meta:
            problems.append(f"{meta_path}: missing key {key!r}")
    if problems:
        return problems
    if meta["split_mode"] == "new_split_kfold" and meta["splits"] != fold_names(int(meta.get("nfolds", 0))):
        problems.append(f"{meta_path}: splits {meta['splits']} do not match nfolds {meta.get('nfolds')}")
    with (task_dir / "labelvocabulary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    vocab = [r["label"] for r in rows]
    if [int(r["idx"]) for r in rows] != list(range(len(rows))):
        problems.append(f"{task_dir / 'labelvocabulary.csv'}: idx must be 0..n-1")
    n_samples = round(float(meta["sample_duration"]) * SAMPLE_RATE)
    for split in meta["splits"]:
        split_json = task_dir / f"{split}.json"
        if not split_json.is_file():
            problems.append(f"{split_json}: missing")
            continue
        entries = json.loads(split_json.read_text())
        audio_dir = task_dir / str(SAMPLE_RATE) / split
        on_disk = {p.name for p in audio_dir.glob("*.wav")} if audio_dir.is_dir() else set()
        if set(entries) != on_disk:
            problems.append(f"{audio_dir}: files differ from {split_json.name}")
        for name, labels in entries.items():
            if meta["prediction_type"] == "multiclass" and len(labels) != 1:
                problems.append(f"{split_json}: {name} has {len(labels)} labels in a multiclass task")
            if any(lab not in vocab for lab in labels):
                problems.append(f"{split_json}: {name} has a label outside labelvocabulary.csv")
        for name in sorted(on_disk):
            info = sf.info(str(audio_dir / name))
            if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames != n_samples:
                problems.append(
                    f"{audio_dir / name}: {info.samplerate} Hz, {info.channels} ch, {info.frames}"
                )
    return problems
