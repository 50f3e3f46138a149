"""`msm export` bundles (pickle-free, round trip, safe checkpoint loading); `msm embed`'s heareval layout."""

from __future__ import annotations

import json
import math
import pickle
import random
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader

from msm_lightning.cli import main as msm
from msm_lightning.hear import encoder as hear
from msm_lightning.hear.embed import embed_tasks
from msm_lightning.hear.layout import embeddings_folder_name, slugify
from msm_lightning.model.bundle import ModelFileError, export_checkpoint, load_model_file
from msm_lightning.training.datamodule import AudioDataModule
from msm_lightning.training.module import MSMPretraining

SR = 16000


class CropsModule(AudioDataModule):
    """The project's datamodule (its hparams hold a pathlib.Path, as Python-API runs do) on random crops."""

    def setup(self, stage: str | None = None) -> None:
        """Nothing to list."""

    def train_dataloader(self) -> DataLoader:
        """Two random 2 s crops."""
        return DataLoader([{"audio": torch.randn(32000) * 0.1} for _ in range(2)], batch_size=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real Lightning 2.x checkpoint of MSMPretraining after one training step."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    module = MSMPretraining(family="transformer", size="tiny", warmup_steps=1)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=CropsModule(root=Path(root), batch_size=2, num_workers=0))
    path = root / "step1.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("export") / "ssast-tiny")


def assert_pure_safetensors(path: Path) -> dict:
    """The file is one JSON header plus tensor bytes that the header accounts for entirely: no pickle."""
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    ends = sorted(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert ends[-1] == len(data) - 8 - header_len  # nothing after the tensors
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    return header


def test_real_lightning_checkpoints_load_with_weights_only(checkpoint):
    raw = torch.load(checkpoint, weights_only=False)
    hp = raw["datamodule_hyper_parameters"]
    assert any(isinstance(v, Path) for v in hp.values())  # the case plain weights_only=True refuses
    model, config = load_model_file(checkpoint)
    assert (config["family"], config["size"], config["global_step"]) == ("transformer", "tiny", 1)
    state = model.state_dict()
    for key, value in raw["state_dict"].items():
        assert torch.equal(state[key.removeprefix("model.")], value), key


def test_export_writes_a_pickle_free_bundle_that_round_trips(checkpoint, bundle, tmp_path):
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["family"] == "transformer" and config["paper_name"] == "SSAST" and config["size"] == "tiny"
    assert config["patch_size"] == [4, 16] and config["crop_frames"] == 200
    assert config["encoder_kwargs"] == {"num_heads": 3, "mlp_ratio": 4.0}
    assert config["frontend"]["hop_length"] == 160 and config["frontend"]["n_mels"] == 80
    assert (config["source_checkpoint"], config["global_step"]) == ("step1.ckpt", 1)
    assert "msm_lightning_version" in config
    header = assert_pure_safetensors(bundle / "model.safetensors")
    assert not any(k.startswith("model.") for k in header)

    single = export_checkpoint(bundle, tmp_path / "ssast.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ssast.safetensors"]
    meta = assert_pure_safetensors(single)["__metadata__"]
    assert json.loads(meta["msm_lightning_config"])["source_checkpoint"] == "step1.ckpt"

    reference, _ = load_model_file(checkpoint)
    for path in (bundle, single):
        model, _ = load_model_file(path)
        for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(p, q), (path, name)


def test_same_embeddings_through_bundle_file_and_checkpoint(checkpoint, bundle, tmp_path):
    single = export_checkpoint(checkpoint, tmp_path / "one.safetensors")
    audio = torch.randn(2, round(2.5 * SR)) * 0.1
    results = [
        hear.get_timestamp_embeddings(audio, hear.load_model(str(p)))[0] for p in (checkpoint, bundle, single)
    ]
    for other in results[1:]:
        assert torch.allclose(results[0], other, atol=1e-6)
    trained = hear.load_model(str(bundle))
    assert not torch.allclose(
        results[0], hear.HearModel(hear.random_model("transformer")).timestamp_embeddings(audio)[0]
    )
    assert trained.config["global_step"] == 1


def test_msm_export_cli(checkpoint, tmp_path, capsys):
    msm(["export", str(checkpoint), str(tmp_path / "b")])
    assert "SSAST-tiny" in capsys.readouterr().out and (tmp_path / "b" / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        msm(["export", str(tmp_path / "nope.ckpt"), str(tmp_path / "c")])


def test_wrong_family_is_a_clear_error(bundle):
    with pytest.raises(
        ValueError, match=r"holds a SSAST \(transformer\) model.*loads SSAM.*hear_modules.ssast"
    ):
        hear.load_model(str(bundle), family="mamba")


class Opaque:
    """A pickled class: weights-only loading must refuse it."""


def test_bad_model_files_are_clear_errors(bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        load_model_file(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a model at all, just some bytes")
    with pytest.raises(ModelFileError, match=r"junk\.ckpt.*neither a Lightning checkpoint"):
        load_model_file(junk)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"family": "transformer"}, "x": Opaque()}, unsafe)
    with pytest.raises(
        ModelFileError,
        match=r"unsafe\.ckpt.*pickles test_export_embed\.Opaque.*msm export --trust-checkpoint",
    ):
        load_model_file(unsafe)
    with pytest.raises(ModelFileError, match=r"unsafe\.ckpt.*hyper_parameters"):  # opt-in: unpickled
        load_model_file(unsafe, trust_checkpoint=True)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, plain)
    with pytest.raises(ModelFileError, match=r"plain\.ckpt.*hyper_parameters"):
        load_model_file(plain)
    no_meta = tmp_path / "weights.safetensors"
    no_meta.write_bytes((bundle / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match=r"weights\.safetensors.*without an msm-lightning config"):
        load_model_file(no_meta)

    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    (mismatch / "model.safetensors").write_bytes((bundle / "model.safetensors").read_bytes())
    config = json.loads((bundle / "config.json").read_text())
    config["model"]["d_model"] = 384
    (mismatch / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"mismatch.*weights do not match"):
        load_model_file(mismatch)
    (mismatch / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"lacks 'config\.json'"):
        load_model_file(mismatch)


# ---------------------------------------------------------------- msm embed


def write_wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(round(seconds * SR))).astype(np.float32), SR)


