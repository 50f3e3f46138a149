"""Folder layouts of HEAR tasks (hearpreprocess) and of their embeddings (heareval): names, readers, writer.

Task folder, as hearpreprocess writes it (and `msm data`, the synthetic tasks and `msm data subset` do):

    TASK/task_metadata.json           task_name, version, embedding_type, prediction_type, split_mode,
                                      [nfolds], sample_duration, evaluation (primary metric first), splits
    TASK/labelvocabulary.csv          header `idx,label`, indices 0..n-1
    TASK/{split}.json                 {"<name>.wav": [label, ...]} for every clip of the split
                                      (event tasks: [{"label", "start", "end"}, ...] per clip)
    TASK/{rate}/{split}/<name>.wav    the audio at each sample rate (16000 for every msm model)
    TASK/provenance.csv, sources.json msm's own record of where clips came from (when present)

Splits are train/valid/test (split_mode `trainvaltest`) or fold00, fold01, ... (the k-fold modes).

Embedding folder, as heareval's runner writes it (and `msm embed` does; `msm evaluate` reads it):

    EMB_DIR/<module name>[-<slugified model options>]/<task name>/
        task_metadata.json, labelvocabulary.csv, {split}.json   copied from the task
        {split}/<name>.embedding.npy                            per file, float32
        {split}/<name>.target-labels.json                       per file (+ .timestamps.json for events)
        {split}.embeddings.npy                                  headerless float32 np.memmap [n, dim]
        {split}.embedding-dimensions.json                       JSON [n, dim]
        {split}.target-labels.pkl                               labels in the memmap's row order
        {split}.filename-timestamps.json                        event tasks only
        profile.embeddings.json, .done.embeddings               timing; completion marker

Standard library only, so that the evaluation and the data builders use it without loading the model.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

METADATA_FILE = "task_metadata.json"
VOCABULARY_FILE = "labelvocabulary.csv"
PROVENANCE_FILE = "provenance.csv"
SOURCES_FILE = "sources.json"
PROFILE_FILE = "profile.embeddings.json"
EMBEDDINGS_DONE_MARKER = ".done.embeddings"

TRAINVALTEST = "trainvaltest"
NEW_SPLIT_KFOLD = "new_split_kfold"
KFOLD_MODES = (NEW_SPLIT_KFOLD, "presplit_kfold", "folds")
TRAIN_VALID_TEST = ("train", "valid", "test")

_SPLIT_FILE = re.compile(r"(train|valid|test|fold\d+)\.(json|embeddings\.npy)")
# A split name becomes part of file and folder names, so it must be one of the layout's, not a path.
_SPLIT_NAME = re.compile(r"train|valid|test|fold\d+")


class LayoutError(ValueError):
    """A task or embedding folder that does not follow the layout; the message names the file."""


# ---------------------------------------------------------------------------------------------- names


def fold_names(n_folds: int) -> list[str]:
    """hearpreprocess's fold split names: fold00, fold01, ..."""
    return [f"fold{i:02d}" for i in range(n_folds)]


def metadata_path(task_dir: Path) -> Path:
    """The task's task_metadata.json."""
    return task_dir / METADATA_FILE


def vocabulary_path(task_dir: Path) -> Path:
    """The task's labelvocabulary.csv."""
    return task_dir / VOCABULARY_FILE


def split_labels_path(task_dir: Path, split: str) -> Path:
    """A split's `{split}.json` (clip name -> labels)."""
    return task_dir / f"{split}.json"


def audio_dir(task_dir: Path, split: str, sample_rate: int) -> Path:
    """The folder of a split's audio at one sample rate, `{rate}/{split}`."""
    return task_dir / str(sample_rate) / split


def sample_rates(task_dir: Path) -> list[int]:
    """The sample rates the task has audio at (its numeric folders), ascending."""
    return sorted(int(p.name) for p in task_dir.iterdir() if p.is_dir() and p.name.isdigit())


