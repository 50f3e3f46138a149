"""`msm embed`: heareval's embedding layout, skipping finished tasks, event tasks, folder names."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from msm_lightning.cli import main as msm
from msm_lightning.hear import encoder as hear
from msm_lightning.hear.embed import embed_tasks
from msm_lightning.hear.layout import embeddings_folder_name, slugify

SR = 16000


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, make_task) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    make_task(root, "tiny-scene", ["train", "valid", "test"])
    make_task(root, "tiny-folds", ["fold00", "fold01"], n_files=2)
    return root


def test_embed_writes_the_heareval_layout_and_skips_done_tasks(bundle, tasks, tmp_path, capsys):
    out = tmp_path / "emb"
    args = ["embed", "--module", "hear_modules.ssast", "--model", str(bundle), "--tasks", str(tasks)]
    msm([*args, "--out", str(out), "--batch-seconds", "1"])
    task_out = out / "hear_modules.ssast" / "tiny-scene"
    model = hear.load_model(str(bundle))
    prng = random.Random(0)
    for split in ["train", "valid", "test"]:
        split_data = json.loads((tasks / "tiny-scene" / f"{split}.json").read_text())
        files = [task_out / split / f"{name}.embedding.npy" for name in split_data]
        for name in split_data:  # per-file embeddings equal the HEAR API's
            emb = np.load(task_out / split / f"{name}.embedding.npy")
            audio, _ = sf.read(tasks / "tiny-scene" / "16000" / split / name, dtype="float32")
            expected = hear.get_scene_embeddings(torch.from_numpy(audio)[None], model)[0].numpy()
            assert emb.dtype == np.float32 and emb.shape == (960,)
            assert np.allclose(emb, expected, atol=1e-5)
            labels = json.loads((task_out / split / f"{name}.target-labels.json").read_text())
            assert labels == split_data[name]
        prng.shuffle(files)  # heareval's row order
        dims = json.loads((task_out / f"{split}.embedding-dimensions.json").read_text())
        assert dims == [3, 960]
        memmap = np.fromfile(task_out / f"{split}.embeddings.npy", dtype=np.float32)  # headerless
        assert memmap.size == 3 * 960
        assert np.array_equal(memmap.reshape(3, 960), np.stack([np.load(f) for f in files]))
        with (task_out / f"{split}.target-labels.pkl").open("rb") as f:
            labels = pickle.load(f)
        expected_labels = [split_data[f.name.removesuffix(".embedding.npy")] for f in files]
        assert labels == expected_labels
        assert (task_out / f"{split}.json").read_text() == (
            tasks / "tiny-scene" / f"{split}.json"
        ).read_text()
    for copied in ("task_metadata.json", "labelvocabulary.csv"):
        assert (task_out / copied).read_bytes() == (tasks / "tiny-scene" / copied).read_bytes()
    assert (task_out / ".done.embeddings").exists()
    assert json.loads((task_out / "profile.embeddings.json").read_text())["gpu_device_name"] == "cpu"
    folds = out / "hear_modules.ssast" / "tiny-folds"
    assert json.loads((folds / "fold01.embedding-dimensions.json").read_text()) == [2, 960]

    stamp = (task_out / "train.embeddings.npy").stat().st_mtime_ns
    capsys.readouterr()
    msm([*args, "--out", str(out)])
    assert capsys.readouterr().out.count("skipping") == 2
    assert (task_out / "train.embeddings.npy").stat().st_mtime_ns == stamp


def test_embed_event_task_layout(tmp_path, make_task):
    tasks = tmp_path / "tasks"
    make_task(tasks, "tiny-events", ["train", "valid", "test"], kind="event", n_files=2)
    with pytest.warns(UserWarning, match="RANDOM"):
        embed_tasks("hear_modules.ssast", tasks, tmp_path / "emb", model_options={"chunk_batch": 4})
    task_out = tmp_path / "emb" / "hear_modules.ssast-chunk-batch=4" / "tiny-events"
    stamps = json.loads((task_out / "train" / "train_1.wav.timestamps.json").read_text())
    labels = json.loads((task_out / "train" / "train_1.wav.target-labels.json").read_text())
    assert len(stamps) == math.ceil((1 + 8000 // 160) / 4) == len(labels) == 13
    assert [bool(x) for x in labels] == [100 <= t < 250.0001 for t in stamps]
    rows = json.loads((task_out / "train.embedding-dimensions.json").read_text())[0]
    assert rows == 13 + math.ceil((1 + 4800 // 160) / 4)
    pairs = json.loads((task_out / "train.filename-timestamps.json").read_text())
    assert len(pairs) == rows and pairs[0][0].endswith(".wav")


def test_folder_names_follow_heareval():
    assert embeddings_folder_name("hear_modules.ssam", {}) == "hear_modules.ssam"
    assert embeddings_folder_name("m", {"chunk_batch": 8, "Size": "Tiny"}) == "m-chunk-batch=8-size=tiny"
    assert slugify("a_b c,1,000 'x'") == "a-b-c-1000-x"


def test_clip_names_outside_the_split_folder_are_refused(tmp_path, make_task):
    task = make_task(tmp_path / "tasks", "hostile", ["train", "valid", "test"], n_files=1)
    labels = json.loads((task / "train.json").read_text())
    labels["../../../escaped.wav"] = ["a"]
    (task / "train.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=r"train\.json.*'\.\./\.\./\.\./escaped\.wav'.*refused"):
        embed_tasks("hear_modules.logmel", tmp_path / "tasks", tmp_path / "emb")
    assert not list(tmp_path.rglob("escaped*"))


def test_a_rerun_with_another_model_redoes_the_task_and_never_mixes_splits(
    bundle, tmp_path, make_task, capsys
):
    make_task(tmp_path / "tasks", "tiny", ["train", "valid", "test"], n_files=2)
    out = tmp_path / "emb"
    with pytest.warns(UserWarning, match="RANDOM"):
        (task_out,) = embed_tasks("hear_modules.ssast", tmp_path / "tasks", out)
    random_rows = np.fromfile(task_out / "test.embeddings.npy", dtype=np.float32)
    marker = json.loads((task_out / ".done.embeddings").read_text())
    assert marker["module"] == "hear_modules.ssast" and marker["model_sha256"] is None

    capsys.readouterr()
    embed_tasks("hear_modules.ssast", tmp_path / "tasks", out, model_path=str(bundle))
    assert "redoing tiny" in capsys.readouterr().out
    marker = json.loads((task_out / ".done.embeddings").read_text())
    assert marker["model_sha256"] and marker["model_file"] == str(bundle.resolve())
    trained_rows = np.fromfile(task_out / "test.embeddings.npy", dtype=np.float32)
    assert not np.allclose(random_rows, trained_rows)
    embed_tasks("hear_modules.ssast", tmp_path / "tasks", out, model_path=str(bundle))
    assert "skipping tiny" in capsys.readouterr().out
    assert not [p.name for p in out.rglob(".*partial*")]


def test_bad_audio_stops_with_the_clip_name_and_leaves_no_half_task(tmp_path, make_task):
    task = make_task(tmp_path / "tasks", "broken", ["train", "valid", "test"], n_files=2)
    nan = np.full(8000, np.nan, dtype=np.float32)
    sf.write(task / "16000" / "valid" / "valid_1.wav", nan, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"valid_1\.wav.*NaN or infinite"):
        embed_tasks("hear_modules.logmel", tmp_path / "tasks", tmp_path / "emb")
    # The train split was embedded before the failure; none of it may look like a usable task.
    assert not (tmp_path / "emb" / "hear_modules.logmel" / "broken").exists()
