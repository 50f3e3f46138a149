"""Callbacks the CLI always adds: step checkpoints that end with the final step, and a run summary;
and how `--ckpt_path last` finds the checkpoint to resume from."""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from msm_lightning.model.bundle import ModelFileError, read_checkpoint

# Errors that, raised before the first training step, come from the configuration or the data named in it
# (no audio found, a missing manifest, inconsistent settings): `msm fit` prints them as one-line messages.
USAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, OSError)


def newest_checkpoint(dirpath: str | Path, trusted: bool = False) -> tuple[Path, int] | None:
    """The readable checkpoint in `dirpath` with the highest global step, and that step.

    None when the folder holds no checkpoint at all; a ValueError naming them when none can be read.
    Checkpoints are read as data only (unless `trusted`, as with `--weights_only false`), with tensors
    memory-mapped, so looking costs little even for big models.
    """
    folder = Path(dirpath)
    files = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    last = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    found: list[tuple[int, bool, float, Path]] = []
    unreadable: list[str] = []
    for path in files:
        try:
            step = read_checkpoint(path, trusted=trusted, mmap=True).get("global_step")
        except (ModelFileError, OSError) as err:
            unreadable.append(f"{path.name} ({err})")
            continue
        if isinstance(step, int) and not isinstance(step, bool):
            found.append((step, path.name == last, path.stat().st_mtime, path))  # ties: last.ckpt
        else:
            unreadable.append(f"{path.name} (no global step)")
    if found:
        step, _, _, path = max(found)
        return path, step
    if unreadable:
        raise ValueError(
            f"--ckpt_path last: none of the {len(files)} checkpoints in '{folder}' can be read: "
            f"{'; '.join(unreadable[:3])}; give --ckpt_path FILE, or move them away to start from scratch"
        )
    return None


def resolve_last(dirpath: str | Path, trusted: bool = False) -> str | None:
    """What `--ckpt_path last` resumes from: last.ckpt, else the newest readable checkpoint, else none.

    Lightning alone would start from scratch when last.ckpt is missing, and then overwrite it, hiding the
    newer step checkpoints; here the choice is said out loud.
    """
    newest = newest_checkpoint(dirpath, trusted)
    last = Path(dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    if newest is None:
        _say(f"msm fit: --ckpt_path last: no checkpoint in '{dirpath}', so training starts from scratch")
        return None
    path, step = newest
    if path.name != last.name:
        why = "is missing" if not last.exists() else "is unreadable or older"
        _say(f"msm fit: --ckpt_path last: '{last}' {why}; resuming from {path} (global step {step})")
    return str(path)


def _say(message: str) -> None:
    if rank_zero_only.rank == 0:
        print(message, flush=True)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` also holds the final step, wherever training stopped.

    With `every_n_train_steps`, ModelCheckpoint saves only on those steps, so a run stopped by
    `trainer.max_time`, or by a `max_steps` that is not a multiple of the interval, would leave its final
    steps out of the checkpoint that `msm export` and `--ckpt_path last` read.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save the final state as `last.ckpt` unless it already is the last one saved."""
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None:
            return
        if getattr(self, "_last_global_step_saved", -1) == trainer.global_step:
            return
        path = os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        if trainer.is_global_zero and os.path.islink(path):
            os.unlink(path)  # save_last="link": writing through the link would overwrite a step checkpoint
        trainer.save_checkpoint(path)
        self.last_model_path = path


class RunSummary(L.Callback):
    """Prints what a fit did: model, steps, wall time, loss at start and end, skipped files, checkpoint.

    It also marks an error raised before the first training step as a usage error (`msm_usage_error`),
    which `msm fit` prints as a message instead of a traceback.
    """

    def __init__(self, window: int = 10) -> None:
        super().__init__()
        self.window = window
        self.losses: list[float] = []
        self.start = 0.0
        self.start_step = 0
        self.training = False  # set once the first training batch is about to run

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember when the run started."""
        self.start = time.perf_counter()
        self.losses = []
        self.training = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the step training starts from: a resume has restored it by now (not yet at fit start)."""
        self.start_step = trainer.global_step
        self.training = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Mark an error of the set-up (data listing, settings) as a usage error."""
        if not self.training and isinstance(exception, USAGE_ERRORS):
            exception.msm_usage_error = True  # type: ignore[attr-defined]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        """Record this rank's training loss."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.losses.append(float(loss.detach()))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Print the summary on rank zero."""
        hp = pl_module.hparams
        n_params = sum(p.numel() for p in pl_module.parameters())
        steps = trainer.global_step - self.start_step
        elapsed = time.perf_counter() - self.start
        w = min(self.window, max(1, len(self.losses) // 2))
        first = sum(self.losses[:w]) / w if self.losses else float("nan")
        last = sum(self.losses[-w:]) / w if self.losses else float("nan")
        ckpt = trainer.checkpoint_callback
        ckpt_path = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ""
        lines = [
            "msm-lightning run summary",
            f"  model          {hp.get('family')}-{hp.get('size')} ({n_params / 1e6:.2f} M parameters)",
            f"  steps          {steps} this run, global step {trainer.global_step} ({elapsed:.1f} s, "
            f"{elapsed / max(1, steps):.2f} s/step)",
            f"  train loss     {first:.4f} (first {w} steps) -> {last:.4f} (last {w} steps)",
            f"  skipped files  {_skipped(pl_module)} (rank 0)",
            f"  checkpoint     {ckpt_path or 'none'}",
        ]
        print("\n".join(lines), flush=True)


def _skipped(pl_module: L.LightningModule) -> str:
    """`3`, or `3 (7 skips)` when files were met more than once."""
    files = getattr(pl_module, "skipped_files", 0)
    events = getattr(pl_module, "skip_events", files)
    return (
        f"{files}"
        if events == files
        else f"{files} ({events} skips: a bad file drawn again is skipped again)"
    )