def make_task(
    root: Path,
    name: str,
    splits: list[str],
    kind: str = "scene",
    n_files: int = 3,
    seconds: tuple[float, ...] = (0.3, 0.5),
) -> Path:
    """A tiny task in hearpreprocess layout; file i lasts seconds[i], the last value repeating."""
    task = root / name
    task.mkdir(parents=True)
    metadata = {
        "task_name": name,
        "version": "test",
        "embedding_type": kind,
        "prediction_type": "multiclass" if kind == "scene" else "multilabel",
        "split_mode": "trainvaltest" if splits[0] == "train" else "new_split_kfold",
        "sample_duration": 0.5,
        "evaluation": ["top1_acc"],
        "splits": splits,
    }
    (task / "task_metadata.json").write_text(json.dumps(metadata, indent=True))
    (task / "labelvocabulary.csv").write_text("idx,label\n0,a\n1,b\n")
    seed = 0
    for split in splits:
        labels = {}
        for i in range(n_files):
            filename = f"{split}_{i}.wav"
            write_wav(task / "16000" / split / filename, seconds[min(i, len(seconds) - 1)], seed)
            seed += 1
            if kind == "scene":
                labels[filename] = ["a" if i % 2 else "b"]
            else:
                labels[filename] = [{"label": "a", "start": 100.0, "end": 250.0}]
        (task / f"{split}.json").write_text(json.dumps(labels))
    return task


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
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


def test_embed_event_task_layout(tmp_path):
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
