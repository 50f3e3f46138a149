"""The pipelines' stages: `msm fit` arguments of a pretraining, and a run folder's recorded settings."""

from __future__ import annotations

from pathlib import Path

from msm_lightning.pipelines.stages import PretrainSpec, recorded_pretraining


def test_fit_arguments_bound_time_and_resume(tmp_path):
    spec = PretrainSpec("mamba", 200, Path("m.txt"), tmp_path, max_minutes=10.5)
    args = [str(a) for a in spec.fit_args()]
    assert args[args.index("--trainer.max_time") + 1] == "00:00:10:30"
    assert args[args.index("--model.warmup_steps") + 1] == "20"
    assert args[-2:] == ["--ckpt_path", "last"]


def test_a_fresh_run_folder_has_no_recorded_pretraining(tmp_path):
    assert recorded_pretraining(tmp_path / "pretrain" / "mamba") is None
