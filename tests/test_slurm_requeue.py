"""SLURM's requeue signal, simulated in one process: checkpoint at a step boundary, requeue, exact resume."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from msm_lightning.datasets.synth import make_corpus
from msm_lightning.training.callbacks import StepCheckpoint
from msm_lightning.training.datamodule import AudioDataModule
from msm_lightning.training.module import MSMPretraining
from msm_lightning.training.slurm import MSMTrainer, SlurmRequeue, hpc_checkpoints

STEPS = 6
# As `msm fit` configures it.
CHECKPOINT = {
    "save_last": True,
    "save_top_k": -1,
    "every_n_train_steps": 1000,
    "enable_version_counter": False,
}


class SignalAtStep(L.Callback):
    """Sends this process the requeue signal as the batch after `step` starts, i.e. mid-step, as SLURM may."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Signal once training reaches `step`."""
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class LossLog(L.Callback):
    """Training loss and a batch fingerprint per global step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, tuple[float, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Record the step just taken."""
        self.steps[trainer.global_step] = (float(outputs["loss"]), float(batch["audio"].double().sum()))


def fit(
    root: Path, manifest: Path, *callbacks: L.Callback, steps: int = STEPS
) -> tuple[L.Trainer, LossLog, SlurmRequeue]:
    """One `msm fit`-like run (checkpoint and requeue callbacks as the CLI adds them); resumes by itself."""
    L.seed_everything(0)
    log, requeue = LossLog(), SlurmRequeue()
    trainer = MSMTrainer(
        default_root_dir=str(root),
        accelerator="cpu",
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[requeue, log, *callbacks, StepCheckpoint(**CHECKPOINT, dirpath=root / "checkpoints")],
    )
    model = MSMPretraining(family="transformer", size="tiny", warmup_steps=2, base_lr=0.032, batch_size=2)
    trainer.fit(model, datamodule=AudioDataModule(manifest=str(manifest), batch_size=2, num_workers=0))
    return trainer, log, requeue


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """A one-task SLURM job step, with an `scontrol` that records its arguments instead of requeueing."""
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "msm", "SLURM_NTASKS": "1", "SLURM_NNODES": "1"}
    env |= {"SLURM_NTASKS_PER_NODE": "1", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    env |= {"SLURM_NODEID": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_the_signal_saves_at_a_step_boundary_requeues_and_the_job_resumes_exactly(tmp_path, slurm_job):
    # 4 batches of 2 per epoch: the requeued run continues in epoch 0 and crosses into epoch 1.
    manifest = make_corpus(tmp_path / "corpus", n_files=8, seed=1)
    _, reference, _ = fit(tmp_path / "reference", manifest)
    assert sorted(reference.steps) == list(range(1, STEPS + 1))

    root = tmp_path / "run"
    trainer, first, requeue = fit(root, manifest, SignalAtStep(2))
    # The signal came during step 3; that step finished, then every rank saved and training stopped.
    assert trainer.global_step == 3 and sorted(first.steps) == [1, 2, 3]
    assert requeue.checkpoint_path == str(root / "hpc_ckpt_1.ckpt")
    assert torch.load(requeue.checkpoint_path, weights_only=False)["global_step"] == 3
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is gone after fit

    # The requeued job runs the same command, with no ckpt_path: Lightning finds hpc_ckpt_1 by itself.
    trainer, second, _ = fit(root, manifest)
    assert trainer.global_step == STEPS and sorted(second.steps) == list(range(4, STEPS + 1))
    assert {**first.steps, **second.steps} == reference.steps  # same batches, same losses, bit for bit
    assert hpc_checkpoints(str(root)) == []  # finished: last.ckpt supersedes the requeue checkpoint
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == STEPS
    assert slurm_job.read_text().split() == ["requeue", "4242"]  # requeued once only


def test_without_slurm_the_signal_is_left_alone(tmp_path):
    manifest = make_corpus(tmp_path / "corpus", n_files=4, seed=1)
    before = signal.getsignal(signal.SIGUSR1)
    trainer, _, requeue = fit(tmp_path / "run", manifest, steps=1)
    assert requeue.checkpoint_path is None
    assert trainer.global_step == 1 and signal.getsignal(signal.SIGUSR1) is before
