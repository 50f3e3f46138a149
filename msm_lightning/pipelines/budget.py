"""`msm budget`: how many pretraining steps each Tiny family needs to beat its random twin and log-mel.

Stages: the families are pretrained round-robin toward log-spaced target steps (250, 500, 1000, ... and
`total_steps`), every round resuming the family's one run, whose warm-up + cosine lr schedule is planned
for `total_steps` (`MSMPretraining.schedule_steps`), so the checkpoint at step N is step N of that run.
Alongside, the checkpoint kept at each target step is exported, embedded and evaluated with `msm
benchmark`'s protocol (its seeded task subset, 10 seeds, the restricted probe grid), as are the random-weight
twins and the log-mel baseline once. After every new result the run folder gets the curves
(`budget-curves.png`: each task's primary score and s(m) against steps, the twins and log-mel as horizontal
lines; s(m) over every model compared), the budget table (`budget.md`) and the score table (`scores.md`).

Resumable like `msm benchmark`: the pretraining (lock and stage log in the pretraining root, which holds one
run folder per family) and the evaluation (lock and stage log in `out`) each skip finished work on a rerun,
so `--no-pretrain` can evaluate what exists while another process pretrains.
"""

from __future__ import annotations

import csv
import math
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from msm_lightning.evaluation.metrics import PERCENT_METRICS
from msm_lightning.model.families import FAMILIES
from msm_lightning.pipelines.benchmark import BENCHMARK_MAX_PER_SPLIT, BENCHMARK_SEEDS
from msm_lightning.pipelines.contenders import LOGMEL, Contender, at_step, random_twin
from msm_lightning.pipelines.inputs import check_data, task_names
from msm_lightning.pipelines.runs import (
    Pipeline,
    Runner,
    RunSettings,
    StageLog,
    fmt_seconds,
    run_command,
    run_lock,
)
from msm_lightning.pipelines.stages import (
    EvalSettings,
    PretrainSpec,
    embed_and_evaluate,
    export_stage,
    finished_tasks,
    pretrain_stage,
    step_checkpoint,
    task_set,
)
from msm_lightning.safe_io import atomic_write_text

BUDGET_TOTAL_STEPS = 8000
BUDGET_FIRST_STEP = 250
BUDGET_OUT = "runs/budget"
PRETRAIN_LOG = "budget-pretrain.json"  # in the pretraining root: every round's steps and wall time
CURVES_FILE = "budget-curves.png"
TABLE_FILE = "budget.md"
# A checkpoint file this old is completely written (another process may still be writing a newer one).
READY_AGE_SECONDS = 10.0


@dataclass(frozen=True)
class BudgetSettings(RunSettings):
    """Everything `msm budget` is run with (the command's options)."""

    families: tuple[str, ...] = tuple(FAMILIES)
    total_steps: int = BUDGET_TOTAL_STEPS  # the lr schedule's length and the last target
    first_step: int = BUDGET_FIRST_STEP  # the first target; each next one doubles it
    last_step: int | None = None  # stop here (a fixed budget, e.g. for recipe choices); default total_steps
    checkpoint_every: int = BUDGET_FIRST_STEP
    seeds: int = BENCHMARK_SEEDS
    grid: str = "restricted"
    max_per_split: int = BENCHMARK_MAX_PER_SPLIT  # 0: the full tasks
    out: Path = Path(BUDGET_OUT)
    pretrain_root: Path | None = None  # one `msm fit` run folder per family; default <out>/pretrain
    pretrain: bool = True
    evaluate: bool = True
    poll_seconds: float = 60.0  # how often the evaluation looks for new checkpoints while pretraining runs

    @property
    def pretrain_dir(self) -> Path:
        """The folder holding each family's pretraining run folder."""
        return Path(self.pretrain_root) if self.pretrain_root is not None else Path(self.out) / "pretrain"

    @property
    def steps(self) -> list[int]:
        """The target steps: where each round stops and which checkpoints are evaluated."""
        return budget_steps(self.first_step, self.total_steps, self.last_step)


def budget_steps(first: int, total: int, last: int | None = None) -> list[int]:
    """Log-spaced target steps: first, 2 x first, 4 x first, ... while below `last` (default total), then
    `last`."""
    last = total if last is None else last
    if first < 1 or last < first or total < last:
        raise ValueError(f"need 1 <= first step ({first}) <= last step ({last}) <= total steps ({total})")
    steps = []
    step = first
    while step < last:
        steps.append(step)
        step *= 2
    return [*steps, last]


