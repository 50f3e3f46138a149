"""A callback for the SLURM cluster test: what each rank trained on, step by step, on which node."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L


def weights_hash(module: L.LightningModule) -> str:
    """SHA-256 of a module's state, tensor by tensor in name order."""
    digest = hashlib.sha256()
    for _, p in sorted(module.state_dict().items()):
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class StepProbe(L.Callback):
    """Appends JSON lines about each training step to `<out_dir>/rank<R>.jsonl`.

    Every line holds the rank, its node and the SLURM restart count. A start line holds the step and the
    weights training starts from (the restored ones after a resume); a step line the global step after the
    step, this rank's loss, a hash of its batch's audio and one of the weights after the step; the end line
    the world size and the final weights. Appending keeps the lines of a requeued job's earlier runs.
    """

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def _write(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        context = {
            "rank": trainer.global_rank,
            "node": os.environ.get("SLURMD_NODENAME", ""),
            "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        }
        with path.open("a") as f:
            f.write(json.dumps({**context, **record}) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record the step and weights training starts from."""
        self._write(trainer, {"start_step": trainer.global_step, "weights": weights_hash(pl_module)})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the step just taken."""
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        batch_hash = hashlib.sha256(batch["audio"].detach().cpu().numpy().tobytes()).hexdigest()
        record = {"step": trainer.global_step, "loss": float(loss), "batch": batch_hash}
        self._write(trainer, {**record, "weights": weights_hash(pl_module)})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record where training ended and the weights it ended with."""
        end = {"end_step": trainer.global_step, "world_size": trainer.world_size}
        self._write(trainer, {**end, "weights": weights_hash(pl_module)})
