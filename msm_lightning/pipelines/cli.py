"""The command lines of `msm demo` and `msm benchmark`: options to settings, then the run and its summary."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.benchmark import (
    BENCHMARK_MAX_PER_SPLIT,
    BENCHMARK_OUT,
    BENCHMARK_SEEDS,
    BENCHMARK_STEPS,
    BenchmarkSettings,
    run_benchmark,
)
from msm_lightning.pipelines.demo import DEMO_MAX_PER_SPLIT, DEMO_OUT, DEMO_SEEDS, DemoSettings, run_demo
from msm_lightning.pipelines.inputs import DEFAULT_CACHE, DEFAULT_DATA
from msm_lightning.pipelines.runs import Pipeline


def _common_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Options shared by both commands."""
    parser.add_argument(
        "--data", default=DEFAULT_DATA, help=f"output of `msm data build` (default {DEFAULT_DATA})"
    )
    parser.add_argument(
        "--out", default=out, help=f"run folder; rerun with the same one to resume (default {out})"
    )
    parser.add_argument(
        "--eval-threads", type=int, default=1, help="torch threads of msm evaluate (default 1)"
    )
    parser.add_argument(
        "--eval-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="msm evaluate processes, one seed each (default: the number of cores)",
    )
    parser.add_argument(
        "--num-workers", type=int, default=1, help="audio loader workers of msm fit (default 1)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="pretraining checkpoint interval in steps (default 100)",
    )
    parser.add_argument("--max-epochs", type=int, help=argparse.SUPPRESS)  # probe epochs cap, for tests
    parser.add_argument(
        "--fit-args", nargs=argparse.REMAINDER, default=[], help="further `msm fit` overrides (put this last)"
    )


def _subset_arguments(parser: argparse.ArgumentParser, default: int | None, help: str) -> None:
    """--max-per-split and --subset-seed (`msm data subset`)."""
    parser.add_argument("--max-per-split", type=int, default=default, help=help)
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the subset's choice (default 0)")


def demo_parser() -> argparse.ArgumentParser:
    """Arguments of `msm demo`."""
    p = argparse.ArgumentParser(
        prog="msm demo",
        description="Pretrain ONE Tiny model on the real corpus for a bounded time, then compare it with its "
        "random-weight twin and the log-mel baseline on a seeded subset of the six real tasks. Resumable: "
        "rerun the same command and finished stages are skipped. Needs `make data` first.",
    )
    p.add_argument("--family", choices=list(FAMILIES), default="mamba", help="encoder family (default mamba)")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining wall-time bound (default 10)")
    p.add_argument(
        "--steps",
        type=int,
        help="lr-schedule length in steps (default: the steps that fit --minutes at the seconds per step "
        "measured on this machine with a few timed steps before pretraining)",
    )
    _subset_arguments(
        p, DEMO_MAX_PER_SPLIT, f"clips per split of each task's subset (default {DEMO_MAX_PER_SPLIT})"
    )
    p.add_argument("--seeds", type=int, default=DEMO_SEEDS, help=f"msm evaluate seeds (default {DEMO_SEEDS})")
    p.add_argument(
        "--build-data", action="store_true", help="run `msm data build` first if the data is missing"
    )
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"cache of --build-data (default {DEFAULT_CACHE})")
    _common_arguments(p, DEMO_OUT)
    return p


def benchmark_parser() -> argparse.ArgumentParser:
    """Arguments of `msm benchmark`."""
    p = argparse.ArgumentParser(
        prog="msm benchmark",
        description="The full comparison on the six real tasks: the Tiny transformer, mamba and xlstm models "
        "pretrained for the same number of steps, their random-weight twins, the log-mel baseline and the "
        "peers CREPE and Resemblyzer; msm evaluate, then msm score. Hours on a CPU; every stage resumes "
        "and skips finished work when the same command is rerun.",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=BENCHMARK_STEPS,
        help=f"pretraining steps of every family (default {BENCHMARK_STEPS})",
    )
    p.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="families (default all)",
    )
    p.add_argument(
        "--seeds", type=int, default=BENCHMARK_SEEDS, help=f"msm evaluate seeds (default {BENCHMARK_SEEDS})"
    )
    p.add_argument("--grid", choices=("restricted", "hear"), default="restricted", help="probe grid")
    p.add_argument("--no-peers", action="store_true", help="leave out CREPE and Resemblyzer")
    p.add_argument(
        "--crepe-capacity",
        choices=("tiny", "full"),
        default="tiny",
        help="CREPE size (default tiny, for CPUs)",
    )
    _subset_arguments(
        p,
        BENCHMARK_MAX_PER_SPLIT,
        f"clips per split of the seeded task subset (default {BENCHMARK_MAX_PER_SPLIT}; 0: the full tasks)",
    )
    _common_arguments(p, BENCHMARK_OUT)
    return p


def demo_settings(argv: list[str]) -> DemoSettings:
    """The `msm demo` command line as settings."""
    args = demo_parser().parse_args(argv)
    return DemoSettings(
        family=args.family,
        minutes=args.minutes,
        steps=args.steps,
        max_per_split=args.max_per_split,
        subset_seed=args.subset_seed,
        seeds=args.seeds,
        build_data=args.build_data,
        cache=Path(args.cache),
        data=Path(args.data),
        out=Path(args.out),
        eval_threads=args.eval_threads,
        eval_workers=args.eval_workers,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        max_epochs=args.max_epochs,
        fit_args=tuple(args.fit_args),
    )


def benchmark_settings(argv: list[str]) -> BenchmarkSettings:
    """The `msm benchmark` command line as settings."""
    args = benchmark_parser().parse_args(argv)
    return BenchmarkSettings(
        steps=args.steps,
        families=tuple(args.families),
        seeds=args.seeds,
        grid=args.grid,
        peers=not args.no_peers,
        crepe_capacity=args.crepe_capacity,
        max_per_split=args.max_per_split,
        subset_seed=args.subset_seed,
        data=Path(args.data),
        out=Path(args.out),
        eval_threads=args.eval_threads,
        eval_workers=args.eval_workers,
        num_workers=args.num_workers,
        checkpoint_every=args.checkpoint_every,
        max_epochs=args.max_epochs,
        fit_args=tuple(args.fit_args),
    )


def _finish(p: Pipeline) -> None:
    """Close the stage log and print the timings and where the outputs are."""
    p.log.finish()
    print(f"\nStage wall times ({p.log.path}):\n")
    print(p.log.summary())
    print(f"\nScores: {p.root / 'scores.md'} (.csv, .png); per model: {p.root / 'results'}")


def _interruptible(command: str, run: Callable[[], Pipeline]) -> None:
    """Run a pipeline; Ctrl-C ends it with a one-line hint instead of a traceback."""
    try:
        _finish(run())
    except KeyboardInterrupt:
        print(f"\nmsm {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None


def demo_main(argv: list[str]) -> None:
    """Entry point of `msm demo`."""
    settings = demo_settings(argv)
    _interruptible("demo", lambda: run_demo(settings))


def benchmark_main(argv: list[str]) -> None:
    """Entry point of `msm benchmark`."""
    settings = benchmark_settings(argv)
    _interruptible("benchmark", lambda: run_benchmark(settings))
