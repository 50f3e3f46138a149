"""This machine's pretraining speed, measured, to plan the lr schedule of a time-bounded pretraining.

`msm demo --minutes M` bounds pretraining by wall time (`--trainer.max_time`), but the lr schedule (warm-up,
then cosine decay to the last step) needs a step count before training starts. Seconds per step differ by
machine, by family and by what else runs on the cores, so no table of timings can give it: the demo times
a few training steps here, just before it pretrains, and plans the steps that fit the budget at that
speed. The time bound stays the hard limit whatever the plan.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

MIN_STEPS = 10


def measure_seconds_per_step(
    family: str, manifest: Path, *, config: str, steps: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Median wall time of `steps` pretraining steps of `family` on this machine, after `warmup` steps.

    A step is what `msm fit --config CONFIG` repeats: the config's model (its size and recipe) and batch
    size, random crops of the corpus in `manifest`, and `MSMPretraining.training_step` with backward and
    an AdamW update, fp32 on the CPU with torch's default threads, as msm fit runs. Reading the batch is
    timed with the step; msm fit reads it in a loader worker that shares the same cores, so this is at
    most slightly slower than msm fit's step, and a schedule planned from it rather ends before the time
    bound than gets cut off in its decay. Lightning's own overhead and checkpoint saving are not timed.
    """
    import torch
    import yaml
    from torch.utils.data import default_collate

    from msm_lightning.training.cli import resolve_config
    from msm_lightning.training.datamodule import AudioDataModule
    from msm_lightning.training.module import MSMPretraining
    from msm_lightning.training.optim import param_groups

    recipe = yaml.safe_load(Path(resolve_config(config)).read_text())
    data = {k: v for k, v in recipe.get("data", {}).items() if k in ("batch_size", "crop_seconds")}
    datamodule = AudioDataModule(manifest=str(manifest), num_workers=0, **data)
    datamodule.setup("fit")
    dataset = datamodule.train_dataset
    torch.manual_seed(seed)
    module = MSMPretraining(**{**recipe.get("model", {}), "family": family})
    hp = module.hparams
    optimizer = torch.optim.AdamW(param_groups(module.model, hp.weight_decay), lr=1e-4, betas=tuple(hp.betas))
    picks = torch.Generator().manual_seed(seed)

    def step() -> float:
        start = time.perf_counter()
        indices = torch.randint(len(dataset), (datamodule.batch_size,), generator=picks).tolist()
        batch = default_collate([dataset[i] for i in indices])
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    with warnings.catch_warnings():
        # training_step logs its loss; without a Trainer, Lightning warns and drops it.
        warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
        for _ in range(warmup):
            step()
        return statistics.median(step() for _ in range(steps))


def demo_steps(minutes: float, seconds_per_step: float) -> int:
    """Steps that take about `minutes` at `seconds_per_step` (at least `MIN_STEPS`)."""
    return max(MIN_STEPS, int(minutes * 60 / seconds_per_step))
