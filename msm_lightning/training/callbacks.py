"""Callbacks the CLI always adds: step checkpoints that end with the final step, and a run summary."""

from __future__ import annotations

import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


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
    """Prints what a fit did: model, steps, wall time, loss at start and end, skipped files, checkpoint."""

    def __init__(self, window: int = 10) -> None:
        super().__init__()
        self.window = window
        self.losses: list[float] = []
        self.start = 0.0
        self.start_step = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember when the run started."""
        self.start = time.perf_counter()
        self.losses = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember the step training starts from: a resume has restored it by now (not yet at fit start)."""
        self.start_step = trainer.global_step

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
            f"  skipped files  {getattr(pl_module, 'skipped_files', 0)} (rank 0)",
            f"  checkpoint     {ckpt_path or 'none'}",
        ]
        print("\n".join(lines), flush=True)
