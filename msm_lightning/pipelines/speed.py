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
from pathlib import Path

MIN_STEPS = 10


def measure_seconds_per_step(
    family: str, manifest: Path, *, config: str, steps: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Median wall time of `steps` pretraining steps of `family` on this machine, after `warmup` steps.

    A step is what `msm fit --config CONFIG` repeats: the config's model and batch size, random crops of
    the corpus in `manifest`, the masked loss that `MSMPretraining.training_step` computes, backward and
    an AdamW update, fp32 on the CPU with torch's default threads. Reading the batch is timed with the
    step (msm fit reads it in a loader worker on the same cores), so a schedule planned from it rather
    ends before the time bound than gets cut off in its decay. Lightning's overhead and checkpoint
    saving are not timed.
    """
    import torch
    import yaml
    from torch.utils.data import default_collate

    from msm_lightning.model.masking import random_mask
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
        spec = module.model.spectrogram(batch["audio"])
        mask = random_mask(spec.shape[0], module.model.n_patches_of(spec), hp.mask_ratio)
        loss = module.model.masked_loss(spec, mask, hp.norm_targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    return statistics.median(step() for _ in range(steps))


def demo_steps(minutes: float, seconds_per_step: float) -> int:
    """Steps that take about `minutes` at `seconds_per_step` (at least `MIN_STEPS`)."""
    return max(MIN_STEPS, int(minutes * 60 / seconds_per_step))
