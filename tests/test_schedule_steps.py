"""`MSMPretraining(schedule_steps=...)`: the lr schedule's length is set apart from where a run stops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from msm_lightning.training.module import MSMPretraining
from msm_lightning.training.optim import scaled_lr, warmup_cosine


def _lr_after(steps: int, *, max_steps: int, schedule_steps: int | None) -> float:
    """The lr after `steps` scheduler steps of a module whose trainer stops at `max_steps`."""
    module = MSMPretraining(
        family="transformer", size="tiny", warmup_steps=10, batch_size=8, schedule_steps=schedule_steps
    )
    # Only what configure_optimizers reads from a trainer: no fit needed to see the schedule.
    module.trainer = SimpleNamespace(
        estimated_stepping_batches=max_steps,
        max_epochs=-1,
        world_size=1,
        accumulate_grad_batches=1,
        datamodule=None,
    )
    config = module.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        config["optimizer"].step()
        scheduler.step()
    return config["optimizer"].param_groups[0]["lr"]


def test_the_lr_at_a_step_follows_schedule_steps_not_max_steps():
    peak = scaled_lr(1.5e-4, 8)
    expected = peak * warmup_cosine(50, 10, 200)
    # Stopping at 60 or at 1000 steps: the same lr at step 50 when the schedule is planned for 200.
    short = _lr_after(50, max_steps=60, schedule_steps=200)
    long = _lr_after(50, max_steps=1000, schedule_steps=200)
    assert short == pytest.approx(expected) and long == pytest.approx(expected)
    # Another planned length gives another lr at the same step.
    assert _lr_after(50, max_steps=60, schedule_steps=400) != pytest.approx(expected)


def test_without_schedule_steps_the_schedule_spans_the_trainer_steps():
    peak = scaled_lr(1.5e-4, 8)
    assert _lr_after(50, max_steps=200, schedule_steps=None) == pytest.approx(
        peak * warmup_cosine(50, 10, 200)
    )
