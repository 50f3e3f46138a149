"""This machine's pretraining speed, measured, and the demo's steps planned from it."""

from __future__ import annotations

import math

from msm_lightning.datasets.synth import make_corpus
from msm_lightning.pipelines.speed import MIN_STEPS, demo_steps, measure_seconds_per_step


def test_demo_steps_fill_the_minutes_at_the_given_speed():
    assert demo_steps(10, 1.5) == int(600 / 1.5)
    assert demo_steps(0.1, 60.0) == MIN_STEPS  # a schedule needs some steps however slow the machine


def test_a_few_training_steps_are_timed_on_the_corpus(tmp_path):
    make_corpus(tmp_path / "corpus", n_files=4, seed=0)
    config = tmp_path / "recipe.yaml"  # the recipe's layout, with a small batch to keep the test quick
    config.write_text("model:\n  size: tiny\n  warmup_steps: 1\ndata:\n  batch_size: 2\n  num_workers: 1\n")
    seconds = measure_seconds_per_step(
        "transformer", tmp_path / "corpus" / "manifest.txt", config=str(config), steps=1, warmup=0
    )
    assert math.isfinite(seconds) and seconds > 0
