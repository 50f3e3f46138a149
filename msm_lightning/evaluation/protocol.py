"""`msm evaluate`: hear-eval-kit's downstream protocol for scene tasks, on Lightning 2 and torch >= 2.6.

For each task folder (heareval layout) and each seed: train an MLP probe for every grid point on the first
data split, pick the point with the best primary validation score, train it on the other splits (the k-fold
rotations), score every split's test set and average over splits. Seeds repeat the whole protocol; the
result is the mean over seeds with a 95% t interval. One JSON and one Markdown table per model.

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
- Metrics are computed in numpy (no scikit-learn); values equal scikit-learn's. mAP gives a class without
  positives an AP of 0 (current scikit-learn; older versions made the whole mAP NaN).
- A lone last example in a training epoch (n mod batch size = 1) is left out of that epoch: BatchNorm
  cannot train on a batch of one (heareval crashes there).
- Only scene tasks; event tasks (sed_eval metrics) are skipped with a warning.
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
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msm_lightning import __version__
from msm_lightning.evaluation.metrics import PERCENT_METRICS, mean_ci95, metric
from msm_lightning.evaluation.probe import ProbeConfig, predict, train_probe
from msm_lightning.evaluation.taskdata import (
    EmbeddingFormatError,
    TaskData,
    find_tasks,
    load_task,
    read_metadata,
)

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
    """The options a result records as its protocol: grid, points per seed, epoch cap, scaling, device."""

    grid: str = "restricted"  # a key of GRIDS
    grid_points: int = 8
    max_epochs: int | None = None  # overrides the grid's (and the task's) epochs when set
    standardize: bool = False
    device: str = "cpu"  # Lightning accelerator

    def record(self, grid_values: dict[str, list[Any]]) -> dict[str, Any]:
        """The `protocol` entry of a task's result, with the task's own grid values."""
        return {
            "grid": self.grid,
            "grid_values": grid_values,
            "grid_points": self.grid_points,
            "standardize": self.standardize,
            "device": self.device,
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


def standardizer(x_train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """z-scoring with the training rows' mean and standard deviation (constant columns left unscaled)."""
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return lambda x: (x - mean) / std


def score_all(task: TaskData, probs: np.ndarray, targets: torch.Tensor) -> dict[str, float]:
    """Every metric of the task on one test split."""
    y = targets.numpy()
    return {name: metric(name)(probs, y) for name in task.metrics}


def run_seed(
    task: TaskData,
    grid: dict[str, list[Any]],
    seed: int,
    grid_points: int,
    accelerator: str = "cpu",
    standardize: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
) -> dict[str, Any]:
    """One seed of the protocol: grid search on the first split, best point on every split, test scores."""
    start = time.time()
    configs = grid_configs(grid, seed, grid_points)
    primary = task.metrics[0]
    monitor = primary if task.metadata.get("use_scoring_for_early_stopping", True) else None
    shown = varying(grid)

    def fit(config: ProbeConfig, j: int, split: dict[str, list[str]], tag: str):
        train, valid, test = (task.gather(split[k]) for k in ("train", "valid", "test"))
        if standardize:
            z = standardizer(train[0])
            train, valid, test = ((z(x), y) for x, y in (train, valid, test))
        logger: Any = False
        if log_dir is not None:
            from lightning.pytorch.loggers import CSVLogger

            logger = CSVLogger(log_dir, name=task.name, version=f"seed{seed}-split{j}-{tag}")
        result = train_probe(
            train, valid, task.prediction_type, config, monitor, 1000 * seed + j, accelerator, logger
        )
        return result, score_all(task, predict(result.module, test[0]), test[1])

    splits = task.data_splits()
    grid_runs = []
    for i, config in enumerate(configs):
        result, test_scores = fit(config, 0, splits[0], f"config{i}")
        grid_runs.append((result, test_scores))
        echo(
            f"[{task.name}] seed {seed} config {i + 1}/{len(configs)} ({describe(config, shown)}): "
            f"valid {monitor or 'loss'} {result.val_score:.4f} at epoch {result.best_epoch}/"
            f"{result.epochs_trained} ({result.time_s:.1f}s)"
        )

    def rank(i: int) -> tuple[bool, float]:
        score = grid_runs[i][0].val_score
        return math.isnan(score), -score if monitor else score

    # min() keeps the first of equal ranks: a tie goes to the earlier grid point, as in heareval's sort.
    best_i = min(range(len(configs)), key=rank)
    best = configs[best_i]
    split_runs = [grid_runs[best_i]]
    for j, split in enumerate(splits[1:], start=1):
        split_runs.append(fit(best, j, split, "best"))
    split_records = []
    for split, (result, test_scores) in zip(splits, split_runs, strict=True):
        split_records.append(
            {
                **split,
                "val_score": result.val_score,
                "best_epoch": result.best_epoch,
                "epochs_trained": result.epochs_trained,
                "time_s": round(result.time_s, 3),
                "test_scores": test_scores,
            }
        )
        test_name = "|".join(split["test"])
        echo(f"[{task.name}] seed {seed} tested on {test_name}: {primary} {test_scores[primary]:.4f}")
    return {
        "seed": seed,
        "hparams": asdict(best),
        "grid": [
            {
                "hparams": asdict(c),
                "val_score": r.val_score,
                "best_epoch": r.best_epoch,
                "epochs_trained": r.epochs_trained,
            }
            for c, (r, _) in zip(configs, grid_runs, strict=True)
        ],
        "splits": split_records,
        "test": {m: float(np.mean([s["test_scores"][m] for s in split_records])) for m in task.metrics},
        "wall_time_s": round(time.time() - start, 3),
    }


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
        "n_splits": len(task.data_splits()),
        "embedding_dim": task.dim,
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
    standardize: bool = False,
    log_dir: Path | None = None,
    echo: Echo = print,
    protocol: dict[str, Any] | None = None,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """The protocol for every seed on one loaded task, summarised; seeds run in `pool` when given."""
    for name in task.metrics:
        try:
            metric(name)  # fail before training on an unsupported metric
        except KeyError as err:
            raise EmbeddingFormatError(f"{task.path / 'task_metadata.json'}: {err.args[0]}") from err
    # A partial of a module function pickles, so the same callable serves the pool's workers.
    one_seed = functools.partial(
        run_seed,
        task,
        grid,
        grid_points=grid_points,
        accelerator=accelerator,
        standardize=standardize,
        log_dir=log_dir,
        echo=echo,
    )
    runs = list(pool.map(one_seed, seeds)) if pool is not None else [one_seed(s) for s in seeds]
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
    scale = 100.0 if name in PERCENT_METRICS else 1.0
    digits = 1 if name in PERCENT_METRICS else 3
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


