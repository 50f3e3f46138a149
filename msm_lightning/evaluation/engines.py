"""Two ways to train the probes of one protocol step on one data split: batched (default) or one by one.

`batched` trains all of them as one model (`batched_probe.BatchedProbes`, a plain PyTorch loop); `single`
trains each with `probe.train_probe` (Lightning), the implementation the batched one reproduces. Both give
each probe its validation score, best and last epochs, a share of the wall time and test probabilities.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from msm_lightning.evaluation.batched_probe import BatchedProbes, CheckLog, ProbeSpec, group_specs
from msm_lightning.evaluation.probe import ProbeConfig, predict, train_probe

ENGINES = ("batched", "single")
Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ProbeJob:
    """One probe to train: a grid point, its torch seed, and a name for its log."""

    config: ProbeConfig
    seed: int
    name: str  # e.g. "seed3-split0-config1"


@dataclass
class ProbeOutcome:
    """A trained probe: best validation score and epoch, epochs run, time, and test probabilities."""

    val_score: float
    best_epoch: int
    epochs_trained: int
    time_s: float  # training and prediction; a batched probe's share of its batch's time
    test_probs: np.ndarray  # [n_test, n_labels], float64


def train_jobs(
    jobs: list[ProbeJob],
    data: tuple[Split, Split, Split],
    prediction_type: str,
    monitor: str | None,
    *,
    engine: str = "batched",
    accelerator: str = "cpu",
    log_dir: Path | None = None,
) -> list[ProbeOutcome]:
    """Train every job on `data` (train, valid, test) with early stopping on valid; outcomes in job order."""
    if engine == "batched":
        return _train_batched(jobs, data, prediction_type, monitor, accelerator, log_dir)
    if engine == "single":
        return [_train_single(job, data, prediction_type, monitor, accelerator, log_dir) for job in jobs]
    raise ValueError(f"unknown engine {engine!r}; engines are {list(ENGINES)}")


def _train_single(
    job: ProbeJob,
    data: tuple[Split, Split, Split],
    prediction_type: str,
    monitor: str | None,
    accelerator: str,
    log_dir: Path | None,
) -> ProbeOutcome:
    """One probe through Lightning (`train_probe`)."""
    start = time.time()
    train, valid, test = data
    logger: object = False
    if log_dir is not None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(log_dir.parent, name=log_dir.name, version=job.name)
    result = train_probe(train, valid, prediction_type, job.config, monitor, job.seed, accelerator, logger)
    probs = predict(result.module, test[0])
    return ProbeOutcome(
        result.val_score, result.best_epoch, result.epochs_trained, time.time() - start, probs
    )


def _train_batched(
    jobs: list[ProbeJob],
    data: tuple[Split, Split, Split],
    prediction_type: str,
    monitor: str | None,
    accelerator: str,
    log_dir: Path | None,
) -> list[ProbeOutcome]:
    """The jobs in as few batched models as their shapes and memory allow."""
    train, valid, test = data
    specs = [ProbeSpec(job.config, job.seed) for job in jobs]
    outcomes: list[ProbeOutcome | None] = [None] * len(jobs)
    for members in group_specs(specs, train[0].shape[1], train[1].shape[1]):
        start = time.time()
        batch = [specs[i] for i in members]
        probes = BatchedProbes(batch, train[0].shape[1], train[1].shape[1], prediction_type, accelerator)
        log = _csv_log(log_dir, [jobs[i].name for i in members]) if log_dir is not None else None
        fits = probes.fit(train, valid, monitor, log)
        probs = probes.predict(test[0])
        share = (time.time() - start) / len(members)
        for k, (i, fit) in enumerate(zip(members, fits, strict=True)):
            outcomes[i] = ProbeOutcome(fit.val_score, fit.best_epoch, fit.epochs_trained, share, probs[k])
    return outcomes  # type: ignore[return-value]


def _csv_log(log_dir: Path, names: list[str]) -> CheckLog:
    """A `metrics.csv` per probe under log_dir/<name>/ with a row per validation check."""
    paths = []
    for name in names:
        path = log_dir / name / "metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("epoch,train_loss,val_loss,val_score\n")
        paths.append(path)

    def log(i: int, epoch: int, train_loss: float, val_loss: float, val_score: float) -> None:
        with paths[i].open("a", newline="") as f:
            csv.writer(f).writerow([epoch, train_loss, val_loss, val_score])

    return log
