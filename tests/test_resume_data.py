"""A resumed run continues the data stream: the same crops, masks and losses as an uninterrupted run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from msm_lightning.cli import main
from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.datamodule import AudioDataModule, RandomCropDataset
from msm_lightning.training.sampler import CropStreamSampler, masks_from_seeds


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 14 entries (2 corrupt): 7 batches of 2 per epoch on one device.
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_files=12, seed=0, n_corrupt=2)


@pytest.fixture
def fit_config(write_fit_config, corpus: Path):
    """Writes small CPU fp32 `msm fit` configs: 8 steps, a checkpoint every 2, every batch recorded."""

    def write(path: Path, root: Path, record: Path, callbacks: tuple[dict, ...] = ()) -> Path:
        recorder = {"class_path": "fit_callbacks.RecordRun", "init_args": {"out_dir": str(record)}}
        # With a finite max_epochs Lightning builds the loader early (to size the schedule), before it
        # restores the loops: the position must come from the checkpoint's data module state.
        trainer = {
            "precision": "32-true",
            "max_steps": 8,
            "max_epochs": 2,
            "callbacks": [recorder, *callbacks],
        }
        model = {"warmup_steps": 2, "base_lr": 0.032}
        return write_fit_config(path, root, {"manifest": corpus}, trainer=trainer, model=model)

    return write


def logged_losses(root: Path) -> dict[int, float]:
    """Step -> logged training loss over all log versions of a run (a resume writes a new version)."""
    losses = {}
    for metrics in sorted((root / "logs").glob("version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row.get("train/loss_step"):
                losses[int(row["step"])] = float(row["train/loss_step"])
    return losses


def test_crash_and_resume_reads_the_same_batches_and_logs_the_same_losses(tmp_path, fit_config):
    # The crash at step 5 resumes from the step-4 checkpoint in the middle of epoch 0, and the resumed
    # run then crosses into epoch 1 (7 batches per epoch).
    full_root, full_rec = tmp_path / "full", tmp_path / "full-record"
    main(["fit", "--config", str(fit_config(tmp_path / "full.yaml", full_root, full_rec))])
    full = json.loads((full_rec / "rank0.json").read_text())
    assert (full["start_step"], full["end_step"], len(full["batches"])) == (0, 8, 8)

    root, rec = tmp_path / "run", tmp_path / "record"
    crash = ({"class_path": "fit_callbacks.CrashAtStep", "init_args": {"step": 5}},)
    config = fit_config(tmp_path / "crash.yaml", root, rec, callbacks=crash)
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        main(["fit", "--config", str(config)])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["AudioDataModule"]["crop_stream"] == {"seed": 0, "batches": 4}

    main(
        [
            "fit",
            "--config",
            str(fit_config(tmp_path / "resume.yaml", root, rec)),
            "--ckpt_path",
            "last",
        ]
    )
    resumed = json.loads((rec / "rank0.json").read_text())
    assert (resumed["start_step"], resumed["end_step"]) == (4, 8)
    # The same crops at every step after the resume, within epoch 0 and into epoch 1 ...
    assert resumed["batches"] == full["batches"][4:]
    # ... and the same masks, weights and optimiser state: every logged loss is equal, bit for bit.
    expected = logged_losses(full_root)
    assert sorted(expected) == list(range(8))
    assert logged_losses(root) == expected
    assert resumed["weights_sha256"] == full["weights_sha256"]


def stream(sampler: CropStreamSampler) -> list[tuple[int, int, int]]:
    return list(sampler)


def test_the_stream_resumes_at_any_batch_and_each_epoch_is_a_new_permutation():
    files = list(range(10))
    full = CropStreamSampler(files, batch_size=3, seed=7)  # 3 batches (9 samples) per epoch
    epochs = [stream(full) for _ in range(3)]  # without a trainer each iterator starts the next epoch
    assert all(len(e) == 9 and len({f for f, _, _ in e}) == 9 for e in epochs)
    assert len({tuple(f for f, _, _ in e) for e in epochs}) == 3
    flat = [item for e in epochs for item in e]
    for start in range(9):
        resumed = CropStreamSampler(files, batch_size=3, seed=7, consumed_batches=lambda s=start: s)
        epoch, first = divmod(start, 3)
        assert stream(resumed) == epochs[epoch][first * 3 :]
        assert stream(resumed) == flat[start * 3 : (epoch + 1) * 9]
    assert stream(CropStreamSampler(files, batch_size=3, seed=8)) != epochs[0]


def test_ranks_share_out_one_permutation_with_their_own_seeds():
    files = list(range(11))
    ranks = [CropStreamSampler(files, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert [len(s) for s in ranks] == [5, 5] and ranks[0].batches_per_epoch == 2
    (f0, s0), (f1, s1) = (s.epoch_items(4) for s in ranks)
    assert not set(f0.tolist()) & set(f1.tolist())
    assert not set(s0.flatten().tolist()) & set(s1.flatten().tolist())
    one = CropStreamSampler(files, batch_size=2, seed=3).epoch_items(4)[0]
    assert sorted(f0.tolist() + f1.tolist()) == sorted(one[:10].tolist())


def test_crops_and_masks_follow_the_seeds_not_the_worker(corpus):
    paths = [p for p in corpus.parent.rglob("*.*") if p.parent.name.startswith("part")]
    dataset = RandomCropDataset(sorted(paths))
    sampler = CropStreamSampler(dataset, batch_size=3, seed=11, consumed_batches=lambda: 0)
    by_worker = [
        [b["audio"] for b in DataLoader(dataset, batch_size=3, sampler=sampler, num_workers=w)]
        for w in (0, 2)
    ]
    assert len(by_worker[0]) == 4
    assert all(torch.equal(a, b) for a, b in zip(*by_worker, strict=True))
    seeds = torch.tensor([5, 6, 5])
    masks = masks_from_seeds(seeds, 250, 0.5)
    assert masks.shape == (3, 250) and masks.sum(1).tolist() == [125] * 3
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[1])


def test_datamodule_state_resumes_the_first_iterator_only(corpus):
    dm = AudioDataModule(manifest=str(corpus), batch_size=2, num_workers=0)
    dm.setup("fit")
    assert dm.state_dict() == {}  # no trainer: nothing trained, nothing to resume
    dm.load_state_dict({"crop_stream": {"seed": 5, "batches": 3}})
    loader = dm.train_dataloader()
    assert loader.sampler.seed == 5
    files, seeds = loader.sampler.epoch_items(0)
    first = next(iter(loader.sampler))
    assert first == (int(files[6]), int(seeds[6, 0]), int(seeds[6, 1]))
    assert next(iter(loader.sampler)) != first  # the restored position is used once
