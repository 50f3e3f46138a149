"""`msm evaluate`: hear-eval-kit's downstream protocol for scene tasks, on Lightning 2 and torch >= 2.6.

For each task folder (heareval layout) and each seed: train an MLP probe for every grid point on the first
data split, pick the point with the best primary validation score, train it on the other splits (the k-fold
rotations), score every split's test set and average over splits. Seeds repeat the whole protocol; the
result is the mean over seeds with a 95% t interval. One JSON and one Markdown table per model.

The probes of one step (every seed's grid points on the first split, then every seed's chosen point on
each other split) are independent runs on the same data, and by default they train together as one
batched model (`--engine batched`, `batched_probe.py`, a plain PyTorch loop). On the CPU that reproduces
one Lightning run per probe (`--engine single`, `probe.train_probe`) bit for bit: same seeds, shuffling,
initialisation, dropout masks, early stopping and kept states, hence the same scores.

Differences from hear-eval-kit
------------------------------
- Training data is shuffled every epoch. heareval intends to (`shuffle=True` when the split is "train")
  but compares a list of split names with a string, so it never shuffles.
- `--seeds N` repeats the whole protocol (grid sampling, initialisation, dropout, shuffling) with seeds
  `first_seed .. first_seed+N-1`; heareval seeds everything once with 42. The run on data split j of seed s
  uses torch seed 1000*s + j, the same for every grid point (common random numbers).
- The `hear` grid is heareval's PARAM_GRID and, like heareval, `--grid-points 8` of its 16 points are
  drawn at random per seed; the draw shuffles the same ParameterGrid order with `random.Random(seed)`, so
  seed 42 picks the points heareval picks. `restricted` is the papers' grid (2 points).
- Validation also runs after the last epoch when the schedule ends between checks (500 epochs with a
  check every 3: heareval never scores its last two epochs).
- The best validation state is kept in memory (no checkpoint files); the test score uses it, as heareval
  tests its best checkpoint. A NaN validation score never counts as an improvement and does not stop
  training early.
- mAP gives a class without positives an AP of 0: the metrics make heareval's scikit-learn calls, and
  scikit-learn >= 1.1 scores such a class 0 (heareval's pinned version made the whole mAP NaN).
- A lone last example in a training epoch (n mod batch size = 1) is left out of that epoch: BatchNorm
  cannot train on a batch of one (heareval crashes there).
- Event tasks follow heareval's timestamp protocol in `event_protocol.py` (its own differences there).
- `--standardize` (off by default) z-scores embeddings with statistics of the training split. heareval
  does not standardise: its `embedding_norm` is Identity and is not even applied in `forward`.
- Lightning's deterministic mode is not forced (heareval sets it); CPU runs are reproducible anyway.
- Results go to RESULTS_DIR (per model: JSON and Markdown), not into the embedding folders; test
  predictions are not pickled. Per seed the score is the mean over folds; heareval reports one run's
  fold mean and fold standard deviation.

Kept from hear-eval-kit: layer order Linear -> BatchNorm -> Dropout -> ReLU, xavier gain 1 after the input
and sqrt(2) after a ReLU, Adam without weight decay, batch size 1024, 500 epochs, a check every 3 epochs,
patience 20 checks (Lightning counts checks, not epochs), strict improvement, ties in the grid resolved
in favour of the earlier point, `use_scoring_for_early_stopping: false` in task metadata (selection on
validation loss), `evaluation_params.task_specific_param_grid` overrides, the k-fold rotation (test fold
i, validation fold i+1, train on the rest), probabilities (softmax/sigmoid) as metric inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
import math
import multiprocessing
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msm_lightning import __version__
from msm_lightning.evaluation.engines import ENGINES, ProbeJob, ProbeOutcome, Split, train_jobs
from msm_lightning.evaluation.events import EVENT_METRICS
from msm_lightning.evaluation.metrics import PERCENT_METRICS, mean_ci95, metric
from msm_lightning.evaluation.probe import ProbeConfig
from msm_lightning.evaluation.taskdata import (
    EmbeddingFormatError,
    TaskData,
    find_tasks,
    load_task,
    read_metadata,
    selection_metric,
)
from msm_lightning.safe_io import UnsafeFileError, atomic_write_json, atomic_write_text, read_json_file

# heareval's PARAM_GRID (hear-eval-kit 2021.1.3) minus its single-valued torch objects (Adam, Identity
# embedding norm, norm before activation), which are fixed in the probe.
HEAR_GRID: dict[str, list[Any]] = {
    "hidden_layers": [1, 2],
    "hidden_dim": [1024],
    "dropout": [0.1],
    "lr": [3.2e-3, 1e-3, 3.2e-4, 1e-4],
    "patience": [20],
    "max_epochs": [500],
    "check_val_every_n_epoch": [3],
    "batch_size": [1024],
    "hidden_norm": ["batchnorm"],
    "initialization": ["xavier_uniform", "xavier_normal"],
}
# The grid of the SSAM / MW-MAE / AxLSTM papers.
RESTRICTED_GRID: dict[str, list[Any]] = {
    **HEAR_GRID,
    "hidden_layers": [1],
    "dropout": [0.1, 0.25],
    "lr": [1e-4],
    "initialization": ["xavier_normal"],
}
GRIDS = {"hear": HEAR_GRID, "restricted": RESTRICTED_GRID}
RESULT_FORMAT = "msm-evaluate/1"

Echo = Callable[[str], None]


@dataclass(frozen=True)
class ProtocolSettings:
    """The options a result records as its protocol: grid, points per seed, epoch cap, scaling, device,
    and the engine that trained the probes (both engines give the same results)."""

    grid: str = "restricted"  # a key of GRIDS
    grid_points: int = 8
    max_epochs: int | None = None  # overrides the grid's (and the task's) epochs when set
    standardise: bool = False
    device: str = "cpu"  # Lightning accelerator
    engine: str = "batched"  # a key of engines.ENGINES

    def record(self, grid_values: dict[str, list[Any]]) -> dict[str, Any]:
        """The `protocol` entry of a task's result, with the task's own grid values."""
        return {
            "grid": self.grid,
            "grid_values": grid_values,
            "grid_points": self.grid_points,
            "standardize": self.standardise,
            "device": self.device,
            "engine": self.engine,
        }


def task_grid(
    grid: dict[str, list[Any]], metadata: dict[str, Any], max_epochs: int | None
) -> dict[str, list]:
    """The grid with the task's `task_specific_param_grid` applied, then an explicit `--max-epochs`."""
    out = dict(grid)
    known = {f.name for f in fields(ProbeConfig)}
    for key, values in metadata.get("evaluation_params", {}).get("task_specific_param_grid", {}).items():
        if key in known:
            out[key] = list(values)
        else:
            print(f"msm evaluate: ignoring task-specific grid key {key!r}", file=sys.stderr)
    if max_epochs is not None:
        out["max_epochs"] = [max_epochs]
    return out


