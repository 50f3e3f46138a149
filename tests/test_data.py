"""Tests for the random-crop dataset and the pretraining data module."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.utils.data import DataLoader, SequentialSampler

from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.datamodule import AudioDataModule, RandomCropDataset, SkippedAudioWarning
from msm_lightning.training.sampler import CropStreamSampler

CROP = 32000


def write(path: Path, data: np.ndarray, sr: int = 16000) -> Path:
    sf.write(path, data.astype(np.float32), sr, subtype="FLOAT")
    return path


def ramp(tmp_path: Path, seconds: float = 5.0) -> tuple[Path, np.ndarray]:
    """A file whose every sample is distinct, so a crop reveals where it was taken."""
    x = np.linspace(-0.9, 0.9, int(seconds * 16000), dtype=np.float32)
    return write(tmp_path / "ramp.wav", x), x


def broken(tmp_path: Path, name: str = "broken.flac") -> Path:
    path = tmp_path / name
    path.write_bytes(b"fLaC this is not really flac" * 10)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=12, n_corrupt=2)


def test_crops_are_exact_windows_of_the_file(tmp_path: Path) -> None:
    path, x = ramp(tmp_path)
    ds = RandomCropDataset([path])
    starts = set()
    for _ in range(8):
        item = ds[0]
        audio = item["audio"].numpy()
        assert audio.shape == (CROP,) and audio.dtype == np.float32 and item["skipped"] == 0
        start = int(np.argmin(np.abs(x - audio[0])))
        np.testing.assert_array_equal(audio, x[start : start + CROP])
        starts.add(start)
    assert len(starts) > 1, "random crops should start at different places"
    center = RandomCropDataset([path], center=True)[0]["audio"].numpy()
    np.testing.assert_array_equal(center, x[24000 : 24000 + CROP])


def test_resampled_crops_have_the_crop_length(corpus: Path) -> None:
    files = [p for p in corpus.read_text().split() if p.startswith("part")]
    ds = RandomCropDataset([corpus.parent / p for p in files], crop_samples=24000, sample_rate=22050)
    for i in range(len(ds)):
        item = ds[i]
        assert item["audio"].shape == (24000,) and item["audio"].dtype == torch.float32
        assert item["skipped"] == 0


def test_short_clips_are_tiled(tmp_path: Path) -> None:
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 4800).astype(np.float32)
    path = write(tmp_path / "short.wav", clip)
    for center in (False, True):
        audio = RandomCropDataset([path], center=center)[0]["audio"].numpy()
        assert audio.shape == (CROP,)
        np.testing.assert_array_equal(audio[4800:], audio[:-4800])  # period of one clip
        phase = int(np.flatnonzero(clip == audio[0])[0])
        np.testing.assert_array_equal(audio[: 4800 - phase], clip[phase:])
        assert phase == 0 or not center


def test_bad_files_are_skipped_counted_and_warned_once(tmp_path: Path) -> None:
    good, _ = ramp(tmp_path, seconds=3.0)
    bad = broken(tmp_path)
    ds = RandomCropDataset([bad, good])
    with pytest.warns(SkippedAudioWarning, match="broken.flac"):
        item = ds[0]
    assert item["skipped"] == 1 and item["audio"].shape == (CROP,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is known bad now: no second warning
        assert ds[0]["skipped"] == 1
        assert ds[1]["skipped"] == 0


def test_all_bad_files_raise_instead_of_looping(tmp_path: Path) -> None:
    ds = RandomCropDataset([broken(tmp_path, f"b{i}.flac") for i in range(3)])
    with (
        pytest.warns(SkippedAudioWarning),
        pytest.raises(RuntimeError, match="all 3 audio files are unreadable"),
    ):
        ds[0]


def test_long_run_of_bad_files_raises(tmp_path: Path) -> None:
    good, _ = ramp(tmp_path, seconds=3.0)
    files = [broken(tmp_path, f"b{i}.flac") for i in range(3)] + [good]
    ds = RandomCropDataset(files, center=True, max_attempts=2)
    with pytest.warns(SkippedAudioWarning), pytest.raises(RuntimeError, match="2 audio files in a row"):
        ds[0]
    assert ds[3]["skipped"] == 0


def test_crops_differ_across_ranks_but_repeat_under_a_seed(tmp_path: Path) -> None:
    path, _ = ramp(tmp_path)

    def crops(rank: int) -> torch.Tensor:
        torch.manual_seed(123)
        ds = RandomCropDataset([path], rank=rank)
        return torch.stack([ds[0]["audio"] for _ in range(3)])

    assert torch.equal(crops(0), crops(0))
    assert not torch.equal(crops(0), crops(1))


def test_workers_draw_different_crops(tmp_path: Path) -> None:
    path, _ = ramp(tmp_path)
    ds = RandomCropDataset([path] * 4)
    # Drawing in the parent first builds its generator, which forked workers must not reuse.
    ds[0]
    loader = DataLoader(ds, batch_size=1, num_workers=2)  # batch i comes from worker i % 2
    batches = [b["audio"][0] for b in loader]
    assert len(batches) == 4
    assert not torch.equal(batches[0], batches[1])
    assert len({float(b[0]) for b in batches}) == 4


def test_datamodule_batches(corpus: Path) -> None:
    dm = AudioDataModule(manifest=str(corpus), batch_size=4, num_workers=0, val_manifest=str(corpus))
    assert dm.batch_size == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedAudioWarning)
        dm.setup("fit")
        train = dm.train_dataloader()
        # Shuffled crops from a resumable stream (a RandomSampler before the stream existed).
        assert isinstance(train.sampler, CropStreamSampler) and train.drop_last
        batches = list(train)
        val = dm.val_dataloader()
        assert isinstance(val.sampler, SequentialSampler) and not val.drop_last
        val_a = [b["audio"] for b in val]
        val_b = [b["audio"] for b in val]
    assert len(batches) == 14 // 4
    for batch in batches:
        assert batch["audio"].shape == (4, CROP) and batch["audio"].dtype == torch.float32
        assert batch["skipped"].shape == (4,)
    # A crop of a readable file skips nothing; one asked of a corrupt file skips it and any corrupt
    # replacement drawn in its place (so the total can exceed the 2 corrupt files: no `<= 2` bound).
    asked = train.sampler.epoch_items(0)[0][: len(batches) * 4].tolist()
    corrupt = [dm.train_dataset.path(i).parent.name == "bad" for i in asked]
    assert [s > 0 for b in batches for s in b["skipped"].tolist()] == corrupt
    assert [a.shape[0] for a in val_a] == [4, 4, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(val_a, val_b, strict=True))


def test_datamodule_with_workers(corpus: Path) -> None:
    dm = AudioDataModule(manifest=str(corpus), batch_size=3, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 2
    # Consume the whole epoch: abandoning persistent workers mid-epoch makes their shutdown slow.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedAudioWarning)
        shapes = [tuple(b["audio"].shape) for b in loader]
    assert shapes == [(3, CROP)] * 4
    assert dm.val_dataloader() == []
    # Stop the persistent workers now: if a later garbage collection breaks the loader's reference
    # cycle, it may close the worker queues before asking the workers to exit, and each then takes
    # torch's 5 s join timeout.
    del loader, dm
    gc.collect()


def test_datamodule_folder_root(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"sub{i}").mkdir()
        write(tmp_path / f"sub{i}" / f"c{i}.wav", np.full(8000, 0.1 * (i + 1)))
    dm = AudioDataModule(root=str(tmp_path), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))["audio"].shape == (2, CROP)


def test_setup_rejects_a_manifest_of_only_bad_files(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.txt"
    manifest.write_text(
        "".join(f"{broken(tmp_path, f'b{i}.flac').name}\n" for i in range(3)) + "missing.wav\n"
    )
    dm = AudioDataModule(manifest=str(manifest))
    with pytest.raises(ValueError, match=r"none of the 4 files.*manifest '.*bad\.txt'"):
        dm.setup("fit")


@pytest.mark.parametrize("kwargs", [{}, {"root": "a", "manifest": "b.txt"}])
def test_setup_needs_exactly_one_source(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="exactly one of root"):
        AudioDataModule(**kwargs).setup("fit")


def test_too_few_files_for_a_batch(tmp_path: Path) -> None:
    path, _ = ramp(tmp_path, seconds=1.0)
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{path}\n")
    dm = AudioDataModule(manifest=str(manifest), batch_size=2, num_workers=0)
    dm.setup("fit")
    with pytest.raises(ValueError, match="only 1 training files"):
        dm.train_dataloader()