def run_budget(settings: BudgetSettings, runner: Runner = run_command) -> Pipeline:
    """The `msm budget` stages; returns the evaluation's pipeline (the pretraining's with --no-evaluate)."""
    s = settings
    if not (s.pretrain or s.evaluate):
        raise SystemExit("msm budget: --no-pretrain and --no-evaluate leave nothing to do")
    try:
        steps = s.steps
    except ValueError as err:
        raise SystemExit(f"msm budget: {err}") from err
    if s.checkpoint_every < 1 or any(step % s.checkpoint_every for step in (s.first_step, steps[-1])):
        # Every target step must have its own kept checkpoint to be evaluated.
        raise SystemExit(
            f"msm budget: --first-step ({s.first_step}) and the last step ({steps[-1]}) must be "
            f"multiples of --checkpoint-every ({s.checkpoint_every})"
        )
    with ExitStack() as locks:
        if s.pretrain:
            locks.enter_context(run_lock(s.pretrain_dir, "budget"))
        if s.evaluate:
            locks.enter_context(run_lock(Path(s.out), "budget"))
        return _budget(s, runner)


def _budget(s: BudgetSettings, runner: Runner) -> Pipeline:
    """`run_budget` inside its locks."""
    manifest, all_tasks = check_data(Path(s.data), "budget")
    record = {
        "families": list(s.families),
        "total_steps": s.total_steps,
        "target_steps": s.steps,
        "seeds": s.seeds,
        "grid": s.grid,
        "max_per_split": s.max_per_split,
        "data": str(s.data),
        "pretrain_root": str(s.pretrain_dir),
    }

    def pretraining_pipeline() -> Pipeline:
        # Only made when this run pretrains: otherwise its log may be another process's, being written.
        return Pipeline(s.pretrain_dir, StageLog(s.pretrain_dir / PRETRAIN_LOG, "budget", record), runner)

    if not s.evaluate:
        pre = pretraining_pipeline()
        pretrain_rounds(pre, s, manifest, threading.Event())
        return pre
    p = Pipeline(Path(s.out), StageLog(Path(s.out) / "budget.json", "budget", record), runner)
    tasks = task_set(
        p, tasks=all_tasks, out=Path(s.out) / "tasks", max_per_split=s.max_per_split, seed=s.subset_seed
    )
    evaluation = EvalSettings(s.seeds, s.grid, s.eval_threads, s.max_epochs, s.eval_workers)
    stop = threading.Event()
    failures: list[BaseException] = []
    thread = None
    if s.pretrain:
        pre = pretraining_pipeline()

        def pretraining() -> None:
            try:
                pretrain_rounds(pre, s, manifest, stop)
            except BaseException as err:  # SystemExit of a failed round: re-raised once evaluation ends
                failures.append(err)

        thread = threading.Thread(target=pretraining, name="pretraining")
        thread.start()
    try:
        evaluate_checkpoints(p, s, tasks, evaluation, thread)
    finally:
        stop.set()  # no new round after a failed or interrupted evaluation
        if thread is not None and thread.is_alive():
            print("==> budget: waiting for the pretraining round in progress to end", flush=True)
            thread.join()
    if failures:
        raise failures[0]
    return p


def family_spec(s: BudgetSettings, family: str, manifest: Path, target: int) -> PretrainSpec:
    """The round of `family`'s run that stops at `target`, its schedule planned for `total_steps`."""
    return PretrainSpec(
        family,
        s.total_steps,
        manifest,
        s.pretrain_dir / family,
        checkpoint_every=s.checkpoint_every,
        num_workers=s.num_workers,
        extra_args=list(s.fit_args),
        stop_at=target,
        progress_bar=sys.stderr.isatty(),  # a log file gets the run summary, not thousands of bar updates
    )


def pretrain_rounds(p: Pipeline, s: BudgetSettings, manifest: Path, stop: threading.Event) -> None:
    """Each family to each target step in turn (round-robin), until done or `stop` is set."""
    try:
        for target in s.steps:
            for family in s.families:
                if stop.is_set():
                    return
                pretrain_stage(p, family_spec(s, family, manifest, target))
    finally:
        p.log.finish()


def ready_checkpoints(s: BudgetSettings, min_age: float) -> list[tuple[int, str, Path]]:
    """(step, family, checkpoint) of each target checkpoint written at least `min_age` seconds ago."""
    found = []
    for step in s.steps:
        for family in s.families:
            ckpt = step_checkpoint(s.pretrain_dir / family, step)
            if ckpt.is_file() and time.time() - ckpt.stat().st_mtime >= min_age:
                found.append((step, family, ckpt))
    return found


