"""The synthetic HEAR tasks are valid hearpreprocess folders that `msm embed` and `msm evaluate` read."""

import json

import soundfile as sf

from msm_lightning.datasets.synth_tasks import make_tasks
from msm_lightning.hear.layout import split_names


def test_synthetic_tasks_layout_and_balance(tmp_path):
    texture, pitch = make_tasks(tmp_path, seed=0)
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
