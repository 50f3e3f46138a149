"""`msm embed`, `msm evaluate`, `msm score` and the pipelines on hostile input: nothing from a file is ever
executed, results files are replaced atomically and a corrupt one is named before any work, malformed task
folders are messages."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from msm_lightning.evaluation import protocol, score
from msm_lightning.evaluation.protocol import write_results
from msm_lightning.hear.embed import main as embed_main
from msm_lightning.pipelines.runs import StageLog


def embedding_task(root: Path, name: str = "toy", n: int = 12, dim: int = 4) -> Path:
    """A small scene task in heareval's embedding layout (what `msm embed` writes)."""
    task = root / name
    task.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        x = rng.normal(size=(n, dim)).astype(np.float32)
        x.tofile(task / f"{split}.embeddings.npy")
        (task / f"{split}.embedding-dimensions.json").write_text(json.dumps([n, dim]))
        with (task / f"{split}.target-labels.pkl").open("wb") as f:
            pickle.dump([["a" if i % 2 else "b"] for i in range(n)], f)
    (task / "labelvocabulary.csv").write_text("idx,label\n0,a\n1,b\n")
    metadata = {
        "task_name": name,
        "embedding_type": "scene",
        "prediction_type": "multiclass",
        "split_mode": "trainvaltest",
        "evaluation": ["top1_acc"],
        "splits": ["train", "valid", "test"],
    }
    (task / "task_metadata.json").write_text(json.dumps(metadata))
    return task


class RunsCode:
    """Pickles to a call of os.mkdir: loading it with plain pickle would create `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def no_training(*args, **kwargs):
    raise AssertionError("a probe was trained before the input was checked")


def test_label_pickles_are_loaded_as_data_only(tmp_path, monkeypatch):
    task = embedding_task(tmp_path / "emb")
    marker = tmp_path / "code-ran"
    labels = [["a"]] * 11 + [RunsCode(marker)]
    (task / "train.target-labels.pkl").write_bytes(pickle.dumps(labels))
    monkeypatch.setattr(protocol, "train_jobs", no_training)
    with pytest.raises(SystemExit, match=r"train\.target-labels\.pkl.*refers to posix\.mkdir"):
        protocol.main([str(task), "--out", str(tmp_path / "results"), "--seeds", "1"])
    assert not marker.exists()


def test_a_corrupt_results_file_is_named_before_any_work(tmp_path, monkeypatch):
    task = embedding_task(tmp_path / "emb")
    results = tmp_path / "results"
    results.mkdir()
    (results / "emb.json").write_text('{"format": "msm-evaluate/1", "tasks": {"toy": {"mean"')  # cut short
    monkeypatch.setattr(protocol, "train_jobs", no_training)
    with pytest.raises(SystemExit, match=r"results file '.*emb\.json' is not valid JSON"):
        protocol.main([str(task), "--out", str(results), "--seeds", "1"])
    # msm score: an error naming the file, not a model silently left out of the comparison.
    good = {"model": "good", "tasks": {"toy": {"primary_metric": "top1_acc", "mean": 0.5}}}
    (results / "good.json").write_text(json.dumps(good))
    with pytest.raises(SystemExit, match=r"emb\.json' is not valid JSON"):
        score.main([str(results), "--out", str(tmp_path / "scores"), "--no-plot"])
    # The pipelines' stage log, read when a run folder is reopened.
    (tmp_path / "demo.json").write_text('{"command": "demo", "stages": {')
    with pytest.raises(ValueError, match=r"demo\.json' is not valid JSON"):
        StageLog(tmp_path / "demo.json", "demo", {})


def test_results_files_are_replaced_whole(tmp_path):
    entry = {"task_name": "toy", "primary_metric": "top1_acc", "metrics": ["top1_acc"], "mean": 0.5}
    entry.update({"ci95": None, "seeds": [0], "protocol": {}, "chosen_hparams": [], "best_epochs": [[1]]})
    entry.update({"wall_time_s": 1.0})
    path = write_results(tmp_path, "m", tmp_path / "emb", {"toy": entry})
    first = path.stat().st_ino
    path = write_results(tmp_path, "m", tmp_path / "emb", {"toy2": entry})
    # A rename, not a rewrite in place: readers (and a crash) see the old file or the new one, whole.
    assert path.stat().st_ino != first
    assert set(json.loads(path.read_text())["tasks"]) == {"toy", "toy2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.md"]  # no temporary files left


def _no_vocabulary(task: Path) -> None:
    (task / "labelvocabulary.csv").unlink()


def _split_file_is_a_list(task: Path) -> None:
    (task / "train.json").write_text('["train_0.wav"]')


def _metadata(**changes) -> Callable[[Path], None]:
    def change(task: Path) -> None:
        metadata = json.loads((task / "task_metadata.json").read_text())
        metadata.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            metadata.pop(key)
        (task / "task_metadata.json").write_text(json.dumps(metadata))

    return change


def _invalid_metadata(task: Path) -> None:
    (task / "task_metadata.json").write_text("{not json")


def _binary_vocabulary(task: Path) -> None:
    (task / "labelvocabulary.csv").write_bytes(b"\xff\xfe\x00idx,label")


MALFORMED = {
    "no labelvocabulary.csv": (_no_vocabulary, r"missing file .*labelvocabulary\.csv"),
    "split file is a list": (_split_file_is_a_list, r"train\.json: expected a JSON object"),
    "invalid task_metadata.json": (_invalid_metadata, r"task_metadata\.json: not valid JSON"),
    "no splits": (
        _metadata(splits=None, split_mode="new_split_kfold"),
        r"task_metadata\.json: no `splits`",
    ),
    "nfolds not a number": (
        _metadata(splits=None, split_mode="new_split_kfold", nfolds="x"),
        r"task_metadata\.json: `nfolds` must be a whole number",
    ),
    "binary labelvocabulary.csv": (_binary_vocabulary, r"labelvocabulary\.csv: not a readable CSV"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_task_folders_are_messages_naming_the_file_in_embed(tmp_path, make_task, case):
    corrupt, message = MALFORMED[case]
    task = make_task(tmp_path / "tasks", "t", ["train", "valid", "test"], n_files=1)
    corrupt(task)
    if case == "no splits":  # the split files would still say which splits there are
        for f in task.glob("*.json"):
            if f.name != "task_metadata.json":
                f.unlink()
    with pytest.raises(SystemExit, match=f"msm embed: .*{message}"):
        embed_main(
            ["--module", "hear_modules.logmel", "--tasks", str(task.parent), "--out", str(tmp_path / "o")]
        )


@pytest.mark.parametrize("case", [c for c in MALFORMED if c != "split file is a list"])
def test_malformed_task_folders_are_messages_naming_the_file_in_evaluate(tmp_path, monkeypatch, case):
    corrupt, message = MALFORMED[case]
    task = embedding_task(tmp_path / "emb")
    corrupt(task)
    if case == "no splits":
        for f in task.glob("*.embeddings.npy"):
            shutil.move(f, tmp_path / f.name)
    monkeypatch.setattr(protocol, "train_jobs", no_training)
    with pytest.raises(SystemExit, match=f"msm evaluate: .*{message}"):
        protocol.main([str(task), "--out", str(tmp_path / "results"), "--seeds", "1"])