def is_task(path: Path) -> bool:
    """Whether `path` is a task (or task embedding) folder: it has a task_metadata.json."""
    return metadata_path(path).is_file()


def embeddings_path(task_out: Path, split: str) -> Path:
    """A split's headerless float32 memmap of embeddings, `{split}.embeddings.npy`."""
    return task_out / f"{split}.embeddings.npy"


def embedding_dimensions_path(task_out: Path, split: str) -> Path:
    """A split's `[n, dim]` of the memmap, `{split}.embedding-dimensions.json`."""
    return task_out / f"{split}.embedding-dimensions.json"


def target_labels_path(task_out: Path, split: str) -> Path:
    """A split's label lists in the memmap's row order, `{split}.target-labels.pkl`."""
    return task_out / f"{split}.target-labels.pkl"


def filename_timestamps_path(task_out: Path, split: str) -> Path:
    """An event task split's (file, timestamp) per memmap row, `{split}.filename-timestamps.json`."""
    return task_out / f"{split}.filename-timestamps.json"


def file_output_stem(task_out: Path, split: str, name: str) -> Path:
    """Where one file's outputs start, `{split}/<name>`: heareval appends `.embedding.npy` and the like."""
    return task_out / split / name


def file_embedding_path(task_out: Path, split: str, name: str) -> Path:
    """One file's embedding, `{split}/<name>.embedding.npy`."""
    return Path(f"{file_output_stem(task_out, split, name)}.embedding.npy")


def file_labels_path(task_out: Path, split: str, name: str) -> Path:
    """One file's labels, `{split}/<name>.target-labels.json`."""
    return Path(f"{file_output_stem(task_out, split, name)}.target-labels.json")


def file_timestamps_path(task_out: Path, split: str, name: str) -> Path:
    """One event file's timestamps in ms, `{split}/<name>.timestamps.json`."""
    return Path(f"{file_output_stem(task_out, split, name)}.timestamps.json")