def grid_configs(grid: dict[str, list[Any]], seed: int, grid_points: int) -> list[ProbeConfig]:
    """`grid_points` configurations drawn like heareval: ParameterGrid order, shuffled, first n."""
    keys = sorted(grid)  # sklearn's ParameterGrid iterates sorted keys, last key fastest
    configs = [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    random.Random(seed).shuffle(configs)
    return [ProbeConfig(**c) for c in configs[:grid_points]]


def varying(grid: dict[str, list[Any]]) -> list[str]:
    """Grid keys with more than one value (the ones worth printing)."""
    return [k for k in sorted(grid) if len(grid[k]) > 1]


def describe(config: ProbeConfig, keys: list[str]) -> str:
    """`key=value` for the given keys (all keys if empty)."""
    values = asdict(config)
    return ", ".join(
        f"{k}={values[k]:g}" if isinstance(values[k], float) else f"{k}={values[k]}"
        for k in (keys or list(values))
    )


def standardiser(x_train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """z-scoring with the training rows' mean and standard deviation (constant columns left unscaled)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return lambda x: (x - mean) / std


def score_all(task: TaskData, probs: np.ndarray, targets: torch.Tensor) -> dict[str, float]:
    """Every metric of the task on one test split."""
    y = targets.numpy()
    return {name: metric(name)(probs, y) for name in task.metrics}


def split_data(task: TaskData, split: dict[str, list[str]], standardise: bool) -> tuple[Split, Split, Split]:
    """A data split's train, valid and test rows, z-scored with training statistics when asked."""
    train, valid, test = (task.gather(split[k]) for k in ("train", "valid", "test"))
    if standardise:
        z = standardiser(train[0])
        train, valid, test = ((z(x), y) for x, y in (train, valid, test))
    return train, valid, test


def best_point(val_scores: Sequence[float], maximise: bool) -> int:
    """Index of the best validation score (NaN last); a tie goes to the earlier point, as in heareval."""

    def rank(i: int) -> tuple[bool, float]:
        score = val_scores[i]
        return math.isnan(score), -score if maximise else score

    return min(range(len(val_scores)), key=rank)  # min() keeps the first of equal ranks


def run_seeds(
    task: TaskData,
    grid: dict[str, list[Any]],
    seeds: list[int],
    grid_points: int,
    accelerator: str = "cpu",
    standardise: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
    engine: str = "batched",
) -> list[dict[str, Any]]:
    """The protocol for some seeds: grid search on the first split, each seed's best point on the others.

    Each step trains all its probes in one `train_jobs` call (one batch with the batched engine): every
    seed's grid points on the first split, then every seed's chosen point on each further split. The
    probe on data split j of seed s has torch seed 1000*s + j.
    """
    configs = {s: grid_configs(grid, s, grid_points) for s in seeds}
    monitor = selection_metric(task.metadata)
    splits = task.data_splits()
    shown = varying(grid)

    def train_step(j: int, jobs: list[ProbeJob]) -> list[tuple[ProbeOutcome, dict[str, float]]]:
        data = split_data(task, splits[j], standardise)
        outcomes = train_jobs(
            jobs,
            data,
            task.prediction_type,
            monitor,
            engine=engine,
            accelerator=accelerator,
            log_dir=log_dir / task.name if log_dir is not None else None,
        )
        return [(o, score_all(task, o.test_probs, data[2][1])) for o in outcomes]

    jobs = [
        ProbeJob(c, 1000 * s, f"seed{s}-split0-config{i}") for s in seeds for i, c in enumerate(configs[s])
    ]
    done = iter(train_step(0, jobs))
    grid_runs = {s: [next(done) for _ in configs[s]] for s in seeds}
    best = {}
    for s in seeds:
        for i, (config, (o, _)) in enumerate(zip(configs[s], grid_runs[s], strict=True)):
            echo(
                f"[{task.name}] seed {s} config {i + 1}/{len(configs[s])} ({describe(config, shown)}): "
                f"valid {monitor or 'loss'} {o.val_score:.4f} at epoch {o.best_epoch}/{o.epochs_trained} "
                f"({o.time_s:.1f}s)"
            )
        best[s] = best_point([o.val_score for o, _ in grid_runs[s]], monitor is not None)
    split_runs = {s: [grid_runs[s][best[s]]] for s in seeds}
    for j in range(1, len(splits)):
        jobs = [ProbeJob(configs[s][best[s]], 1000 * s + j, f"seed{s}-split{j}-best") for s in seeds]
        for s, run in zip(seeds, train_step(j, jobs), strict=True):
            split_runs[s].append(run)
    return [
        seed_record(task, s, configs[s], grid_runs[s], configs[s][best[s]], split_runs[s], echo)
        for s in seeds
    ]


def seed_record(
    task: TaskData,
    seed: int,
    configs: list[ProbeConfig],
    grid_runs: list[tuple[ProbeOutcome, dict[str, float]]],
    best: ProbeConfig,
    split_runs: list[tuple[ProbeOutcome, dict[str, float]]],
    echo: Echo = print,
) -> dict[str, Any]:
    """One seed's entry in a task's `runs`: the grid, the chosen point, per-split and mean test scores."""
    primary = task.metrics[0]
    split_records = []
    for split, (outcome, test_scores) in zip(task.data_splits(), split_runs, strict=True):
        split_records.append(
            {
                **split,
                "val_score": outcome.val_score,
                "best_epoch": outcome.best_epoch,
                "epochs_trained": outcome.epochs_trained,
                "time_s": round(outcome.time_s, 3),
                "test_scores": test_scores,
            }
        )
        test_name = "|".join(split["test"])
        echo(f"[{task.name}] seed {seed} tested on {test_name}: {primary} {test_scores[primary]:.4f}")
    # The first split's run is one of the grid's, so it is counted once.
    seconds = sum(o.time_s for o, _ in grid_runs) + sum(o.time_s for o, _ in split_runs[1:])
    return {
        "seed": seed,
        "hparams": asdict(best),
        "grid": [
            {
                "hparams": asdict(c),
                "val_score": o.val_score,
                "best_epoch": o.best_epoch,
                "epochs_trained": o.epochs_trained,
            }
            for c, (o, _) in zip(configs, grid_runs, strict=True)
        ],
        "splits": split_records,
        "test": {m: float(np.mean([s["test_scores"][m] for s in split_records])) for m in task.metrics},
        "wall_time_s": round(seconds, 3),
    }


def run_seed(
    task: TaskData,
    grid: dict[str, list[Any]],
    seed: int,
    grid_points: int,
    accelerator: str = "cpu",
    standardise: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
    engine: str = "batched",
) -> dict[str, Any]:
    """One seed of the protocol (`run_seeds` for a single seed)."""
    return run_seeds(task, grid, [seed], grid_points, accelerator, standardise, log_dir, echo, engine)[0]


def summarise(task: TaskData, runs: list[dict[str, Any]], protocol: dict[str, Any]) -> dict[str, Any]:
    """A task's entry in the result JSON: per-seed scores, mean and 95% interval, choices, epochs, time."""
    primary = task.metrics[0]
    per_metric = {}
    for name in task.metrics:
        values = [r["test"][name] for r in runs]
        mean, ci = mean_ci95(values)
        per_metric[name] = {"per_seed": values, "mean": mean, "ci95": ci}
    return {
        "task_name": task.metadata.get("task_name", task.name),
        "primary_metric": primary,
        "metrics": task.metrics,
        "prediction_type": task.prediction_type,
        "split_mode": task.metadata["split_mode"],
        "embedding_type": task.metadata["embedding_type"],
        "n_splits": len(task.data_splits()),
        "embedding_dim": task.dim,
        "valid_metric": selection_metric(task.metadata) or "loss",  # what each split's `val_score` is
        "seeds": [r["seed"] for r in runs],
        "test_scores": per_metric[primary]["per_seed"],
        "mean": per_metric[primary]["mean"],
        "ci95": per_metric[primary]["ci95"],
        "test_metrics": per_metric,
        "chosen_hparams": [r["hparams"] for r in runs],
        "best_epochs": [[s["best_epoch"] for s in r["splits"]] for r in runs],
        "wall_time_s": round(sum(r["wall_time_s"] for r in runs), 3),
        "protocol": protocol,
        "runs": runs,
    }


def evaluate_task(
    task: TaskData,
    *,
    grid: dict[str, list[Any]],
    seeds: list[int],
    grid_points: int = 8,
    accelerator: str = "cpu",
    standardise: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
    protocol: dict[str, Any] | None = None,
    pool: Executor | None = None,
    engine: str = "batched",
    workers: int = 1,
) -> dict[str, Any]:
    """The protocol for every seed on one loaded task, summarised.

    With `pool`, the seeds are shared among its `workers` processes: one seed per call with the single
    engine, one contiguous share of the seeds (trained as one batch) per worker with the batched engine.
    """
    for name in task.metrics:
        try:
            metric(name)  # fail before training on an unsupported metric
        except KeyError as err:
            raise EmbeddingFormatError(f"{task.path / 'task_metadata.json'}: {err.args[0]}") from err
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; engines are {list(ENGINES)}")
    # A partial of a module function pickles, so the same callable serves the pool's workers.
    some_seeds = functools.partial(
        run_seeds,
        task,
        grid,
        grid_points=grid_points,
        accelerator=accelerator,
        standardise=standardise,
        log_dir=log_dir,
        echo=echo,
        engine=engine,
    )
    if engine == "single":
        shares = [[s] for s in seeds]
    else:
        n = min(len(seeds), workers if pool is not None else 1)
        shares = [seeds[k * len(seeds) // n : (k + 1) * len(seeds) // n] for k in range(n)]
    parts = pool.map(some_seeds, shares) if pool is not None else map(some_seeds, shares)
    runs = [run for part in parts for run in part]
    return summarise(task, runs, protocol or {})


def print_line(text: str) -> None:
    """Progress echo that workers can use too (a lambda cannot be sent to a process)."""
    print(text, flush=True)


def no_echo(text: str) -> None:
    """Progress echo of `--quiet`."""


def _init_worker(threads: int | None) -> None:
    """Each seed worker gets its own torch thread count, so workers do not oversubscribe the cores."""
    torch.set_num_threads(threads or 1)


@contextlib.contextmanager
def seed_pool(workers: int, threads: int | None) -> Iterator[Executor | None]:
    """Worker processes for seeds (None for one worker): seeds are independent runs with their own seeds."""
    if workers <= 1:
        yield None
        return
    # spawn, not fork: forking a process whose OpenMP threads have already run can deadlock.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        yield pool


def fmt_score(name: str, mean: float, ci: float | None) -> str:
    """`93.9 ± 0.7` (fractions shown x100), or the bare mean without an interval."""
    percent = name in PERCENT_METRICS or name in EVENT_METRICS  # F-measures and error rates are fractions
    scale = 100.0 if percent else 1.0
    digits = 1 if percent else 3
    text = f"{mean * scale:.{digits}f}"
    return text if ci is None else f"{text} ± {ci * scale:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """A model's results as a Markdown table, one row per task."""
    lines = [
        f"## {result['model']}",
        "",
        "| task | metric | test (mean ± 95% CI) | seeds | chosen hyper-parameters | best epoch (mean) "
        "| time |",
        "|---|---|---|---|---|---|---|",
    ]
    for _, t in sorted(result["tasks"].items()):
        grid = t["protocol"].get("grid_values", {})
        keys = varying(grid) if grid else []
        chosen = Counter(describe(ProbeConfig(**h), keys) or "-" for h in t["chosen_hparams"])
        n = len(t["seeds"])
        hp = "; ".join(f"{c} ({k}/{n})" if len(chosen) > 1 else c for c, k in chosen.most_common())
        epochs = np.mean([e for per_seed in t["best_epochs"] for e in per_seed])
        score = fmt_score(t["primary_metric"], t["mean"], t["ci95"])
        secs = t["wall_time_s"]
        took = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} min"
        lines.append(
            f"| {t['task_name']} | {t['primary_metric']} | {score} | {n} | {hp} | {epochs:.0f} | {took} |"
        )
    return "\n".join(lines) + "\n"


def read_results(path: Path) -> dict[str, Any] | None:
    """An existing results file (None if there is none); one that does not parse is an UnsafeFileError."""
    if not path.exists():
        return None
    previous = read_json_file(path, "msm evaluate results file")
    if not isinstance(previous, dict) or not isinstance(previous.get("tasks", {}), dict):
        raise UnsafeFileError(f"msm evaluate results file '{path}' is not a results object with `tasks`")
    return previous


def write_results(out_dir: Path, model: str, embedding_dir: Path, tasks: dict[str, dict]) -> Path:
    """Merge the tasks into `out_dir/<model>.json` (earlier tasks kept) and rewrite `<model>.md`.

    Both files are replaced atomically, so an interrupted run leaves the previous results, never half.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.json"
    result = {"format": RESULT_FORMAT, "model": model, "tasks": {}}
    previous = read_results(path)
    if previous is not None and previous.get("format") == RESULT_FORMAT:
        result["tasks"] = previous.get("tasks", {})
    result.update(
        {
            "embedding_dir": str(embedding_dir),
            "msm_lightning": __version__,
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        }
    )
    result["tasks"].update(tasks)
    atomic_write_json(path, result, indent=1)
    atomic_write_text(out_dir / f"{model}.md", markdown(result))
    return path


def evaluate_all(
    embeddings: Path,
    out: Path,
    *,
    model: str,
    seeds: list[int],
    protocol: ProtocolSettings = ProtocolSettings(),
    tasks: list[str] | None = None,
    csv_logs: bool = False,
    echo: Echo = print,
    pool: Executor | None = None,
    workers: int = 1,
) -> tuple[Path | None, dict[str, Any]]:
    """Evaluate every scene and event task of an embedding folder, saving `out/<model>.json` after each.

    `tasks` picks task folder names or task_name values (a task of another embedding_type among them is
    an error; without `tasks` such tasks are skipped with a warning). Returns the result file (None when
    no task was evaluated) and the evaluated tasks' entries; raises EmbeddingFormatError on malformed input.
    `workers` is the number of processes in `pool`.
    """
    path = None
    results: dict[str, Any] = {}
    read_results(out / f"{model}.json")  # a corrupt results file stops the run before any training
    for task_dir in find_tasks(embeddings, tasks):
        metadata = read_metadata(task_dir)
        if metadata["embedding_type"] not in ("scene", "event"):
            kind = metadata["embedding_type"]
            if tasks:
                raise EmbeddingFormatError(f"{task_dir}: unknown embedding_type {kind!r}")
            print(f"msm evaluate: skipping {task_dir.name} (embedding_type {kind!r})", file=sys.stderr)
            continue
        task = load_task(task_dir)
        grid = task_grid(GRIDS[protocol.grid], task.metadata, protocol.max_epochs)
        echo(
            f"[{task.name}] {task.prediction_type}, {len(task.data_splits())} split(s), dim {task.dim}, "
            f"{task.n_labels} labels, primary {task.metrics[0]}"
        )
        evaluate: Callable[..., dict[str, Any]] = functools.partial(
            evaluate_task, engine=protocol.engine, workers=workers
        )
        if task.embedding_type == "event":
            # Imported here: the event protocol builds on this module's helpers.
            from msm_lightning.evaluation.event_protocol import evaluate_event_task as evaluate
        results[task.name] = evaluate(
            task,
            grid=grid,
            seeds=seeds,
            grid_points=protocol.grid_points,
            accelerator=protocol.device,
            standardise=protocol.standardise,
            log_dir=out / "logs" / model if csv_logs else None,
            echo=echo,
            protocol=protocol.record(grid),
            pool=pool,
        )
        t = results[task.name]
        echo(f"[{task.name}] {t['primary_metric']} {fmt_score(t['primary_metric'], t['mean'], t['ci95'])}")
        # Written after every task so that a long run keeps what it has finished.
        path = write_results(out, model, embeddings, {task.name: results[task.name]})
    return path, results


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `msm evaluate`."""
    p = argparse.ArgumentParser(
        prog="msm evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", type=Path, help="EMB_DIR/<module>: a folder per task (or one task folder)")
    p.add_argument("--tasks", nargs="+", help="task folder names or task_name values (default: all)")
    p.add_argument(
        "--grid",
        choices=sorted(GRIDS),
        default="restricted",
        help="restricted: the papers' 2 points (default); hear: heareval's PARAM_GRID",
    )
    p.add_argument("--grid-points", type=int, default=8, help="grid points drawn per seed (heareval: 8)")
    p.add_argument("--seeds", type=int, default=10, help="repetitions of the protocol (default 10)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="RESULTS_DIR for <model>.json and <model>.md")
    p.add_argument("--name", help="model name in the results (default: the embedding folder's name)")
    p.add_argument("--max-epochs", type=int, help="override the grid's 500 epochs (and task-specific values)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (Lightning's accelerator names)")
    p.add_argument(
        "--standardise",
        "--standardize",
        dest="standardise",
        action="store_true",
        help="z-score embeddings with training statistics",
    )
    p.add_argument(
        "--csv-logs",
        action="store_true",
        help="a metrics.csv per probe under RESULTS_DIR/logs (Lightning's CSV logs with --engine single)",
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is best on a busy machine)"
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="batched",
        help="batched (default): the probes of each protocol step (all seeds and grid points) trained "
        "together as one batched model; single: one Lightning run per probe, the reference it reproduces",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that share the seeds, each with --threads threads (default 1); results are the "
        "same as with one. With the batched engine one process with all threads is usually as fast",
    )
    p.add_argument("--quiet", action="store_true", help="no per-config progress lines")
    return p


def main(argv: list[str]) -> None:
    """Entry point of `msm evaluate`."""
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.grid_points < 1 or args.workers < 1:
        raise SystemExit("msm evaluate: --seeds, --grid-points and --workers must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    emb = args.embeddings
    model = args.name or (emb.parent.name if (emb / "task_metadata.json").is_file() else emb.name)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    protocol = ProtocolSettings(
        args.grid, args.grid_points, args.max_epochs, args.standardise, args.device, args.engine
    )
    workers = min(args.workers, len(seeds))
    with seed_pool(workers, args.threads) as pool:
        try:
            path, results = evaluate_all(
                emb,
                args.out,
                model=model,
                seeds=seeds,
                protocol=protocol,
                tasks=args.tasks,
                csv_logs=args.csv_logs,
                echo=no_echo if args.quiet else print_line,
                pool=pool,
                workers=workers,
            )
        except (EmbeddingFormatError, UnsafeFileError) as err:
            raise SystemExit(f"msm evaluate: {err}") from err
    if not results:
        raise SystemExit(f"msm evaluate: no scene or event tasks in {emb}")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(markdown(json.loads(path.read_text())))
