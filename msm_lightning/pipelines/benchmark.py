"""`msm benchmark`: the Tiny families pretrained alike, compared with their random twins and the peers.

Stages: a larger seeded subset of the six tasks (or the full tasks), the three Tiny families pretrained
for the same number of steps and exported, then their random-weight twins, the log-mel baseline and the
peers (CREPE, Resemblyzer) embedded, evaluated and scored. Resumable: a rerun skips finished stages.
Every stage's wall time goes to `<out>/benchmark.json` (kept across reruns).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.contenders import LOGMEL, RESEMBLYZER, crepe, pretrained, random_twin
from msm_lightning.pipelines.inputs import check_data, check_peers
from msm_lightning.pipelines.runs import Pipeline, Runner, RunSettings, StageLog, run_command, run_lock
from msm_lightning.pipelines.stages import (
    EvalSettings,
    PretrainSpec,
    compare,
    export_stage,
    pretrain_stage,
    task_set,
)

# The defaults fit a working session on the machine of the README's benchmark (2 h 22 min there, of which
# pretraining was about 45 min); the full tasks (max_per_split 0, 4 h of audio against 58 min) take about
# 4x the embedding and evaluation time.
BENCHMARK_STEPS = 600
BENCHMARK_MAX_PER_SPLIT = 64
BENCHMARK_SEEDS = 10
BENCHMARK_OUT = "runs/benchmark"


@dataclass(frozen=True)
class BenchmarkSettings(RunSettings):
    """Everything `msm benchmark` is run with (the command's options)."""

    steps: int = BENCHMARK_STEPS  # pretraining steps of every family
    families: tuple[str, ...] = tuple(FAMILIES)
    seeds: int = BENCHMARK_SEEDS
    grid: str = "restricted"  # msm evaluate's probe grid: restricted or hear
    peers: bool = True  # CREPE and Resemblyzer (the `peers` extra)
    crepe_capacity: str = "tiny"
    max_per_split: int = BENCHMARK_MAX_PER_SPLIT  # 0: the full tasks
    out: Path = Path(BENCHMARK_OUT)


def run_benchmark(settings: BenchmarkSettings, runner: Runner = run_command) -> Pipeline:
    """The `msm benchmark` stages; returns the finished pipeline (its log holds the timings)."""
    if settings.steps < 1:
        raise SystemExit("msm benchmark: --steps must be at least 1")
    with run_lock(Path(settings.out), "benchmark"):
        return _benchmark(settings, runner)


def _benchmark(s: BenchmarkSettings, runner: Runner) -> Pipeline:
    """`run_benchmark` inside the run folder's lock."""
    data, out = Path(s.data), Path(s.out)
    evaluation = EvalSettings(s.seeds, s.grid, s.eval_threads, s.max_epochs, s.eval_workers)
    families = list(s.families)
    log = StageLog(
        out / "benchmark.json",
        "benchmark",
        {
            "families": families,
            "steps": s.steps,
            "seeds": s.seeds,
            "grid": s.grid,
            "peers": s.peers,
            "crepe_capacity": s.crepe_capacity,
            "max_per_split": s.max_per_split,
            "data": str(data),
        },
    )
    p = Pipeline(out, log, runner)
    manifest, tasks = check_data(data, "benchmark")
    tasks = task_set(p, tasks=tasks, out=out / "tasks", max_per_split=s.max_per_split, seed=s.subset_seed)
    if s.peers:
        check_peers("benchmark")  # before hours of pretraining, not after
    bundles = {}
    for family in families:
        spec = PretrainSpec(
            family,
            s.steps,
            manifest,
            out / "pretrain" / family,
            checkpoint_every=s.checkpoint_every,
            num_workers=s.num_workers,
            extra_args=list(s.fit_args),
        )
        ckpt = pretrain_stage(p, spec)
        name = FAMILIES[family].paper_name.lower()
        bundles[family] = export_stage(
            p, ckpt=ckpt, out=out / "bundles" / f"{name}-t", stage=f"export {family}"
        )
    contenders = [c for f in families for c in (pretrained(f, bundles[f]), random_twin(f))] + [LOGMEL]
    if s.peers:
        contenders += [crepe(s.crepe_capacity), RESEMBLYZER]
    compare(p, contenders, tasks=tasks, settings=evaluation)
    return p
