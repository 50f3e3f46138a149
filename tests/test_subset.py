"""Task subsets (`msm data subset`): seeded, label-stratified, linked, resumable."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from msm_lightning.datasets.subset import SUBSET_DONE_MARKER, stratified_pick, subset_task, subset_tasks
from msm_lightning.datasets.synth_tasks import make_tasks


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """The two synthetic HEAR tasks: synth-texture (train/valid/test, 5 labels) and synth-pitch (4 folds)."""
    out = tmp_path_factory.mktemp("tasks")
    make_tasks(out, seed=0)
    return out


def _splits(task: Path) -> dict[str, dict[str, list[str]]]:
    meta = json.loads((task / "task_metadata.json").read_text())
    return {s: json.loads((task / f"{s}.json").read_text()) for s in meta["splits"]}


def test_subset_keeps_metadata_splits_and_vocabulary(tasks_dir, tmp_path):
    written = subset_tasks(tasks_dir, tmp_path / "sub", max_per_split=7, seed=0)
    assert [p.name for p in written] == ["synth-pitch", "synth-texture"]
    for task in written:
        src = tasks_dir / task.name
        meta, src_meta = (json.loads((t / "task_metadata.json").read_text()) for t in (task, src))
        subset = meta.pop("subset")
        assert meta == src_meta  # everything but the note is unchanged, folds and split_mode included
        assert subset["max_per_split"] == 7 and subset["seed"] == 0
        assert (task / "labelvocabulary.csv").read_bytes() == (src / "labelvocabulary.csv").read_bytes()
        src_splits = _splits(src)
        for split, clips in _splits(task).items():
            assert len(clips) == min(7, len(src_splits[split]))
            assert all(src_splits[split][name] == labels for name, labels in clips.items())
            # The source's order is kept, so heareval's seeded row shuffle sees the same relative order.
            assert list(clips) == [n for n in src_splits[split] if n in clips]
            assert sorted(os.listdir(task / "16000" / split)) == sorted(clips)
            assert subset["splits"][split] == {"source": len(src_splits[split]), "kept": len(clips)}


def test_subset_is_label_stratified_and_capped(tasks_dir, tmp_path):
    texture = subset_task(tasks_dir / "synth-texture", tmp_path / "texture", max_per_split=12, seed=3)
    for split, clips in _splits(texture).items():
        counts = Counter(labels[0] for labels in clips.values())
        assert len(clips) == 12, split
        assert len(counts) == 5 and max(counts.values()) - min(counts.values()) <= 1
    pitch = subset_task(tasks_dir / "synth-pitch", tmp_path / "pitch", max_per_split=14, seed=3)
    for clips in _splits(pitch).values():  # 7 labels x 4 clips per fold: exactly 2 of each
        assert Counter(labels[0] for labels in clips.values()) == Counter({p: 2 for p in "CDEFGAB"})
    # A cap above a split's size keeps the whole split.
    whole = subset_task(tasks_dir / "synth-pitch", tmp_path / "whole", max_per_split=1000)
    assert _splits(whole) == _splits(tasks_dir / "synth-pitch")


def test_splits_keep_the_same_labels_when_the_cap_is_below_the_label_count(tasks_dir, tmp_path):
    pitch = subset_task(tasks_dir / "synth-pitch", tmp_path / "pitch", max_per_split=3, seed=5)
    label_sets = [{labels[0] for labels in clips.values()} for clips in _splits(pitch).values()]
    assert len(label_sets[0]) == 3 and all(s == label_sets[0] for s in label_sets)


def test_stratified_pick_runs_out_of_rare_labels_gracefully():
    import random

    clips = {"a1": ["a"], "b1": ["b"], "b2": ["b"], "b3": ["b"], "b4": ["b"]}
    picked = stratified_pick(clips, 3, random.Random(0))
    assert "a1" in picked and len(picked) == 3
    assert stratified_pick(clips, 10, random.Random(0)) == set(clips)


def test_subset_is_deterministic_and_seeded(tasks_dir, tmp_path):
    a = subset_task(tasks_dir / "synth-texture", tmp_path / "a", max_per_split=6, seed=0)
    b = subset_task(tasks_dir / "synth-texture", tmp_path / "b", max_per_split=6, seed=0)
    c = subset_task(tasks_dir / "synth-texture", tmp_path / "c", max_per_split=6, seed=1)
    assert _splits(a) == _splits(b)
    assert _splits(a) != _splits(c)


def test_subset_links_only_source_audio(tasks_dir, tmp_path):
    src = tasks_dir / "synth-pitch"
    task = subset_task(src, tmp_path / "sub", max_per_split=5)
    src_files = {p.resolve() for p in src.rglob("*") if p.is_file()}
    for path in (task / "16000").rglob("*"):
        if path.is_file():
            rel = path.relative_to(task)
            assert path.samefile(src / rel)  # a hard link (or symlink) to the same clip of the source
            assert (src / rel).resolve() in src_files
    # Nothing but metadata besides the linked audio.
    others = {p.name for p in task.iterdir() if p.is_file()}
    assert others == {"task_metadata.json", "labelvocabulary.csv", SUBSET_DONE_MARKER} | {
        f"{s}.json" for s in _splits(src)
    }


def test_subset_rerun_skips_and_refuses_a_foreign_folder(tasks_dir, tmp_path):
    src = tasks_dir / "synth-texture"
    task = subset_task(src, tmp_path / "sub", max_per_split=4)
    before = (task / "train.json").stat().st_mtime_ns
    subset_task(src, tmp_path / "sub", max_per_split=4)
    assert (task / "train.json").stat().st_mtime_ns == before
    subset_task(src, tmp_path / "sub", max_per_split=8)  # other parameters: rebuilt
    assert len(_splits(task)["train"]) == 8
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a subset"):
        subset_task(src, foreign, max_per_split=4)
    with pytest.raises(ValueError, match="at least 1"):
        subset_task(src, tmp_path / "zero", max_per_split=0)


def test_subset_command_line(tasks_dir, tmp_path, capsys):
    from msm_lightning.datasets.subset import main

    main([str(tasks_dir), str(tmp_path / "sub"), "--max-per-split", "3"])
    out = capsys.readouterr().out
    assert "synth-texture: train 3/120, valid 3/40, test 3/40" in out
    with pytest.raises(SystemExit, match="does not exist"):
        main([str(tmp_path / "nope"), str(tmp_path / "x"), "--max-per-split", "3"])
