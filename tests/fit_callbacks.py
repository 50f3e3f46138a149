"""Callbacks that tests inject into `msm fit` runs through the config (`trainer.callbacks`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class CrashAtStep(L.Callback):
    """Simulates a crash (pre-emption, node failure) when training reaches `step`."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Raise once the global step reaches `step`."""
        if trainer.global_step >= self.step:
            raise RuntimeError(f"simulated crash at step {trainer.global_step}")


class RecordRun(L.Callback):
    """Writes, per rank, the start step, a fingerprint of every batch and a hash of the final weights."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.batches: list[list[float]] = []
        self.start_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        """Remember the step training (re)starts from."""
        self.start_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Fingerprint each crop by its sum and energy."""
        audio = batch["audio"].double()
        self.batches.append(
            [round(float(x), 6) for x in audio.sum(1)] + [round(float(audio.pow(2).sum()), 6)]
        )

    def on_train_end(self, trainer, pl_module) -> None:
        """Write this rank's record."""
        digest = hashlib.sha256()
        for _, p in sorted(pl_module.state_dict().items()):
            digest.update(p.detach().float().cpu().numpy().tobytes())
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start_step": self.start_step,
            "end_step": trainer.global_step,
            "batches": self.batches,
            "weights_sha256": digest.hexdigest(),
            "precision": str(trainer.precision),
            "weight_norm": float(sum(p.detach().double().pow(2).sum() for p in pl_module.parameters())),
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PoisonWeightsAtStep(L.Callback):
    """Simulates a diverged optimisation: sets one weight to NaN when training reaches `step`."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        """Poison the reconstruction head once the global step reaches `step`."""
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.head[0].weight[0, 0] = float("nan")
