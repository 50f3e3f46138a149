"""Fixtures shared by several test modules: a real checkpoint, its bundle, tiny HEAR task folders and small
`msm fit` configs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from torch.utils.data import DataLoader

from msm_lightning.model.bundle import export_checkpoint
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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def bundle(checkpoint, tmp_path_factory) -> Path:
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("export") / "ssast-tiny")


def write_wav(path: Path, seconds: float, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sf.write(path, (0.1 * rng.standard_normal(round(seconds * SR))).astype(np.float32), SR)


def build_task(
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


@pytest.fixture(scope="session")
def make_task() -> Callable[..., Path]:
    """`build_task`: a tiny task in hearpreprocess layout (see its docstring)."""
    return build_task


def build_fit_config(path: Path, root: Path, data: dict, **sections: dict) -> Path:
    """A small CPU `msm fit` config (Tiny SSAST, batch 2) in `path`; keyword sections update the defaults."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "max_epochs": -1,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
        },
        "model": {"family": "transformer", "size": "tiny", "warmup_steps": 1},
        "data": {
            "batch_size": 2,
            "num_workers": 0,
            **{k: str(v) if isinstance(v, Path) else v for k, v in data.items()},
        },
        "checkpoint": {"every_n_train_steps": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def write_fit_config() -> Callable[..., Path]:
    """`build_fit_config`: a small CPU `msm fit` config file (see its docstring)."""
    return build_fit_config