def evaluate_checkpoints(
    p: Pipeline,
    s: BudgetSettings,
    tasks: Path,
    evaluation: EvalSettings,
    pretraining: threading.Thread | None,
) -> None:
    """The twins and log-mel, then every target checkpoint as it appears; the report after each result."""
    for contender in [*(random_twin(f) for f in s.families), LOGMEL]:
        embed_and_evaluate(p, contender, tasks=tasks, settings=evaluation)
    write_report(p, s, tasks, evaluation)
    done: set[tuple[int, str]] = set()
    while True:
        running = pretraining is not None and pretraining.is_alive()
        # Without a pretraining of its own, this run may be evaluating beside another process's.
        min_age = READY_AGE_SECONDS if running or pretraining is None else 0.0
        todo = [c for c in ready_checkpoints(s, min_age) if c[:2] not in done]
        for step, family, ckpt in todo:
            name = FAMILIES[family].paper_name.lower()
            bundle = export_stage(
                p, ckpt=ckpt, out=p.root / "bundles" / f"{name}-t-step{step}", stage=f"export {family} {step}"
            )
            embed_and_evaluate(p, at_step(family, step, bundle), tasks=tasks, settings=evaluation)
            done.add((step, family))
            write_report(p, s, tasks, evaluation)
        if not todo:
            if not running:
                return
            pretraining.join(timeout=s.poll_seconds)


# The report: curves and tables from the result files -------------------------------------------------