def slugify(text: str) -> str:
    """python-slugify's `slugify(text)` (used by heareval for option folder names); the package if present."""
    try:
        from slugify import slugify as package_slugify
    except ImportError:
        package_slugify = None
    if package_slugify is not None:
        return package_slugify(text)
    # Fallback with python-slugify's default rules for ASCII-representable text.
    text = re.sub(r"[']+", "-", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[']+", "", text)
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # "1,000" -> "1000"
    text = re.sub(r"[^-a-z0-9]+", "-", text)
    return re.sub(r"-{2,}", "-", text).strip("-")


def embeddings_folder_name(module_name: str, model_options: Mapping[str, Any]) -> str:
    """heareval's folder name: the module name plus `-key=value` per model option, slugified."""
    options = "".join(f"-{slugify(k)}={slugify(str(v))}" for k, v in model_options.items())
    return module_name + options


# ---------------------------------------------------------------------------------------------- readers


def read_json(path: Path) -> Any:
    """JSON content, or an error naming the missing or malformed file."""
    if not path.is_file():
        raise LayoutError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutError(f"{path}: not valid JSON ({err})") from err


def read_task_metadata(task_dir: Path) -> dict[str, Any]:
    """task_metadata.json as a dict (no check of its keys: readers need different ones)."""
    path = metadata_path(task_dir)
    metadata = read_json(path)
    if not isinstance(metadata, dict):
        raise LayoutError(f"{path}: expected a JSON object, got {type(metadata).__name__}")
    return metadata


def read_vocabulary(task_dir: Path) -> list[str]:
    """Labels ordered by their index in labelvocabulary.csv (labels compared as strings, as heareval does)."""
    path = vocabulary_path(task_dir)
    if not path.is_file():
        raise LayoutError(f"missing file {path}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise LayoutError(f"{path}: not a readable CSV file ({err})") from err
    if not rows or "idx" not in rows[0] or "label" not in rows[0]:
        raise LayoutError(f"{path}: expected a header with columns `idx` and `label`")
    try:
        by_idx = {int(r["idx"]): str(r["label"]) for r in rows}
    except (TypeError, ValueError) as err:
        raise LayoutError(f"{path}: `idx` must hold whole numbers ({err})") from err
    if sorted(by_idx) != list(range(len(rows))):
        raise LayoutError(f"{path}: indices must be 0..{len(rows) - 1} without gaps or repeats")
    return [by_idx[i] for i in range(len(rows))]


def read_split_labels(task_dir: Path, split: str) -> dict[str, Any]:
    """A split's `{split}.json`: clip name -> labels (event tasks: -> events), in the file's order."""
    path = split_labels_path(task_dir, split)
    if not path.is_file():
        raise LayoutError(f"task '{task_dir}' has split {split!r} but no {path.name} ({path})")
    labels = read_json(path)
    if not isinstance(labels, dict):
        raise LayoutError(f"{path}: expected a JSON object of clip name -> labels")
    for name in labels:
        check_clip_name(path, name)
    return labels


def check_task(task_dir: Path) -> dict[str, Any]:
    """Read a task folder's metadata, vocabulary and every split's labels; its metadata if all are sound.

    Readers call it before any work, so a malformed folder is a LayoutError naming the file, not a crash.
    """
    metadata = read_task_metadata(task_dir)
    read_vocabulary(task_dir)
    for split in split_names(metadata, task_dir):
        path = split_labels_path(task_dir, split)
        for name, labels in read_split_labels(task_dir, split).items():
            if not isinstance(labels, list):
                raise LayoutError(f"{path}: {name!r} maps to {labels!r}, not a list of labels or events")
    return metadata


def check_clip_name(labels_file: Path, name: str) -> None:
    """Refuse a clip name that would read or write outside its split folder (absolute, `..`, empty)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not name or name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
        raise LayoutError(
            f"{labels_file}: clip name {name!r} is not a plain file name inside the split folder "
            "(absolute paths and '..' are refused)"
        )


def split_names(metadata: Mapping[str, Any], task_dir: Path) -> list[str]:
    """The task's splits: metadata `splits`, else implied by `split_mode`/`nfolds`, else the split files.

    Older hearpreprocess versions wrote no `splits`; the files (`{split}.json` in a task folder,
    `{split}.embeddings.npy` in an embedding folder) settle the rest.
    """
    if metadata.get("splits"):
        splits = metadata["splits"]
        if not isinstance(splits, list) or not all(
            isinstance(s, str) and _SPLIT_NAME.fullmatch(s) for s in splits
        ):
            raise LayoutError(
                f"{metadata_path(task_dir)}: `splits` must be a list of split names (train, valid, test, "
                f"fold00, ...), got {splits!r}"
            )
        return list(splits)
    if metadata.get("split_mode") == TRAINVALTEST:
        return list(TRAIN_VALID_TEST)
    if metadata.get("nfolds"):
        n_folds = metadata["nfolds"]
        if isinstance(n_folds, bool) or not isinstance(n_folds, int) or not 0 < n_folds <= 1000:
            raise LayoutError(f"{metadata_path(task_dir)}: `nfolds` must be a whole number, got {n_folds!r}")
        return fold_names(n_folds)
    found = {m.group(1) for p in task_dir.iterdir() if (m := _SPLIT_FILE.fullmatch(p.name))}
    if not found:
        raise LayoutError(
            f"{metadata_path(task_dir)}: no `splits`, trainvaltest `split_mode` or `nfolds`, and "
            f"'{task_dir}' has no train/valid/test or fold split files"
        )
    return [s for s in TRAIN_VALID_TEST if s in found] + sorted(found - set(TRAIN_VALID_TEST))


def list_tasks(
    tasks_dir: Path, names: Sequence[str] | None = None, embedding_type: str | None = None
) -> list[Path]:
    """Task folders under `tasks_dir` (or `tasks_dir` itself if it is one), sorted by name.

    `names` keeps the tasks so named (by folder or `task_name`) and fails on a name that matches none;
    `embedding_type` keeps the tasks of that type ("scene" or "event").
    """
    if not tasks_dir.is_dir():
        raise LayoutError(f"tasks folder '{tasks_dir}' does not exist or is not a folder")
    if is_task(tasks_dir):
        found = [tasks_dir]
    else:
        # Hidden and `.partial` folders are unfinished writes of the task writers and of subsets.
        found = sorted(
            p
            for p in tasks_dir.iterdir()
            if is_task(p) and not p.name.startswith(".") and not p.name.endswith(".partial")
        )
    if names:
        aliases = {p: {p.name, read_task_metadata(p).get("task_name")} for p in found}
        unknown = [n for n in names if not any(n in a for a in aliases.values())]
        if unknown:
            raise LayoutError(f"{tasks_dir}: no task named {unknown}; found {[p.name for p in found]}")
        found = [p for p in found if aliases[p] & set(names)]
    if embedding_type is not None:
        found = [p for p in found if read_task_metadata(p).get("embedding_type") == embedding_type]
    if not found:
        kind = f"{embedding_type} " if embedding_type else ""
        raise LayoutError(f"no {kind}task folders (with {METADATA_FILE}) under '{tasks_dir}'")
    return found


# ---------------------------------------------------------------------------------------------- writer


def vocabulary_order(labels: Iterable[str]) -> list[str]:
    """Vocabulary order: numeric labels by value (pitch, counts), others alphabetically, as pandas sorts."""
    unique = set(labels)
    if unique and all(label.lstrip("-").isdigit() for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def write_json(path: Path, obj: Any, sort_keys: bool = False) -> Path:
    """`obj` as UTF-8 JSON, one-space indent and a final newline (the form every task file has)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((json.dumps(obj, indent=1, sort_keys=sort_keys, ensure_ascii=False) + "\n").encode())
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """A CSV file with `\\n` line ends whatever the platform, so that checksums agree everywhere."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue().encode())
    return path


def write_metadata(task_dir: Path, metadata: Mapping[str, Any]) -> Path:
    """task_metadata.json, keys sorted so that equal metadata gives equal bytes."""
    return write_json(metadata_path(task_dir), dict(metadata), sort_keys=True)


def write_split_labels(task_dir: Path, split: str, labels: Mapping[str, Any]) -> Path:
    """`{split}.json` with the clips in the given order, which fixes heareval's embedding row order."""
    return write_json(split_labels_path(task_dir, split), dict(labels))


def write_vocabulary(task_dir: Path, labels: Iterable[str]) -> list[str]:
    """labelvocabulary.csv of the distinct `labels` in vocabulary order; returns that order."""
    vocab = vocabulary_order(labels)
    write_csv(vocabulary_path(task_dir), ["idx", "label"], enumerate(vocab))
    return vocab


def write_task_files(
    task_dir: Path, metadata: Mapping[str, Any], labels: Mapping[str, Mapping[str, Sequence[str]]]
) -> list[str]:
    """A scene task's metadata, vocabulary (of every label used) and `{split}.json` files; returns the vocab.

    `labels[split][clip name]` lists a clip's labels; `labels` must hold exactly the metadata's splits (a
    split without clips as an empty mapping). The audio is the caller's: see `audio_dir`.
    """
    listed = metadata.get("splits")
    if not isinstance(listed, list) or list(labels) != [str(s) for s in listed]:
        raise LayoutError(
            f"{metadata_path(task_dir)}: metadata `splits` {listed!r} differ from the labelled splits "
            f"{list(labels)}"
        )
    task_dir.mkdir(parents=True, exist_ok=True)
    for split, split_labels in labels.items():
        write_split_labels(task_dir, split, {name: list(ls) for name, ls in split_labels.items()})
    vocab = write_vocabulary(task_dir, (label for s in labels.values() for ls in s.values() for label in ls))
    write_metadata(task_dir, metadata)
    return vocab
