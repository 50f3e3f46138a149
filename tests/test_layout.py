"""The one module of HEAR folder layouts: task writer, split names, task listing, errors naming the file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from msm_lightning.hear import layout
from msm_lightning.hear.layout import (
    LayoutError,
    list_tasks,
    read_split_labels,
    read_task_metadata,
    read_vocabulary,
    split_names,
    write_task_files,
)

LABELS_TVT = {
    "train": {"b.wav": ["dog"], "a.wav": ["cat"]},
    "valid": {"c.wav": ["cat"]},
    "test": {"d.wav": ["dog"], "e.wav": ["bird"]},
}


def metadata(name: str, splits: list[str], **extra: object) -> dict:
    """Scene-task metadata listing `splits`."""
    mode = layout.TRAINVALTEST if splits[0] == "train" else layout.NEW_SPLIT_KFOLD
    meta = {"task_name": name, "embedding_type": "scene", "split_mode": mode, "splits": splits}
    return {**meta, **extra}


def test_writer_round_trip_train_valid_test(tmp_path: Path) -> None:
    task = tmp_path / "tasks" / "animals"
    vocab = write_task_files(task, metadata("animals", ["train", "valid", "test"]), LABELS_TVT)
    assert vocab == ["bird", "cat", "dog"] == read_vocabulary(task)
    assert (task / "labelvocabulary.csv").read_text() == "idx,label\n0,bird\n1,cat\n2,dog\n"
    meta = read_task_metadata(task)
    assert split_names(meta, task) == ["train", "valid", "test"]
    for split, labels in LABELS_TVT.items():
        # The clips keep the writer's order: it fixes heareval's embedding row order.
        assert list(read_split_labels(task, split).items()) == list(labels.items())
    text = (task / "task_metadata.json").read_text()
    assert text.endswith("}\n") and list(json.loads(text)) == sorted(meta)
    assert list_tasks(tmp_path / "tasks") == [task]


def test_writer_round_trip_folds_and_numeric_vocabulary(tmp_path: Path) -> None:
    folds = layout.fold_names(3)
    assert folds == ["fold00", "fold01", "fold02"]
    labels = {f: {f"{f}_{i}.wav": [str(10 - 4 * i)] for i in range(3)} for f in folds}
    task = tmp_path / "counts"
    assert write_task_files(task, metadata("counts", folds, nfolds=3), labels) == ["2", "6", "10"]
    assert split_names(read_task_metadata(task), task) == folds
    assert read_split_labels(task, "fold01") == {
        "fold01_0.wav": ["10"],
        "fold01_1.wav": ["6"],
        "fold01_2.wav": ["2"],
    }


def test_split_names_without_splits_come_from_mode_nfolds_or_files(tmp_path: Path) -> None:
    assert split_names({"split_mode": "trainvaltest"}, tmp_path) == ["train", "valid", "test"]
    assert split_names({"split_mode": "new_split_kfold", "nfolds": 2}, tmp_path) == ["fold00", "fold01"]
    for name in ("fold01.json", "fold00.embeddings.npy", "fold00.embedding-dimensions.json", "x.json"):
        (tmp_path / name).write_text("{}")
    assert split_names({"split_mode": "presplit_kfold"}, tmp_path) == ["fold00", "fold01"]
    for name in ("test.json", "train.json"):
        (tmp_path / name).write_text("{}")
    assert split_names({}, tmp_path) == ["train", "test", "fold00", "fold01"]


def test_list_tasks_by_name_type_and_self(tmp_path: Path) -> None:
    for folder, name, kind in [("a", "task-a", "scene"), ("b", "task-b", "event"), ("c", "task-c", "scene")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "task_metadata.json").write_text(
            json.dumps({"task_name": name, "embedding_type": kind})
        )
    for unfinished in ("d.partial", ".e.partial"):  # interrupted writes are not tasks yet
        (tmp_path / unfinished).mkdir()
        (tmp_path / unfinished / "task_metadata.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    assert [p.name for p in list_tasks(tmp_path)] == ["a", "b", "c"]
    assert [p.name for p in list_tasks(tmp_path, embedding_type="scene")] == ["a", "c"]
    assert [p.name for p in list_tasks(tmp_path, ["c", "task-a"])] == ["a", "c"]
    assert list_tasks(tmp_path / "b") == [tmp_path / "b"]
    with pytest.raises(LayoutError, match=r"no task named \['zzz'\]; found \['a', 'b', 'c'\]"):
        list_tasks(tmp_path, ["a", "zzz"])
    with pytest.raises(LayoutError, match="no scene task folders"):
        list_tasks(tmp_path / "b", embedding_type="scene")
    with pytest.raises(LayoutError, match=r"no task folders \(with task_metadata\.json\) under '.*notes'"):
        list_tasks(tmp_path / "notes")
    with pytest.raises(LayoutError, match="does not exist"):
        list_tasks(tmp_path / "missing")


def test_embedding_file_names_follow_heareval(tmp_path: Path) -> None:
    assert layout.embeddings_path(tmp_path, "fold00") == tmp_path / "fold00.embeddings.npy"
    assert layout.embedding_dimensions_path(tmp_path, "test") == tmp_path / "test.embedding-dimensions.json"
    assert layout.target_labels_path(tmp_path, "test") == tmp_path / "test.target-labels.pkl"
    assert layout.filename_timestamps_path(tmp_path, "test") == tmp_path / "test.filename-timestamps.json"
    assert (
        layout.file_embedding_path(tmp_path, "train", "x.wav") == tmp_path / "train" / "x.wav.embedding.npy"
    )
    assert layout.file_labels_path(tmp_path, "train", "x.wav").name == "x.wav.target-labels.json"
    assert layout.file_timestamps_path(tmp_path, "train", "x.wav").name == "x.wav.timestamps.json"
    assert layout.audio_dir(tmp_path, "valid", 16000) == tmp_path / "16000" / "valid"


def strip_splits(task: Path) -> None:
    """Metadata that names no splits in a folder without split files."""
    (task / "task_metadata.json").write_text("{}")
    for split in LABELS_TVT:
        (task / f"{split}.json").unlink()


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda d: (d / "task_metadata.json").write_text("{oops"), r"task_metadata\.json: not valid JSON"),
        (
            lambda d: (d / "task_metadata.json").write_text("[]"),
            r"task_metadata\.json: expected a JSON object",
        ),
        (
            lambda d: (d / "task_metadata.json").write_text('{"splits": "train"}'),
            r"task_metadata\.json: `splits` must be a list",
        ),
        (strip_splits, r"task_metadata\.json: no `splits`.* no train/valid/test or fold split files"),
        (lambda d: (d / "valid.json").unlink(), r"split 'valid' but no valid\.json"),
        (lambda d: (d / "test.json").write_text("[1, 2]"), r"test\.json: expected a JSON object"),
        (
            lambda d: (d / "labelvocabulary.csv").write_text("idx,label\n0,a\n2,b\n"),
            r"labelvocabulary\.csv: indices",
        ),
        (
            lambda d: (d / "labelvocabulary.csv").write_text("label\na\n"),
            r"labelvocabulary\.csv: expected a header",
        ),
        (lambda d: (d / "labelvocabulary.csv").unlink(), r"missing file .*labelvocabulary\.csv"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "splits-not-list",
        "no-splits",
        "missing-split",
        "bad-split",
        "gap",
        "header",
        "vocab",
    ],
)
def test_malformed_task_errors_name_the_file(tmp_path: Path, break_it, expected) -> None:
    task = tmp_path / "t"
    write_task_files(task, metadata("t", ["train", "valid", "test"]), LABELS_TVT)
    break_it(task)
    with pytest.raises(LayoutError, match=expected):
        meta = read_task_metadata(task)
        for split in split_names(meta, task):
            read_split_labels(task, split)
        read_vocabulary(task)


def test_writer_refuses_splits_that_differ_from_the_metadata(tmp_path: Path) -> None:
    with pytest.raises(
        LayoutError, match=r"task_metadata\.json: metadata `splits` \['train', 'valid'\] differ"
    ):
        write_task_files(tmp_path / "t", metadata("t", ["train", "valid"]), LABELS_TVT)


def test_layout_loads_neither_torch_nor_the_model() -> None:
    code = (
        "import sys, msm_lightning.hear.layout; "
        "heavy = ('torch', 'numpy', 'msm_lightning.model'); "
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