def write_results(out_dir: Path, model: str, embedding_dir: Path, tasks: dict[str, dict]) -> Path:
    """Merge the tasks into `out_dir/<model>.json` (earlier tasks kept) and rewrite `<model>.md`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.json"
    result = {"format": RESULT_FORMAT, "model": model, "tasks": {}}
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("format") == RESULT_FORMAT:
            result["tasks"] = previous.get("tasks", {})
    result.update(
        {
            "embedding_dir": str(embedding_dir),
            "msm_lightning": __version__,
            "updated": datetime.datetime.now().isoformat(timespec="seconds"),
        }
    )
    result["tasks"].update(tasks)
    path.write_text(json.dumps(result, indent=1))
    (out_dir / f"{model}.md").write_text(markdown(result))
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
) -> tuple[Path | None, dict[str, Any]]:
    """Evaluate every scene task of an embedding folder, saving `out/<model>.json` after each task.

    `tasks` picks task folder names or task_name values (an event task among them is an error; without
    `tasks` event tasks are skipped with a warning). Returns the result file (None when no task was
    evaluated) and the evaluated tasks' entries; raises EmbeddingFormatError on malformed input.
    """
    path = None
    results: dict[str, Any] = {}
    for task_dir in find_tasks(embeddings, tasks):
        metadata = read_metadata(task_dir)
        if metadata["embedding_type"] != "scene":
            if tasks:
                raise EmbeddingFormatError(f"{task_dir}: event tasks are not supported")
            kind = metadata["embedding_type"]
            print(f"msm evaluate: skipping {task_dir.name} (embedding_type {kind!r})", file=sys.stderr)
            continue
        task = load_task(task_dir)
        grid = task_grid(GRIDS[protocol.grid], task.metadata, protocol.max_epochs)
        echo(
            f"[{task.name}] {task.prediction_type}, {len(task.data_splits())} split(s), dim {task.dim}, "
            f"{task.n_labels} labels, primary {task.metrics[0]}"
        )
        results[task.name] = evaluate_task(
            task,
            grid=grid,
            seeds=seeds,
            grid_points=protocol.grid_points,
            accelerator=protocol.device,
            standardize=protocol.standardize,
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
    p.add_argument("--device", default="cpu", help="Lightning accelerator: cpu, cuda, mps or auto")
    p.add_argument("--standardize", action="store_true", help="z-score embeddings with training statistics")
    p.add_argument("--csv-logs", action="store_true", help="write Lightning CSV logs under RESULTS_DIR/logs")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is best on a busy machine)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes that run seeds in parallel, each with --threads threads (default 1); results are "
        "the same as with one",
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
    protocol = ProtocolSettings(args.grid, args.grid_points, args.max_epochs, args.standardize, args.device)
    with seed_pool(min(args.workers, len(seeds)), args.threads) as pool:
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
            )
        except EmbeddingFormatError as err:
            raise SystemExit(f"msm evaluate: {err}") from err
    if not results:
        raise SystemExit(f"msm evaluate: no scene tasks in {emb}")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    print(markdown(json.loads(path.read_text())))
