"""The synthetic HEAR tasks are valid hearpreprocess folders that `msm embed` and `msm evaluate` read."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from msm_lightning.datasets.synth_tasks import make_tasks
from msm_lightning.hear.layout import split_names


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> list[Path]:
    """The tasks `msm synth --tasks` writes: the two scene tasks and the event task."""
    return make_tasks(tmp_path_factory.mktemp("synth"), seed=0, events=True)


def test_synthetic_tasks_layout_and_balance(tasks):
    texture, pitch, _ = tasks
    for task in (texture, pitch):
        meta = json.loads((task / "task_metadata.json").read_text())
        vocab = (task / "labelvocabulary.csv").read_text().splitlines()
        assert vocab[0] == "idx,label"
        labels_seen = set()
        for split in split_names(meta, task):
            labels = json.loads((task / f"{split}.json").read_text())
            for name, ls in labels.items():
                info = sf.info(task / "16000" / split / name)
                assert info.samplerate == 16000 and info.channels == 1
                assert abs(info.duration - meta["sample_duration"]) < 1e-3
                labels_seen.update(ls)
        assert labels_seen == {line.split(",")[1] for line in vocab[1:]}
    assert len(json.loads((texture / "train.json").read_text())) == 5 * 24
    assert len(json.loads((pitch / "fold00.json").read_text())) == 7 * 4


def test_synthetic_event_task_has_separate_events_where_the_sound_is(tasks):
    assert [t.name for t in tasks] == ["synth-texture", "synth-pitch", "synth-events"]
    task = tasks[-1]
    meta = json.loads((task / "task_metadata.json").read_text())
    assert (meta["embedding_type"], meta["prediction_type"], meta["split_mode"]) == (
        "event",
        "multilabel",
        "trainvaltest",
    )
    assert meta["evaluation"][0] == "event_onset_200ms_fms"
    assert (task / "labelvocabulary.csv").read_text() == "idx,label\n0,noise\n1,tone\n"
    counts = {}
    for split in split_names(meta, task):
        clips = json.loads((task / f"{split}.json").read_text())
        counts[split] = len(clips)
        for name, events in clips.items():
            audio, rate = sf.read(task / "16000" / split / name)
            assert rate == 16000 and len(audio) == 16000 * meta["sample_duration"]
            assert 2 <= len(events) <= 3
            inside = np.zeros(len(audio), dtype=bool)
            for i, e in enumerate(events):
                assert e["label"] in ("noise", "tone") and 400 <= e["end"] - e["start"] <= 800
                assert e["start"] >= 100 and e["end"] <= 2900
                assert i == 0 or e["start"] - events[i - 1]["end"] >= 250  # separate, in time order
                inside[int(e["start"]) * 16 : int(e["end"]) * 16] = True
            # Loud where the events are, a quiet floor elsewhere.
            assert np.sqrt(np.mean(audio[inside] ** 2)) > 30 * np.sqrt(np.mean(audio[~inside] ** 2))
    assert counts == {"train": 20, "valid": 8, "test": 8}
