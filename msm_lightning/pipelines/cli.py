"""The command lines of `msm demo`, `msm benchmark` and `msm budget`: options to settings, then the run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_type_hints

from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.benchmark import (
    BENCHMARK_MAX_PER_SPLIT,
    BENCHMARK_OUT,
    BENCHMARK_SEEDS,
    BENCHMARK_STEPS,
    BenchmarkSettings,
    run_benchmark,
)
from msm_lightning.pipelines.budget import (
    BUDGET_FIRST_STEP,
    BUDGET_OUT,
    BUDGET_TOTAL_STEPS,
    CURVES_FILE,
    PRETRAIN_LOG,
    TABLE_FILE,
    BudgetSettings,
    run_budget,
)
from msm_lightning.pipelines.demo import DEMO_MAX_PER_SPLIT, DEMO_OUT, DEMO_SEEDS, DemoSettings, run_demo
from msm_lightning.pipelines.inputs import DEFAULT_CACHE, DEFAULT_DATA
from msm_lightning.pipelines.runs import Pipeline
from msm_lightning.safe_io import UnsafeFileError


def _common_arguments(parser: argparse.ArgumentParser, out: str, checkpoint_every: int = 100) -> None:
    """Options shared by the commands."""
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
        default=checkpoint_every,
        help=f"pretraining checkpoint interval in steps (default {checkpoint_every})",
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
    _family_arguments(p)
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


def _family_arguments(parser: argparse.ArgumentParser) -> None:
    """--families (all three by default)."""
    parser.add_argument(
        "--families",
        nargs="+",
        choices=list(FAMILIES),
        default=list(FAMILIES),
        help="families (default all)",
    )


def budget_parser() -> argparse.ArgumentParser:
    """Arguments of `msm budget`."""
    p = argparse.ArgumentParser(
        prog="msm budget",
        description="How many pretraining steps each Tiny family needs to beat its random-weight twin and "
        "the log-mel baseline: pretrains the families round-robin toward log-spaced target steps (the lr "
        "schedule planned for --total-steps), evaluates the checkpoint of each target step with msm "
        "benchmark's protocol as it appears, and writes the curves (budget-curves.png) and the budget table "
        "(budget.md) to --out. Days on a CPU; rerun the same command to resume.",
    )
    _family_arguments(p)
    p.add_argument(
        "--total-steps",
        type=int,
        default=BUDGET_TOTAL_STEPS,
        help=f"steps the lr schedule is planned for, and the last target (default {BUDGET_TOTAL_STEPS})",
    )
    p.add_argument(
        "--first-step",
        type=int,
        default=BUDGET_FIRST_STEP,
        help=f"the first target step; each next one doubles it (default {BUDGET_FIRST_STEP})",
    )
    p.add_argument(
        "--last-step",
        type=int,
        help="stop pretraining and evaluation at this step, the schedule still planned for --total-steps: "
        "a fixed budget, e.g. to compare a recipe variant (--fit-args) with the main run (default: "
        "--total-steps)",
    )
    p.add_argument(
        "--pretrain-root",
        help="folder of the pretraining runs, one `msm fit` run folder per family (default OUT/pretrain)",
    )
    p.add_argument(
        "--no-pretrain",
        action="store_true",
        help="only evaluate the checkpoints that exist (e.g. while another process pretrains)",
    )
    p.add_argument("--no-evaluate", action="store_true", help="only pretrain")
    p.add_argument(
        "--seeds", type=int, default=BENCHMARK_SEEDS, help=f"msm evaluate seeds (default {BENCHMARK_SEEDS})"
    )
    p.add_argument("--grid", choices=("restricted", "hear"), default="restricted", help="probe grid")
    _subset_arguments(
        p,
        BENCHMARK_MAX_PER_SPLIT,
        f"clips per split of the seeded task subset (default {BENCHMARK_MAX_PER_SPLIT}; 0: the full tasks)",
    )
    _common_arguments(p, BUDGET_OUT, checkpoint_every=BUDGET_FIRST_STEP)
    return p


S = TypeVar("S")


def _settings(cls: type[S], args: argparse.Namespace, **derived: Any) -> S:
    """The settings dataclass `cls` from parsed options: each field from the option of its name (lists as
    tuples, Path fields as Path) unless `derived` gives it; fields without an option keep their defaults."""
    values = dict(derived)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in values or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if isinstance(value, list):
            value = tuple(value)
        elif Path in (hints[f.name], *get_args(hints[f.name])) and value is not None:
            value = Path(value)
        values[f.name] = value
    return cls(**values)


def demo_settings(argv: list[str]) -> DemoSettings:
    """The `msm demo` command line as settings."""
    return _settings(DemoSettings, demo_parser().parse_args(argv))


def benchmark_settings(argv: list[str]) -> BenchmarkSettings:
    """The `msm benchmark` command line as settings."""
    args = benchmark_parser().parse_args(argv)
    return _settings(BenchmarkSettings, args, peers=not args.no_peers)


def budget_settings(argv: list[str]) -> BudgetSettings:
    """The `msm budget` command line as settings."""
    args = budget_parser().parse_args(argv)
    return _settings(BudgetSettings, args, pretrain=not args.no_pretrain, evaluate=not args.no_evaluate)


def _finish(p: Pipeline, outputs: str) -> None:
    """Close the stage log and print the timings and where the outputs are."""
    p.log.finish()
    print(f"\nStage wall times ({p.log.path}):\n")
    print(p.log.summary())
    print(f"\n{outputs}")


def _scores(p: Pipeline) -> str:
    """Where `msm demo` and `msm benchmark` put their scores."""
    return f"Scores: {p.root / 'scores.md'} (.csv, .png); per model: {p.root / 'results'}"


def _budget_outputs(p: Pipeline) -> str:
    """Where `msm budget` puts its curves and tables."""
    if p.log.path.name == PRETRAIN_LOG:  # --no-evaluate: only the pretraining ran
        return f"Checkpoints: {p.root}/<family>/checkpoints"
    files = ", ".join(str(p.root / f) for f in (CURVES_FILE, TABLE_FILE, "scores.md"))
    return f"Curves and tables: {files}; per model: {p.root / 'results'}"


def _interruptible(
    command: str, run: Callable[[], Pipeline], outputs: Callable[[Pipeline], str] = _scores
) -> None:
    """Run a pipeline; Ctrl-C ends it with a one-line hint instead of a traceback."""
    try:
        p = run()
        _finish(p, outputs(p))
    except KeyboardInterrupt:
        print(f"\nmsm {command}: interrupted; rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except UnsafeFileError as err:  # a record or results file that does not parse, named
        raise SystemExit(f"msm {command}: {err}") from None


def demo_main(argv: list[str]) -> None:
    """Entry point of `msm demo`."""
    settings = demo_settings(argv)
    _interruptible("demo", lambda: run_demo(settings))


def benchmark_main(argv: list[str]) -> None:
    """Entry point of `msm benchmark`."""
    settings = benchmark_settings(argv)
    _interruptible("benchmark", lambda: run_benchmark(settings))


def budget_main(argv: list[str]) -> None:
    """Entry point of `msm budget`."""
    settings = budget_settings(argv)
    _interruptible("budget", lambda: run_budget(settings), _budget_outputs)
