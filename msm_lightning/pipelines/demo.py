"""`msm demo`: ONE Tiny model pretrained for a bounded time, compared on a seeded subset of the six tasks.

Stages: a seeded, label-stratified subset of the six tasks (`msm data subset`), the model pretrained on the
real corpus for at most `minutes`, exported, then embedded, evaluated and scored with its random-weight
twin and the log-mel baseline. Resumable: a rerun skips finished stages. Every stage's wall time goes to
`<out>/demo.json` (kept across reruns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.contenders import LOGMEL, pretrained, random_twin
from msm_lightning.pipelines.inputs import DEFAULT_CACHE, check_data
from msm_lightning.pipelines.runs import Pipeline, Runner, RunSettings, StageLog, run_command, run_lock
from msm_lightning.pipelines.speed import demo_steps, measure_seconds_per_step
from msm_lightning.pipelines.stages import (
    PRETRAIN_CONFIG,
    EvalSettings,
    PretrainSpec,
    build_data_stage,
    compare,
    export_stage,
    pretrain_stage,
    recorded_pretraining,
    subset_stage,
)

# The demo's budget (measured on one core, see the README): evaluating one model on the six tasks costs
# about a minute per seed whatever the subset's size (the probes' fixed per-epoch cost dominates), so the
# seeds are the big lever; embedding costs SSAM-T about 0.14 s per second of audio, and 16 clips in each
# of the 23 splits are 864 s of audio, 2-3 min per SSAM-T model.
DEMO_MAX_PER_SPLIT = 16
DEMO_SEEDS = 2
DEMO_OUT = "runs/demo-real"


@dataclass(frozen=True)
class DemoSettings(RunSettings):
    """Everything `msm demo` is run with (the command's options)."""

    family: str = "mamba"
    minutes: float = 10.0  # pretraining wall-time bound
    steps: int | None = None  # lr-schedule length; None: planned from this machine's measured speed
    max_per_split: int = DEMO_MAX_PER_SPLIT
    seeds: int = DEMO_SEEDS
    build_data: bool = False  # run `msm data build` first when the data is missing
    cache: Path = Path(DEFAULT_CACHE)
    out: Path = Path(DEMO_OUT)


def run_demo(settings: DemoSettings, runner: Runner = run_command) -> Pipeline:
    """The `msm demo` stages; returns the finished pipeline (its log holds the timings)."""
    with run_lock(Path(settings.out), "demo"):
        return _demo(settings, runner)


def plan_steps(p: Pipeline, *, family: str, manifest: Path, root: Path, minutes: float) -> int:
    """Steps of a pretraining bounded by `minutes`: those planned before in its run folder, or measured.

    A pretraining already started in `root` keeps its planned steps, so a rerun resumes it (or, with other
    settings, is refused) rather than planning another schedule from a new measurement. Otherwise a few
    steps are timed here (see `msm_lightning.pipelines.speed`).
    """
    stage = f"time {family} steps"
    recorded = recorded_pretraining(root)
    if recorded is not None:
        p.log.skipped(stage, f"{recorded['steps']} steps were planned when '{root}' was started")
        return int(recorded["steps"])
    print(f"==> {stage}: timing a few pretraining steps to plan {minutes:g} min of them", flush=True)
    start = time.time()
    seconds_per_step = measure_seconds_per_step(family, manifest, config=PRETRAIN_CONFIG)
    steps = demo_steps(minutes, seconds_per_step)
    print(f"==> {stage}: {seconds_per_step:.2f} s/step, {steps} steps planned", flush=True)
    p.log.ran(stage, time.time() - start, seconds_per_step=round(seconds_per_step, 3), planned_steps=steps)
    return steps


def _demo(s: DemoSettings, runner: Runner) -> Pipeline:
    """`run_demo` inside the run folder's lock."""
    data, out = Path(s.data), Path(s.out)
    evaluation = EvalSettings(s.seeds, "restricted", s.eval_threads, s.max_epochs, s.eval_workers)
    log = StageLog(
        out / "demo.json",
        "demo",
        {
            "family": s.family,
            "minutes": s.minutes,
            "steps": s.steps,
            "max_per_split": s.max_per_split,
            "seeds": s.seeds,
            "data": str(data),
        },
    )
    p = Pipeline(out, log, runner)
    if s.build_data and not (data / "tasks").is_dir():
        build_data_stage(p, data=data, cache=Path(s.cache))
    manifest, tasks = check_data(data, "demo")
    subset = subset_stage(
        p, tasks=tasks, out=out / "tasks", max_per_split=s.max_per_split, seed=s.subset_seed
    )
    root = out / "pretrain" / s.family
    steps = s.steps or plan_steps(p, family=s.family, manifest=manifest, root=root, minutes=s.minutes)
    log.data["settings"]["steps"] = steps
    log.save()
    spec = PretrainSpec(
        s.family,
        steps,
        manifest,
        root,
        max_minutes=s.minutes,
        checkpoint_every=s.checkpoint_every,
        num_workers=s.num_workers,
        extra_args=list(s.fit_args),
    )
    ckpt = pretrain_stage(p, spec)
    name = FAMILIES[s.family].paper_name.lower()
    bundle = export_stage(p, ckpt=ckpt, out=out / "bundles" / f"{name}-t", stage=f"export {s.family}")
    contenders = [pretrained(s.family, bundle), random_twin(s.family), LOGMEL]
    compare(p, contenders, tasks=subset, settings=evaluation)
    return p