def ahead(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether task result `a` is ahead of `b`: their 95 % intervals do not overlap and a's is higher.

    Every primary metric of the tasks here (accuracies, mAP, d') is higher-is-better.
    """
    return a["mean"] - (a.get("ci95") or 0.0) > b["mean"] + (b.get("ci95") or 0.0)


def tasks_ahead(model: dict[str, dict[str, Any]], other: dict[str, dict[str, Any]], tasks: list[str]) -> int:
    """On how many of `tasks` the task results `model` are ahead of `other`."""
    return sum(ahead(model[t], other[t]) for t in tasks)


def first_beating(
    curve: dict[int, dict[str, dict[str, Any]]], other: dict[str, dict[str, Any]], tasks: list[str]
) -> int | None:
    """The first step whose model is ahead of `other` on a majority of `tasks`; None if none is."""
    for step in sorted(curve):
        if 2 * tasks_ahead(curve[step], other, tasks) > len(tasks):
            return step
    return None


def pretraining_seconds(attempts: list[dict[str, Any]], step: int) -> tuple[float, bool] | None:
    """Wall time of pretraining to `step` from the fits' rounds, and whether part of it is estimated.

    Steps no round covers (a fit without logs) are counted at the mean seconds per step of the others.
    None without any round.
    """
    rounds = [a for a in attempts if a.get("to_step", 0) > a.get("from_step", 0)]
    trained = sum(a["to_step"] - a["from_step"] for a in rounds)
    if not trained:
        return None
    seconds, covered = 0.0, 0
    for a in rounds:
        overlap = max(0, min(a["to_step"], step) - a["from_step"])
        seconds += a["seconds"] * overlap / (a["to_step"] - a["from_step"])
        covered += overlap
    missing = max(0, step - covered)
    seconds += missing * sum(a["seconds"] for a in rounds) / trained
    return seconds, missing > 0


def fit_rounds(root: Path) -> list[dict[str, Any]]:
    """Each `msm fit` of a run folder, from its Lightning logs: the steps it went from and to, its seconds.

    A fit's wall time runs from its saved config (written as training starts) to the last write of its
    metrics (at the end), so fits run by any means count, not only this pipeline's rounds; the few seconds
    before training starts are left out.
    """
    versions = [v for v in (root / "logs").glob("version_*") if v.name[len("version_") :].isdigit()]
    rounds: list[dict[str, Any]] = []
    done = 0
    for version in sorted(versions, key=lambda v: int(v.name[len("version_") :])):
        config, metrics = version / "config.yaml", version / "metrics.csv"
        if not (config.is_file() and metrics.is_file()):
            continue
        with metrics.open() as f:
            steps = [int(row["step"]) for row in csv.DictReader(f) if row.get("step")]
        if not steps:
            continue
        # Logged steps count from 0 and each fit logs every few steps; a fit resumed from an earlier
        # checkpoint than the last step logged (after a crash) starts before `done`.
        start, end = min(done, min(steps)), max(steps) + 1
        seconds = metrics.stat().st_mtime - config.stat().st_mtime
        rounds.append({"from_step": start, "to_step": end, "seconds": max(0.0, seconds)})
        done = end
    return rounds


def trained_to(root: Path) -> int:
    """The latest step with a kept checkpoint in a pretraining run folder (0 without one)."""
    steps = [int(c.stem[4:]) for c in (root / "checkpoints").glob("step*.ckpt") if c.stem[4:].isdigit()]
    return max(steps, default=0)


@dataclass
class BudgetData:
    """The complete results of a budget run, by model, and s(m) over all of them."""

    comparison: Any  # msm_lightning.evaluation.score.Comparison
    curves: dict[str, dict[int, str]]  # family -> step -> model name, for the evaluated steps

    @property
    def tasks(self) -> list[str]:
        """The tasks every model has."""
        return self.comparison.tasks


def step_model(family: str, step: int) -> Contender:
    """The contender of `family`'s checkpoint at `step`, for its name and folders (not for embedding)."""
    return at_step(family, step, Path())


def collect(
    results: Path, families: list[str], steps: list[int], complete: set[str] | None = None
) -> BudgetData | None:
    """The result JSONs in `results` of the twins, log-mel and each family's steps (those in `complete`,
    when given); None while there is none."""
    from msm_lightning.evaluation.score import compare, load_results

    names = [random_twin(f).name for f in families] + [LOGMEL.name]
    curves: dict[str, dict[int, str]] = {f: {} for f in families}
    for family in families:
        for step in steps:
            name = step_model(family, step).name
            curves[family][step] = name
            names.append(name)
    paths = [results / f"{n}.json" for n in names if complete is None or n in complete]
    paths = [path for path in paths if path.is_file()]
    if not paths:
        return None
    comparison = compare(load_results(paths))
    curves = {f: {st: n for st, n in c.items() if n in comparison.models} for f, c in curves.items()}
    return BudgetData(comparison, curves)


def budget_table(
    data: BudgetData, families: list[str], pretrain_dir: Path, total_steps: int, seeds: int
) -> str:
    """Markdown: per family the first step ahead of its twin and of log-mel, then the counts per step."""
    c, tasks = data.comparison, data.tasks
    logmel = c.scores.get(LOGMEL.name)
    majority = len(tasks) // 2 + 1

    def wall(family: str, step: int) -> str:
        measured = pretraining_seconds(fit_rounds(pretrain_dir / family), step)
        if measured is None:
            return "-"
        seconds, estimated = measured
        return ("≈ " if estimated else "") + fmt_seconds(seconds)

    def steps(family: str, step: int) -> str:
        took = wall(family, step)
        return f"{step} steps" + (f" ({took})" if took != "-" else "")

    def when(family: str, other: dict[str, dict[str, Any]] | None) -> str:
        curve = {st: c.scores[name] for st, name in data.curves[family].items()}
        if other is None or not curve:
            return "not evaluated yet"
        step = first_beating(curve, other, tasks)
        if step is None:
            return f"not within {steps(family, max(curve))}"
        return steps(family, step)

    lines = [
        f"| model | ahead of its random twin | ahead of log-mel | pretrained so far (of {total_steps}) |",
        "|---|---|---|---|",
    ]
    for family in families:
        name = f"{FAMILIES[family].paper_name}-T"
        twin = c.scores.get(random_twin(family).name)
        done = steps(family, trained_to(pretrain_dir / family))
        lines.append(f"| {name} | {when(family, twin)} | {when(family, logmel)} | {done} |")
    lines += [
        "",
        f"Ahead: on at least {majority} of the {len(tasks)} tasks the model's 95 % interval over {seeds} "
        "seeds lies above the other's (intervals do not overlap). Wall time: pretraining to that step "
        "on this machine, summed over the fits in the run folder's Lightning logs (≈: partly estimated, "
        "for steps of fits without logs).",
        "",
        "| model | step | pretraining wall time | tasks ahead / behind its twin "
        "| tasks ahead / behind log-mel | s(m) |",
        "|---|---:|---:|---|---|---|",
    ]
    for family in families:
        twin = c.scores.get(random_twin(family).name)
        for step, name in sorted(data.curves[family].items()):
            model = c.scores[name]
            cells = []
            for other in (twin, logmel):
                if other is None:
                    cells.append("-")
                else:
                    cells.append(f"{tasks_ahead(model, other, tasks)} / {tasks_ahead(other, model, tasks)}")
            s_text = f"{c.s[name]:.1f}" + (f" ± {c.s_ci[name]:.1f}" if c.s_ci[name] is not None else "")
            lines.append(f"| {name} | {step} | {wall(family, step)} | {cells[0]} | {cells[1]} | {s_text} |")
    return "\n".join(lines) + "\n"


def plot_curves(data: BudgetData, families: list[str], steps: list[int], path: Path) -> None:
    """Per task primary score and s(m) against steps (log axis); twins dashed, log-mel dotted."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    c = data.comparison
    panels = [*c.tasks, "s(m)"]
    cols = 4
    rows = math.ceil((len(panels) + 1) / cols)  # one more panel holds the legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    flat = axes.ravel()

    def value(model: str, panel: str) -> tuple[float, float]:
        if panel == "s(m)":
            return c.s[model], c.s_ci[model] or 0.0
        entry = c.scores[model][panel]
        scale = 100.0 if c.metrics[panel] in PERCENT_METRICS else 1.0
        return entry["mean"] * scale, (entry.get("ci95") or 0.0) * scale

    for ax, panel in zip(flat, panels, strict=False):
        for i, family in enumerate(families):
            colour = f"C{i}"
            curve = sorted(data.curves[family].items())
            if curve:
                ys = [value(name, panel) for _, name in curve]
                ax.errorbar(
                    [st for st, _ in curve],
                    [y for y, _ in ys],
                    yerr=[e for _, e in ys],
                    color=colour,
                    marker="o",
                    markersize=3,
                    capsize=2,
                    label=f"{FAMILIES[family].paper_name}-T",
                )
            twin = random_twin(family).name
            if twin in c.models:
                y, e = value(twin, panel)
                ax.axhline(y, color=colour, linestyle="--", linewidth=1, label=twin)
                ax.axhspan(y - e, y + e, color=colour, alpha=0.08, linewidth=0)
        if LOGMEL.name in c.models:
            y, e = value(LOGMEL.name, panel)
            ax.axhline(y, color="black", linestyle=":", linewidth=1.2, label=LOGMEL.name)
            ax.axhspan(y - e, y + e, color="black", alpha=0.06, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlim(steps[0] / 1.4, steps[-1] * 1.4)
        ax.set_xticks(steps)
        ax.set_xticklabels([str(st) for st in steps], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel("pretraining steps", fontsize=8)
        if panel == "s(m)":
            ax.set_title(f"s(m) over the {len(c.models)} models", fontsize=9)
        else:
            scale = " x100" if c.metrics[panel] in PERCENT_METRICS else ""
            ax.set_title(f"{c.task_names[panel]} ({c.metrics[panel]}{scale})", fontsize=9)
        ax.tick_params(labelsize=7)
    legend_ax = flat[len(panels)]
    handles, labels = flat[len(panels) - 1].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", fontsize=8, frameon=False)
    for ax in flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Score against pretraining steps (95 % intervals over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(p: Pipeline, s: BudgetSettings, tasks: Path, evaluation: EvalSettings) -> None:
    """Curves, budget table and score table of every up-to-date result so far (a few seconds)."""
    from msm_lightning.evaluation.score import markdown

    names = task_names(tasks)
    families = list(s.families)
    contenders: list[Contender] = [*(random_twin(f) for f in families), LOGMEL]
    contenders += [step_model(f, st) for st in s.steps for f in families]
    complete = set()
    for contender in contenders:
        folder = contender.folder(p.root / "emb")
        result = p.root / "results" / f"{contender.name}.json"
        if set(names) <= finished_tasks(result, folder, names, evaluation):
            complete.add(contender.name)
    data = collect(p.root / "results", families, s.steps, complete)
    if data is None:
        return
    table = budget_table(data, families, s.pretrain_dir, s.total_steps, s.seeds)
    atomic_write_text(p.root / TABLE_FILE, table)
    atomic_write_text(p.root / "scores.md", markdown(data.comparison))
    written = [p.root / TABLE_FILE, p.root / "scores.md"]
    try:
        plot_curves(data, families, s.steps, p.root / CURVES_FILE)
        written.append(p.root / CURVES_FILE)
    except ModuleNotFoundError:
        print("msm budget: matplotlib is not installed, no curves (pip install matplotlib)", file=sys.stderr)
    print(f"==> report: {', '.join(map(str, written))}\n{table}", flush=True)
