"""The Lightning system for MSM pretraining: masking, loss, optimiser, schedule and logging."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from msm_lightning.model.bundle import MODEL_CONFIG_KEY
from msm_lightning.model.masking import random_mask
from msm_lightning.model.msm import MaskedSpectrogramModel
from msm_lightning.training.optim import make_scheduler, param_groups, scaled_lr
from msm_lightning.training.sampler import masks_from_seeds


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; `msm fit` stops with this message."""


class MSMPretraining(L.LightningModule):
    """Pretrains a `MaskedSpectrogramModel` preset by reconstructing masked log-mel patches.

    Args:
        family: encoder family: transformer (SSAST), mamba (SSAM) or xlstm (AxLSTM).
        size: preset size: tiny, small or base.
        patch_size: patch (frames, mel bins); the paper ablates (4, 8), (4, 16) and (8, 16).
        mask_ratio: fraction of patches masked per sample.
        norm_targets: normalise each target patch to zero mean, unit variance (off in the papers).
        crop_frames: frames per training crop (200 = 2 s); sets the positional grid.
        encoder_kwargs: overrides of the family's preset arguments, e.g. {proj_factor: 2, flip: true}.
        base_lr: learning rate per 256 samples; the peak is base_lr x global batch / 256.
        weight_decay: AdamW weight decay on weight matrices (none on biases, norms, tokens, A and D).
        betas: AdamW betas.
        warmup_epochs: linear warm-up length in epochs (converted to steps from trainer.max_epochs).
        warmup_steps: warm-up length in steps; overrides warmup_epochs when set.
        min_lr_ratio: final learning rate of the cosine decay, as a fraction of the peak.
        batch_size: per-device batch size, used only for the learning-rate scaling when the datamodule
            does not say (LightningCLI links it to data.batch_size).
        schedule_steps: total steps of the warm-up + cosine schedule; default: the trainer's estimated
            stepping batches (max_steps, or max_epochs x batches). With it, trainer.max_steps is only
            where this run stops, so a long schedule can be trained in shorter runs.
    """

    def __init__(
        self,
        family: str = "transformer",
        size: str = "tiny",
        patch_size: tuple[int, int] = (4, 16),
        mask_ratio: float = 0.5,
        norm_targets: bool = False,
        crop_frames: int = 200,
        encoder_kwargs: dict[str, Any] | None = None,
        base_lr: float = 1.5e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 10.0,
        warmup_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        batch_size: int = 32,
        schedule_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = MaskedSpectrogramModel.from_preset(
            family, size, patch_size=patch_size, crop_frames=crop_frames, encoder_kwargs=encoder_kwargs
        )
        # Bad audio met by this rank's data loaders: every skip, and the distinct files among them (a file
        # is skipped again when a later draw lands on it; sources that do not name the file, such as shard
        # records, count each skip as a file).
        self.skip_events = 0
        self.skipped_ids: set[int] = set()
        self._unnamed_skips = 0
        self._epoch_ids: set[int] = set()
        self._epoch_unnamed = 0

    @property
    def skipped_files(self) -> int:
        """Distinct bad files this rank's data loaders skipped so far."""
        return len(self.skipped_ids) + self._unnamed_skips

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """Inference: [batch, samples] audio -> unmasked encoder tokens [batch, 1 + n_patches, d_model]."""
        return self.model(self.model.spectrogram(audio))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model's own constructor arguments, so bundles are rebuilt from them, not re-derived."""
        checkpoint[MODEL_CONFIG_KEY] = self.model.config()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One MSM step: mask half the patches of each crop and reconstruct them."""
        spec = self.model.spectrogram(batch["audio"])
        n = self.model.n_patches_of(spec)
        if "mask_seed" in batch:
            # Masks that belong to the data stream's position, so a resumed run draws the same ones.
            mask = masks_from_seeds(batch["mask_seed"], n, self.hparams.mask_ratio).to(spec.device)
        else:
            mask = random_mask(spec.shape[0], n, self.hparams.mask_ratio, device=spec.device)
        loss = self.model.masked_loss(spec, mask, self.hparams.norm_targets)
        finite = bool(torch.isfinite(loss))
        if self._trainer is not None:  # decided on all ranks together, so that they stop at the same step
            finite = self._trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise NonFiniteLossError(
                f"the training loss is {float(loss.detach())} at global step {self.global_step} (on this or "
                "another rank); stopped before that step changed the weights, so the checkpoints written so "
                "far are unaffected. Lower model.base_lr, or look for broken audio in the data"
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        if "skipped" in batch:
            skipped = batch["skipped"].sum()
            self.skip_events += int(skipped)
            if "skipped_ids" in batch:
                ids = {int(i) for i in batch["skipped_ids"].flatten().tolist() if i >= 0}
                self.skipped_ids |= ids
                self._epoch_ids |= ids
            else:
                self._unnamed_skips += int(skipped)
                self._epoch_unnamed += int(skipped)
            # Epoch total of skips over all ranks (distinct files: on_train_epoch_end); the running
            # per-rank count of distinct files goes to the progress bar.
            self.log(
                "data/skip_events",
                skipped.float(),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                sync_dist=True,
            )
            self.log(
                "skipped",
                float(self.skipped_files),
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                logger=False,
            )
        return loss

    def on_train_epoch_end(self) -> None:
        """Log the distinct bad files skipped this epoch over all ranks (`data/skipped_files`)."""
        if not (self.skip_events or self._unnamed_skips or self.trainer.world_size > 1):
            return  # nothing skipped on this (only) rank
        ids = torch.tensor(sorted(self._epoch_ids), dtype=torch.int64, device=self.device)
        unnamed = torch.tensor(self._epoch_unnamed, device=self.device)
        if self.trainer.world_size > 1:
            # Two ranks can meet the same bad file: gather the indices (padded to one length) and unite.
            longest = int(self.all_gather(torch.tensor(ids.numel(), device=self.device)).max())
            ids = self.all_gather(torch.nn.functional.pad(ids, (0, longest - ids.numel()), value=-1))
            ids = ids.flatten()[ids.flatten() >= 0]
            unnamed = self.all_gather(unnamed).sum()
        distinct = float(ids.unique().numel() + int(unnamed))
        self.log("data/skipped_files", distinct, on_step=False, on_epoch=True, sync_dist=True)
        self._epoch_ids, self._epoch_unnamed = set(), 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Masked reconstruction loss on held-out crops with a fixed mask per batch index."""
        spec = self.model.spectrogram(batch["audio"])
        n = self.model.n_patches_of(spec)
        gen = torch.Generator().manual_seed(batch_idx)
        mask = random_mask(spec.shape[0], n, self.hparams.mask_ratio, generator=gen).to(spec.device)
        loss = self.model.masked_loss(spec, mask, self.hparams.norm_targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def global_batch_size(self) -> int:
        """Samples per optimiser step over all devices and accumulated batches."""
        dm = getattr(self.trainer, "datamodule", None)
        per_device = getattr(dm, "batch_size", None) or self.hparams.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def schedule_steps(self) -> tuple[int, int]:
        """(warm-up steps, total steps) of the learning-rate schedule for this trainer."""
        planned = self.hparams.schedule_steps
        total = int(planned) if planned else int(self.trainer.estimated_stepping_batches)
        if self.hparams.warmup_steps is not None:
            warmup = self.hparams.warmup_steps
        elif self.trainer.max_epochs and self.trainer.max_epochs > 0:
            warmup = round(total * self.hparams.warmup_epochs / self.trainer.max_epochs)
        else:
            raise ValueError("set trainer.max_epochs or model.warmup_steps to define the warm-up length")
        return max(1, min(warmup, total)), total

    def configure_optimizers(self) -> dict:
        """AdamW at the batch-scaled peak lr with a per-step warm-up + cosine schedule."""
        lr = scaled_lr(self.hparams.base_lr, self.global_batch_size())
        optimizer = torch.optim.AdamW(
            param_groups(self.model, self.hparams.weight_decay), lr=lr, betas=tuple(self.hparams.betas)
        )
        warmup, total = self.schedule_steps()
        scheduler = make_scheduler(optimizer, warmup, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
